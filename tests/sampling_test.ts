/**
 * Tests of runtime/model/sampling.ts: greedy, top-k, top-p, min-p, logit bias and penalties, the
 * sampled distribution, the hash, the parameter ranges.
 */
import assert from "node:assert/strict";
import { ParameterError } from "../runtime/errors.ts";
import {
  adjustLogits,
  argmax,
  pcgHash,
  sample,
  type SamplingParams,
  uniform,
  validateSamplingParams,
} from "../runtime/model/sampling.ts";

/** Counts sample() results over `n` stratified u values (j + 0.5) / n. */
function histogram(logits: Float64Array, params: Parameters<typeof sample>[1], n: number) {
  const counts = new Array(logits.length).fill(0);
  for (let j = 0; j < n; j++) counts[sample(logits, params, (j + 0.5) / n)]++;
  return counts.map((c) => c / n);
}

/** Softmax of logits / T restricted to `keep`, as the expected distribution. */
function expectedProbs(logits: number[], T: number, keep: number[]): number[] {
  const w = logits.map((l, i) => (keep.includes(i) ? Math.exp(l / T) : 0));
  const s = w.reduce((a, b) => a + b, 0);
  return w.map((x) => x / s);
}

Deno.test("pcgHash and uniform match the PCG reference values", () => {
  assert.deepEqual(
    [0, 1, 42, 0xffffffff, 123456789].map(pcgHash),
    [129708002, 2831084092, 1223963391, 3861530882, 4272394698],
  );
  // Values computed with Python integer arithmetic.
  assert.deepEqual(uniform(0, 0), 0.19039934873580933);
  assert.deepEqual(uniform(42, 7), 0.4519132971763611);
  assert.deepEqual(uniform(133742, 1000), 0.3761892318725586);
  for (let s = 0; s < 1000; s++) {
    const u = uniform(7, s);
    assert.ok(u >= 0 && u < 1, `uniform out of [0, 1): ${u}`);
  }
});

Deno.test("argmax and temperature 0 pick the lowest index among ties", () => {
  const l = new Float32Array([0.5, 3, -1, 3, 2]);
  assert.deepEqual(argmax(l), 1);
  for (const u of [0, 0.3, 0.999]) {
    assert.deepEqual(sample(l, { temperature: 0, topK: 5, topP: 0.5 }, u), 1);
  }
  assert.deepEqual(argmax(new Float64Array([-Infinity, -5, -Infinity])), 1);
});

Deno.test("top-k = 1 equals argmax", () => {
  for (let trial = 0; trial < 200; trial++) {
    const l = Float32Array.from({ length: 50 }, (_, i) => uniform(trial, i) * 10 - 5);
    const u = uniform(trial, 999);
    assert.deepEqual(sample(l, { temperature: 1.3, topK: 1, topP: 1 }, u), argmax(l));
  }
});

Deno.test("sample() follows softmax(l / T), with and without top-k", () => {
  const logits = [1, 2, 0.5, 3, -1, 2.5];
  const l = Float64Array.from(logits);
  const n = 100_000;
  const cases = [
    { params: { temperature: 0.7, topK: 0, topP: 1 }, keep: [0, 1, 2, 3, 4, 5] },
    { params: { temperature: 1.5, topK: 3, topP: 1 }, keep: [1, 3, 5] },
    { params: { temperature: 1, topK: 6, topP: 1 }, keep: [0, 1, 2, 3, 4, 5] },
  ];
  for (const { params, keep } of cases) {
    const got = histogram(l, params, n);
    const want = expectedProbs(logits, params.temperature, keep);
    // Stratified u values: each frequency is exact to within 1/n.
    got.forEach((g, i) => {
      assert.ok(
        Math.abs(g - want[i]) <= 2 / n,
        `${JSON.stringify(params)} token ${i}: ${g} vs ${want[i]}`,
      );
    });
  }
  // Pseudo-random u from uniform(): frequencies within sampling noise (σ ≤ 0.0036).
  const counts = new Array(logits.length).fill(0);
  const m = 20_000;
  for (let s = 0; s < m; s++) counts[sample(l, cases[0].params, uniform(1234, s))]++;
  const want = expectedProbs(logits, 0.7, cases[0].keep);
  counts.forEach((c, i) => {
    assert.ok(Math.abs(c / m - want[i]) < 0.015, `uniform() token ${i}: ${c / m} vs ${want[i]}`);
  });
});

