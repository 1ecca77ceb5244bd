/** Tests of runtime/format/pack.ts: round trips and hand-checked words of the packed layout. */
import assert from "node:assert/strict";
import { bitsPerWeight, packQ, paddedK, unpackQ } from "../runtime/format/pack.ts";
import { type Bits, nGroups, qRange, type QuantizedLinear } from "../runtime/format/qtensor.ts";
import { NumericalError, ParameterError } from "../runtime/errors.ts";
import { mulberry32 } from "./helpers.ts";

function randomQl(N: number, K: number, bits: Bits, G: number, seed: number): QuantizedLinear {
  const r = mulberry32(seed);
  const { qmin, qmax } = qRange(bits);
  const nG = nGroups(K, G);
  const q = Int8Array.from({ length: N * K }, () => qmin + Math.floor(r() * (qmax - qmin + 1)));
  const scale = Float32Array.from({ length: N * nG }, () => Math.f16round(r() * 0.01 + 1e-4));
  const zero = Float32Array.from({ length: N * nG }, () => Math.f16round((r() - 0.5) * 0.1));
  return { N, K, bits, groupSize: G === 0 ? K : G, q, scale, zero };
}

/** A (1, 32) layer whose codes are u − 2^(b−1) with the given nonzero u, all other u = 0. */
function oneBlock(bits: Bits, u: Record<number, number>): QuantizedLinear {
  const half = 1 << (bits - 1);
  const q = new Int8Array(32).fill(-half);
  for (const [j, v] of Object.entries(u)) q[Number(j)] = v - half;
  return {
    N: 1,
    K: 32,
    bits,
    groupSize: 32,
    q,
    scale: new Float32Array([1]),
    zero: new Float32Array([-2]),
  };
}

Deno.test("pack: round trip for every bit width and group size, K not a multiple of 32", () => {
  let seed = 1;
  for (const bits of [2, 3, 4] as Bits[]) {
    for (const G of [32, 64, 128, 0]) {
      for (const K of [172, 688, 100]) {
        const N = 5;
        const ql = randomQl(N, K, bits, G, seed++);
        const packed = packQ(ql);
        assert.equal(packed.qweight.length, N * bits * paddedK(K) / 32);
        assert.equal(packed.sz.length, N * nGroups(K, G));
        assert.deepEqual(unpackQ(packed, N, K, bits, G), ql, `bits ${bits}, G ${G}, K ${K}`);
      }
    }
  }
});

Deno.test("pack: 4-bit words match the hand-computed layout", () => {
  // u5 = 0xA → word 0 bit 12; u3 = 7 → word 0 bit 24; u12 = 0xF → word 1 bit 4;
  // u31 = 1 → word 3 bit 28.
  const { qweight, sz } = packQ(oneBlock(4, { 5: 0xa, 3: 7, 12: 0xf, 31: 1 }));
  assert.deepEqual([...qweight], [0x0700a000, 0x000000f0, 0, 0x10000000]);
  // s = 1.0 (fp16 0x3C00) in the low half, z = −2.0 (0xC000) in the high half.
  assert.deepEqual([...sz], [0xc0003c00]);
});

Deno.test("pack: 2-bit words match the hand-computed layout", () => {
  // u1 = 3 → word 0 bit 8; u6 = 2 → word 0 bit 18; u17 = 1 → word 1 bit 8.
  const { qweight } = packQ(oneBlock(2, { 1: 3, 6: 2, 17: 1 }));
  assert.deepEqual([...qweight], [0x00080300, 0x00000100]);
});

Deno.test("pack: 3-bit words match the hand-computed layout", () => {
  // u0 = 0b101: low 1 → w0 bit 0, high → w2 bit 0. u21 = 0b110: low 2 → w1 bit 10,
  // high → w2 bit 8·1 + 5 = 13. u30 = 0b011: low 3 → w1 bit 22. u7 = 0b100: high → w2 bit 25.
  const { qweight } = packQ(oneBlock(3, { 0: 5, 21: 6, 30: 3, 7: 4 }));
  assert.deepEqual([...qweight], [0x00000001, 0x00c00800, 0x02002001]);
});

Deno.test("pack: rows are padded with q = 0 to a multiple of 32", () => {
  const ql: QuantizedLinear = {
    N: 2,
    K: 33,
    bits: 4,
    groupSize: 33,
    q: new Int8Array(66).fill(-8),
    scale: new Float32Array([1, 1]),
    zero: new Float32Array([0, 0]),
  };
  const { qweight } = packQ(ql);
  // Per row: block 0 all u = 0; block 1: u = 0 for value 0, u = 8 (padding) for values 1..31.
  const row = [0, 0, 0, 0, 0x88888880, 0x88888888, 0x88888888, 0x88888888];
  assert.deepEqual([...qweight], [...row, ...row]);
});

Deno.test("pack: bad codes and non-fp16 scales are rejected", () => {
  const ql = randomQl(2, 40, 2, 32, 7);
  ql.q[3] = 2;
  assert.throws(() => packQ(ql), ParameterError);
  const ql2 = randomQl(2, 40, 2, 32, 8);
  ql2.scale[1] = 0.1; // not an fp16 value
  assert.throws(() => packQ(ql2), NumericalError);
});

Deno.test("pack: bits per weight include padding and the s/z overhead", () => {
  assert.equal(bitsPerWeight(2048, 2048, 2, 64), 2.5);
  assert.equal(bitsPerWeight(256, 4096, 4, 128), 4.25);
  assert.equal(bitsPerWeight(10, 100, 3, 32), (3 * 128 + 4 * 32) / 100);
  assert.equal(bitsPerWeight(10, 100, 3, 0), (3 * 128 + 32) / 100);
});
