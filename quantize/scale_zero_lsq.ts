/**
 * decoupleQ's float step: with the codes q fixed, the per-group (s, z) of one row that minimize
 * (A·θ − w)·H·(A·θ − w)ᵀ, θ = (s_1..s_nG, z_1..z_nG), where column g of A (K, 2nG) is q on
 * group g (zero elsewhere) and column nG + g is the indicator of group g. Normal equations:
 *
 *   M = AᵀHA = [[S, C], [Cᵀ, Z]],  b = AᵀHw = [bs; bz],  loss(θ) = θᵀMθ − 2θᵀb + wᵀHw
 *   S_gh = Σ_{i∈g, j∈h} q_i H_ij q_j   C_gh = Σ_{i∈g} q_i R_ih   Z_gh = Σ_{i∈g} R_ih
 *   R_ih = Σ_{j∈h} H_ij                bs_g = Σ_{i∈g} q_i (Hw)_i  bz_g = Σ_{i∈g} (Hw)_i
 *
 * R, Z, Hw, bz and wᵀHw do not depend on q and are computed once; S costs K²/2 per row (upper
 * block triangle), C and bs K·nG, so a row costs O(K²), not O(K²·nG).
 */

import { ShapeError } from "../runtime/errors.ts";
import { solveSymmetric } from "./linalg.ts";
import { effectiveGroupSize, nGroups } from "./qtensor.ts";
import type { ScaleZero } from "./rtn.ts";

/** Float-step solver for one layer: W (N, K), H (K, K), groups of G columns. */
export class ScaleZeroLsq {
  readonly nG: number;
  /** Size of θ: 2·nG. */
  readonly m: number;
  private readonly Ge: number;
  private readonly HW: Float64Array; // rows of W·H (N, K)
  private readonly wHw: Float64Array; // (N)
  private readonly Bz: Float64Array; // (N, nG)
  private readonly Rg: Float64Array; // (K, nG)
  private readonly Zg: Float64Array; // (nG, nG)

  constructor(
    W: Float32Array | Float64Array,
    readonly N: number,
    readonly K: number,
    private readonly H: Float64Array,
    G: number,
  ) {
    if (W.length !== N * K || H.length !== K * K) {
      throw new ShapeError(`ScaleZeroLsq: W ${W.length}, H ${H.length} entries; (${N}, ${K})`);
    }
    const Ge = this.Ge = effectiveGroupSize(K, G);
    const nG = this.nG = nGroups(K, G);
    this.m = 2 * nG;
    const Rg = this.Rg = new Float64Array(K * nG);
    for (let i = 0; i < K; i++) {
      for (let j = 0; j < K; j++) Rg[i * nG + Math.floor(j / Ge)] += H[i * K + j];
    }
    const Zg = this.Zg = new Float64Array(nG * nG);
    for (let i = 0; i < K; i++) {
      const g = Math.floor(i / Ge);
      for (let h = 0; h < nG; h++) Zg[g * nG + h] += Rg[i * nG + h];
    }
    const HW = this.HW = new Float64Array(N * K);
    const wHw = this.wHw = new Float64Array(N), Bz = this.Bz = new Float64Array(N * nG);
    // Rows of W·H, four at a time: HW[n, :] = Σ_j W[n, j]·H[j, :] (H symmetric), as axpys.
    for (let n0 = 0; n0 < N; n0 += 4) {
      const nb = Math.min(4, N - n0);
      const o0 = n0 * K, o1 = nb > 1 ? o0 + K : o0, o2 = nb > 2 ? o0 + 2 * K : o0;
      const o3 = nb > 3 ? o0 + 3 * K : o0;
      for (let j = 0; j < K; j++) {
        const a0 = W[o0 + j], a1 = nb > 1 ? W[o1 + j] : 0, a2 = nb > 2 ? W[o2 + j] : 0;
        const a3 = nb > 3 ? W[o3 + j] : 0, rj = j * K;
        for (let i = 0; i < K; i++) {
          const h = H[rj + i];
          HW[o0 + i] += a0 * h;
          HW[o1 + i] += a1 * h;
          HW[o2 + i] += a2 * h;
          HW[o3 + i] += a3 * h;
        }
      }
    }
    for (let n = 0; n < N; n++) {
      for (let i = 0; i < K; i++) {
        const t = HW[n * K + i];
        wHw[n] += W[n * K + i] * t;
        Bz[n * nG + Math.floor(i / Ge)] += t;
      }
    }
  }

