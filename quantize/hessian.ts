/**
 * The layer Hessian H = XᵀX / tokens of the reconstruction loss ‖X·Ŵᵀ − X·Wᵀ‖², accumulated
 * over calibration batches in float64, and the layer loss Σ_n (Ŵ_n − W_n)·H·(Ŵ_n − W_n)ᵀ.
 */

import { ParameterError, ShapeError } from "../runtime/errors.ts";
import { dequantize, type QuantizedLinear } from "../runtime/format/qtensor.ts";

/** Running accumulation of H = XᵀX / tokens for a linear layer with K inputs. */
export class Hessian {
  /** Input features. */
  readonly K: number;
  /** Calibration tokens seen so far. */
  tokens = 0;
  /**
   * Columns with H_kk = 0 (never active in the calibration data), set by {@link finalize}.
   * Their weights should be zeroed before quantizing (see {@link zeroDeadColumns}).
   */
  dead: Uint8Array | null = null;
  private acc: Float64Array | null; // Σ XᵀX, lower triangle (K, K)

  constructor(K: number) {
    if (!Number.isInteger(K) || K < 1) throw new ShapeError(`Hessian: bad K = ${K}`);
    this.K = K;
    this.acc = new Float64Array(K * K);
  }

  /** Adds the rows of X (T tokens, K inputs, row-major) to XᵀX. Cost T·K²/2. */
  addBatch(X: Float32Array | Float64Array, T: number): void {
    const K = this.K, acc = this.live();
    if (X.length !== T * K) {
      throw new ShapeError(`Hessian.addBatch: X has ${X.length} entries, expected (${T}, ${K})`);
    }
    // Four tokens per sweep over the lower triangle, to read and write H a quarter as often.
    let t = 0;
    for (; t + 4 <= T; t += 4) {
      const o0 = t * K, o1 = o0 + K, o2 = o1 + K, o3 = o2 + K;
      for (let i = 0; i < K; i++) {
        const a0 = X[o0 + i], a1 = X[o1 + i], a2 = X[o2 + i], a3 = X[o3 + i];
        if (a0 === 0 && a1 === 0 && a2 === 0 && a3 === 0) continue;
        const ri = i * K;
        for (let j = 0; j <= i; j++) {
          acc[ri + j] += a0 * X[o0 + j] + a1 * X[o1 + j] + a2 * X[o2 + j] + a3 * X[o3 + j];
        }
      }
    }
    for (; t < T; t++) {
      const o = t * K;
      for (let i = 0; i < K; i++) {
        const a = X[o + i];
        if (a === 0) continue;
        const ri = i * K;
        for (let j = 0; j <= i; j++) acc[ri + j] += a * X[o + j];
      }
    }
    this.tokens += T;
  }

  /**
   * H = XᵀX / tokens (K, K), symmetric, ready for the quantizers: dead columns (H_kk = 0) get
   * H_kk = 1 (recorded in {@link dead}), then `percdamp`·mean(diag H) is added to the diagonal,
   * as gptq.py does. The accumulator is left untouched, so more batches may follow.
   */
  finalize(percdamp = 0.01): Float64Array {
    const K = this.K, acc = this.live();
    if (this.tokens === 0) throw new ParameterError("Hessian.finalize: no calibration batches");
    if (!(percdamp >= 0)) throw new ParameterError(`percdamp must be ≥ 0, got ${percdamp}`);
    const H = new Float64Array(K * K); // (K, K)
    const inv = 1 / this.tokens;
    for (let i = 0; i < K; i++) {
      for (let j = 0; j <= i; j++) {
        const h = acc[i * K + j] * inv;
        H[i * K + j] = h;
        H[j * K + i] = h;
      }
    }
    const dead = new Uint8Array(K);
    let meanDiag = 0;
    for (let k = 0; k < K; k++) {
      if (H[k * K + k] === 0) {
        dead[k] = 1;
        H[k * K + k] = 1;
      }
      meanDiag += H[k * K + k];
    }
    meanDiag /= K;
    for (let k = 0; k < K; k++) H[k * K + k] += percdamp * meanDiag;
    this.dead = dead;
    return H;
  }

  /** Releases the accumulator. */
  free(): void {
    this.acc = null;
  }

  private live(): Float64Array {
    if (this.acc === null) throw new ParameterError("Hessian: used after free()");
    return this.acc;
  }
}

/** Sets W[:, k] = 0 in place for the dead columns k (W: (N, K)). */
export function zeroDeadColumns(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  dead: Uint8Array,
): void {
  for (let k = 0; k < K; k++) {
    if (!dead[k]) continue;
    for (let n = 0; n < N; n++) W[n * K + k] = 0;
  }
}

/** Quadratic reconstruction loss of a quantized layer. */
export interface LayerLoss {
  /** Σ_n (Ŵ_n − W_n)·H·(Ŵ_n − W_n)ᵀ = tr(ΔW·H·ΔWᵀ). */
  loss: number;
  /** loss / tr(W·H·Wᵀ). */
  relative: number;
  /** Per-row losses. */
  rows: Float64Array; // (N)
}

