/**
 * The gemm pool (quantize/gemm_pool.ts): products spread over worker threads equal the
 * single-threaded ones bit for bit, and both equal a plain triple loop, on odd shapes.
 */
import assert from "node:assert/strict";
import { gemmABtSerial } from "../quantize/gemm.ts";
import { f64, gemmABt, sliceRows, startGemmPool, withArena } from "../quantize/gemm_pool.ts";
import { rng } from "./helpers.ts";

function filled(n: number, seed: number): Float64Array {
  const r = rng(seed), a = f64(n);
  for (let i = 0; i < n; i++) a[i] = r();
  return a;
}

Deno.test("sliceRows cuts M rows into contiguous slices of whole quads", () => {
  for (const [M, n] of [[37, 2], [105, 3], [8, 16], [1000, 7]]) {
    let next = 0;
    for (let i = 0; i < n; i++) {
      const [m0, m1] = sliceRows(M, n, i);
      assert.equal(m0, next, `M ${M}, ${n} slices: slice ${i} starts at ${m0}`);
      assert.ok(m1 >= m0 && (m1 % 4 === 0 || m1 === M), `slice ${i} ends at ${m1}`);
      next = m1;
    }
    assert.equal(next, M);
  }
});

Deno.test("pooled gemmABt equals the serial product bit for bit, and a plain loop", async () => {
  const pool = await startGemmPool(3, { minMacs: 0 });
  try {
    for (const [M, N, K] of [[37, 129, 65], [9, 33, 300], [64, 7, 5], [8, 1, 1]]) {
      for (const accumulate of [false, true]) {
        const A = filled(M * K, 1), B = filled(N * K, 2), C = filled(M * N, 3);
        const serial = Float64Array.from(C), plain = Float64Array.from(C);
        gemmABt(C, A, B, M, N, K, accumulate);
        gemmABtSerial(serial, Float64Array.from(A), Float64Array.from(B), M, N, K, accumulate);
        assert.deepEqual(C, serial, `(${M}, ${N}, ${K}) accumulate ${accumulate}`);
        for (let m = 0; m < M; m++) {
          for (let n = 0; n < N; n++) {
            let s = accumulate ? plain[m * N + n] : 0;
            for (let k = 0; k < K; k++) s += A[m * K + k] * B[n * K + k];
            plain[m * N + n] = s;
          }
        }
        for (let i = 0; i < M * N; i++) assert.ok(Math.abs(C[i] - plain[i]) < 1e-12 * K);
      }
    }
    // arrays in the arena at offsets other than 0, and subarrays of them, work too
    const big = filled(50 * 40, 4), C = f64(20 * 10), serial = new Float64Array(20 * 10);
    const A = big.subarray(40 * 3), B = big.subarray(40 * 30);
    gemmABt(C, A, B, 20, 10, 40);
    gemmABtSerial(serial, A.slice(), B.slice(), 20, 10, 40);
    assert.deepEqual(C, serial);
  } finally {
    pool.stop();
  }
});

Deno.test("withArena frees the arena for reuse, and f64 hands out zeroed arrays", async () => {
  const pool = await startGemmPool(2);
  try {
    const before = f64(4);
    const inner = withArena(() => {
      const a = f64(1000).fill(7);
      return a.byteOffset;
    });
    const again = f64(1000);
    assert.equal(again.byteOffset, inner, "the freed space is reused");
    assert.ok(again.every((v) => v === 0));
    assert.ok(before.buffer === again.buffer && before.buffer instanceof SharedArrayBuffer);
  } finally {
    pool.stop();
  }
  assert.ok(!(f64(4).buffer instanceof SharedArrayBuffer), "no pool: ordinary arrays");
});

Deno.test("startGemmPool rejects a bad thread count and a second pool", async () => {
  await assert.rejects(() => startGemmPool(0), /threads must be a positive integer/);
  const pool = await startGemmPool(2);
  try {
    await assert.rejects(() => startGemmPool(2), /already running/);
  } finally {
    pool.stop();
  }
});
