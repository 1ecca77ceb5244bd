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
  const { model } = await loadModel(path, {
    gpu,
    slots,
    ctx: 128,
    maxT: Math.max(16, slots),
    quiet: true,
  });
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
    fn: () => withTempDir((dir) => batchVsAlone(dir, layout, w4, 4)),
  });
}

// 32 rows: the batched quantized kernels take every row in one token group (the 32-row plan once
// more than 8 rows run, the 8-row one before), and so do the dense lane kernels of the buffer
// layout (kernels/matmul.ts)
for (const [layout, w4] of [["texture", true], ["buffer", true], ["buffer", false]] as const) {
  Deno.test({
    name: `decodeBatch (${layout} layout${
      w4 ? ", W4 g32" : ", f32"
    }): 32 rows give their tokens alone`,
    ignore: !have,
    fn: () => withTempDir((dir) => batchVsAlone(dir, layout, w4, 32)),
  });
}

const TEXTS = [
  "Once upon a time",
  "The little dog went to the park and",
  "Lily",
  "Tom saw",
  "One day, a girl named Sue",
  "The sun was",
  "Ben and his mom",
  "There was a big",
];

async function batchVsAlone(dir: string, layout: string, w4: boolean, n: number): Promise<void> {
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
  const many = n > 4;
  const seqs: Seq[] = Array.from({ length: n }, (_, i) => ({
    prompt: tok.encode(TEXTS[i % TEXTS.length], { bos: true }),
    sampling: i % 2 === 0
      ? GREEDY
      : { temperature: 0.8 + 0.1 * (i % 4), topK: i % 4 === 1 ? 0 : 20, topP: 0.9, seed: 77 + i },
    steps: many ? 12 + (i % 5) : 20 + 3 * i,
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
  const model = await load(path, gpu, n);
  assert.equal(model.state.kv, layout);
  const slot = (i: number) => n - 1 - i; // slot order differs from sequence order
  const pos = seqs.map(() => -1);
  let widest = 0;
  for (let step = 0; pos.some((p, i) => p < seqs[i].prompt.length + seqs[i].steps); step++) {
    const rows = [];
    for (const [i, s] of seqs.entries()) {
      const len = s.prompt.length;
      if (pos[i] < 0 && step >= (many ? i >> 3 : 3 * i)) {
        model.writeTokens(0, s.prompt, slot(i));
        model.prefill(0, len, s.sampling, undefined, slot(i));
        pos[i] = len;
      } else if (pos[i] >= 0 && pos[i] < len + s.steps) {
        rows.push({ slot: slot(i), pos: pos[i]++, sampling: s.sampling });
      }
    }
    if (rows.length) model.decodeBatch(rows);
    widest = Math.max(widest, rows.length);
  }
  if (many) assert.equal(widest, n, "every row ran in one step at least once");
  // GPU adapters (and the GPU layout on lavapipe): the quantized kernels, or the dense lane
  // kernels, took all 32 rows in one token group (CPU adapters run the prefill kernels above 8
  // rows: runtime/model/model.ts)
  if (many && !gpu.isCpu) {
    const keys = [...gpu.pipelines.keys()].filter((k) => k.startsWith(w4 ? "matmulq" : "matmul_"));
    const tag = w4 ? `_b${n}_` : `b${n}`; // a quantized kernel's batch, a lane kernel's tt
    assert.ok(
      keys.some((k) => w4 ? k.includes(tag) : /_t\d+u\d+b\d+$/.test(k) && k.endsWith(tag)),
      keys.join(", "),
    );
  }
  for (const [i, s] of seqs.entries()) {
    const len = s.prompt.length;
    const got = await model.readTokens(len, len + s.steps + 1, slot(i));
    assert.deepEqual(got, alone[i], `sequence ${i}`);
  }
  assert.ok(new Set(alone.map((a) => a.join())).size >= Math.min(seqs.length, 8));
}
