/**
 * Token sampling on the host: logit bias and penalties (OpenAI's presence and frequency, vLLM's
 * repetition), then greedy or temperature with top-k, top-p and min-p, driven by an explicit
 * uniform number so runs are reproducible. The GPU sampler (kernels/sample.ts,
 * kernels/penalties.ts) mirrors `sample` exactly. The parameters' ranges are here too, shared by
 * the server and the `generate` CLI so that the two cannot disagree.
 */
import { ParameterError } from "../errors.ts";

/** Logits of one position, float32 (GPU read-back) or float64 (reference). */
export type Logits = Float32Array | Float64Array;

/**
 * Sampling parameters. temperature 0 = greedy; topK 0 (or −1) = off; topP 1 = off. The optional ones are
 * off when absent: minP 0, presencePenalty and frequencyPenalty 0, repetitionPenalty 1, no bias.
 */
export interface SamplingParams {
  temperature: number;
  topK: number;
  topP: number;
  /** Drop tokens whose probability (after temperature) is below minP × the largest one. */
  minP?: number;
  /** OpenAI's: logit[t] −= presencePenalty when t is among the generated tokens. */
  presencePenalty?: number;
  /** OpenAI's: logit[t] −= frequencyPenalty × (times t was generated). */
  frequencyPenalty?: number;
  /**
   * vLLM's: for t in the prompt or generated, logit[t] / r when positive, logit[t] · r otherwise.
   */
  repetitionPenalty?: number;
  /** Added to the logits of these token ids (OpenAI's logit_bias: −100 bans, +100 forces). */
  logitBias?: ReadonlyMap<number, number>;
}

/** The tokens a sequence's penalties look at: its prompt and the tokens generated so far. */
export interface SamplingHistory {
  prompt: ArrayLike<number>;
  generated: ArrayLike<number>;
}

/** The allowed values of a number: [min, max] (integers only when `integer`; gtMin: > min). */
export interface NumberRange {
  min?: number;
  max?: number;
  integer?: boolean;
  gtMin?: boolean;
}

/** What a range allows, as words: "a number > 0 and ≤ 1", "an integer ≥ 0". */
export function describeRange(r: NumberRange): string {
  const { min = -Infinity, max = Infinity, integer = false, gtMin = false } = r;
  const bounds = [
    min > -Infinity ? `${gtMin ? ">" : "≥"} ${min}` : "",
    max < Infinity ? `≤ ${max}` : "",
  ].filter(Boolean);
  return `${integer ? "an integer" : "a number"}${bounds.length ? " " + bounds.join(" and ") : ""}`;
}

/** Whether `v` is a finite number (a safe integer when `integer`) within the range. */
export function inRange(v: number, r: NumberRange): boolean {
  const { min = -Infinity, max = Infinity, integer = false, gtMin = false } = r;
  if (!Number.isFinite(v) || (integer && !Number.isSafeInteger(v))) return false;
  return v >= min && v <= max && !(gtMin && v === min);
}

/**
 * Every sampling parameter's range, by its API name (`top_p`; the CLI's `--top-p`). Temperature
 * and the OpenAI penalties as OpenAI allows them; repetition_penalty bounded so that dividing or
 * multiplying a logit by it cannot overflow float32.
 */
export const SAMPLING_RANGES = {
  temperature: { min: 0, max: 2 },
  top_p: { min: 0, max: 1, gtMin: true },
  top_k: { min: -1, integer: true }, // 0 and −1 (vLLM's) = off
  min_p: { min: 0, max: 1 },
  presence_penalty: { min: -2, max: 2 },
  frequency_penalty: { min: -2, max: 2 },
  repetition_penalty: { min: 0.01, max: 100 },
  seed: { integer: true },
} as const satisfies Record<string, NumberRange>;

/** A sampling parameter's API name. */
export type SamplingName = keyof typeof SAMPLING_RANGES;

/** Most logit_bias entries (OpenAI's limit), and the range of each bias. */
export const MAX_LOGIT_BIAS = 300;
export const LOGIT_BIAS_RANGE: NumberRange = { min: -100, max: 100 };

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

