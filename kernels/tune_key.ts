/**
 * What the kernel tuner (kernels/tuner.ts) chooses and for what: a {@link TuneKey} names one
 * quantized matrix kernel as the forward plan runs it (family, weight format, shape, tokens,
 * epilogue kind, sources), a {@link TunedShape} the thread shape chosen for it. Keys print as one
 * line ("matvec_q q4g128 576x1536 b1 gateup+norm buffer"), which is also their name in the tune
 * cache (kernels/tune_cache.ts), and parse back; {@link tunedShapeProblem} says whether a shape
 * can run a key, so that a cache entry is checked before the runtime uses it.
 */
import type { Bits } from "../runtime/format/qtensor.ts";
import type { Epilogue } from "./epilogue.ts";
import { MAX_Q_BATCH, type QCore, qCoreWgsl, qGroup, type QWeights } from "./matvec_q.ts";

/**
 * Kernel families the tuner knows: "matvec_q" (kernels/matvec_q.ts, decode: `batch` vectors,
 * optional fused RMSNorm), "matmul_q" (kernels/matmul_q.ts: a batched decode step of `tokens`
 * rows in one token group, or prefill).
 */
export type TuneFamily = "matvec_q" | "matmul_q";

/** One quantized matrix kernel as the forward plan runs it (kernels/tune_key.ts). */
export interface TuneKey {
  family: TuneFamily;
  bits: Bits;
  /** The effective group size (K for one group per row; see qGroup). */
  groupSize: number;
  /** Weight rows of the dispatch (a row chunk of a larger matrix). */
  rows: number;
  K: number;
  /**
   * matvec_q: the batch (input vectors); matmul_q: the rows of a batched decode step (all in
   * one token group, tt = tokens), or 0 for prefill (tt is then tuned).
   */
  tokens: number;
  epilogue: Epilogue["kind"];
  /** Fused RMSNorm of x. */
  norm: boolean;
  weights: QWeights;
  /** x (and g) bound as uniform buffers. */
  xUniform: boolean;
}

/** A thread shape of the quantized kernels (QShape, plus tokens per workgroup for matmul_q). */
export interface TunedShape {
  tpr: number;
  upw: number;
  upt: number;
  /** matmul_q: tokens per workgroup; absent for matvec_q. */
  tt?: number;
}

/** Just the shape fields of `s` (a cache entry also holds its times). */
export function bareShape(s: TunedShape): TunedShape {
  const { tpr, upw, upt, tt } = s;
  return tt === undefined ? { tpr, upw, upt } : { tpr, upw, upt, tt };
}

/** `key` with its group size made effective (0 or ≥ K → K), as keys are stored and compared. */
export function normalizeKey(key: TuneKey): TuneKey {
  return { ...key, groupSize: qGroup(key.K, key.groupSize) };
}

/** The one-line name of a key, e.g. "matmul_q q3g64 2048x8192 b8 add buffer". */
export function tuneKeyString(key: TuneKey): string {
  const k = normalizeKey(key);
  const tok = k.family === "matmul_q" && k.tokens === 0 ? "prefill" : `b${k.tokens}`;
  return `${k.family} q${k.bits}g${k.groupSize} ${k.rows}x${k.K} ${tok} ${k.epilogue}${
    k.norm ? "+norm" : ""
  } ${k.weights}${k.xUniform ? "+xu" : ""}`;
}

const KEY_RE =
  /^(matvec_q|matmul_q) q([234])g(\d+) (\d+)x(\d+) (b\d+|prefill) (store|add|gateup|qkv)(\+norm)? (buffer|texture)(\+xu)?$/;

/** The key a {@link tuneKeyString} names, or null where `s` is not one. */
export function parseTuneKey(s: string): TuneKey | null {
  const m = KEY_RE.exec(s);
  if (!m) return null;
  const key: TuneKey = {
    family: m[1] as TuneFamily,
    bits: Number(m[2]) as Bits,
    groupSize: Number(m[3]),
    rows: Number(m[4]),
    K: Number(m[5]),
    tokens: m[6] === "prefill" ? 0 : Number(m[6].slice(1)),
    epilogue: m[7] as Epilogue["kind"],
    norm: m[8] !== undefined,
    weights: m[9] as QWeights,
    xUniform: m[10] !== undefined,
  };
  if (m[6] === "prefill" && key.family !== "matmul_q") return null;
  try {
    return tuneKeyString(key) === s ? key : null;
  } catch {
    return null; // a group size the kernels reject
  }
}

