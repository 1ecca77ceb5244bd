/** runtime/checkpoint/finite.ts: the NaN/±Inf scan of raw F32/F16/BF16 data and its messages. */
import assert from "node:assert/strict";
import { checkFinite, checkFiniteSz, firstNonFinite } from "../runtime/checkpoint/finite.ts";
import type { DType } from "../runtime/checkpoint/checkpoint.ts";
import { encodeDtype } from "./synthetic.ts";

const dtypes: DType[] = ["F32", "F16", "BF16"];
const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

Deno.test("firstNonFinite: finds NaN, +Inf and -Inf anywhere, in every dtype", () => {
  for (const dtype of dtypes) {
    // Odd lengths: a 16-bit dtype's last element is the half a u32 word leaves over.
    for (const n of [1, 2, 7, 8, 1001]) {
      const clean = Float32Array.from({ length: n }, (_, i) => (i % 13) - 6.5);
      assert.equal(firstNonFinite(dtype, encodeDtype(clean, dtype)), -1, `${dtype} n=${n}`);
      for (const at of new Set([0, 1, n >> 1, n - 1])) {
        if (at >= n) continue;
        for (const bad of [NaN, Infinity, -Infinity]) {
          const x = clean.slice();
          x[at] = bad;
          x[n - 1 - at] = bad; // a second one later must not hide the first
          const want = Math.min(at, n - 1 - at);
          assert.equal(firstNonFinite(dtype, encodeDtype(x, dtype)), want, `${dtype} ${bad}@${at}`);
        }
      }
    }
  }
});

Deno.test("firstNonFinite: extremes that are finite pass; unaligned views work", () => {
  // fp16: largest finite 0x7bff, -0, smallest subnormal; bf16/f32 the same in their widths.
  const f16 = new Uint16Array([0x7bff, 0xfbff, 0x8000, 0x0001, 0x03ff, 0x7c00]);
  assert.equal(firstNonFinite("F16", bytesOf(f16.subarray(0, 5))), -1);
  assert.equal(firstNonFinite("F16", bytesOf(f16)), 5);
  const bf16 = new Uint16Array([0x7f7f, 0xff7f, 0x8000, 0x0001, 0xffc1]);
  assert.equal(firstNonFinite("BF16", bytesOf(bf16)), 4);
  const f32 = new Float32Array([3.4028234663852886e38, -0, 1e-45, NaN]);
  assert.equal(firstNonFinite("F32", bytesOf(f32.subarray(0, 3))), -1);
  assert.equal(firstNonFinite("F32", bytesOf(f32)), 3);
  // A view that starts 2 bytes into its buffer (not u32-aligned).
  const buf = new Uint8Array(2 + 8);
  buf.set(bytesOf(new Uint16Array([1, 2, 0x7e00, 3])), 2);
  assert.equal(firstNonFinite("F16", buf.subarray(2)), 2);
});

Deno.test("checkFinite and checkFiniteSz name the tensor, the value and where it is", () => {
  const x = new Float32Array(12);
  x[7] = -Infinity;
  assert.throws(
    () => checkFinite("m.safetensors", "w", [3, 4], "F32", bytesOf(x)),
    {
      name: "ModelFormatError",
      message: /^m\.safetensors: tensor w holds -Inf at \[1, 3\] \(F32\)/,
    },
  );
  // Rows from row 2 on: the index counts from the tensor's start.
  const rows = encodeDtype(Float32Array.from([0, NaN, 0, 0]), "BF16");
  assert.throws(() => checkFinite("f", "w", [3, 4], "BF16", rows, 8), /holds NaN at \[2, 1\]/);
  assert.doesNotThrow(() => checkFinite("f", "w", [3, 4], "F16", new Uint8Array(24)));
  // sz: (s, z) pairs, 3 groups per row, from row 5: word 4 is row 6, group 1; z is the high half.
  const sz = new Uint32Array(6).fill(0x3c003c00);
  sz[4] = 0x7c003c00;
  assert.throws(() => checkFiniteSz("q.lowbit", "wq", sz, 3, 5), {
    name: "ModelFormatError",
    message: /^q\.lowbit: tensor wq holds \+Inf in its offset z of row 6, group 1/,
  });
  sz[4] = 0x3c007e00;
  assert.throws(() => checkFiniteSz("q.lowbit", "wq", sz, 3), /NaN in its scale s of row 1/);
});