/** xᵀ·H·x for each of up to four vectors at once (lower triangle of H only). */
function quadForms(
  H: Float64Array,
  K: number,
  d: Float64Array,
  nv: number,
  out: Float64Array,
): void {
  let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  const o1 = K, o2 = 2 * K, o3 = 3 * K;
  for (let i = 0; i < K; i++) {
    const ri = i * K;
    let t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (let j = 0; j < i; j++) {
      const h = H[ri + j];
      t0 += h * d[j];
      t1 += h * d[o1 + j];
      t2 += h * d[o2 + j];
      t3 += h * d[o3 + j];
    }
    const hii = H[ri + i];
    a0 += d[i] * (2 * t0 + hii * d[i]);
    a1 += d[o1 + i] * (2 * t1 + hii * d[o1 + i]);
    a2 += d[o2 + i] * (2 * t2 + hii * d[o2 + i]);
    a3 += d[o3 + i] * (2 * t3 + hii * d[o3 + i]);
  }
  const a = [a0, a1, a2, a3];
  for (let v = 0; v < nv; v++) out[v] = a[v];
}

/**
 * Layer loss of Ŵ against W under H (K, K): total, relative to tr(W·H·Wᵀ), and per row.
 * Cost N·K² (two quadratic forms per row).
 */
export function layerLoss(
  W: Float32Array | Float64Array,
  What: Float32Array | Float64Array,
  H: Float64Array,
  N: number,
  K: number,
): LayerLoss {
  if (W.length !== N * K || What.length !== N * K || H.length !== K * K) {
    throw new ShapeError(
      `layerLoss: W ${W.length}, Ŵ ${What.length}, H ${H.length} entries for N = ${N}, K = ${K}`,
    );
  }
  const rows = new Float64Array(N);
  const d = new Float64Array(4 * K), out = new Float64Array(4);
  let loss = 0, ref = 0;
  for (let n0 = 0; n0 < N; n0 += 4) {
    const nv = Math.min(4, N - n0);
    d.fill(0);
    for (let v = 0; v < nv; v++) {
      const o = (n0 + v) * K;
      for (let k = 0; k < K; k++) d[v * K + k] = What[o + k] - W[o + k];
    }
    quadForms(H, K, d, nv, out);
    for (let v = 0; v < nv; v++) {
      rows[n0 + v] = out[v];
      loss += out[v];
    }
    for (let v = 0; v < nv; v++) d.set(W.subarray((n0 + v) * K, (n0 + v + 1) * K), v * K);
    quadForms(H, K, d, nv, out);
    for (let v = 0; v < nv; v++) ref += out[v];
  }
  return { loss, relative: ref > 0 ? loss / ref : 0, rows };
}

/** What every quantizer returns: the quantized layer and its loss under the damped H. */
export interface QuantizeResult {
  ql: QuantizedLinear;
  loss: LayerLoss;
}

/**
 * Float64 copy of W (N, K) with the dead columns of `hessian` zeroed, and the finalized H:
 * the inputs every quantizer's `quantize()` starts from (as gptq.py's `fasterquant`).
 */
export function calibratedLayer(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  hessian: Hessian,
  percdamp = 0.01,
): { W: Float64Array; H: Float64Array } {
  if (W.length !== N * K) throw new ShapeError(`W has ${W.length} entries, expected (${N}, ${K})`);
  const H = hessian.finalize(percdamp);
  const W64 = Float64Array.from(W);
  zeroDeadColumns(W64, N, K, hessian.dead!);
  return { W: W64, H };
}

/**
 * The shell every layer quantizer shares (gptq.py's `GPTQ` class): the constructor takes W
 * (N, K), `addBatch` accumulates calibration inputs into H, `quantize` hands the calibrated W
 * and damped H to the subclass's {@link quantizeCalibrated}, and `free` drops W and H.
 */
export abstract class LayerQuantizer<Options, Result> {
  readonly hessian: Hessian;
  private W: Float32Array | Float64Array | null;

  /** W: (N, K) weights of the layer, row-major. */
  constructor(W: Float32Array | Float64Array, readonly N: number, readonly K: number) {
    if (W.length !== N * K) {
      throw new ShapeError(`W has ${W.length} entries, expected (${N}, ${K})`);
    }
    this.W = W;
    this.hessian = new Hessian(K);
  }

  /** Accumulates calibration inputs X (T, K) into H. */
  addBatch(X: Float32Array | Float64Array, T: number): void {
    this.hessian.addBatch(X, T);
  }

  /** Quantizes with H damped by percdamp (default 0.01); losses are under the damped H. */
  quantize(opts: Options & { percdamp?: number }): Result {
    if (this.W === null) throw new ShapeError(`${this.constructor.name}: used after free()`);
    const { W, H } = calibratedLayer(this.W, this.N, this.K, this.hessian, opts.percdamp);
    return this.quantizeCalibrated(W, H, opts);
  }

  /** Drops the weights and the Hessian. */
  free(): void {
    this.W = null;
    this.hessian.free();
  }

  /** Quantizes the calibrated W (N, K) (dead columns zeroed) under the damped H (K, K). */
  protected abstract quantizeCalibrated(W: Float64Array, H: Float64Array, opts: Options): Result;

  /** `ql` with its layer loss against W under H. */
  protected withLoss(ql: QuantizedLinear, W: Float64Array, H: Float64Array): QuantizeResult {
    return {
      ql,
      loss: layerLoss(W, dequantize(ql, new Float64Array(W.length)), H, this.N, this.K),
    };
  }
}
