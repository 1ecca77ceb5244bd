/**
 * The in-memory form of a quantized linear layer: Ŵ[n, k] = s[n, g]·q[n, k] + z[n, g] with
 * g = ⌊k / G⌋, signed integers q ∈ [−2^(b−1), 2^(b−1)−1] and fp16-representable s, z.
 */

import { ParameterError, ShapeError } from "../errors.ts";

/** Supported weight bit widths. */
export type Bits = 2 | 3 | 4;

/** A quantized weight matrix W (N outputs, K inputs) in unpacked form. */
export interface QuantizedLinear {
  /** Output features (rows of W). */
  N: number;
  /** Input features (columns of W). */
  K: number;
  bits: Bits;
  /** Effective group size G: K when the requested size was 0 (one group per row). */
  groupSize: number;
  /** Signed integer codes, row-major. */
  q: Int8Array; // (N, K)
  /** Per-(row, group) scale, fp16-representable. */
  scale: Float32Array; // (N, nGroups)
  /** Per-(row, group) offset, fp16-representable. */
  zero: Float32Array; // (N, nGroups)
}

/** Throws ParameterError unless `bits` is 2, 3 or 4. */
export function checkBits(bits: number): asserts bits is Bits {
  if (bits !== 2 && bits !== 3 && bits !== 4) {
    throw new ParameterError(`bits must be 2, 3 or 4, got ${bits}`);
  }
}

/** The effective group size: `G`, or K when G is 0 (one group per row). */
export function effectiveGroupSize(K: number, G: number): number {
  if (!Number.isInteger(G) || G < 0) {
    throw new ParameterError(`group size must be 0 (per row) or a positive integer, got ${G}`);
  }
  return G === 0 ? K : G;
}

/** Number of groups per row: ⌈K / G⌉ (the last group is shorter when G does not divide K). */
export function nGroups(K: number, G: number): number {
  return Math.ceil(K / effectiveGroupSize(K, G));
}

/** Integer code range [qmin, qmax] = [−2^(b−1), 2^(b−1)−1]. */
export function qRange(bits: Bits): { qmin: number; qmax: number } {
  const half = 1 << (bits - 1);
  return { qmin: -half, qmax: half - 1 };
}

/** Throws ShapeError/ParameterError when the arrays of `ql` contradict N, K, bits, G. */
export function checkQuantizedLinear(ql: QuantizedLinear): void {
  const { N, K, bits, groupSize } = ql;
  checkBits(bits);
  if (!Number.isInteger(N) || !Number.isInteger(K) || N < 1 || K < 1) {
    throw new ShapeError(`quantized linear: bad shape (${N}, ${K})`);
  }
  if (!Number.isInteger(groupSize) || groupSize < 1) {
    throw new ParameterError(`quantized linear: group size must be ≥ 1, got ${groupSize}`);
  }
  const nG = nGroups(K, groupSize);
  if (ql.q.length !== N * K) {
    throw new ShapeError(`quantized linear: q has ${ql.q.length} entries, expected ${N}·${K}`);
  }
  if (ql.scale.length !== N * nG || ql.zero.length !== N * nG) {
    throw new ShapeError(
      `quantized linear: scale/zero have ${ql.scale.length}/${ql.zero.length} entries, ` +
        `expected ${N}·${nG}`,
    );
  }
}

/**
 * Ŵ = s·q + z, row-major (N, K), into a new Float32Array or into `out` (pass a Float64Array to
 * get the products without float32 rounding, as the loss computations do).
 */
export function dequantize<T extends Float32Array | Float64Array = Float32Array>(
  ql: QuantizedLinear,
  out?: T,
): T {
  checkQuantizedLinear(ql);
  const { N, K, groupSize: G, q, scale, zero } = ql;
  const nG = nGroups(K, G);
  const What = out ?? new Float32Array(N * K) as T; // (N, K)
  if (What.length !== N * K) {
    throw new ShapeError(`dequantize: output has ${What.length} entries, expected ${N}·${K}`);
  }
  for (let n = 0; n < N; n++) {
    for (let g = 0; g < nG; g++) {
      const s = scale[n * nG + g], z = zero[n * nG + g];
      const k2 = Math.min(K, (g + 1) * G);
      for (let k = g * G; k < k2; k++) What[n * K + k] = s * q[n * K + k] + z;
    }
  }
  return What;
}