Deno.test("top-p keeps the smallest high-probability set (hand example)", () => {
  // p = [0.5, 0.2, 0.15, 0.1, 0.05]
  const l = Float64Array.from([0.5, 0.2, 0.15, 0.1, 0.05].map(Math.log));
  const keptBy = (topP: number, topK = 0) => {
    const h = histogram(l, { temperature: 1, topK, topP }, 10_000);
    return h.flatMap((f, i) => (f > 0 ? [i] : []));
  };
  assert.deepEqual(keptBy(0.45), [0]); // 0.5 ≥ 0.45
  assert.deepEqual(keptBy(0.55), [0, 1]); // 0.5 < 0.55 ≤ 0.7
  assert.deepEqual(keptBy(0.8), [0, 1, 2]); // 0.7 < 0.8 ≤ 0.85
  assert.deepEqual(keptBy(0.99), [0, 1, 2, 3, 4]);
  assert.deepEqual(keptBy(0.8, 2), [0, 1]); // the tighter of top-k and top-p wins
  assert.deepEqual(keptBy(0.45, 3), [0]);
  // Kept tokens are sampled in proportion: 0.5 / 0.7 of u goes to token 0.
  const h = histogram(l, { temperature: 1, topK: 0, topP: 0.55 }, 7000);
  assert.ok(Math.abs(h[0] - 5 / 7) < 1e-3, `token 0 frequency ${h[0]}`);
  // Ties: p ∝ [e², e, e, 1]; top-p 0.6 needs the tied pair, and keeps both of it.
  const tied = Float64Array.from([2, 1, 1, 0]);
  const ht = histogram(tied, { temperature: 1, topK: 0, topP: 0.6 }, 10_000);
  assert.ok(ht[1] > 0 && ht[2] > 0 && ht[3] === 0, `tie group handling: ${ht}`);
  // u at the top end returns the last kept token.
  assert.deepEqual(sample(tied, { temperature: 1, topK: 0, topP: 0.6 }, 0.9999999), 2);
});

Deno.test("sample() rejects out-of-range parameters", () => {
  const l = new Float32Array([1, 2]);
  for (
    const p of [{ temperature: -1, topK: 0, topP: 1 }, { temperature: 1, topK: 1.5, topP: 1 }, {
      temperature: 1,
      topK: 0,
      topP: 0,
    }]
  ) {
    assert.throws(
      () => sample(l, p, 0.5),
      ParameterError,
      `no ParameterError for ${JSON.stringify(p)}`,
    );
  }
});

const SAMPLED: SamplingParams = { temperature: 1, topK: 0, topP: 1 };

Deno.test("adjustLogits: bias first, then repetition over prompt and output, then frequency and presence", () => {
  const logits = Float64Array.from([1, -2, 3, 0.5, -0.5, 2]);
  const params: SamplingParams = {
    ...SAMPLED,
    repetitionPenalty: 2,
    presencePenalty: 0.5,
    frequencyPenalty: 0.25,
    logitBias: new Map([[3, 1], [4, 1]]),
  };
  const history = { prompt: [1, 4, 1], generated: [2, 2, 0] };
  assert.deepEqual([...adjustLogits(logits, params, history)], [
    1 / 2 - (0.25 + 0.5), // generated once: positive, so divided
    -2 * 2, // prompt only: negative, so multiplied; no presence or frequency
    3 / 2 - (2 * 0.25 + 0.5), // generated twice
    0.5 + 1, // unseen: the bias alone
    (-0.5 + 1) / 2, // the bias before the repetition penalty (the other order gives 0)
    2, // untouched
  ]);
  // without a history the penalties see nothing; without parameters the logits are returned
  assert.deepEqual([...adjustLogits(logits, { ...params, logitBias: undefined })], [...logits]);
  assert.equal(adjustLogits(logits, SAMPLED, history), logits);
  const off = {
    ...SAMPLED,
    minP: 0,
    presencePenalty: 0,
    frequencyPenalty: 0,
    repetitionPenalty: 1,
  };
  assert.equal(adjustLogits(logits, { ...off, logitBias: new Map() }, history), logits);
});

Deno.test("logit bias: −100 bans the greedy token, +100 forces a token, sampled or greedy", () => {
  const l = Float32Array.from([0.5, 3, -1, 2.5, 2]);
  const ban = new Map([[1, -100]]);
  assert.equal(sample(l, { temperature: 0, topK: 0, topP: 1, logitBias: ban }, 0.5), 3);
  for (const u of [0.001, 0.3, 0.7, 0.9999]) {
    const force = new Map([[2, 100]]);
    assert.equal(sample(l, { ...SAMPLED, logitBias: force }, u), 2);
    assert.notEqual(sample(l, { ...SAMPLED, logitBias: ban }, u), 1);
  }
});

