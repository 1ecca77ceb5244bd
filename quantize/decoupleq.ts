/**
 * decoupleQ stage 1 (Guo et al. 2024, arXiv 2404.12759; bytedance/decoupleQ): treat the codes q
 * and the per-group (s, z) as separate unknowns of min Σ_n (Ŵ_n − W_n)·H·(Ŵ_n − W_n)ᵀ and
 * alternate an integer step (GPTQ rounding with s, z fixed, {@link gptqRound}) with a float
 * step (the exact H-weighted least-squares s, z with q fixed, {@link ScaleZeroLsq}). Each row
 * keeps whichever (q, s, z) has the lowest loss, so the loss never increases.
 */

import { ParameterError, ShapeError } from "../runtime/errors.ts";
import { LayerQuantizer, type QuantizeResult } from "./hessian.ts";
import { type GptqPlan, gptqPlan, gptqRound } from "./gptq.ts";
import { type Bits, effectiveGroupSize, nGroups } from "../runtime/format/qtensor.ts";
import { diagonal, minMaxScaleZero, type ScaleZero } from "./rtn.ts";
import { floatStep, ScaleZeroLsq } from "./scale_zero_lsq.ts";

export { floatStep, ScaleZeroLsq };

/** Options of decoupleQ stage 1. */
export interface DecoupleQOptions {
  bits: Bits;
  /** Group size G (0: one group per row). */
  groupSize: number;
  /** Alternations of grid/integer/float steps; default {@link DEFAULT_ITERS}. */
  iters?: number;
  /** Act-order in the integer step; default true. */
  actorder?: boolean;
  /** GPTQ lazy-update block size; default 128. */
  blocksize?: number;
  /**
   * Criterion of the first pass's per-group shrink-factor search: "hdiag" (Σ H_kk·(ŵ − w)²,
   * the default: lower layer loss in tests/quantizers_test.ts) or "plain" (Σ (ŵ − w)²).
   */
  gridCriterion?: "plain" | "hdiag";
  /** Stop when fewer than this fraction of rows improve in an iteration; default 1e-4. */
  minImprovedFraction?: number;
  /** A precomputed {@link gptqPlan} of H (its column order must follow `actorder`). */
  plan?: GptqPlan;
}

/**
 * Default number of alternations. On the synthetic layers of the tests the loss is within
 * ~0.3% of its converged value after 8 (3 leave it ~3% higher); rows that stop improving drop
 * out of later iterations, so 8 costs about 1.4× as much as 3.
 */
export const DEFAULT_ITERS = 8;

/** Layer loss after each stage of one iteration (iteration 0: the GPTQ initialization). */
export interface DecoupleQStep {
  iter: number;
  /** Σ of per-row best losses after the integer step of this iteration. */
  lossAfterInteger: number;
  /** Σ of per-row best losses after the float step (the state the iteration leaves). */
  loss: number;
  /** Rows whose loss dropped by more than a relative 1e-7 in this iteration (N for 0). */
  improvedRows: number;
}

/** decoupleQ's result: the quantized layer, its loss and the per-iteration history. */
export interface DecoupleQResult extends QuantizeResult {
  history: DecoupleQStep[];
  /** tr(W·H·Wᵀ), the denominator of the relative loss. */
  energy: number;
}

/**
 * decoupleQ stage 1 of W (N, K) under a finalized (damped) H (K, K). Initialization: (s, z)
 * from each group's min/max and q = gptqRound under them (= GPTQ with static groups). Then per
 * iteration: (a) on the first pass only, (s, z) from a per-group shrink-factor search;
 * (b) q = gptqRound under (s, z); (c) least-squares (s, z) for that q, fp16-rounded. Each row
 * keeps the best of its previous state, (q_b, s, z) and (q_b, s_c, z_c).
 */
