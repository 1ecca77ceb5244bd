/**
 * Round-to-nearest quantization per group from the group's min/max, with an optional search
 * for a clipped range. Also the per-group (s, z) initialization GPTQ and decoupleQ start from.
 */

import { ShapeError } from "../runtime/errors.ts";
import { LayerQuantizer, type QuantizeResult } from "./hessian.ts";
import {
  type Bits,
  checkBits,
  effectiveGroupSize,
  nGroups,
  qRange,
  type QuantizedLinear,
} from "../runtime/format/qtensor.ts";

/**
 * How a group's clipping factor is chosen: "none" keeps the full min/max range; "plain" picks
 * the factor with the lowest Σ(ŵ − w)²; "hdiag" the lowest Σ H_kk·(ŵ − w)².
 */
export type ClipCriterion = "none" | "plain" | "hdiag";

/** Range shrink factors of the clipping search: 1.0, 0.95, …, 0.5. */
export const SHRINK_FACTORS: readonly number[] = Array.from({ length: 11 }, (_, i) => 1 - 0.05 * i);

/** Per-(row, group) scales and offsets, fp16-representable, (N, nGroups) each. */
export interface ScaleZero {
  scale: Float32Array; // (N, nGroups)
  zero: Float32Array; // (N, nGroups)
}

/** Options of {@link minMaxScaleZero}. */
export interface ScaleZeroOptions {
  /** Clipping search criterion; default "none". */
  clip?: ClipCriterion;
  /** diag(H) (K), required by clip "hdiag". */
  Hdiag?: Float64Array;
  /** Shrink factors to try; default {@link SHRINK_FACTORS}. */
  shrinkFactors?: readonly number[];
}

/** q = clamp(round((w − z) / s), qmin, qmax); 0 when s = 0. */
export function roundCode(w: number, s: number, z: number, qmin: number, qmax: number): number {
  if (s === 0) return 0;
  const q = Math.round((w - z) / s);
  return q < qmin ? qmin : q > qmax ? qmax : q;
}

/**
 * fp16 (s, z) covering [lo, hi]: s = (hi − lo)/(2^b − 1), z = lo + 2^(b−1)·s, so that
 * q = −2^(b−1) maps to lo and q = 2^(b−1) − 1 to hi. A range too small for an fp16 scale gives
 * s = 0 and z = the midpoint.
 */
export function rangeScaleZero(lo: number, hi: number, bits: Bits, out: Float64Array): void {
  const s = Math.f16round((hi - lo) / ((1 << bits) - 1));
  out[0] = s;
  out[1] = s === 0 ? Math.f16round((lo + hi) / 2) : Math.f16round(lo + (1 << (bits - 1)) * s);
}

/**
 * Per-group (s, z) of W (N, K) from each group's min/max, optionally shrinking the range toward
 * c = clamp(0, min, max) (lo = c + f·(min − c), hi = c + f·(max − c)) by the factor f with the
 * lowest round-to-nearest error under `clip`. Errors are measured with the fp16-rounded s, z.
 */
export function minMaxScaleZero(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  bits: Bits,
  G: number,
  opts: ScaleZeroOptions = {},
): ScaleZero {
  checkBits(bits);
  if (W.length !== N * K) throw new ShapeError(`W has ${W.length} entries, expected (${N}, ${K})`);
  const clip = opts.clip ?? "none";
  const factors = clip === "none" ? [1] : opts.shrinkFactors ?? SHRINK_FACTORS;
  const Hdiag = opts.Hdiag;
  if (clip === "hdiag" && (Hdiag === undefined || Hdiag.length !== K)) {
    throw new ShapeError(`clip "hdiag" needs diag(H) with ${K} entries`);
  }
  const Ge = effectiveGroupSize(K, G), nG = nGroups(K, G);
  const { qmin, qmax } = qRange(bits);
  const scale = new Float32Array(N * nG), zero = new Float32Array(N * nG);
  const sz = new Float64Array(2);
  for (let n = 0; n < N; n++) {
    const o = n * K;
    for (let g = 0; g < nG; g++) {
      const k1 = g * Ge, k2 = Math.min(K, k1 + Ge);
      let min = Infinity, max = -Infinity;
      for (let k = k1; k < k2; k++) {
        const w = W[o + k];
        if (w < min) min = w;
        if (w > max) max = w;
      }
      const c = min > 0 ? min : max < 0 ? max : 0;
      let bestErr = Infinity, bestS = 0, bestZ = 0;
      for (const f of factors) {
        rangeScaleZero(c + f * (min - c), c + f * (max - c), bits, sz);
        const s = sz[0], z = sz[1];
        let err = 0;
        if (factors.length > 1) {
          for (let k = k1; k < k2; k++) {
            const w = W[o + k];
            const e = s * roundCode(w, s, z, qmin, qmax) + z - w;
            err += clip === "hdiag" ? Hdiag![k] * e * e : e * e;
          }
        }
        if (err < bestErr) {
          bestErr = err;
          bestS = s;
          bestZ = z;
        }
      }
      scale[n * nG + g] = bestS;
      zero[n * nG + g] = bestZ;
    }
  }
  return { scale, zero };
}

/** Round-to-nearest codes of W (N, K) under fixed per-group (s, z). */
export function roundToNearest(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  bits: Bits,
  G: number,
  sz: ScaleZero,
): Int8Array {
  const Ge = effectiveGroupSize(K, G), nG = nGroups(K, G);
  const { qmin, qmax } = qRange(bits);
  const q = new Int8Array(N * K); // (N, K)
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) {
      const g = n * nG + Math.floor(k / Ge);
      q[n * K + k] = roundCode(W[n * K + k], sz.scale[g], sz.zero[g], qmin, qmax);
    }
  }
  return q;
}

/** Options of round-to-nearest quantization. */
export interface RtnOptions extends ScaleZeroOptions {
  bits: Bits;
  /** Group size G (0: one group per row). */
  groupSize: number;
}

/** Round-to-nearest quantization of W (N, K) with per-group min/max (optionally clipped) s, z. */
export function rtnQuantize(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  opts: RtnOptions,
): QuantizedLinear {
  const sz = minMaxScaleZero(W, N, K, opts.bits, opts.groupSize, opts);
  const q = roundToNearest(W, N, K, opts.bits, opts.groupSize, sz);
  const groupSize = effectiveGroupSize(K, opts.groupSize);
  return { N, K, bits: opts.bits, groupSize, q, scale: sz.scale, zero: sz.zero };
}

/** diag(H) of a (K, K) matrix. */
export function diagonal(H: Float64Array, K: number): Float64Array {
  const d = new Float64Array(K);
  for (let k = 0; k < K; k++) d[k] = H[k * K + k];
  return d;
}

/**
 * Round-to-nearest as a layer quantizer: calibration batches only serve the "hdiag" clipping
 * criterion, dead columns and the reported loss.
 */
export class RTN extends LayerQuantizer<RtnOptions, QuantizeResult> {
  protected quantizeCalibrated(W: Float64Array, H: Float64Array, opts: RtnOptions): QuantizeResult {
    return this.withLoss(
      rtnQuantize(W, this.N, this.K, { ...opts, Hdiag: diagonal(H, this.K) }),
      W,
      H,
    );
  }
}
