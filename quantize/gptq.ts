/**
 * GPTQ (Frantar et al. 2022, IST-DASLab/gptq `gptq.py`): quantize the columns of W one at a
 * time in act-order (descending diag H) and feed each column's rounding error into the columns
 * not yet quantized through the upper Cholesky factor of H⁻¹, with lazy batch updates.
 *
 * Groups and act-order: groups are runs of G consecutive columns in the ORIGINAL order, and
 * every group's (s, z) is computed from the weights before quantization starts and then stays
 * fixed ("static groups", gptq.py `static_groups=True`). With act-order the columns of a group
 * are quantized at scattered times, so recomputing (s, z) from partially error-updated weights
 * would be ill-defined; static groups also make the rounding a pure function of (W, H, s, z),
 * which is what decoupleQ's integer step needs ({@link gptqRound}).
 */

import { NumericalError, ParameterError, ShapeError } from "../runtime/errors.ts";
import { LayerQuantizer, type QuantizeResult } from "./hessian.ts";
import { hinvUpperCholesky } from "./linalg.ts";
import {
  type Bits,
  checkBits,
  effectiveGroupSize,
  nGroups,
  qRange,
  type QuantizedLinear,
} from "../runtime/format/qtensor.ts";
import { type ClipCriterion, diagonal, minMaxScaleZero, roundCode, type ScaleZero } from "./rtn.ts";

/** Rows quantized together: one pass over a row of H⁻¹'s factor serves this many rows of W. */
const ROW_CHUNK = 16;

/** Column order and H⁻¹ factor shared by every {@link gptqRound} call on one layer. */
export interface GptqPlan {
  K: number;
  /** order[i] = original column quantized i-th. */
  order: Int32Array; // (K)
  /** Upper Cholesky factor U of (H[order][:, order])⁻¹ = Uᵀ·U. */
  Hinv: Float64Array; // (K, K)
}

/** Columns in descending diag(H) (ties by index), gptq.py's `argsort(diag(H), descending)`. */
export function actOrder(H: Float64Array, K: number): Int32Array {
  const idx = Array.from({ length: K }, (_, k) => k);
  idx.sort((a, b) => H[b * K + b] - H[a * K + a] || a - b);
  return Int32Array.from(idx);
}

/** Permutes H (K, K) to the column order, factors it: O(K³), once per layer. */
export function gptqPlan(H: Float64Array, K: number, actorder = true): GptqPlan {
  if (H.length !== K * K) throw new ShapeError(`H has ${H.length} entries, expected (${K}, ${K})`);
  const order = actorder ? actOrder(H, K) : Int32Array.from({ length: K }, (_, k) => k);
  const Hp = new Float64Array(K * K); // H[order][:, order]
  for (let i = 0; i < K; i++) {
    const ri = order[i] * K;
    for (let j = 0; j < K; j++) Hp[i * K + j] = H[ri + order[j]];
  }
  return { K, order, Hinv: hinvUpperCholesky(Hp, K) };
}

/**
 * GPTQ rounding of W (N, K) with fixed per-group (s, z) ((N, nGroups), groups of G original
 * columns): returns q (N, K) in the original column order. Columns are visited in `plan.order`;
 * the error (w − ŵ)/U_ii of column i is subtracted, times U[i, j], from every later column j:
 * immediately inside the current block of `blocksize` columns, and as one lazy update for the
 * columns after the block (gptq.py's `W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`). Rows are
 * independent and processed in chunks of 16 so that each row of U is read once per chunk.
 *
 * With `rowLoss` (N), each row's loss (Ŵ_n − W_n)·H·(Ŵ_n − W_n)ᵀ is written there, for free: the
 * final error is W − Ŵ = e·U with e the scaled errors above, and U·H·Uᵀ = I, so the loss is |e|².
 */