Deno.test("presence and frequency penalties count generated tokens; repetition also the prompt", () => {
  const l = Float64Array.from([2, 1.9, 1.8, 0]);
  const greedy = (p: Partial<SamplingParams>, prompt: number[], generated: number[]) =>
    sample(l, { temperature: 0, topK: 0, topP: 1, ...p }, 0, { prompt, generated });
  assert.equal(greedy({ presencePenalty: 0.25 }, [0], []), 0); // the prompt is not penalized
  assert.equal(greedy({ presencePenalty: 0.25 }, [], [0]), 1);
  assert.equal(greedy({ presencePenalty: 0.25 }, [], [0, 1]), 2);
  assert.equal(greedy({ frequencyPenalty: 0.15 }, [], [0]), 1); // 1.85 < 1.9
  assert.equal(greedy({ frequencyPenalty: 0.06 }, [], [0]), 0); // 1.94 > 1.9
  assert.equal(greedy({ frequencyPenalty: 0.06 }, [], [0, 0]), 1); // 1.88 < 1.9
  assert.equal(greedy({ frequencyPenalty: -1 }, [], [3, 3, 3]), 3); // negative: encourages
  assert.equal(greedy({ repetitionPenalty: 1.2 }, [0], []), 1); // 2 / 1.2 < 1.9
  assert.equal(greedy({ repetitionPenalty: 1.2 }, [], [0, 1]), 2);
});

Deno.test("min-p keeps the tokens with p ≥ minP × the largest p, after temperature", () => {
  // p = [0.5, 0.2, 0.15, 0.1, 0.05]
  const l = Float64Array.from([0.5, 0.2, 0.15, 0.1, 0.05].map(Math.log));
  const keptBy = (minP: number, temperature = 1, topK = 0) => {
    const h = histogram(l, { temperature, topK, topP: 1, minP }, 10_000);
    return h.flatMap((f, i) => (f > 0 ? [i] : []));
  };
  assert.deepEqual(keptBy(0), [0, 1, 2, 3, 4]);
  assert.deepEqual(keptBy(0.35), [0, 1]); // 0.2 ≥ 0.175 > 0.15
  assert.deepEqual(keptBy(0.25), [0, 1, 2]); // 0.15 ≥ 0.125 > 0.1
  assert.deepEqual(keptBy(1), [0]);
  // T = 2: p ∝ √[1, 0.4, 0.3, 0.2, 0.1] = [1, 0.63, 0.55, 0.45, 0.32]
  assert.deepEqual(keptBy(0.5, 2), [0, 1, 2]);
  assert.deepEqual(keptBy(0.25, 2, 2), [0, 1]); // the tighter of top-k and min-p wins
  // kept tokens in proportion: 0.5 / 0.7 of u goes to token 0
  const h = histogram(l, { ...SAMPLED, minP: 0.35 }, 7000);
  assert.ok(Math.abs(h[0] - 5 / 7) < 1e-3, `token 0 frequency ${h[0]}`);
});

Deno.test("validateSamplingParams names each parameter out of its range", () => {
  const bad: [Partial<SamplingParams>, string][] = [
    [{ temperature: 2.5 }, "temperature must be a number ≥ 0 and ≤ 2; got 2.5"],
    [{ topP: 1.5 }, "top_p must be a number > 0 and ≤ 1; got 1.5"],
    [{ topK: -2 }, "top_k must be an integer ≥ -1; got -2"],
    [{ minP: 1.1 }, "min_p must be a number ≥ 0 and ≤ 1; got 1.1"],
    [{ presencePenalty: -3 }, "presence_penalty must be a number ≥ -2 and ≤ 2; got -3"],
    [{ frequencyPenalty: NaN }, "frequency_penalty must be a number ≥ -2 and ≤ 2; got NaN"],
    [{ repetitionPenalty: 0 }, "repetition_penalty must be a number ≥ 0.01 and ≤ 100; got 0"],
    [{ logitBias: new Map([[5, 101]]) }, "logit_bias.5 must be a number ≥ -100 and ≤ 100; got 101"],
    [{ logitBias: new Map([[9, 1]]) }, "logit_bias keys must be token ids in [0, 8); got 9"],
    [
      { logitBias: new Map(Array.from({ length: 301 }, (_, i) => [i, 1])) },
      "logit_bias holds at most 300 entries; got 301",
    ],
  ];
  for (const [p, message] of bad) {
    assert.throws(() => validateSamplingParams({ ...SAMPLED, ...p }, 8), {
      name: "ParameterError",
      message,
    });
  }
  validateSamplingParams({
    temperature: 2,
    topK: 3,
    topP: 1,
    minP: 1,
    presencePenalty: -2,
    frequencyPenalty: 2,
    repetitionPenalty: 100,
    logitBias: new Map([[7, -100]]),
  }, 8);
});
