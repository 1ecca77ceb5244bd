/**
 * Mixed precision to a size budget: which format (bits × group size) each linear layer gets.
 *
 * - CVXQ (arXiv 2409.02026; seannz/cvxq `optimizer.py`): minimise Σ_l G²_l·D_l(f_l) subject to
 *   Σ_l n_l·bpw(f_l) ≤ R*·Σ_l n_l by dual ascent on the Lagrange multiplier λ. For a given λ each
 *   linear takes argmin_f G²_l·D_l(f) + λ·n_l·bpw(f); the rate R(λ) falls as λ grows, and
 *   log2 λ ← log2 λ + step·(R(λ) − R*) moves λ toward the budget. R(λ) is a step function, so
 *   the ascent ends with a bisection on log λ for the largest rate within the budget, and the
 *   bits the last step leaves unspent go to the upgrades with the best distortion drop per bit
 *   that still fit ({@link fillBudget}). D_l(f) is measured (quantize/distortion.ts) or, for the
 *   analytic variant, modelled from the weights ({@link analyticDistortion}).
 * - MixQuant (arXiv 2309.17341): each linear takes the cheapest format whose round-off error
 *   E_l(f) = ‖W_l − RTN_f(W_l)‖² is within QEM·E_l(ref), the reference being the layer's own error
 *   at the dearest candidate; QEM is found by bisection so that the model meets the budget.
 *
 * Rates are exact stored bits: codes with row padding plus the fp16 (s, z) per group, as
 * {@link bitsPerWeight} (and `inspect`) count them.
 */
import { ParameterError } from "../runtime/errors.ts";
import { bitsPerWeight } from "../runtime/format/pack.ts";
import type { Bits } from "../runtime/format/qtensor.ts";

/** One candidate storage format of a linear layer. */
export interface Format {
  bits: Bits;
  groupSize: number;
}

export type Allocator = "cvxq" | "cvxq-analytic" | "mixquant" | "uniform";
export const ALLOCATORS: readonly Allocator[] = ["cvxq", "cvxq-analytic", "mixquant", "uniform"];

/** The default candidates: bits {2, 3, 4} × group size {32, 64, 128}. */
export const CANDIDATES: readonly Format[] = ([2, 3, 4] as Bits[]).flatMap((bits) =>
  [32, 64, 128].map((groupSize) => ({ bits, groupSize }))
);

/** "W3 g64". */
export function formatName(f: Format): string {
  return `W${f.bits} g${f.groupSize === 0 ? "row" : f.groupSize}`;
}

/** Throws ParameterError unless `a` is one of {@link ALLOCATORS}. */
export function checkAllocator(a: string): asserts a is Allocator {
  if (!(ALLOCATORS as readonly string[]).includes(a)) {
    throw new ParameterError(`--allocator must be ${ALLOCATORS.join(", ")}; got "${a}"`);
  }
}

/** `--formats` text: comma-separated "W2g32", "2g32" or "w3 g64" (case-insensitive). */
export function parseFormats(text: string): Format[] {
  const out: Format[] = [];
  for (const part of text.split(",").map((p) => p.trim()).filter((p) => p !== "")) {
    const m = /^w?([234])\s*g(\d+)$/i.exec(part);
    const G = m ? Number(m[2]) : NaN;
    if (!m || ![0, 32, 64, 128].includes(G)) {
      throw new ParameterError(
        `--formats: "${part}" is not a format (bits 2|3|4, group size 32|64|128|0: e.g. W3g64)`,
      );
    }
    if (!out.some((f) => f.bits === Number(m[1]) && f.groupSize === G)) {
      out.push({ bits: Number(m[1]) as Bits, groupSize: G });
    }
  }
  if (out.length === 0) throw new ParameterError("--formats names no format");
  return out;
}

