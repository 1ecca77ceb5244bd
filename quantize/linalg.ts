/**
 * Dense float64 linear algebra for the quantizers: Cholesky factorization, SPD inverse, the
 * upper Cholesky factor of H⁻¹ that GPTQ feeds its error through, and a symmetric solve that
 * retries with damping. Matrices are row-major `Float64Array`s of n·n entries.
 */

import { NumericalError, ShapeError } from "../runtime/errors.ts";

function checkSquare(A: Float64Array, n: number, what: string): void {
  if (!Number.isInteger(n) || n < 1 || A.length !== n * n) {
    throw new ShapeError(`${what}: expected an (${n}, ${n}) matrix, got ${A.length} entries`);
  }
}

/**
 * Factors A = L·Lᵀ in place (left-looking, four rows of L per pass so that each load of an
 * earlier row feeds four dot products). On success the lower triangle of `A` holds L (the
 * strict upper triangle is zeroed) and −1 is returned; on failure returns the index of the
 * first pivot that is not positive (A is then garbage).
 */
export function choleskyInPlace(A: Float64Array, n: number): number {
  for (let i0 = 0; i0 < n; i0 += 4) {
    const nb = Math.min(4, n - i0);
    const r0 = i0 * n, r1 = nb > 1 ? r0 + n : r0, r2 = nb > 2 ? r0 + 2 * n : r0;
    const r3 = nb > 3 ? r0 + 3 * n : r0;
    // Columns left of the block: L[i, j] = (A[i, j] − Σ_{k<j} L[i, k]·L[j, k]) / L[j, j].
    for (let j = 0; j < i0; j++) {
      const rj = j * n;
      let s0 = A[r0 + j], s1 = A[r1 + j], s2 = A[r2 + j], s3 = A[r3 + j];
      for (let k = 0; k < j; k++) {
        const l = A[rj + k];
        s0 -= A[r0 + k] * l;
        s1 -= A[r1 + k] * l;
        s2 -= A[r2 + k] * l;
        s3 -= A[r3 + k] * l;
      }
      const d = A[rj + j];
      A[r3 + j] = s3 / d; // aliased rows (nb < 4) are written first, then overwritten
      A[r2 + j] = s2 / d;
      A[r1 + j] = s1 / d;
      A[r0 + j] = s0 / d;
    }
    // The block's own lower triangle.
    for (let i = i0; i < i0 + nb; i++) {
      const ri = i * n;
      for (let j = i0; j <= i; j++) {
        const rj = j * n;
        let s = A[ri + j];
        for (let k = 0; k < j; k++) s -= A[ri + k] * A[rj + k];
        if (i === j) {
          if (!(s > 0) || !Number.isFinite(s)) return i;
          A[ri + i] = Math.sqrt(s);
        } else {
          A[ri + j] = s / A[rj + j];
        }
      }
      A.fill(0, ri + i + 1, ri + n);
    }
  }
  return -1;
}

function notPositiveDefinite(A: Float64Array, n: number, bad: number): NumericalError {
  return new NumericalError(
    `cholesky: matrix (${n}, ${n}) is not positive definite (pivot ${bad}, diagonal ` +
      `${A[bad * n + bad]}); add damping (percdamp) or check for NaN/Inf in the inputs`,
  );
}

/**
 * Lower Cholesky factor L of a symmetric positive definite A (n, n): A = L·Lᵀ.
 * Throws NumericalError naming the failing pivot when A is not positive definite.
 */
export function cholesky(A: Float64Array, n: number): Float64Array {
  checkSquare(A, n, "cholesky");
  const L = A.slice(); // (n, n)
  const bad = choleskyInPlace(L, n);
  if (bad >= 0) throw notPositiveDefinite(A, n, bad);
  return L;
}

/**
 * X = L⁻ᵀ (upper triangular) for a lower triangular L (n, n). Row j of X is column j of L⁻¹,
 * so L⁻¹[i, j] = −(Σ_{k=j}^{i−1} L[i, k]·L⁻¹[k, j]) / L[i, i] is a contiguous dot product of
 * row i of L and row j of X; four rows i share each load of X.
 */
export function lowerInverseTransposed(L: Float64Array, n: number): Float64Array {
  checkSquare(L, n, "lowerInverseTransposed");
  const X = new Float64Array(n * n); // (n, n) upper
  for (let i0 = 0; i0 < n; i0 += 4) {
    const nb = Math.min(4, n - i0);
    const r0 = i0 * n, r1 = nb > 1 ? r0 + n : r0, r2 = nb > 2 ? r0 + 2 * n : r0;
    const r3 = nb > 3 ? r0 + 3 * n : r0;
    for (let j = 0; j < i0; j++) {
      const rj = j * n;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let k = j; k < i0; k++) {
        const x = X[rj + k];
        s0 += L[r0 + k] * x;
        s1 += L[r1 + k] * x;
        s2 += L[r2 + k] * x;
        s3 += L[r3 + k] * x;
      }
      const x0 = -s0 / L[r0 + i0];
      X[rj + i0] = x0;
      if (nb < 2) continue;
      const x1 = -(s1 + L[r1 + i0] * x0) / L[r1 + i0 + 1];
      X[rj + i0 + 1] = x1;
      if (nb < 3) continue;
      const x2 = -(s2 + L[r2 + i0] * x0 + L[r2 + i0 + 1] * x1) / L[r2 + i0 + 2];
      X[rj + i0 + 2] = x2;
      if (nb < 4) continue;
      X[rj + i0 + 3] = -(s3 + L[r3 + i0] * x0 + L[r3 + i0 + 1] * x1 + L[r3 + i0 + 2] * x2) /
        L[r3 + i0 + 3];
    }
    for (let j = i0; j < i0 + nb; j++) {
      const rj = j * n;
      X[rj + j] = 1 / L[rj + j];
      for (let i = j + 1; i < i0 + nb; i++) {
        let s = 0;
        for (let k = j; k < i; k++) s += L[i * n + k] * X[rj + k];
        X[rj + i] = -s / L[i * n + i];
      }
    }
  }
  return X;
}

