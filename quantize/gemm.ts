/**
 * The CPU matrix product every float64 pass of the quantizer is written in (stage 2, the
 * end-to-end stage): C (M, N) = A (M, K)·B (N, K)ᵀ over contiguous rows, on the calling thread.
 * {@link gemmABt} in gemm_pool.ts spreads the rows of C over several threads.
 */

/**
 * C (M, N) = A (M, K)·B (N, K)ᵀ, or C += that when `accumulate`. All row-major. Register
 * blocked 4×4 (16 float64 accumulators; the JIT keeps them in registers), remainders 4×1, 1×1.
 */
export function gemmABtSerial(
  C: Float64Array,
  A: Float64Array,
  B: Float64Array,
  M: number,
  N: number,
  K: number,
  accumulate = false,
): void {
  const M4 = M - (M % 4), N4 = N - (N % 4);
  for (let m = 0; m < M4; m += 4) {
    const a0 = m * K, a1 = a0 + K, a2 = a1 + K, a3 = a2 + K;
    for (let n = 0; n < N4; n += 4) {
      const b0 = n * K, b1 = b0 + K, b2 = b1 + K, b3 = b2 + K;
      let s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      let s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
      for (let k = 0; k < K; k++) {
        const w0 = B[b0 + k], w1 = B[b1 + k], w2 = B[b2 + k], w3 = B[b3 + k];
        let x = A[a0 + k];
        s00 += x * w0, s01 += x * w1, s02 += x * w2, s03 += x * w3;
        x = A[a1 + k];
        s10 += x * w0, s11 += x * w1, s12 += x * w2, s13 += x * w3;
        x = A[a2 + k];
        s20 += x * w0, s21 += x * w1, s22 += x * w2, s23 += x * w3;
        x = A[a3 + k];
        s30 += x * w0, s31 += x * w1, s32 += x * w2, s33 += x * w3;
      }
      let c = m * N + n;
      if (accumulate) {
        C[c] += s00, C[c + 1] += s01, C[c + 2] += s02, C[c + 3] += s03, c += N;
        C[c] += s10, C[c + 1] += s11, C[c + 2] += s12, C[c + 3] += s13, c += N;
        C[c] += s20, C[c + 1] += s21, C[c + 2] += s22, C[c + 3] += s23, c += N;
        C[c] += s30, C[c + 1] += s31, C[c + 2] += s32, C[c + 3] += s33;
      } else {
        C[c] = s00, C[c + 1] = s01, C[c + 2] = s02, C[c + 3] = s03, c += N;
        C[c] = s10, C[c + 1] = s11, C[c + 2] = s12, C[c + 3] = s13, c += N;
        C[c] = s20, C[c + 1] = s21, C[c + 2] = s22, C[c + 3] = s23, c += N;
        C[c] = s30, C[c + 1] = s31, C[c + 2] = s32, C[c + 3] = s33;
      }
    }
    for (let n = N4; n < N; n++) {
      const b = n * K;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let k = 0; k < K; k++) {
        const w = B[b + k];
        s0 += A[a0 + k] * w, s1 += A[a1 + k] * w, s2 += A[a2 + k] * w, s3 += A[a3 + k] * w;
      }
      const c = m * N + n;
      if (accumulate) C[c] += s0, C[c + N] += s1, C[c + 2 * N] += s2, C[c + 3 * N] += s3;
      else C[c] = s0, C[c + N] = s1, C[c + 2 * N] = s2, C[c + 3 * N] = s3;
    }
  }
  for (let m = M4; m < M; m++) {
    const a = m * K;
    for (let n = 0; n < N; n++) {
      const b = n * K;
      let s = 0;
      for (let k = 0; k < K; k++) s += A[a + k] * B[b + k];
      if (accumulate) C[m * N + n] += s;
      else C[m * N + n] = s;
    }
  }
}
