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
import { effectiveGroupSize, nGroups } from "../runtime/format/qtensor.ts";
import type { ScaleZero } from "./rtn.ts";

/**
 * Rows of W or q processed together by default, a multiple of 4 with RB·K f64 ≈ 2 MiB (in the
 * L2/L3 cache), so that H (K² f64, 32 MiB at K = 2048) is streamed once per RB rows, not per 4.
 */
function defaultRowBlock(K: number): number {
  return Math.max(4, Math.min(128, Math.floor((1 << 18) / K / 4) * 4));
}

/**
 * Two rows of H against four rows of x over columns j0..j1: out[r] = Σ_j H[ra + j]·x[x0 + r·K + j]
 * and out[4 + r] = Σ_j H[rb + j]·x[x0 + r·K + j], r < 4 (six loads feed eight multiply-adds).
 */
function dots2x4(
  H: Float64Array,
  ra: number,
  rb: number,
  x: Float64Array,
  x0: number,
  K: number,
  j0: number,
  j1: number,
  out: Float64Array,
): void {
  const x1 = x0 + K, x2 = x1 + K, x3 = x2 + K;
  let a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
  for (let j = j0; j < j1; j++) {
    const ha = H[ra + j], hb = H[rb + j];
    const y0 = x[x0 + j], y1 = x[x1 + j], y2 = x[x2 + j], y3 = x[x3 + j];
    a0 += ha * y0;
    a1 += ha * y1;
    a2 += ha * y2;
    a3 += ha * y3;
    b0 += hb * y0;
    b1 += hb * y1;
    b2 += hb * y2;
    b3 += hb * y3;
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
  out[4] = b0;
  out[5] = b1;
  out[6] = b2;
  out[7] = b3;
}

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
    /** Rows per pass over H (a multiple of 4); the default keeps a block in cache. */
    private readonly rowBlock = defaultRowBlock(K),
  ) {
    if (W.length !== N * K || H.length !== K * K) {
      throw new ShapeError(`ScaleZeroLsq: W ${W.length}, H ${H.length} entries; (${N}, ${K})`);
    }
    if (!Number.isInteger(rowBlock) || rowBlock < 4 || rowBlock % 4 !== 0) {
      throw new ShapeError(
        `ScaleZeroLsq: rowBlock must be a positive multiple of 4, got ${rowBlock}`,
      );
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
    // Rows of W·H as dot products HW[n, i] = W[n, :]·H[i, :] (H symmetric), a block of rows
    // of W (kept in cache) against each pair of rows of H, so H is streamed once per block.
    const RB = rowBlock, wf = new Float64Array(RB * K); // (RB, K), zero past N
    const d8 = new Float64Array(8);
    for (let n0 = 0; n0 < N; n0 += RB) {
      const R = Math.min(RB, N - n0);
      wf.fill(0);
      for (let r = 0; r < R; r++) {
        for (let j = 0; j < K; j++) wf[r * K + j] = W[(n0 + r) * K + j];
      }
      for (let i = 0; i < K; i += 2) {
        const ra = i * K, rb = i + 1 < K ? ra + K : ra;
        for (let r0 = 0; r0 < R; r0 += 4) {
          dots2x4(H, ra, rb, wf, r0 * K, K, 0, K, d8);
          for (let r = r0; r < Math.min(R, r0 + 4); r++) {
            const o = (n0 + r) * K + i;
            HW[o] = d8[r - r0];
            if (i + 1 < K) HW[o + 1] = d8[4 + r - r0];
          }
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
    const { m, nG } = this;
    const RB = this.rowBlock, qf = new Float64Array(RB * this.K);
    const S = new Float64Array(RB * nG * nG);
    for (let c = 0; c < R; c += RB) {
      const nb = Math.min(RB, R - c);
      this.blockS(q, n0 + c, nb, qf, S);
      for (let r = 0; r < nb; r++) {
        const k = c + r;
        this.rowEquations(q, n0 + k, n0 + k, S, r, M.subarray(k * m * m), b.subarray(k * m));
      }
    }
  }

  /**
   * The upper block triangle of S for rows c..c+R−1 of q (·, K): S (R, nG, nG). qf is an
   * (RB, K) scratch. For each pair of columns i of one group (two rows of H, kept in cache),
   * four rows of q at a time: S[g, h] += q_i·Σ_{j∈h} H_ij q_j for h ≥ g.
   */
  private blockS(q: Int8Array, c: number, R: number, qf: Float64Array, S: Float64Array): void {
    const { K, H, Ge, nG } = this;
    const nG2 = nG * nG, d8 = new Float64Array(8);
    qf.fill(0);
    for (let r = 0; r < R; r++) {
      for (let k = 0; k < K; k++) qf[r * K + k] = q[(c + r) * K + k];
    }
    S.fill(0, 0, Math.ceil(R / 4) * 4 * nG2);
    for (let i = 0; i < K; i++) {
      const gi = Math.floor(i / Ge), ri = i * K;
      const pair = i + 1 < K && Math.floor((i + 1) / Ge) === gi;
      const rc = pair ? ri + K : ri, i1 = pair ? i + 1 : i;
      for (let r0 = 0; r0 < R; r0 += 4) {
        const x0 = r0 * K, x1 = x0 + K, x2 = x1 + K, x3 = x2 + K;
        const a0 = qf[x0 + i], a1 = qf[x1 + i], a2 = qf[x2 + i], a3 = qf[x3 + i];
        const c0 = pair ? qf[x0 + i1] : 0, c1 = pair ? qf[x1 + i1] : 0;
        const c2 = pair ? qf[x2 + i1] : 0, c3 = pair ? qf[x3 + i1] : 0;
        if (
          a0 === 0 && a1 === 0 && a2 === 0 && a3 === 0 && c0 === 0 && c1 === 0 && c2 === 0 &&
          c3 === 0
        ) continue;
        const s0 = r0 * nG2 + gi * nG, s1 = s0 + nG2, s2 = s1 + nG2, s3 = s2 + nG2;
        for (let h = gi; h < nG; h++) {
          dots2x4(H, ri, rc, qf, x0, K, h * Ge, Math.min(K, (h + 1) * Ge), d8);
          S[s0 + h] += a0 * d8[0] + c0 * d8[4];
          S[s1 + h] += a1 * d8[1] + c1 * d8[5];
          S[s2 + h] += a2 * d8[2] + c2 * d8[6];
          S[s3 + h] += a3 * d8[3] + c3 * d8[7];
        }
      }
      if (pair) i++;
    }
  }

  /**
   * Normal equations M (m, m), b (m) of one row: codes at row k of q (·, K), layer row n (for
   * W·H), its S block at row r of S (·, nG, nG) from {@link blockS}.
   */
  private rowEquations(
    q: Int8Array,
    k: number,
    n: number,
    S: Float64Array,
    r: number,
    M: Float64Array,
    b: Float64Array,
  ): void {
    const { K, Ge, nG, m, Rg, Zg, HW, Bz } = this;
    M.fill(0, 0, m * m);
    b.fill(0, 0, m);
    for (let i = 0; i < K; i++) {
      const a = q[k * K + i];
      if (a === 0) continue;
      const gi = Math.floor(i / Ge), Mg = gi * m + nG;
      for (let h = 0; h < nG; h++) M[Mg + h] += a * Rg[i * nG + h]; // C[gi, h]
      b[gi] += a * HW[n * K + i];
    }
    const Sr = r * nG * nG;
    for (let g = 0; g < nG; g++) {
      for (let h = g; h < nG; h++) M[g * m + h] = M[h * m + g] = S[Sr + g * nG + h];
      for (let h = 0; h < nG; h++) {
        M[(nG + h) * m + g] = M[g * m + nG + h]; // Cᵀ
        M[(nG + g) * m + nG + h] = Zg[g * nG + h];
      }
      b[nG + g] = Bz[n * nG + g];
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
    const M = new Float64Array(m * m), b = new Float64Array(m), work = new Float64Array(m * m);
    const RB = this.rowBlock, qf = new Float64Array(RB * K), S = new Float64Array(RB * nG * nG);
    for (let c = 0; c < R; c += RB) {
      const nb = Math.min(RB, R - c);
      this.blockS(q, c, nb, qf, S);
      for (let r = 0; r < nb; r++) {
        const k = c + r, n = idx[k];
        this.rowEquations(q, k, n, S, r, M, b);
        lossIn[k] = this.loss(n, M, b, 0, sz, k);
        const th = this.solve(M, b, 0, 0, sz.scale.subarray(k * nG, (k + 1) * nG), work);
        for (let g = 0; g < nG; g++) {
          out.scale[k * nG + g] = Math.f16round(th[g]);
          out.zero[k * nG + g] = Math.f16round(th[nG + g]);
        }
        lossOut[k] = this.loss(n, M, b, 0, out, k);
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
