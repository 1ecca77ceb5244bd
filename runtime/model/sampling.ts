/**
 * Token sampling on the host: greedy, temperature, top-k and top-p, driven by an explicit
 * uniform number so runs are reproducible. A GPU implementation mirrors `sample` exactly.
 */
import { ParameterError } from "../errors.ts";

/** Logits of one position, float32 (GPU read-back) or float64 (reference). */
export type Logits = Float32Array | Float64Array;

/** Sampling parameters. temperature 0 = greedy; topK 0 = off; topP ≥ 1 = off. */
export interface SamplingParams {
  temperature: number;
  topK: number;
  topP: number;
}

/** Index of the largest logit; the lowest index wins ties. */
export function argmax(logits: Logits): number {
  let best = 0, bestV = -Infinity;
  for (let i = 0; i < logits.length; i++) {
    if (logits[i] > bestV) {
      bestV = logits[i];
      best = i;
    }
  }
  return best;
}

/** PCG hash of a u32 (Jarzynski & Olano, "Hash Functions for GPU Rendering"); returns a u32. */
export function pcgHash(x: number): number {
  const state = (Math.imul(x, 747796405) + 2891336453) >>> 0;
  const word = Math.imul((state >>> ((state >>> 28) + 4)) ^ state, 277803737) >>> 0;
  return ((word >>> 22) ^ word) >>> 0;
}

/** The uniform number in [0, 1) (24 bits) for generation step `step` of a run seeded `seed`. */
export function uniform(seed: number, step: number): number {
  return (pcgHash(pcgHash(seed) ^ step) >>> 8) / 16777216;
}

/** A seeded generator of uniform numbers in [0, 1) (mulberry32), for shuffles and tests. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Throws ParameterError unless the parameters are in range. */
export function validateSamplingParams(p: SamplingParams): void {
  if (!(p.temperature >= 0) || !Number.isFinite(p.temperature)) {
    throw new ParameterError(`temperature ${p.temperature} must be a finite number ≥ 0`);
  }
  if (!Number.isInteger(p.topK) || p.topK < 0) {
    throw new ParameterError(`topK ${p.topK} must be an integer ≥ 0 (0 = off)`);
  }
  if (!(p.topP > 0)) throw new ParameterError(`topP ${p.topP} must be > 0 (≥ 1 = off)`);
}

/**
 * Samples a token with uniform number `u` ∈ [0, 1):
 * p_i = exp((l_i - max) / T) (unnormalized); threshold t = max(t_k, t_p) where t_k is the k-th
 * largest p and t_p the largest t with Σ_{p_i ≥ t} p_i ≥ topP·Σp; tokens with p_i ≥ t are kept;
 * walking tokens in index order, returns the first whose cumulative kept p exceeds u·(kept mass).
 */
export function sample(logits: Logits, params: SamplingParams, u: number): number {
  validateSamplingParams(params);
  const { temperature, topK, topP } = params;
  if (temperature === 0) return argmax(logits);
  const n = logits.length;
  // Unnormalized probabilities.
  const max = logits[argmax(logits)];
  const p = new Float64Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) total += p[i] = Math.exp((logits[i] - max) / temperature);
  // Thresholds from the descending order of p.
  let t = 0;
  const kOn = topK > 0 && topK < n, pOn = topP < 1;
  if (kOn || pOn) {
    const sorted = p.slice().sort().reverse();
    if (kOn) t = sorted[topK - 1];
    if (pOn) {
      // Smallest prefix, whole tie groups included, holding topP of the mass.
      let acc = 0;
      for (let j = 0; j < n; j++) {
        acc += sorted[j];
        const groupEnd = j === n - 1 || sorted[j + 1] < sorted[j];
        if (groupEnd && acc >= topP * total) {
          t = Math.max(t, sorted[j]);
          break;
        }
      }
    }
  }
  // Kept mass, then the inverse-CDF walk in index order.
  let kept = 0, last = 0;
  for (let i = 0; i < n; i++) {
    if (p[i] >= t) {
      kept += p[i];
      last = i;
    }
  }
  const r = u * kept;
  let cum = 0;
  for (let i = 0; i < n; i++) {
    if (p[i] >= t) {
      cum += p[i];
      if (cum > r) return i;
    }
  }
  return last;
}