/** Throws ParameterError, naming the parameter by its API name, unless every one is in range. */
export function validateSamplingParams(p: SamplingParams, vocabSize?: number): void {
  const check = (name: SamplingName, v: number | undefined) => {
    if (v !== undefined && !inRange(v, SAMPLING_RANGES[name])) {
      throw new ParameterError(`${name} must be ${describeRange(SAMPLING_RANGES[name])}; got ${v}`);
    }
  };
  check("temperature", p.temperature);
  check("top_k", p.topK);
  check("top_p", p.topP);
  check("min_p", p.minP);
  check("presence_penalty", p.presencePenalty);
  check("frequency_penalty", p.frequencyPenalty);
  check("repetition_penalty", p.repetitionPenalty);
  const bias = p.logitBias;
  if (!bias) return;
  if (bias.size > MAX_LOGIT_BIAS) {
    throw new ParameterError(
      `logit_bias holds at most ${MAX_LOGIT_BIAS} entries; got ${bias.size}`,
    );
  }
  for (const [id, b] of bias) {
    const okId = Number.isInteger(id) && id >= 0 && (vocabSize === undefined || id < vocabSize);
    if (!okId) {
      const vocab = vocabSize === undefined ? "" : ` in [0, ${vocabSize})`;
      throw new ParameterError(`logit_bias keys must be token ids${vocab}; got ${id}`);
    }
    if (!inRange(b, LOGIT_BIAS_RANGE)) {
      throw new ParameterError(
        `logit_bias.${id} must be ${describeRange(LOGIT_BIAS_RANGE)}; got ${b}`,
      );
    }
  }
}

/** Whether the parameters change the logits before sampling (bias or a penalty is on). */
export function adjustsLogits(p: SamplingParams): boolean {
  return (p.logitBias?.size ?? 0) > 0 || (p.presencePenalty ?? 0) !== 0 ||
    (p.frequencyPenalty ?? 0) !== 0 || (p.repetitionPenalty ?? 1) !== 1;
}

/**
 * The logits the sampler draws from, in vLLM's order: the logit bias added, then for each token
 * seen in the history the repetition penalty, then the frequency and presence penalties (over
 * the generated tokens only). Returns `logits` itself when nothing applies, else a copy.
 */
export function adjustLogits(
  logits: Logits,
  p: SamplingParams,
  history?: SamplingHistory,
): Logits {
  if (!adjustsLogits(p)) return logits;
  const n = logits.length;
  const out = Float64Array.from(logits);
  for (const [id, b] of p.logitBias ?? []) {
    if (id >= n) throw new ParameterError(`logit_bias token ${id} is outside the vocabulary`);
    out[id] += b;
  }
  const rep = p.repetitionPenalty ?? 1;
  const presence = p.presencePenalty ?? 0, frequency = p.frequencyPenalty ?? 0;
  const seen = new Uint8Array(n), count = new Uint32Array(n);
  for (const t of Array.from(history?.prompt ?? [])) seen[t] = 1;
  for (const t of Array.from(history?.generated ?? [])) {
    seen[t] = 1;
    count[t]++;
  }
  for (let i = 0; i < n; i++) {
    if (!seen[i]) continue;
    if (rep !== 1) out[i] = out[i] > 0 ? out[i] / rep : out[i] * rep;
    out[i] -= count[i] * frequency + (count[i] > 0 ? presence : 0);
  }
  return out;
}

/**
 * Samples a token with uniform number `u` ∈ [0, 1) from the adjusted logits l
 * ({@link adjustLogits}; `history` holds the tokens the penalties see):
 * greedy (temperature 0) is the argmax of l; otherwise p_i = exp((l_i − max) / T) (unnormalized,
 * the largest is 1); threshold t = max(t_k, t_p, minP) where t_k is the k-th largest p and t_p
 * the largest t with Σ_{p_i ≥ t} p_i ≥ topP·Σp; tokens with p_i ≥ t are kept; walking tokens in
 * index order, returns the first whose cumulative kept p exceeds u·(kept mass).
 */
export function sample(
  raw: Logits,
  params: SamplingParams,
  u: number,
  history?: SamplingHistory,
): number {
  validateSamplingParams(params, raw.length);
  const { temperature, topK, topP, minP = 0 } = params;
  const logits = adjustLogits(raw, params, history);
  if (temperature === 0) return argmax(logits);
  const n = logits.length;
  // Unnormalized probabilities.
  const max = logits[argmax(logits)];
  const p = new Float64Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) total += p[i] = Math.exp((logits[i] - max) / temperature);
  // Thresholds from the descending order of p; min-p's is minP itself (the largest p is 1).
  let t = minP;
  const kOn = topK > 0 && topK < n, pOn = topP < 1;
  if (kOn || pOn) {
    const sorted = p.slice().sort().reverse();
    if (kOn) t = Math.max(t, sorted[topK - 1]);
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