/** `--size-budget` text: "900MB", "1.2GiB", "350kB", "1000000" (bytes). */
export function parseSize(text: string): number {
  const m = /^\s*([\d.]+(?:e\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$/i.exec(text);
  const unit: Record<string, number> = {
    b: 1,
    kb: 1e3,
    mb: 1e6,
    gb: 1e9,
    kib: 1024,
    mib: 1024 ** 2,
    gib: 1024 ** 3,
  };
  const v = m ? Number(m[1]) * unit[(m[2] ?? "b").toLowerCase()] : NaN;
  if (!(v > 0) || !Number.isFinite(v)) {
    throw new ParameterError(`--size-budget: "${text}" is not a size (e.g. 900MB, 1.2GiB)`);
  }
  return Math.floor(v);
}

/** What the allocators see of a linear layer: its weights and each candidate's rate and cost. */
export interface LinearCosts {
  name: string;
  /** Weights N·K. */
  n: number;
  /** Stored bits per weight of each candidate (same order as the formats). */
  bpw: number[];
  /** What the allocator minimises, per candidate: G²·D(f) for CVXQ, E(f) for MixQuant. */
  cost: number[];
}

/** bpw of every candidate for an (N, K) layer. */
export function candidateRates(N: number, K: number, formats: readonly Format[]): number[] {
  return formats.map((f) => bitsPerWeight(N, K, f.bits, f.groupSize));
}

/** Average stored bits per weight of a choice (one candidate index per layer). */
export function rateOf(layers: readonly LinearCosts[], choice: readonly number[]): number {
  let bits = 0, n = 0;
  layers.forEach((l, i) => {
    bits += l.n * l.bpw[choice[i]];
    n += l.n;
  });
  return bits / n;
}

/** Σ cost of a choice. */
export function costOf(layers: readonly LinearCosts[], choice: readonly number[]): number {
  return layers.reduce((a, l, i) => a + l.cost[choice[i]], 0);
}

/** The cheapest and dearest average rates the candidates allow. */
export function rateRange(layers: readonly LinearCosts[]): { min: number; max: number } {
  const pick = (f: (r: number[]) => number) =>
    rateOf(layers, layers.map((l) => l.bpw.indexOf(f(l.bpw))));
  return { min: pick((r) => Math.min(...r)), max: pick((r) => Math.max(...r)) };
}

/**
 * Throws a ParameterError naming the range when `budget` (average bits per weight over the
 * linears) is below the cheapest allocation or above the dearest: before any work is done.
 */
export function checkBudget(layers: readonly LinearCosts[], budget: number, what: string): void {
  const { min, max } = rateRange(layers);
  if (!(budget >= min - 1e-12) || !(budget <= max + 1e-12)) {
    throw new ParameterError(
      `${what} is unreachable: the candidate formats give ${min.toFixed(3)} to ` +
        `${max.toFixed(3)} bits per weight over the linear layers`,
    );
  }
}

/** The Lagrangian choice at λ: each layer's argmin_f cost(f) + λ·n·bpw(f) (ties: cheaper). */
export function lagrangianChoice(layers: readonly LinearCosts[], lambda: number): number[] {
  return layers.map((l) => {
    let best = 0, bestV = Infinity;
    l.cost.forEach((c, f) => {
      const v = c + lambda * l.n * l.bpw[f];
      if (v < bestV || (v === bestV && l.bpw[f] < l.bpw[best])) {
        best = f;
        bestV = v;
      }
    });
    return best;
  });
}

/** The result of {@link dualAscent}. */
export interface DualResult {
  choice: number[];
  /** The multiplier of the returned Lagrangian solution (before the fill). */
  lambda: number;
  /** Dual-ascent steps, then bisection steps, then upgrades of the fill. */
  iterations: { ascent: number; bisection: number; fill: number };
  /** Average bits per weight of the returned choice. */
  rate: number;
  cost: number;
}

/**
 * CVXQ's dual ascent on log2 λ, then bisection, then {@link fillBudget}: the choice never
 * exceeds `budget` (average bits per weight), and lands on it where the candidates allow.
 */
export function dualAscent(
  layers: readonly LinearCosts[],
  budget: number,
  { step = 2, ascentIters = 40, bisectIters = 80 } = {},
): DualResult {
  checkBudget(layers, budget, `a budget of ${budget} bits per weight`);
  const rate = (lg: number) => rateOf(layers, lagrangianChoice(layers, 2 ** lg));
  // start where λ·n·bpw is of the size of the costs
  const meanCost = layers.reduce((a, l) => a + Math.max(...l.cost), 0) / layers.length;
  const meanN = layers.reduce((a, l) => a + l.n, 0) / layers.length;
  let lg = Math.log2(Math.max(meanCost, 1e-300) / meanN);
  // lo: a log λ whose rate exceeds the budget; hi: one within it
  let lo = -Infinity, hi = Infinity, ascent = 0;
  for (; ascent < ascentIters; ascent++) {
    const r = rate(lg);
    if (r > budget) lo = Math.max(lo, lg);
    else hi = Math.min(hi, lg);
    if (Number.isFinite(lo) && Number.isFinite(hi)) break;
    lg += step * (r - budget) + (r > budget ? 1e-3 : -1e-3);
  }
  // not bracketed yet: widen (λ → ∞ gives the cheapest rate, within any reachable budget;
  // at a budget of the dearest rate even λ → 0 stays within it, and hi goes down with it)
  for (let x = lg; !Number.isFinite(hi); x += 16) if (x > 1000 || rate(x) <= budget) hi = x;
  for (let x = Math.min(lg, hi); !Number.isFinite(lo); x -= 16) {
    if (rate(x) > budget) lo = x;
    else if (x < -1000) lo = hi = x;
    else hi = x;
  }
  let bisection = 0;
  for (; bisection < bisectIters && hi - lo > 1e-9; bisection++) {
    const mid = (lo + hi) / 2;
    if (rate(mid) > budget) lo = mid;
    else hi = mid;
  }
  const lagrangian = lagrangianChoice(layers, 2 ** hi);
  const { choice, steps } = fillBudget(layers, lagrangian, budget);
  return {
    choice,
    lambda: 2 ** hi,
    iterations: { ascent, bisection, fill: steps },
    rate: rateOf(layers, choice),
    cost: costOf(layers, choice),
  };
}

/**
 * Spends what a choice leaves of the budget: repeatedly takes the single-layer change that
 * lowers the cost most per extra bit among those that still fit (a change that lowers the cost
 * and the rate at once comes first), until none does. Never exceeds the budget.
 */
export function fillBudget(
  layers: readonly LinearCosts[],
  start: readonly number[],
  budget: number,
): { choice: number[]; steps: number } {
  const choice = [...start];
  const total = layers.reduce((a, l) => a + l.n, 0), cap = budget * total;
  let bits = layers.reduce((a, l, i) => a + l.n * l.bpw[choice[i]], 0), steps = 0;
  for (;;) {
    let best: { i: number; f: number; gain: number; dBits: number } | null = null;
    layers.forEach((l, i) => {
      const c0 = l.cost[choice[i]], b0 = l.n * l.bpw[choice[i]];
      l.bpw.forEach((r, f) => {
        const dBits = l.n * r - b0, dCost = l.cost[f] - c0;
        if (dCost >= 0 || bits + dBits > cap * (1 + 1e-12)) return;
        const gain = dBits <= 0 ? Infinity : -dCost / dBits;
        if (!best || gain > best.gain || (gain === best.gain && dBits < best.dBits)) {
          best = { i, f, gain, dBits };
        }
      });
    });
    if (!best) return { choice, steps };
    const b = best as { i: number; f: number; dBits: number };
    choice[b.i] = b.f;
    bits += b.dBits;
    steps++;
  }
}

/**
 * CVXQ's analytic distortion of one layer at each candidate, without a trial quantization:
 * the output error tr(ΔW·H·ΔWᵀ) if the round-off were white noise of the variance of a uniform
 * grid of 2^b levels over each group's range, S²_l(G)·(2^b − 1)⁻², where S²_l(G) is the mean
 * over groups of range²/12 (the variance of a uniform over the range, a spread measure that
 * follows the group size): N·tr(H)·S²_l(G)/(2^b − 1)². With it the Lagrangian choice is
 * B_l = ½·log2(S²_l·G²_l/λ) + const rounded to the candidates, the paper's analytic solution.
 */
export function analyticDistortion(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  traceH: number,
  formats: readonly Format[],
): number[] {
  return formats.map((f) => {
    const G = f.groupSize === 0 ? K : f.groupSize;
    let s2 = 0, groups = 0;
    for (let n = 0; n < N; n++) {
      for (let k1 = 0; k1 < K; k1 += G) {
        let lo = Infinity, hi = -Infinity;
        for (let k = k1; k < Math.min(K, k1 + G); k++) {
          const w = W[n * K + k];
          if (w < lo) lo = w;
          if (w > hi) hi = w;
        }
        s2 += (hi - lo) ** 2 / 12;
        groups++;
      }
    }
    return (N * traceH * (s2 / groups)) / ((1 << f.bits) - 1) ** 2;
  });
}

/** The result of {@link mixQuant}. */
export interface MixQuantResult {
  choice: number[];
  /** The quantization error multiplier of the returned choice. */
  qem: number;
  iterations: number;
  rate: number;
}

/**
 * MixQuant's choice for a QEM: each layer the cheapest candidate (by rate) whose error
 * `cost[f]` (E_l(f)) is within qem·E_l(ref), ref = the dearest candidate (the widest format).
 */
export function mixQuantChoice(layers: readonly LinearCosts[], qem: number): number[] {
  return layers.map((l) => {
    const ref = l.bpw.indexOf(Math.max(...l.bpw));
    let best = ref;
    l.cost.forEach((e, f) => {
      if (e <= qem * l.cost[ref] && l.bpw[f] < l.bpw[best]) best = f;
    });
    return best;
  });
}

/**
 * MixQuant to a budget: bisection on log QEM for the smallest QEM (the most accurate choice)
 * whose rate is within `budget`. The rate falls as QEM grows (more formats qualify).
 */
export function mixQuant(
  layers: readonly LinearCosts[],
  budget: number,
  { iters = 100 } = {},
): MixQuantResult {
  checkBudget(layers, budget, `a budget of ${budget} bits per weight`);
  const rate = (lq: number) => rateOf(layers, mixQuantChoice(layers, 2 ** lq));
  // QEM = 1 admits only the reference (unless a cheaper one is as good); QEM large admits all
  const ratios = layers.flatMap((l) => {
    const ref = Math.max(...l.bpw), e = l.cost[l.bpw.indexOf(ref)];
    return l.cost.map((c) => c / Math.max(e, 1e-300));
  });
  let lo = 0, hi = Math.log2(Math.max(...ratios, 1)) + 1, it = 0;
  if (rate(lo) <= budget) hi = lo;
  for (; it < iters && hi - lo > 1e-9; it++) {
    const mid = (lo + hi) / 2;
    if (rate(mid) > budget) lo = mid;
    else hi = mid;
  }
  const choice = mixQuantChoice(layers, 2 ** hi);
  return { choice, qem: 2 ** hi, iterations: it, rate: rateOf(layers, choice) };
}

/**
 * The best uniform setting at or under the budget: the one candidate for every layer with the
 * highest rate within it (ties: the lower total cost, then more bits).
 */
export function uniformChoice(
  layers: readonly LinearCosts[],
  formats: readonly Format[],
  budget: number,
): number[] {
  checkBudget(layers, budget, `a budget of ${budget} bits per weight`);
  let best: { f: number; rate: number; cost: number } | null = null;
  for (let f = 0; f < formats.length; f++) {
    const choice = layers.map(() => f), rate = rateOf(layers, choice);
    if (rate > budget * (1 + 1e-12)) continue;
    const cost = costOf(layers, choice);
    if (
      !best || rate > best.rate + 1e-12 ||
      (Math.abs(rate - best.rate) <= 1e-12 && cost < best.cost)
    ) best = { f, rate, cost };
  }
  if (!best) {
    throw new ParameterError(
      `a budget of ${budget} bits per weight: no single format fits every layer within it; ` +
        `use a mixed allocator (cvxq, mixquant)`,
    );
  }
  return layers.map(() => best!.f);
}