  /**
   * Normal equations of rows n0..n0+R−1 for codes q (N, K): M (R, m, m) and b (R, m).
   */
  normalEquations(q: Int8Array, n0: number, R: number, M: Float64Array, b: Float64Array): void {
    const { m } = this;
    const rows = Int32Array.from({ length: R }, (_, r) => n0 + r);
    const q4 = new Float64Array(4 * this.K);
    for (let c = 0; c < R; c += 4) {
      const nb = Math.min(4, R - c);
      this.equations4(q, rows, c, nb, q4, M.subarray(c * m * m), b.subarray(c * m));
    }
  }

  /**
   * Normal equations of up to four rows: codes at rows c..c+nb−1 of q (·, K), whose original
   * rows (for W·H) are rows[c..]. M (nb, m, m), b (nb, m); q4 is a (4, K) scratch.
   */
  private equations4(
    q: Int8Array,
    rows: ArrayLike<number>,
    c: number,
    nb: number,
    q4: Float64Array,
    M: Float64Array,
    b: Float64Array,
  ): void {
    const { K, H, Ge, nG, m, Rg, Zg, HW, Bz } = this;
    M.fill(0, 0, nb * m * m);
    b.fill(0, 0, nb * m);
    q4.fill(0);
    for (let r = 0; r < nb; r++) {
      for (let k = 0; k < K; k++) q4[r * K + k] = q[(c + r) * K + k];
    }
    const K2 = 2 * K, K3 = 3 * K, mm = m * m;
    const S = new Float64Array(4 * nG * nG); // upper block triangle of S per row
    for (let i = 0; i < K; i++) {
      const a0 = q4[i], a1 = q4[K + i], a2 = q4[K2 + i], a3 = q4[K3 + i];
      if (a0 === 0 && a1 === 0 && a2 === 0 && a3 === 0) continue;
      const gi = Math.floor(i / Ge), ri = i * K;
      // S[gi, h] += q_i·Σ_{j∈h} H_ij q_j for h ≥ gi: four independent dot products per group.
      for (let h = gi; h < nG; h++) {
        const j2 = Math.min(K, (h + 1) * Ge);
        let t0 = 0, t1 = 0, t2 = 0, t3 = 0;
        for (let j = h * Ge; j < j2; j++) {
          const hij = H[ri + j];
          t0 += hij * q4[j];
          t1 += hij * q4[K + j];
          t2 += hij * q4[K2 + j];
          t3 += hij * q4[K3 + j];
        }
        const o = gi * nG + h;
        S[o] += a0 * t0;
        S[nG * nG + o] += a1 * t1;
        S[2 * nG * nG + o] += a2 * t2;
        S[3 * nG * nG + o] += a3 * t3;
      }
      for (let r = 0; r < nb; r++) {
        const ar = q4[r * K + i];
        if (ar === 0) continue;
        const Mg = r * mm + gi * m + nG;
        for (let h = 0; h < nG; h++) M[Mg + h] += ar * Rg[i * nG + h]; // C[gi, h]
        b[r * m + gi] += ar * HW[rows[c + r] * K + i];
      }
    }
    for (let r = 0; r < nb; r++) {
      const Mr = r * mm, Sr = r * nG * nG, n = rows[c + r];
      for (let g = 0; g < nG; g++) {
        for (let h = g; h < nG; h++) {
          M[Mr + g * m + h] = M[Mr + h * m + g] = S[Sr + g * nG + h];
        }
        for (let h = 0; h < nG; h++) {
          M[Mr + (nG + h) * m + g] = M[Mr + g * m + nG + h]; // Cᵀ
          M[Mr + (nG + g) * m + nG + h] = Zg[g * nG + h];
        }
        b[r * m + nG + g] = Bz[n * nG + g];
      }
    }
  }

  /**
   * loss(θ) = θᵀMθ − 2θᵀb + wᵀHw of layer row n, from the r-th system in M (·, m, m), b (·, m),
   * with θ = (s, z) read from row k of `sz`.
   */
  loss(n: number, M: Float64Array, b: Float64Array, r: number, sz: ScaleZero, k = n): number {
    const { nG, m } = this;
    const th = (i: number) => i < nG ? sz.scale[k * nG + i] : sz.zero[k * nG + i - nG];
    const Mr = r * m * m, br = r * m;
    let acc = this.wHw[n];
    for (let a = 0; a < m; a++) {
      const ta = th(a);
      if (ta === 0) continue;
      let t = 0;
      for (let c = 0; c < m; c++) t += M[Mr + a * m + c] * th(c);
      acc += ta * (t - 2 * b[br + a]);
    }
    return acc;
  }

