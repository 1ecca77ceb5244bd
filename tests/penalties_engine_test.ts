/**
 * Logit bias and penalties in continuous batching on the real stories260K model: a job with
 * them gives the same tokens beside other jobs as alone (its sampler history lives in its slot
 * and restarts with each job), the same as generate(), and the parameters act as they should.
 */
import assert from "node:assert/strict";
import { Engine, type Job } from "../runtime/model/engine.ts";
import { generate } from "../runtime/model/generate.ts";
import { loadModel } from "../runtime/model/load.ts";
import { GREEDY, type SamplingParams } from "../runtime/model/model.ts";
import { collect, haveShared, sharedPath, testGpu } from "./helpers.ts";

const have = await haveShared("models/stories260K-hf");
const loaded = have
  ? await loadModel(sharedPath("models/stories260K-hf"), { gpu: await testGpu(), quiet: true })
  : null;

/** 12 jobs: with penalties, bias and min-p (greedy and sampled) and without. */
function jobs(): Job[] {
  const { model, tokenizer } = loaded!;
  const texts = ["Once upon a time", "The little dog", "Lily saw a", "Tom and Sue"];
  const samplings: SamplingParams[] = [
    { ...GREEDY, repetitionPenalty: 1.3 },
    { temperature: 0.9, topK: 0, topP: 0.95, seed: 11, presencePenalty: 1, frequencyPenalty: 0.5 },
    GREEDY,
    { ...GREEDY, frequencyPenalty: 0.8, logitBias: new Map([[410, -100], [265, 3]]) },
    { temperature: 1.1, topK: 40, topP: 1, seed: 12, minP: 0.1, repetitionPenalty: 0.9 },
    { temperature: 0.8, topK: 0, topP: 0.9, seed: 13 },
    { ...GREEDY, presencePenalty: -1.5, logitBias: new Map([[400, 2]]) },
    { temperature: 0.7, topK: 0, topP: 1, seed: 14, frequencyPenalty: -0.5, minP: 0.02 },
  ];
  return Array.from({ length: 12 }, (_, i) => ({
    prompt: tokenizer.encode(texts[i % 4] + (i > 3 ? " went" : ""), { bos: true }),
    maxTokens: 20 + ((i * 29) % 70),
    sampling: samplings[i % samplings.length],
    stopIds: i % 3 === 0 ? [] : model.config.eosIds,
  }));
}

Deno.test({
  name: "jobs with logit bias and penalties give the same tokens batched as alone",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const js = jobs();
    // alone, one after another in one slot: each job's history starts from its own prompt
    const solo = new Engine(model, tokenizer, "t", { slots: 1 });
    const alone: number[][] = [];
    for (const j of js) alone.push(await collect(solo.submit(j)));
    for (const [i, j] of js.entries()) {
      assert.deepEqual(await collect(generate(model, j)), alone[i], `generate, job ${i}`);
    }
    const steps: number[][] = [];
    const engine = new Engine(model, tokenizer, "t", { slots: 5, onStep: (s) => steps.push(s) });
    const together = await Promise.all(js.map((j) => collect(engine.submit(j))));
    for (const [i, a] of alone.entries()) assert.deepEqual(together[i], a, `job ${i}`);
    assert.ok(steps.some((s) => s.length === 5), "jobs shared steps");
  },
});

Deno.test({
  name: "the parameters act on the model's tokens: bias bans and forces, penalties curb repeats",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const prompt = tokenizer.encode("Once upon a time", { bos: true });
    const run = (sampling: SamplingParams, maxTokens = 60) =>
      collect(generate(model, { prompt, maxTokens, sampling, stopIds: [] }));
    const plain = await run(GREEDY);
    // −100 bans the most frequent token; +100 forces one, greedy and sampled
    const top = mostFrequent(plain);
    const banned = await run({ ...GREEDY, logitBias: new Map([[top, -100]]) });
    assert.ok(!banned.includes(top) && plain.includes(top));
    for (const s of [GREEDY, { temperature: 1, topK: 0, topP: 1, seed: 5 }]) {
      assert.deepEqual(
        await run({ ...s, logitBias: new Map([[300, 100]]) }, 10),
        Array(10).fill(300),
      );
    }
    // a repetition penalty over the prompt keeps the prompt's tokens out of a greedy continuation
    // while they would come; presence and frequency make generated tokens rarer
    const distinct = (ids: number[]) => new Set(ids).size;
    const strong = await run({ ...GREEDY, presencePenalty: 2, frequencyPenalty: 2 });
    assert.ok(distinct(strong) > distinct(plain), `${distinct(strong)} vs ${distinct(plain)}`);
    const rep = await run({ ...GREEDY, repetitionPenalty: 100 }, 30);
    assert.ok(!rep.some((t) => prompt.includes(t)), "a prompt token came back");
    assert.ok(
      distinct(rep) === rep.length,
      `a token repeated under repetition penalty 100: ${rep}`,
    );
  },
});

function mostFrequent(ids: number[]): number {
  const n = new Map<number, number>();
  for (const t of ids) n.set(t, (n.get(t) ?? 0) + 1);
  return [...n].sort((a, b) => b[1] - a[1])[0][0];
}

Deno.test({
  name: "a job with a bias outside the vocabulary is refused at submit; running jobs go on",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const prompt = tokenizer.encode("Lily saw a", { bos: true });
    const engine = new Engine(model, tokenizer, "t", { slots: 2 });
    const job: Job = { prompt, maxTokens: 30, sampling: GREEDY, stopIds: [] };
    const alone = await collect(engine.submit(job));
    const running = collect(engine.submit(job));
    const V = model.config.vocabSize;
    for (
      const sampling of [
        { ...GREEDY, logitBias: new Map([[V, 1]]) },
        { ...GREEDY, repetitionPenalty: 0 },
      ]
    ) {
      await assert.rejects(engine.submit({ ...job, sampling }).next(), {
        name: "ParameterError",
      });
    }
    assert.deepEqual(await running, alone);
  },
});
