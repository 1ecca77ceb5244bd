/** A SmolLM2-135M-shaped checkpoint (seeded random BF16, two shards) loads and generates. */
import assert from "node:assert/strict";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { GpuModel, GREEDY } from "../runtime/model/model.ts";
import { generate } from "../runtime/model/generate.ts";
import { maxAbsDiff, testGpu } from "./helpers.ts";
import { smolLm2_135mConfig, writeSyntheticHfCheckpoint } from "./synthetic.ts";

Deno.test("SmolLM2-135M shape: sharded BF16 checkpoint loads and generates 16 tokens", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await writeSyntheticHfCheckpoint(dir, smolLm2_135mConfig, {
      dtype: "BF16",
      shards: 2,
      seed: 11,
    });
    const ckpt = await openCheckpoint(dir);
    const model = await GpuModel.load(await testGpu(), ckpt, { ctx: 256 });
    assert.equal(model.weights.format === "f32", false, "BF16 weights load as f16");
    const prompt = [0, 510, 2000, 33000, 49151];
    // The last prompt position's logits against the float64 reference (same BF16 values;
    // the GPU holds them as f16, which represents these small values exactly).
    const logits = (await model.logitsAt(0, prompt)).subarray(4 * 49152);
    const ref = await ReferenceModel.load(ckpt);
    let refLogits = ref.forward(prompt[0], 0);
    for (let p = 1; p < prompt.length; p++) refLogits = ref.forward(prompt[p], p);
    const scale = refLogits.reduce((a, b) => Math.max(a, Math.abs(b)), 0);
    assert.ok(
      maxAbsDiff(logits, refLogits) < 2e-3 * scale,
      `logits differ by ${maxAbsDiff(logits, refLogits)}`,
    );
    const ids: number[] = [];
    for await (
      const id of generate(model, { prompt, maxTokens: 16, sampling: GREEDY, stopIds: [] })
    ) ids.push(id);
    assert.equal(ids.length, 16);
    assert.ok(ids.every((t) => Number.isInteger(t) && t >= 0 && t < 49152));
    ckpt.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