  /**
   * Exact least-squares θ of one row's normal equations (M: m×m, b: m, read at element offsets
   * mOff, bOff). A group whose codes are all 0 leaves s_g undetermined: it keeps `sCur[g]`.
   * Near-singular systems are damped by {@link solveSymmetric}. Not rounded to fp16.
   */
  solve(
    M: Float64Array,
    b: Float64Array,
    mOff: number,
    bOff: number,
    sCur: ArrayLike<number>,
    work?: Float64Array,
  ): Float64Array {
    const { nG, m } = this;
    const A = M.slice(mOff, mOff + m * m), rhs = b.slice(bOff, bOff + m);
    for (let g = 0; g < nG; g++) {
      if (A[g * m + g] !== 0) continue;
      for (let c = 0; c < m; c++) A[g * m + c] = A[c * m + g] = 0;
      A[g * m + g] = 1;
      rhs[g] = sCur[g];
    }
    return solveSymmetric(A, rhs, m, work).x;
  }

  /** Σ_n wᵀHw over the rows, = tr(W·H·Wᵀ), the denominator of the relative loss. */
  totalWeightEnergy(): number {
    return this.wHw.reduce((x, y) => x + y, 0);
  }

  /**
   * One float step for codes q starting from `sz`: per row, the loss under `sz` (lossIn), the
   * fp16-rounded least-squares (s, z) (out) and its loss (lossOut). Callers keep per row
   * whichever is lower (see {@link floatStep}). With `rows`, q (R, K) and sz (R, nG) hold only
   * those rows of the layer (original indices, for W·H); all outputs are (R) / (R, nG).
   */
  step(
    q: Int8Array,
    sz: ScaleZero,
    rows?: Int32Array,
  ): { lossIn: Float64Array; lossOut: Float64Array; out: ScaleZero } {
    const { K, nG, m } = this;
    const idx = rows ?? Int32Array.from({ length: this.N }, (_, n) => n);
    const R = idx.length;
    if (q.length !== R * K || sz.scale.length !== R * nG || sz.zero.length !== R * nG) {
      throw new ShapeError(`ScaleZeroLsq.step: q/scale/zero sizes do not match (${R}, ${K})`);
    }
    const lossIn = new Float64Array(R), lossOut = new Float64Array(R);
    const out: ScaleZero = { scale: new Float32Array(R * nG), zero: new Float32Array(R * nG) };
    const M = new Float64Array(4 * m * m), b = new Float64Array(4 * m);
    const q4 = new Float64Array(4 * K), work = new Float64Array(m * m);
    for (let c = 0; c < R; c += 4) {
      const nb = Math.min(4, R - c);
      this.equations4(q, idx, c, nb, q4, M, b);
      for (let r = 0; r < nb; r++) {
        const k = c + r, n = idx[k];
        lossIn[k] = this.loss(n, M, b, r, sz, k);
        const th = this.solve(
          M,
          b,
          r * m * m,
          r * m,
          sz.scale.subarray(k * nG, (k + 1) * nG),
          work,
        );
        for (let g = 0; g < nG; g++) {
          out.scale[k * nG + g] = Math.f16round(th[g]);
          out.zero[k * nG + g] = Math.f16round(th[nG + g]);
        }
        lossOut[k] = this.loss(n, M, b, r, out, k);
      }
    }
    return { lossIn, lossOut, out };
  }
}

/**
 * The float step as a function: fp16 least-squares (s, z) for fixed q (N, K), each row keeping
 * its input (s, z) when that is not worse. Returns the new (s, z) and per-row losses before
 * and after (after ≤ before for every row).
 */
export function floatStep(
  lsq: ScaleZeroLsq,
  q: Int8Array,
  sz: ScaleZero,
): { sz: ScaleZero; before: Float64Array; after: Float64Array } {
  const { lossIn, lossOut, out } = lsq.step(q, sz);
  const { N, nG } = lsq;
  const after = new Float64Array(N);
  for (let n = 0; n < N; n++) {
    if (lossOut[n] <= lossIn[n]) {
      after[n] = lossOut[n];
      continue;
    }
    after[n] = lossIn[n];
    out.scale.set(sz.scale.subarray(n * nG, (n + 1) * nG), n * nG);
    out.zero.set(sz.zero.subarray(n * nG, (n + 1) * nG), n * nG);
  }
  return { sz: out, before: lossIn, after };
}