/** The short form of a shape for messages: "tpr 32 upt 2 upw 8" (+ " tt 8"). */
export function describeShape(s: TunedShape): string {
  return `tpr ${s.tpr} upt ${s.upt} upw ${s.upw}${s.tt !== undefined ? ` tt ${s.tt}` : ""}`;
}

/**
 * An epilogue with the key's unit structure, which is what a thread shape depends on: store/add
 * over the key's rows, and a row-pair epilogue (gateup, qkv) as gateup over rows / 2 units.
 */
export function unitEpilogue(key: Pick<TuneKey, "epilogue" | "rows">): Epilogue {
  if (key.epilogue === "gateup" || key.epilogue === "qkv") {
    return { kind: "gateup", hidden: key.rows / 2 };
  }
  return key.epilogue === "add" ? { kind: "add" } : { kind: "store", offset: 0, ld: key.rows };
}

/** The kernel parameters of a key run with a shape (over {@link unitEpilogue}). */
export function tuneCore(key: TuneKey, s: TunedShape): QCore {
  const matmul = key.family === "matmul_q";
  return {
    bits: key.bits,
    groupSize: key.groupSize,
    rows: key.rows,
    K: key.K,
    norm: key.norm ? { eps: 1e-5 } : null,
    epilogue: unitEpilogue(key),
    tpr: s.tpr,
    upw: s.upw,
    upt: s.upt,
    batch: matmul ? s.tt ?? 0 : key.tokens,
    dynamicTokens: matmul,
    weights: key.weights,
    xUniform: key.xUniform,
  };
}

/** The device limits a shape must respect. */
export interface ShapeLimits {
  maxComputeInvocationsPerWorkgroup: number;
  maxComputeWorkgroupStorageSize: number;
}

/** The bytes of workgroup memory a kernel reserves (qCoreWgsl's reduction array). */
function workgroupBytes(wgsl: string): number {
  const m = /var<workgroup> red: array<f32, (\d+)>/.exec(wgsl);
  return m ? Number(m[1]) * 4 : 0;
}

/**
 * Why `s` cannot run `key` (a sentence), or null where it can: integer fields, tt present
 * exactly for matmul_q and equal to the step's rows for a batched decode step, the kernel's own
 * checks (checkCore: powers of two, texture weights need tpr = 1, batch ≤ MAX_Q_BATCH,
 * workgroup memory ≤ 32 KiB), and the device's limits where given.
 */
export function tunedShapeProblem(
  key: TuneKey,
  s: TunedShape,
  limits?: ShapeLimits,
): string | null {
  const int = (n: unknown) => typeof n === "number" && Number.isInteger(n) && n >= 1;
  if (!int(s.tpr) || !int(s.upw) || !int(s.upt)) return "tpr, upw and upt must be integers ≥ 1";
  if (key.family === "matvec_q") {
    if (s.tt !== undefined) return "a matvec_q shape has no tt";
    if (!int(key.tokens) || key.tokens > MAX_Q_BATCH) {
      return `batch must be 1..${MAX_Q_BATCH}`;
    }
  } else {
    if (!int(s.tt) || s.tt! > MAX_Q_BATCH) return `tt must be an integer in 1..${MAX_Q_BATCH}`;
    if (key.tokens > 0 && s.tt !== key.tokens) {
      return `a batched step of ${key.tokens} rows needs tt = ${key.tokens}`;
    }
  }
  if ((key.epilogue === "gateup" || key.epilogue === "qkv") && key.rows % 2 !== 0) {
    return `a ${key.epilogue} epilogue needs an even row count`;
  }
  let wgsl: string;
  try {
    wgsl = qCoreWgsl(tuneCore(key, s));
  } catch (e) {
    return (e as Error).message;
  }
  const wg = s.tpr * (s.upw / s.upt);
  if (limits && wg > limits.maxComputeInvocationsPerWorkgroup) {
    return `${wg} threads per workgroup exceed the device's ${limits.maxComputeInvocationsPerWorkgroup}`;
  }
  const bytes = workgroupBytes(wgsl);
  if (limits && bytes > limits.maxComputeWorkgroupStorageSize) {
    return `${bytes} bytes of workgroup memory exceed the device's ${limits.maxComputeWorkgroupStorageSize}`;
  }
  return null;
}