export function decoupleQ(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  H: Float64Array,
  opts: DecoupleQOptions,
): DecoupleQResult {
  if (W.length !== N * K) throw new ShapeError(`W has ${W.length} entries, expected (${N}, ${K})`);
  const { bits, groupSize: G } = opts;
  const iters = opts.iters ?? DEFAULT_ITERS;
  if (!Number.isInteger(iters) || iters < 0) {
    throw new ParameterError(`decoupleQ: iters must be an integer ≥ 0, got ${iters}`);
  }
  const minImproved = (opts.minImprovedFraction ?? 1e-4) * N;
  const nG = nGroups(K, G);
  const plan = opts.plan ?? gptqPlan(H, K, opts.actorder ?? true);
  const lsq = new ScaleZeroLsq(W, N, K, H, G);
  const Hdiag = diagonal(H, K);

  const cur = minMaxScaleZero(W, N, K, bits, G);
  const rowLoss = new Float64Array(N); // GPTQ's loss comes with its rounding
  const q = gptqRound(W, N, K, bits, G, cur, plan, opts.blocksize, rowLoss);
  const sum = (a: Float64Array) => a.reduce((x, y) => x + y, 0);
  const history: DecoupleQStep[] = [
    { iter: 0, lossAfterInteger: sum(rowLoss), loss: sum(rowLoss), improvedRows: N },
  ];
  const allRows = Int32Array.from({ length: N }, (_, n) => n);
  let active = allRows;

  for (let iter = 1; iter <= iters && active.length > 0; iter++) {
    // Rows whose state did not change last iteration would repeat the same candidate (from
    // iteration 3 on, the candidate (s, z) is the state itself), so only changed rows run.
    const grid = iter === 1
      ? minMaxScaleZero(W, N, K, bits, G, { clip: opts.gridCriterion ?? "hdiag", Hdiag })
      : cur;
    const Wa = active.length === N ? W : gatherRows(W, K, active);
    const cand: ScaleZero = {
      scale: gatherRows(grid.scale, nG, active),
      zero: gatherRows(grid.zero, nG, active),
    };
    const qb = gptqRound(Wa, active.length, K, bits, G, cand, plan, opts.blocksize);
    const { lossIn, lossOut, out } = lsq.step(qb, cand, active);
    const changed: number[] = [];
    let improved = 0;
    const afterInteger = rowLoss.slice();
    for (let k = 0; k < active.length; k++) {
      const n = active[k], old = rowLoss[n];
      afterInteger[n] = Math.min(old, lossIn[k]);
      const useOut = lossOut[k] <= lossIn[k];
      const best = useOut ? lossOut[k] : lossIn[k];
      if (!(best < old)) continue;
      if (best < old * (1 - 1e-7)) improved++;
      changed.push(n);
      rowLoss[n] = best;
      q.set(qb.subarray(k * K, (k + 1) * K), n * K);
      const src = useOut ? out : cand;
      cur.scale.set(src.scale.subarray(k * nG, (k + 1) * nG), n * nG);
      cur.zero.set(src.zero.subarray(k * nG, (k + 1) * nG), n * nG);
    }
    history.push({
      iter,
      lossAfterInteger: sum(afterInteger),
      loss: sum(rowLoss),
      improvedRows: improved,
    });
    if (improved < minImproved) break;
    active = iter === 1 ? allRows : Int32Array.from(changed);
  }

  const ql = {
    N,
    K,
    bits,
    groupSize: effectiveGroupSize(K, G),
    q,
    scale: cur.scale,
    zero: cur.zero,
  };
  const energy = lsq.totalWeightEnergy();
  const loss = { loss: sum(rowLoss), relative: sum(rowLoss) / energy, rows: rowLoss };
  return { ql, loss, history, energy };
}

/** Rows `rows` of a row-major (·, width) array, compacted. */
function gatherRows<T extends Float32Array | Float64Array>(
  A: T,
  width: number,
  rows: Int32Array,
): T {
  const out = new (A.constructor as { new (n: number): T })(rows.length * width);
  for (let k = 0; k < rows.length; k++) {
    out.set(A.subarray(rows[k] * width, (rows[k] + 1) * width), k * width);
  }
  return out;
}

/** decoupleQ as a layer quantizer: addBatch, quantize, free. */
export class DecoupleQ extends LayerQuantizer<DecoupleQOptions, DecoupleQResult> {
  protected quantizeCalibrated(
    W: Float64Array,
    H: Float64Array,
    opts: DecoupleQOptions,
  ): DecoupleQResult {
    return decoupleQ(W, this.N, this.K, H, opts);
  }
}
