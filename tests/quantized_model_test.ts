/**
 * Packed low-bit models end to end: stories260K's weights rounded with RTN and packed into a
 * .lowbit file run on the GPU's quantized kernels, against the float64 CPU reference running the
 * same dequantized weights.
 */
import assert from "node:assert/strict";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { expectedShapes, tensorNames as T } from "../runtime/checkpoint/config.ts";
import { createLowbitWriter } from "../runtime/format/lowbit_writer.ts";
import { openLowbit } from "../runtime/format/lowbit_reader.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { GpuModel, GREEDY } from "../runtime/model/model.ts";
import { generate } from "../runtime/model/generate.ts";
import { argmax } from "../runtime/model/sampling.ts";
import { rtnQuantize } from "../quantize/rtn.ts";
import { packQ } from "../runtime/format/pack.ts";
import type { Bits } from "../runtime/format/qtensor.ts";
import { quantizeModel } from "../quantize/quantize_model.ts";
import {
  haveShared,
  maxAbsDiff,
  sharedPath,
  testGpu,
  testGpuLayout,
  withTempDir,
} from "./helpers.ts";

const have = await haveShared("models/stories260K-hf");

/** Writes stories260K with RTN-rounded, packed linear layers. */
async function rtnLowbit(path: string, bits: Bits, groupSize: number): Promise<void> {
  const src = sharedPath("models/stories260K-hf");
  const ckpt = await openCheckpoint(src);
  const c = ckpt.config;
  const linears = new Set<string>();
  for (let l = 0; l < c.nLayers; l++) {
    for (const f of [T.wq, T.wk, T.wv, T.wo, T.w1, T.w3, T.w2]) linears.add(f(l));
  }
  const tensors = [...expectedShapes(c)].map(([name, shape]) =>
    linears.has(name)
      ? { name, shape, dtype: "Q" as const, quant: { bits, groupSize } }
      : { name, shape, dtype: "F32" as const }
  );
  const tok = await loadTokenizer(src);
  const w = await createLowbitWriter(path, {
    config: c,
    tokenizer: tok.toData(),
    quantization: { method: "rtn", bits, groupSize },
    tensors,
  });
  for (const t of tensors) {
    const data = await ckpt.read(t.name);
    await w.writeTensor(
      t.name,
      t.dtype === "Q"
        ? packQ(rtnQuantize(data, t.shape[0], t.shape[1], { bits, groupSize }))
        : data,
    );
  }
  await w.close();
  ckpt.close();
}

Deno.test({
  name:
    "W4 g32 stories260K: GPU greedy tokens equal the CPU reference on the same dequantized weights",
  ignore: !have,
  fn: async () => {
    const path = await Deno.makeTempFile({ suffix: ".lowbit" });
    try {
      await rtnLowbit(path, 4, 32);
      const file = await openLowbit(path);
      const model = await GpuModel.load(await testGpu(), file);
      assert.equal(model.weights.layers[0].wqkv.format, "q");
      const ids: number[] = [];
      for await (
        const id of generate(model, { prompt: [1], maxTokens: 100, sampling: GREEDY, stopIds: [] })
      ) ids.push(id);
      const ref = await ReferenceModel.load(file);
      const want: number[] = [];
      let tok = 1;
      for (let p = 0; p < 100; p++) want.push(tok = argmax(ref.forward(tok, p)));
      assert.deepEqual(ids, want);
      file.close();
    } finally {
      await Deno.remove(path);
    }
  },
});

Deno.test({
  name: "W3 g64 and W2 g0 (GPU layout) stories260K: prefill and decode logits match the reference",
  ignore: !have,
  fn: async () => {
    for (const [bits, g] of [[3, 64], [2, 0]] as const) {
      const path = await Deno.makeTempFile({ suffix: ".lowbit" });
      try {
        await rtnLowbit(path, bits, g);
        const file = await openLowbit(path);
        // W2 g0 runs the layout of GPU adapters (storage buffers), W3 g64 this adapter's
        const gpu = bits === 2 ? await testGpuLayout() : await testGpu();
        // an f32 KV cache: at 1e-3 the reference's logits see f16's rounding of K and V
        const model = await GpuModel.load(gpu, file, { maxT: 16, kvType: "f32" });
        const ref = await ReferenceModel.load(file);
        const ids = [
          1,
          403,
          407,
          261,
          378,
          300,
          500,
          20,
          33,
          44,
          100,
          200,
          7,
          9,
          11,
          13,
          15,
          17,
          19,
          21,
        ];
        const all = await model.logitsAt(0, ids);
        const V = file.config.vocabSize;
        for (let p = 0; p < ids.length; p++) {
          const row = all.subarray(p * V, (p + 1) * V);
          const r = ref.forward(ids[p], p);
          assert.ok(
            maxAbsDiff(row, r) < 1e-3,
            `W${bits} g${g} prefill position ${p}: ${maxAbsDiff(row, r)}`,
          );
          model.writeTokens(p, [ids[p]]);
          model.decode(p, GREEDY);
          const d = await model.readLogits();
          assert.ok(
            maxAbsDiff(d, r) < 1e-3,
            `W${bits} g${g} decode position ${p}: ${maxAbsDiff(d, r)}`,
          );
        }
        file.close();
      } finally {
        await Deno.remove(path);
      }
    }
  },
});

Deno.test({
  name: "--quantize-head: a packed logits layer (calibrated GPTQ) runs as the CPU reference does",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const out = `${dir}/head.lowbit`;
      const r = await quantizeModel({
        model: sharedPath("models/stories260K-hf"),
        tokenizer: sharedPath("models/stories260K/tok512.bin"),
        out,
        method: "gptq",
        bits: 4,
        groupSize: 32,
        calib: {
          path: sharedPath("data/tinystories/TinyStories-valid-sample.txt"),
          samples: 4,
          seqLen: 128,
          seed: 0,
        },
        quantizeHead: true,
        log: () => {},
      });
      // the tied checkpoint's classifier becomes a packed lm_head of its own
      const head = r.layers.at(-1)!;
      assert.equal(head.name, T.lmHead);
      assert.ok(head.loss.gptq! < head.loss.rtn!, JSON.stringify(head.loss));
      const file = await openLowbit(out);
      assert.equal(file.config.tiedEmbeddings, false);
      assert.equal(file.tensors.get(T.lmHead)!.dtype, "Q");
      assert.equal(file.tensors.get(T.embed)!.dtype, "F16");
      const model = await GpuModel.load(await testGpu(), file, { maxT: 16, kvType: "f32" });
      assert.equal(model.weights.lmHead.format, "q");
      const ref = await ReferenceModel.load(file);
      const V = file.config.vocabSize;
      const ids = [1, 403, 407, 261, 378, 300, 500, 20];
      const all = await model.logitsAt(0, ids);
      for (let p = 0; p < ids.length; p++) {
        const want = ref.forward(ids[p], p);
        const d = maxAbsDiff(all.subarray(p * V, (p + 1) * V), want);
        assert.ok(d < 1e-3, `prefill position ${p}: ${d}`);
        model.writeTokens(p, [ids[p]]);
        model.decode(p, GREEDY);
        const e = maxAbsDiff(await model.readLogits(), want);
        assert.ok(e < 1e-3, `decode position ${p}: ${e}`);
      }
      file.close();
    }),
});