export function gptqRound(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  bits: Bits,
  G: number,
  sz: ScaleZero,
  plan: GptqPlan,
  blocksize = 128,
  rowLoss?: Float64Array,
): Int8Array {
  checkBits(bits);
  const Ge = effectiveGroupSize(K, G), nG = nGroups(K, G);
  if (W.length !== N * K || plan.K !== K) {
    throw new ShapeError(`gptqRound: W has ${W.length} entries, plan K = ${plan.K}; (${N}, ${K})`);
  }
  if (sz.scale.length !== N * nG || sz.zero.length !== N * nG) {
    throw new ShapeError(`gptqRound: scale/zero must have ${N}·${nG} entries`);
  }
  if (!Number.isInteger(blocksize) || blocksize < 1) {
    throw new ParameterError(`gptqRound: blocksize must be a positive integer, got ${blocksize}`);
  }
  if (rowLoss && rowLoss.length !== N) {
    throw new ShapeError(`gptqRound: rowLoss has ${rowLoss.length} entries, expected ${N}`);
  }
  const { qmin, qmax } = qRange(bits);
  const { order, Hinv: U } = plan;
  const { scale, zero } = sz;
  const grp = new Int32Array(K); // group of the i-th quantized column
  for (let i = 0; i < K; i++) grp[i] = Math.floor(order[i] / Ge);
  const B = Math.min(blocksize, K);
  const Q = new Int8Array(N * K); // (N, K)
  const Wc = new Float64Array(ROW_CHUNK * K); // rows n0.. of W[:, order]  (R, K)
  const Err1 = new Float64Array(ROW_CHUNK * B); // (R, B)
  const loss = new Float64Array(ROW_CHUNK); // Σ err² of the chunk's rows

  for (let n0 = 0; n0 < N; n0 += ROW_CHUNK) {
    const R = Math.min(ROW_CHUNK, N - n0);
    loss.fill(0);
    for (let r = 0; r < R; r++) {
      const src = (n0 + r) * K;
      for (let i = 0; i < K; i++) Wc[r * K + i] = W[src + order[i]];
    }
    for (let i1 = 0; i1 < K; i1 += B) {
      const i2 = Math.min(i1 + B, K);
      for (let i = i1; i < i2; i++) {
        const ui = i * K, d = U[ui + i], col = order[i];
        for (let r = 0; r < R; r++) {
          const wr = r * K, g = (n0 + r) * nG + grp[i];
          const w = Wc[wr + i], s = scale[g], z = zero[g];
          const q = roundCode(w, s, z, qmin, qmax);
          Q[(n0 + r) * K + col] = q;
          const err = (w - (s * q + z)) / d;
          Err1[r * B + i - i1] = err;
          if (err === 0) continue;
          loss[r] += err * err;
          for (let j = i + 1; j < i2; j++) Wc[wr + j] -= err * U[ui + j];
        }
      }
      if (i2 < K) lazyUpdate(Wc, R, K, U, Err1, B, i1, i2);
    }
    if (rowLoss) rowLoss.set(loss.subarray(0, R), n0);
  }
  return Q;
}

/**
 * W[:, i2:] −= Err1·U[i1:i2, i2:] for the R rows of the chunk, four rows per pass so that each
 * load of U feeds four multiply-adds.
 */
function lazyUpdate(
  Wc: Float64Array, // (R, K)
  R: number,
  K: number,
  U: Float64Array, // (K, K)
  Err1: Float64Array, // (R, B)
  B: number,
  i1: number,
  i2: number,
): void {
  for (let i = i1; i < i2; i++) {
    const ui = i * K, c = i - i1;
    let r = 0;
    for (; r + 4 <= R; r += 4) {
      const e0 = Err1[r * B + c], e1 = Err1[(r + 1) * B + c];
      const e2 = Err1[(r + 2) * B + c], e3 = Err1[(r + 3) * B + c];
      const w0 = r * K, w1 = w0 + K, w2 = w1 + K, w3 = w2 + K;
      for (let j = i2; j < K; j++) {
        const u = U[ui + j];
        Wc[w0 + j] -= e0 * u;
        Wc[w1 + j] -= e1 * u;
        Wc[w2 + j] -= e2 * u;
        Wc[w3 + j] -= e3 * u;
      }
    }
    for (; r < R; r++) {
      const e = Err1[r * B + c], wr = r * K;
      for (let j = i2; j < K; j++) Wc[wr + j] -= e * U[ui + j];
    }
  }
}

