/** End-to-end generation on the real stories260K model, from both checkpoint layouts. */
import assert from "node:assert/strict";
import { loadModel } from "../runtime/model/load.ts";
import { generate } from "../runtime/model/generate.ts";
import { GREEDY } from "../runtime/model/model.ts";
import { haveShared, sharedPath, stories260KGreedyText, testGpu } from "./helpers.ts";

const have = await haveShared("models/stories260K/stories260K.bin", "models/stories260K-hf");

async function greedyText(path: string, opts: { batch?: number; inflight?: number } = {}) {
  const { model, tokenizer } = await loadModel(path, {
    gpu: await testGpu(),
    quiet: true,
    dtype: "f32",
  });
  const prompt = tokenizer.encode("", { bos: true });
  const ids: number[] = [];
  const it = generate(model, {
    prompt,
    maxTokens: 256,
    sampling: GREEDY,
    stopIds: model.config.eosIds,
  }, opts);
  for await (const id of it) ids.push(id);
  return tokenizer.decode([...prompt, ...ids]);
}

for (const layout of ["stories260K/stories260K.bin", "stories260K-hf"]) {
  Deno.test({
    name: `stories260K greedy generation reproduces the model card (${layout})`,
    ignore: !have,
    fn: async () => {
      const text = await greedyText(sharedPath(`models/${layout}`));
      assert.equal(text, await stories260KGreedyText());
    },
  });
}

Deno.test({
  name: "generation is the same whatever the read-back batch and depth",
  ignore: !have,
  fn: async () => {
    const path = sharedPath("models/stories260K/stories260K.bin");
    const a = await greedyText(path, { batch: 1, inflight: 1 });
    const b = await greedyText(path, { batch: 5, inflight: 7 });
    assert.equal(a, b);
  },
});

Deno.test({
  name:
    "seeded sampling is reproducible and follows the seed; max tokens and stop ids are honoured",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = await loadModel(sharedPath("models/stories260K-hf"), {
      gpu: await testGpu(),
      quiet: true,
    });
    const prompt = tokenizer.encode("Once upon a time", { bos: true });
    const run = async (seed: number, maxTokens = 40, stopIds: number[] = []) => {
      const ids: number[] = [];
      const sampling = { temperature: 0.8, topP: 0.9, topK: 0, seed };
      for await (const id of generate(model, { prompt, maxTokens, sampling, stopIds })) {
        ids.push(id);
      }
      return ids;
    };
    const a = await run(7), b = await run(7), c = await run(8);
    assert.equal(a.length, 40);
    assert.deepEqual(a, b);
    assert.notDeepEqual(a, c);
    // stopping on the 5th token's id yields the tokens before its first occurrence
    const stopAt = a.indexOf(a[4]);
    assert.deepEqual(await run(7, 40, [a[4]]), a.slice(0, stopAt));
  },
});
