/**
 * What the tuner chooses for the dense (f32/f16) matrix kernels and for what: a {@link DenseKey}
 * names one dense kernel as the forward plan runs it, the decode matrix-vector product
 * (kernels/matvec.ts, family "matvec": buffer or texture weights, optional fused RMSNorm) or the
 * lane variant of the matrix-matrix product (kernels/matmul.ts, "matmul_lane": a batched decode
 * step of `tokens` rows over buffer weights, every row in one token group); the shape chosen for
 * it is a TunedShape (kernels/tune_key.ts): on buffer weights tpr threads per unit × upw units
 * per workgroup (upt 1; the lane kernel's tt is the step's rows), on textures tpr 1 and upt units
 * per thread (upw / upt threads). Keys print as one line ("matvec f16 576x1536 gateup+norm
 * buffer", "matmul_lane f16 576x1536 b8 gateup buffer"), their name in the tune cache beside the
 * other kernels' (kernels/tune_cache.ts), and parse back; {@link denseShapeProblem} says whether
 * a shape can run a key, so that a cache entry is checked before the runtime uses it, and
 * {@link denseKernelShape} is the runtime's lookup: the tuned shape, else the heuristic.
 *
 * Not tuned: the staged prefill kernel and the texture matrix-matrix kernel (CPU adapters'
 * prefill and batched steps) of kernels/matmul.ts run their built-in shapes.
 */
import type { DenseFormat, WeightSource } from "./common.ts";
import { type Epilogue, unitCount } from "./epilogue.ts";
import type { Gpu } from "./gpu.ts";
import { LANE_MAX_TT, laneWorkgroupBytes, matmulLaneShape } from "./matmul.ts";
import { matvecShape, matvecWorkgroupBytes, spreadShape } from "./matvec.ts";
import type { KernelLimits } from "./attention_key.ts";
import { type TunedShape, unitEpilogue } from "./tune_key.ts";

/** "matvec": kernels/matvec.ts (decode, one token); "matmul_lane": matmul.ts's lane variant. */
export type DenseFamily = "matvec" | "matmul_lane";

/** One dense matrix kernel as the forward plan runs it (Builder.matvec, Builder.matmul). */
export interface DenseKey {
  family: DenseFamily;
  format: DenseFormat;
  /** Weight rows of the dispatch (a row chunk of a larger matrix). */
  rows: number;
  K: number;
  /** matmul_lane: the batched decode step's rows, all in one token group (tt); matvec: 1. */
  tokens: number;
  epilogue: Epilogue["kind"];
  /** Fused RMSNorm of x (matvec only: a batched step normalizes x in its own dispatch). */
  norm: boolean;
  /** matmul_lane: buffer only (textures run the untuned texture kernel). */
  weights: WeightSource;
  /** x (and g) bound as uniform buffers: texture matvec only. */
  xUniform: boolean;
}

/** The one-line name of a key, e.g. "matmul_lane f16 576x1536 b8 gateup buffer". */
export function denseKeyString(k: DenseKey): string {
  const b = k.family === "matmul_lane" ? ` b${k.tokens}` : "";
  return `${k.family} ${k.format} ${k.rows}x${k.K}${b} ${k.epilogue}${
    k.norm ? "+norm" : ""
  } ${k.weights}${k.xUniform ? "+xu" : ""}`;
}

const KEY_RE =
  /^(matvec|matmul_lane) (f32|f16|f16p) (\d+)x(\d+)(?: b(\d+))? (store|add|gateup|qkv)(\+norm)? (buffer|texture)(\+xu)?$/;

/**
 * Why `k` names no kernel (a sentence), or null: K a positive multiple of 4, an even row count
 * for the row-pair epilogues (gateup, qkv), one token for matvec, 1..LANE_MAX_TT rows and plain
 * buffer weights for the lane kernel (no fused norm, no uniform x), a uniform x only with
 * texture weights and K·4 ≤ 64 KiB.
 */
export function denseKeyProblem(k: DenseKey): string | null {
  const int = (n: number) => Number.isInteger(n) && n >= 1;
  if (!int(k.rows) || !int(k.K) || k.K % 4 !== 0) {
    return "rows must be an integer ≥ 1 and K a positive multiple of 4";
  }
  if ((k.epilogue === "gateup" || k.epilogue === "qkv") && k.rows % 2 !== 0) {
    return `a ${k.epilogue} epilogue needs an even row count`;
  }
  if (k.family === "matvec") {
    if (k.tokens !== 1) return "a matvec key has one token";
  } else {
    if (!int(k.tokens) || k.tokens > LANE_MAX_TT) return `tokens must be 1..${LANE_MAX_TT}`;
    if (k.norm || k.xUniform || k.weights !== "buffer") {
      return "the lane kernel takes buffer weights, no fused norm and x in storage";
    }
  }
  if (k.xUniform && (k.weights !== "texture" || k.K * 4 > 65536)) {
    return "a uniform x needs texture weights and K·4 ≤ 65536";
  }
  return null;
}