/** Options of GPTQ quantization. */
export interface GptqOptions {
  bits: Bits;
  /** Group size G (0: one group per row). */
  groupSize: number;
  /** Quantize columns in descending diag(H); default true. */
  actorder?: boolean;
  /** Lazy-update block size; default 128. */
  blocksize?: number;
  /** Clipping search for the static group (s, z); default "none" (min/max, as gptq.py). */
  clip?: ClipCriterion;
  /** The layer's name, for messages (default: its shape). */
  layer?: string;
  /** A precomputed {@link gptqPlan} of H (shared by trial quantizations of one layer). */
  plan?: GptqPlan;
}

/** Index of the first NaN or ±Inf of `a`, or −1. */
function nonFiniteAt(a: Float32Array | Float64Array): number {
  for (let i = 0; i < a.length; i++) {
    // x − x is 0 for every finite x and NaN for NaN and ±Inf: one subtraction per entry
    if (a[i] - a[i] !== 0) return i;
  }
  return -1;
}

/**
 * Throws a NumericalError naming the layer when W (·, K) or H (K, K) holds NaN or Inf: no
 * damping repairs that, so GPTQ must not get as far as its Cholesky factorization (which would
 * ask for more).
 */
function checkFinite(
  W: Float32Array | Float64Array,
  K: number,
  H: Float64Array,
  layer: string,
): void {
  const w = nonFiniteAt(W);
  if (w >= 0) {
    throw new NumericalError(
      `gptq: layer ${layer} holds non-finite weights (W[${Math.floor(w / K)}, ${w % K}] = ` +
        `${W[w]}); no damping repairs that: check the checkpoint`,
    );
  }
  const h = nonFiniteAt(H);
  if (h >= 0) {
    throw new NumericalError(
      `gptq: layer ${layer} has non-finite calibration statistics (H[${Math.floor(h / K)}, ` +
        `${h % K}] = ${H[h]}): its inputs hold NaN or Inf, from non-finite weights or ` +
        `activations earlier in the model`,
    );
  }
}

/** GPTQ of W (N, K) under a finalized (damped) H (K, K), with static groups. */
export function gptqQuantize(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  H: Float64Array,
  opts: GptqOptions,
): QuantizedLinear {
  const { bits, groupSize } = opts;
  if (W.length !== N * K || H.length !== K * K) {
    throw new ShapeError(`gptq: W has ${W.length}, H ${H.length} entries; (${N}, ${K})`);
  }
  checkFinite(W, K, H, opts.layer ?? `(${N}×${K})`);
  const sz = minMaxScaleZero(W, N, K, bits, groupSize, {
    clip: opts.clip,
    Hdiag: diagonal(H, K),
  });
  const plan = opts.plan ?? gptqPlan(H, K, opts.actorder ?? true);
  const q = gptqRound(W, N, K, bits, groupSize, sz, plan, opts.blocksize);
  return {
    N,
    K,
    bits,
    groupSize: effectiveGroupSize(K, groupSize),
    q,
    scale: sz.scale,
    zero: sz.zero,
  };
}

/** GPTQ as a layer quantizer (gptq.py's `GPTQ` class): addBatch, quantize, free. */
export class GPTQ extends LayerQuantizer<GptqOptions, QuantizeResult> {
  protected quantizeCalibrated(
    W: Float64Array,
    H: Float64Array,
    opts: GptqOptions,
  ): QuantizeResult {
    return this.withLoss(gptqQuantize(W, this.N, this.K, H, opts), W, H);
  }
}
