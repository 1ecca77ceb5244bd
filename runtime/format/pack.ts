/**
 * Packed low-bit weights: the file and GPU-buffer layout of a {@link QuantizedLinear}
 * (docs/FORMAT.md, "Packed low-bit weights").
 *
 * Codes. u = q + 2^(b−1) ∈ [0, 2^b) (unsigned). Each row of K codes is padded to
 * Kp = ⌈K/32⌉·32 with u = 2^(b−1) (q = 0) and stored as Kp/32 blocks of 32 values; a block is
 * b consecutive little-endian u32 words, row n starts at word n·b·Kp/32, and `qweight` holds
 * N·b·Kp/32 words. Value j (0..31) of a block:
 * - 4-bit: word j>>3, bit 8·(p & 3) + 4·(p >> 2) with p = j & 7. `w & 0x0F0F0F0F` holds values
 *   0..3 of the word as byte lanes, `(w >> 4) & 0x0F0F0F0F` values 4..7.
 * - 2-bit: word j>>4, bit 8·(p & 3) + 2·(p >> 2) with p = j & 15. `(w >> 2c) & 0x03030303`
 *   holds values 4c..4c+3 as byte lanes.
 * - 3-bit: words w0, w1 hold the low 2 bits of values 0..15 and 16..31 in the 2-bit layout;
 *   w2 holds the high bit of value j at bit 8·(j & 3) + (j >> 2). Values 4i..4i+3 =
 *   low-2-bit lanes | (((w2 >> i) & 0x01010101) << 2).
 *
 * Scales. `sz` holds one u32 per (row, group), row-major (N, nGroups): low 16 bits = fp16 bits
 * of s, high 16 bits = fp16 bits of z (WGSL `unpack2x16float(sz)` = vec2(s, z)).
 */

import { NumericalError, ParameterError, ShapeError } from "../errors.ts";
import {
  type Bits,
  checkBits,
  checkQuantizedLinear,
  effectiveGroupSize,
  nGroups,
  qRange,
  type QuantizedLinear,
} from "./qtensor.ts";

/** Packed form of a quantized linear layer. */
export interface PackedQ {
  /** Codes, N·b·Kp/32 words (Kp = ⌈K/32⌉·32). */
  qweight: Uint32Array;
  /** fp16 (s, z) pairs, (N, nGroups) words. */
  sz: Uint32Array;
}

/** K rounded up to a multiple of 32. */
export function paddedK(K: number): number {
  return Math.ceil(K / 32) * 32;
}

/** Bit position of value j (0..31) within the word holding it: 2-bit and 4-bit layouts. */
function lanePos(bits: 2 | 4, j: number): { word: number; shift: number } {
  if (bits === 4) {
    const p = j & 7;
    return { word: j >> 3, shift: 8 * (p & 3) + 4 * (p >> 2) };
  }
  const p = j & 15;
  return { word: j >> 4, shift: 8 * (p & 3) + 2 * (p >> 2) };
}

const f16 = new Float16Array(1);
const u16 = new Uint16Array(f16.buffer);

function f16Bits(x: number, what: string): number {
  if (!Number.isFinite(x) || Math.f16round(x) !== x) {
    throw new NumericalError(
      `packQ: ${what} = ${x} is not a finite fp16 value; quantizers round s and z with Math.f16round`,
    );
  }
  f16[0] = x;
  return u16[0];
}

function f16FromBits(b: number): number {
  u16[0] = b;
  return f16[0];
}

/** Packs q (into qweight) and s, z (into sz) in the layout described above. */
export function packQ(ql: QuantizedLinear): PackedQ {
  checkQuantizedLinear(ql);
  const { N, K, bits, groupSize: G, q, scale, zero } = ql;
  const { qmin, qmax } = qRange(bits);
  const half = 1 << (bits - 1), nBlocks = paddedK(K) / 32;
  const qweight = new Uint32Array(N * bits * nBlocks);
  const u = new Uint8Array(32);
  for (let n = 0; n < N; n++) {
    for (let kb = 0; kb < nBlocks; kb++) {
      for (let j = 0; j < 32; j++) {
        const k = kb * 32 + j;
        if (k >= K) {
          u[j] = half;
          continue;
        }
        const v = q[n * K + k];
        if (v < qmin || v > qmax) {
          throw new ParameterError(`packQ: q[${n}, ${k}] = ${v} outside [${qmin}, ${qmax}]`);
        }
        u[j] = v + half;
      }
      const w0 = (n * nBlocks + kb) * bits;
      for (let j = 0; j < 32; j++) {
        if (bits === 3) {
          const { word, shift } = lanePos(2, j & 15);
          qweight[w0 + (j >> 4) + word] |= (u[j] & 3) << shift;
          qweight[w0 + 2] |= (u[j] >> 2) << (8 * (j & 3) + (j >> 2));
        } else {
          const { word, shift } = lanePos(bits, j);
          qweight[w0 + word] |= u[j] << shift;
        }
      }
    }
  }
  const nG = nGroups(K, G);
  const sz = new Uint32Array(N * nG);
  for (let i = 0; i < N * nG; i++) {
    sz[i] = (f16Bits(scale[i], "scale") | (f16Bits(zero[i], "zero") << 16)) >>> 0;
  }
  return { qweight, sz };
}

/** Inverse of {@link packQ}: G is the group size as requested (0: one group per row). */
export function unpackQ(
  packed: PackedQ,
  N: number,
  K: number,
  bits: Bits,
  G: number,
): QuantizedLinear {
  checkBits(bits);
  const Ge = effectiveGroupSize(K, G), nG = nGroups(K, G);
  const half = 1 << (bits - 1), nBlocks = paddedK(K) / 32;
  const { qweight, sz } = packed;
  if (qweight.length !== N * bits * nBlocks || sz.length !== N * nG) {
    throw new ShapeError(
      `unpackQ: qweight has ${qweight.length} words, sz ${sz.length}; expected ` +
        `${N * bits * nBlocks} and ${N * nG} for (${N}, ${K}) at ${bits} bits, G = ${Ge}`,
    );
  }
  const q = new Int8Array(N * K);
  for (let n = 0; n < N; n++) {
    for (let kb = 0; kb < nBlocks; kb++) {
      const w0 = (n * nBlocks + kb) * bits;
      for (let j = 0; j < 32 && kb * 32 + j < K; j++) {
        let u: number;
        if (bits === 3) {
          const { word, shift } = lanePos(2, j & 15);
          const lo = (qweight[w0 + (j >> 4) + word] >>> shift) & 3;
          u = lo | (((qweight[w0 + 2] >>> (8 * (j & 3) + (j >> 2))) & 1) << 2);
        } else {
          const { word, shift } = lanePos(bits, j);
          u = (qweight[w0 + word] >>> shift) & ((1 << bits) - 1);
        }
        q[n * K + kb * 32 + j] = u - half;
      }
    }
  }
  const scale = new Float32Array(N * nG), zero = new Float32Array(N * nG);
  for (let i = 0; i < N * nG; i++) {
    scale[i] = f16FromBits(sz[i] & 0xffff);
    zero[i] = f16FromBits(sz[i] >>> 16);
  }
  return { N, K, bits, groupSize: Ge, q, scale, zero };
}

/** Stored bits per weight of an (N, K) layer: codes with row padding plus 32 bits per group. */
export function bitsPerWeight(N: number, K: number, bits: Bits, G: number): number {
  checkBits(bits);
  return (N * bits * paddedK(K) + N * nGroups(K, G) * 32) / (N * K);
}
