/**
 * Batched decode on the real stories260K model: a model with several slots steps sequences at
 * different positions in one pass over the weights (`decodeBatch`), and each gives the tokens it
 * gives decoded alone (greedy and sampled), in the texture and buffer layouts, and packed W4
 * (the batched quantized kernels).
 */
import assert from "node:assert/strict";
import { loadModel } from "../runtime/model/load.ts";
import { type GpuModel, GREEDY, type SamplingParams } from "../runtime/model/model.ts";
import type { Gpu } from "../kernels/gpu.ts";
import { quantizeModel } from "../quantize/quantize_model.ts";
import { haveShared, sharedPath, testGpu, testGpuLayout, withTempDir } from "./helpers.ts";

const have = await haveShared("models/stories260K-hf");
const fpPath = sharedPath("models/stories260K-hf");

async function load(path: string, gpu: Gpu, slots: number): Promise<GpuModel> {
  const { model } = await loadModel(path, { gpu, slots, ctx: 128, maxT: 16, quiet: true });
  return model;
}

interface Seq {
  prompt: number[];
  sampling: SamplingParams;
  steps: number;
}

for (const [layout, w4] of [["texture", false], ["buffer", false], ["texture", true]] as const) {
  Deno.test({
    name: `decodeBatch (${layout} layout${w4 ? ", W4 g32" : ""}): sequences at different ` +
      "positions give their tokens alone",
    ignore: !have,
    fn: () => withTempDir((dir) => batchVsAlone(dir, layout, w4)),
  });
}

async function batchVsAlone(dir: string, layout: string, w4: boolean): Promise<void> {
  let path = fpPath;
  if (w4) {
    path = `${dir}/w4.lowbit`;
    const o = { model: fpPath, out: path, method: "rtn", bits: 4, groupSize: 32 } as const;
    await quantizeModel({
      ...o,
      tokenizer: sharedPath("models/stories260K/tok512.bin"),
      log: () => {},
    });
  }
  const gpu = layout === "buffer" ? await testGpuLayout() : await testGpu();
  const { tokenizer: tok } = await loadModel(fpPath, { gpu, ctx: 2, maxT: 1, quiet: true });
  const texts = ["Once upon a time", "The little dog went to the park and", "Lily", "Tom saw"];
  const seqs: Seq[] = texts.map((t, i) => ({
    prompt: tok.encode(t, { bos: true }),
    sampling: i % 2 === 0
      ? GREEDY
      : { temperature: 0.8 + 0.1 * i, topK: i === 1 ? 0 : 20, topP: 0.9, seed: 77 + i },
    steps: 20 + 3 * i,
  }));
  // alone: prefill, then one decode step at a time in slot 0 of a one-slot model
  const single = await load(path, gpu, 1);
  const alone: number[][] = [];
  for (const s of seqs) {
    const n = s.prompt.length;
    single.writeTokens(0, s.prompt);
    single.prefill(0, n, s.sampling);
    for (let p = n; p < n + s.steps; p++) single.decode(p, s.sampling);
    alone.push(await single.readTokens(n, n + s.steps + 1));
  }
  // batched: slots joining at different steps, each row at its own position
  const model = await load(path, gpu, 4);
  assert.equal(model.state.kv, layout);
  const pos = seqs.map(() => -1);
  for (let step = 0; pos.some((p, i) => p < seqs[i].prompt.length + seqs[i].steps); step++) {
    const rows = [];
    for (const [i, s] of seqs.entries()) {
      const n = s.prompt.length;
      if (pos[i] < 0 && step >= 3 * i) {
        // slot order differs from sequence order
        model.writeTokens(0, s.prompt, 3 - i);
        model.prefill(0, n, s.sampling, undefined, 3 - i);
        pos[i] = n;
      } else if (pos[i] >= 0 && pos[i] < n + s.steps) {
        rows.push({ slot: 3 - i, pos: pos[i]++, sampling: s.sampling });
      }
    }
    if (rows.length) model.decodeBatch(rows);
  }
  for (const [i, s] of seqs.entries()) {
    const n = s.prompt.length;
    const got = await model.readTokens(n, n + s.steps + 1, 3 - i);
    assert.deepEqual(got, alone[i], `sequence ${i}`);
  }
  assert.ok(new Set(alone.map((a) => a.join())).size === seqs.length);
}