/** The key a {@link denseKeyString} names, or null where `s` is not one. */
export function parseDenseKey(s: string): DenseKey | null {
  const m = KEY_RE.exec(s);
  if (!m) return null;
  const family = m[1] as DenseFamily;
  if ((family === "matmul_lane") !== (m[5] !== undefined)) return null;
  const key: DenseKey = {
    family,
    format: m[2] as DenseFormat,
    rows: Number(m[3]),
    K: Number(m[4]),
    tokens: m[5] === undefined ? 1 : Number(m[5]),
    epilogue: m[6] as Epilogue["kind"],
    norm: m[7] !== undefined,
    weights: m[8] as WeightSource,
    xUniform: m[9] !== undefined,
  };
  if (denseKeyProblem(key) !== null) return null;
  return denseKeyString(key) === s ? key : null;
}

const pow2 = (n: number) => (n & (n - 1)) === 0;

/**
 * Why `s` cannot run `key` (a sentence), or null where it can: the key's own checks
 * ({@link denseKeyProblem}), integer fields, tt present exactly for the lane kernel and equal to
 * the step's rows; texture weights: tpr 1, upw a multiple of upt; buffer weights: upt 1, tpr a
 * power of two (≥ 2 for the lane kernel, whose tpr 1 is the staged kernel), tpr·upw a power of
 * two with a fused norm (its sum of squares is a tree over the workgroup); and the device's
 * threads per workgroup and workgroup memory where given (matvecWorkgroupBytes,
 * laneWorkgroupBytes: the lane kernel's WG·tt·8 bytes).
 */
export function denseShapeProblem(
  key: DenseKey,
  s: TunedShape,
  limits?: KernelLimits,
): string | null {
  const keyProblem = denseKeyProblem(key);
  if (keyProblem) return keyProblem;
  const int = (n: unknown) => typeof n === "number" && Number.isInteger(n) && n >= 1;
  if (!int(s.tpr) || !int(s.upw) || !int(s.upt)) return "tpr, upw and upt must be integers ≥ 1";
  const lane = key.family === "matmul_lane";
  if (!lane && s.tt !== undefined) return "a matvec shape has no tt";
  if (lane && s.tt !== key.tokens) {
    return `a batched step of ${key.tokens} rows needs tt = ${key.tokens}`;
  }
  let threads: number, bytes: number;
  if (key.weights === "texture") {
    if (s.tpr !== 1) return "texture weights need tpr = 1";
    if (s.upw % s.upt !== 0) return `upw = ${s.upw} is no multiple of upt = ${s.upt}`;
    threads = s.upw / s.upt;
    bytes = 0;
  } else {
    if (s.upt !== 1) return "buffer weights take upt = 1";
    if (!pow2(s.tpr) || (lane && s.tpr < 2)) {
      return `tpr must be a power of two${lane ? " ≥ 2" : ""}`;
    }
    threads = s.tpr * s.upw;
    if (key.norm && !pow2(threads)) return "a fused norm needs tpr·upw a power of two";
    bytes = lane
      ? laneWorkgroupBytes({ tpr: s.tpr, upw: s.upw, tt: key.tokens })
      : matvecWorkgroupBytes({ ...key, norm: key.norm ? { eps: 0 } : null, ...s });
  }
  if (!limits) return null;
  const maxThreads = Math.min(
    limits.maxComputeInvocationsPerWorkgroup,
    limits.maxComputeWorkgroupSizeX ?? Infinity,
  );
  if (threads > maxThreads) {
    return `${threads} threads per workgroup exceed the device's ${maxThreads}`;
  }
  if (bytes > limits.maxComputeWorkgroupStorageSize) {
    return `${bytes} bytes of workgroup memory exceed the device's ${limits.maxComputeWorkgroupStorageSize}`;
  }
  return null;
}

/**
 * The thread shape of a dense matrix kernel: the tuner's choice for this adapter and key
 * (`gpu.tuned`), used as it is, else the heuristic: matvecShape spread over the cores
 * (spreadShape), or matmulLaneShape; with upt 1 where the heuristic has none. `tuned` false
 * gives the heuristic (the tuner's baseline).
 */
export function denseKernelShape(gpu: Gpu, key: DenseKey, tuned = true): TunedShape {
  const t = tuned ? gpu.tuned.get(denseKeyString(key)) : undefined;
  if (t) return t;
  if (key.family === "matmul_lane") return { ...matmulLaneShape(key.tokens), upt: 1 };
  const e = unitEpilogue(key);
  const s = spreadShape(matvecShape(gpu, key.K, key.weights, e), unitCount(e, key.rows), gpu);
  return { tpr: s.tpr, upw: s.upw, upt: s.upt ?? 1 };
}
