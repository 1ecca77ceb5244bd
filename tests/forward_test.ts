/** The GPU forward pass against the float64 CPU reference, and prefill against decode. */
import assert from "node:assert/strict";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { GpuModel, GREEDY } from "../runtime/model/model.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import { haveShared, maxAbsDiff, sharedPath, testGpu, testGpuLayout } from "./helpers.ts";
import type { Gpu } from "../kernels/gpu.ts";
import { writeSyntheticHfCheckpoint } from "./synthetic.ts";

const haveStories = await haveShared(
  "models/stories260K-hf",
  "data/tinystories/TinyStories-valid-sample.txt",
);
const haveNovels = await haveShared("models/novels-5M", "data/novels/heldout.txt");

/**
 * Max |GPU − reference| over every position of `ids`, and max |prefill − decode|. f32 weights and
 * KV cache, as the float64 reference holds them (the f16 cache: tests/kv_cache_test.ts).
 */
async function compare(ckpt: Checkpoint, ids: number[], maxT: number, gpu?: Gpu) {
  const opts = { dtype: "f32", kvType: "f32", maxT } as const;
  const model = await GpuModel.load(gpu ?? await testGpu(), ckpt, opts);
  const ref = await ReferenceModel.load(ckpt);
  const V = ckpt.config.vocabSize;
  const prefill = await model.logitsAt(0, ids);
  let refErr = 0, decodeErr = 0;
  for (let p = 0; p < ids.length; p++) {
    const row = prefill.subarray(p * V, (p + 1) * V);
    refErr = Math.max(refErr, maxAbsDiff(row, ref.forward(ids[p], p)));
    model.writeTokens(p, [ids[p]]);
    model.decode(p, GREEDY);
    decodeErr = Math.max(decodeErr, maxAbsDiff(row, await model.readLogits()));
  }
  return { refErr, decodeErr };
}

async function textIds(modelDir: string, textFile: string, n: number): Promise<number[]> {
  const tok = await loadTokenizer(sharedPath(modelDir));
  const text = await Deno.readTextFile(sharedPath(textFile));
  const ids = tok.encode(text.slice(0, 4000), { bos: true }).slice(0, n);
  assert.equal(ids.length, n);
  return ids;
}

Deno.test({
  name: "stories260K: GPU logits match the reference within 1e-3 over 64 tokens; prefill = decode",
  ignore: !haveStories,
  fn: async () => {
    const ids = await textIds(
      "models/stories260K-hf",
      "data/tinystories/TinyStories-valid-sample.txt",
      64,
    );
    const ckpt = await openCheckpoint(sharedPath("models/stories260K-hf"));
    // maxT 24: the prompt runs as three prefill steps (24 + 24 + 16); this adapter's layout
    // (textures on CPU adapters) and the GPU one (storage buffers)
    for (const gpu of [await testGpu(), await testGpuLayout()]) {
      const { refErr, decodeErr } = await compare(ckpt, ids, 24, gpu);
      assert.ok(refErr < 1e-3, `${gpu.adapterName}: GPU vs reference: ${refErr}`);
      assert.ok(decodeErr < 1e-4, `${gpu.adapterName}: prefill vs decode: ${decodeErr}`);
    }
  },
});

Deno.test({
  name: "novels-5M: GPU logits match the reference within 1e-3 over 64 tokens; prefill = decode",
  ignore: !haveNovels,
  fn: async () => {
    const ids = await textIds("models/novels-5M", "data/novels/heldout.txt", 64);
    const ckpt = await openCheckpoint(sharedPath("models/novels-5M"));
    const { refErr, decodeErr } = await compare(ckpt, ids, 128);
    assert.ok(refErr < 1e-3, `GPU vs reference: ${refErr}`);
    assert.ok(decodeErr < 1e-4, `prefill vs decode: ${decodeErr}`);
  },
});

Deno.test("synthetic Qwen2 shape (q/k/v biases, llama3 RoPE scaling, untied, GQA 3:1) matches the reference", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await writeSyntheticHfCheckpoint(dir, {
      dim: 96,
      hiddenDim: 136,
      nHeads: 6,
      nKvHeads: 2,
      nLayers: 2,
      vocabSize: 300,
      seqLen: 256,
      qkvBias: true,
      tiedEmbeddings: false,
      ropeTheta: 500000,
      ropeScaling: {
        factor: 8,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 64,
      },
    }, { dtype: "F32", shards: 1, seed: 3 });
    const ckpt = await openCheckpoint(dir);
    const ids = Array.from({ length: 70 }, (_, i) => (i * 37 + 5) % 300);
    const { refErr, decodeErr } = await compare(ckpt, ids, 32);
    assert.ok(refErr < 1e-3, `GPU vs reference: ${refErr}`);
    assert.ok(decodeErr < 1e-4, `prefill vs decode: ${decodeErr}`);
    ckpt.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
