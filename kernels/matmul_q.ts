/**
 * Prefill matrix-matrix product over packed low-bit weights: for each of the step's tokens t,
 * epilogue(t, Ŵ · x[t]). The same generator as the decode kernel (matvec_q.ts) with `tt` tokens
 * per workgroup taken from the step uniform (workgroup z covers tokens z·tt .. z·tt + tt − 1,
 * those ≥ step.ntok are skipped): each weight block loaded is used for tt tokens, each x block
 * for the thread's `upt` units.
 */
import { grid } from "./common.ts";
import { type Epilogue, epilogueBindings, isPair, unitCount } from "./epilogue.ts";
import type { Gpu } from "./gpu.ts";
import type { Bits } from "../runtime/format/qtensor.ts";
import { type QCore, qCoreKey, qCoreWgsl, type QWeights } from "./matvec_q.ts";

export interface MatmulQVariant {
  bits: Bits;
  /** Group size: 32, 64, 128, or 0 (or ≥ K) for one group per row. */
  groupSize: number;
  rows: number;
  K: number; // a multiple of 4
  /**
   * Fuse x ← x · g / rms(x) per token (RMSNorm with weight g) before the product (default none),
   * as the decode kernels do: the step then needs no separate norm pass.
   */
  norm?: { eps: number } | null;
  epilogue: Epilogue;
  /** Thread shape (defaults: tpr 1, upt 1, upw 64, tt 8, as matmul.ts); see matmulQShape. */
  tpr?: number;
  upw?: number;
  upt?: number;
  /** Tokens per workgroup (1..MAX_Q_BATCH). */
  tt?: number;
  /** Where qweight and sz live (default "buffer"; "texture": see createQTextures). */
  weights?: QWeights;
  /**
   * Bind x as a uniform buffer of tt tokens (default false): needs tt·K·4 ≤ 65536 and steps of
   * at most tt tokens (one token group), as in a batched decode step.
   */
  xUniform?: boolean;
}

export interface MatmulQShape {
  tpr: number;
  upw: number;
  upt: number;
  tt: number;
}

function core(v: MatmulQVariant): QCore {
  return {
    bits: v.bits,
    groupSize: v.groupSize,
    rows: v.rows,
    K: v.K,
    norm: v.norm ?? null,
    epilogue: v.epilogue,
    tpr: v.tpr ?? 1,
    upw: v.upw ?? 64,
    upt: v.upt ?? 1,
    batch: v.tt ?? 8,
    dynamicTokens: true,
    weights: v.weights ?? "buffer",
    xUniform: v.xUniform ?? false,
  };
}

/** Buffer names in binding order. */
export function matmulQBindings(v: MatmulQVariant): string[] {
  const e = epilogueBindings(v.epilogue).filter((n) => n !== "step");
  return ["step", "x", ...(v.norm ? ["g"] : []), "qweight", "sz", ...e];
}

export function matmulQWgsl(v: MatmulQVariant): string {
  return qCoreWgsl(core(v));
}

export function matmulQKey(v: MatmulQVariant): string {
  return `matmul${qCoreKey(core(v))}`;
}

export function matmulQPipeline(gpu: Gpu, v: MatmulQVariant): GPUComputePipeline {
  return gpu.pipeline(matmulQKey(v), () => matmulQWgsl(v));
}

/** Grid: (unit groups, 1 or more, token groups). */
export function matmulQGrid(v: MatmulQVariant, ntok: number): [number, number, number] {
  const [x, y] = grid(Math.ceil(unitCount(v.epilogue, v.rows) / (v.upw ?? 64)));
  return [x, y, Math.ceil(ntok / (v.tt ?? 8))];
}

/**
 * Thread shape: on CPU adapters 32 weight rows (16 units of the pair epilogues) × 4 tokens per
 * thread, so each loaded x value serves 32 rows and each weight 4 tokens, or with `tt` = 8
 * (batched decode: every row of the step in one token group) 16 rows × 8 tokens, and above 8
 * (up to MAX_Q_BATCH) 4 rows × tt tokens, which keeps the unrolled rows × tokens body (and
 * lavapipe's compile) about the size of the 8-token one; on GPUs the matrix-vector shape: 32
 * threads share a unit (coalesced loads, see qCoreWgsl), two units × 8 tokens per thread, or
 * above 8 tokens one unit × tt tokens per thread (the reduction's workgroup memory stays within
 * 32 KiB: two units per workgroup where a fused norm's Σx² per token joins a pair's sums).
 */
export function matmulQShape(gpu: Gpu, epilogue?: Epilogue, tt = 4, norm = false): MatmulQShape {
  const pair = epilogue !== undefined && isPair(epilogue);
  if (gpu.isCpu) {
    const rows = tt > 8 ? 4 : tt > 4 ? 16 : 32;
    const upt = pair ? rows / 2 : rows;
    return { tpr: 1, upt, upw: upt * 8, tt };
  }
  if (tt > 8) return { tpr: 32, upt: 1, upw: pair && norm ? 2 : 4, tt };
  return { tpr: 32, upt: 2, upw: 8, tt: 8 };
}