/** Inverse of a lower triangular L (n, n), itself lower triangular. */
export function lowerTriangularInverse(L: Float64Array, n: number): Float64Array {
  const X = lowerInverseTransposed(L, n);
  const Linv = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) Linv[i * n + j] = X[j * n + i];
  return Linv;
}

/** A⁻¹ from the lower Cholesky factor L of A (as torch.cholesky_inverse): A⁻¹ = L⁻ᵀ·L⁻¹. */
export function choleskyInverse(L: Float64Array, n: number): Float64Array {
  const X = lowerInverseTransposed(L, n); // L⁻ᵀ (n, n)
  const Ainv = new Float64Array(n * n); // (n, n)
  // (A⁻¹)_ij = Σ_{k ≥ max(i,j)} X[i, k]·X[j, k].
  for (let i = 0; i < n; i++) {
    for (let j = 0; j <= i; j++) {
      let s = 0;
      for (let k = i; k < n; k++) s += X[i * n + k] * X[j * n + k];
      Ainv[i * n + j] = Ainv[j * n + i] = s;
    }
  }
  return Ainv;
}

/** Inverse of a symmetric positive definite A (n, n) via Cholesky. */
export function inverseSPD(A: Float64Array, n: number): Float64Array {
  return choleskyInverse(cholesky(A, n), n);
}

/**
 * Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ·U), the matrix gptq.py builds as
 * `cholesky(cholesky_inverse(cholesky(H)), upper=True)`. Computed more cheaply (2n³/3 instead
 * of 5n³/3 flops) from the Cholesky factor of the reversed matrix: with J the reversal
 * permutation and J·H·J = C·Cᵀ, H⁻¹ = (J·C⁻¹·J)ᵀ·(J·C⁻¹·J), and J·C⁻¹·J is upper triangular with
 * a positive diagonal, so it is the unique U.
 */
export function hinvUpperCholesky(H: Float64Array, n: number): Float64Array {
  checkSquare(H, n, "hinvUpperCholesky");
  const C = new Float64Array(n * n); // J·H·J, then its lower factor C  (n, n)
  for (let i = 0; i < n; i++) {
    const src = (n - 1 - i) * n;
    for (let j = 0; j < n; j++) C[i * n + j] = H[src + n - 1 - j];
  }
  const bad = choleskyInPlace(C, n);
  if (bad >= 0) throw notPositiveDefinite(H, n, n - 1 - bad);
  const X = lowerInverseTransposed(C, n); // C⁻ᵀ
  // U = J·C⁻¹·J: U[i, j] = C⁻¹[n−1−i, n−1−j] = X[n−1−j, n−1−i].
  const U = new Float64Array(n * n); // (n, n) upper
  for (let i = 0; i < n; i++) {
    for (let j = i; j < n; j++) U[i * n + j] = X[(n - 1 - j) * n + n - 1 - i];
  }
  return U;
}

/** Solves L·Lᵀ·x = b in place in `b` given the lower Cholesky factor L (n, n). */
export function choleskySolveInPlace(L: Float64Array, b: Float64Array, n: number): void {
  for (let i = 0; i < n; i++) {
    const ri = i * n;
    let s = b[i];
    for (let k = 0; k < i; k++) s -= L[ri + k] * b[k];
    b[i] = s / L[ri + i];
  }
  for (let i = n - 1; i >= 0; i--) {
    let s = b[i];
    for (let k = i + 1; k < n; k++) s -= L[k * n + i] * b[k];
    b[i] = s / L[i * n + i];
  }
}

/** Damping factors tried by {@link solveSymmetric}, relative to the mean |diagonal|. */
export const DAMPING_STEPS: readonly number[] = [0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1];

/**
 * Solves the symmetric positive (semi-)definite system A·x = b (A: (n, n), b: (n)). When A is
 * not positive definite it retries with A + λ·mean|diag(A)|·I for λ in {@link DAMPING_STEPS},
 * which for a singular A gives the small-norm least-squares solution. `work` (n·n) avoids an
 * allocation in hot loops. Returns x and the λ that was used; throws NumericalError when even
 * the largest damping fails (NaN/Inf in A).
 */
export function solveSymmetric(
  A: Float64Array,
  b: Float64Array,
  n: number,
  work: Float64Array = new Float64Array(n * n),
): { x: Float64Array; damp: number } {
  checkSquare(A, n, "solveSymmetric");
  if (b.length !== n || work.length < n * n) {
    throw new ShapeError(
      `solveSymmetric: b has ${b.length} entries, work ${work.length}; n = ${n}`,
    );
  }
  let meanDiag = 0;
  for (let i = 0; i < n; i++) meanDiag += Math.abs(A[i * n + i]);
  meanDiag = meanDiag > 0 ? meanDiag / n : 1;
  for (const damp of DAMPING_STEPS) {
    work.set(A.subarray(0, n * n));
    if (damp > 0) { for (let i = 0; i < n; i++) work[i * n + i] += damp * meanDiag; }
    if (choleskyInPlace(work, n) >= 0) continue;
    const x = b.slice();
    choleskySolveInPlace(work, x, n);
    return { x, damp };
  }
  throw new NumericalError(
    `solveSymmetric: (${n}, ${n}) system stays singular with damping up to ` +
      `${DAMPING_STEPS[DAMPING_STEPS.length - 1]}·mean|diag|; the matrix has NaN/Inf entries`,
  );
}
