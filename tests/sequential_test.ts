/**
 * The quantizer's GPU calibration path: BlockRunner reproduces the model's own forward pass, and
 * sequential quantization of stories260K writes a model file that loads and generates, with
 * decoupleQ's per-layer losses below GPTQ's and stage 2 lowering each block's output error, and
 * the end-to-end stage rewriting that file.
 */
import assert from "node:assert/strict";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { tensorNames as T } from "../runtime/checkpoint/config.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { BlockRunner, CAPTURE } from "../quantize/block_runner.ts";
import { calibrationSequences } from "../quantize/calibration.ts";
import { quantizeSequential } from "../quantize/sequential.ts";
import { dequantize, type QuantizedLinear } from "../runtime/format/qtensor.ts";
import { quantizeModel } from "../quantize/quantize_model.ts";
import { openLowbit } from "../runtime/format/lowbit_reader.ts";
import { haveShared, maxAbsDiff, sharedPath, testGpu, withTempDir } from "./helpers.ts";
import { writeSyntheticHfCheckpoint } from "./synthetic.ts";

const have = await haveShared(
  "models/stories260K-hf",
  "data/tinystories/TinyStories-valid-sample.txt",
);
const MODEL = sharedPath("models/stories260K-hf");

Deno.test({
  name: "BlockRunner: all blocks in turn, then the final norm and head, give the reference logits",
  ignore: !have,
  fn: async () => {
    const ckpt = await openCheckpoint(MODEL);
    const c = ckpt.config;
    const ids = [1, 403, 407, 261, 378, 300, 500, 20, 33, 44, 100, 200];
    const runner = BlockRunner.create(await testGpu(), c, ids.length);
    const E = await ckpt.read(T.embed);
    let x: Float32Array = new Float32Array(ids.length * c.dim);
    ids.forEach((id, t) => x.set(E.subarray(id * c.dim, (id + 1) * c.dim), t * c.dim));
    for (let l = 0; l < c.nLayers; l++) {
      await runner.loadLayer(ckpt, l);
      [x] = await runner.run([x], CAPTURE.output);
    }
    // final RMSNorm and the tied head on the host, for the last position
    const g = await ckpt.read(T.norm);
    const last = x.subarray((ids.length - 1) * c.dim);
    const inv = 1 / Math.sqrt(last.reduce((a, v) => a + v * v, 0) / c.dim + c.normEps);
    const logits = new Float64Array(c.vocabSize);
    for (let v = 0; v < c.vocabSize; v++) {
      for (let k = 0; k < c.dim; k++) logits[v] += E[v * c.dim + k] * last[k] * inv * g[k];
    }
    const ref = await ReferenceModel.load(ckpt);
    let want: Float64Array = new Float64Array();
    ids.forEach((id, p) => want = ref.forward(id, p));
    assert.ok(
      maxAbsDiff(logits, want) < 1e-3,
      `block-by-block logits differ by ${maxAbsDiff(logits, want)}`,
    );
    ckpt.close();
  },
});

Deno.test("BlockRunner: sequences longer than a step's 256 rows match the reference at every position", async () => {
  await withTempDir(async (dir) => {
    // tied head; 300 tokens: more than the Step uniform's MAX_ROWS = 256 rows of one step
    const c = await writeSyntheticHfCheckpoint(dir, {
      dim: 32,
      hiddenDim: 64,
      nHeads: 4,
      nKvHeads: 2,
      nLayers: 2,
      vocabSize: 64,
      seqLen: 320,
      tiedEmbeddings: true,
    }, { dtype: "F32", shards: 1, seed: 5 });
    const ckpt = await openCheckpoint(dir);
    const seqs = [300, 40].map((n, s) => Array.from({ length: n }, (_, t) => (t * 7 + s * 3) % 64));
    const runner = BlockRunner.create(await testGpu(), c, 300);
    const E = await ckpt.read(T.embed);
    let xs: Float32Array[] = seqs.map((ids) => {
      const x = new Float32Array(ids.length * c.dim);
      ids.forEach((id, t) => x.set(E.subarray(id * c.dim, (id + 1) * c.dim), t * c.dim));
      return x;
    });
    for (let l = 0; l < c.nLayers; l++) {
      await runner.loadLayer(ckpt, l);
      xs = await runner.run(xs, CAPTURE.output);
    }
    const g = await ckpt.read(T.norm);
    const ref = await ReferenceModel.load(ckpt);
    seqs.forEach((ids, s) => {
      ref.reset();
      let err = 0;
      ids.forEach((id, p) => {
        const h = xs[s].subarray(p * c.dim, (p + 1) * c.dim);
        const inv = 1 / Math.sqrt(h.reduce((a, v) => a + v * v, 0) / c.dim + c.normEps);
        const logits = new Float64Array(c.vocabSize);
        for (let v = 0; v < c.vocabSize; v++) {
          for (let k = 0; k < c.dim; k++) logits[v] += E[v * c.dim + k] * h[k] * inv * g[k];
        }
        err = Math.max(err, maxAbsDiff(logits, ref.forward(id, p)));
      });
      assert.ok(err < 1e-3, `sequence ${s} (${ids.length} tokens): logits differ by ${err}`);
    });
    ckpt.close();
  });
});

Deno.test({
  name:
    "sequential decoupleQ W3 g32 on stories260K: losses below GPTQ, stage 2 helps, output is consistent",
  ignore: !have,
  fn: async () => {
    const ckpt = await openCheckpoint(MODEL);
    const tok = await loadTokenizer(MODEL);
    const text = await Deno.readTextFile(
      sharedPath("data/tinystories/TinyStories-valid-sample.txt"),
    );
    const seqs = calibrationSequences(tok, text, { seqLen: 96, samples: 6, seed: 1 });
    const linears = new Map<string, QuantizedLinear>();
    const norms = new Map<string, Float32Array>();
    const { layers, blocks } = await quantizeSequential(await testGpu(), ckpt, seqs, {
      method: "decoupleq",
      bits: 3,
      groupSize: 32,
      iters: 2,
      stage2: { epochs: 2 },
      log: () => {},
    }, {
      linear: (name, ql) => Promise.resolve(void linears.set(name, ql)),
      norm: (name, g) => Promise.resolve(void norms.set(name, g)),
    });
    assert.equal(layers.length, 7 * ckpt.config.nLayers);
    assert.equal(linears.size, 7 * ckpt.config.nLayers);
    assert.equal(norms.size, 2 * ckpt.config.nLayers);
    const mean = (m: "gptq" | "decoupleq" | "rtn") =>
      layers.reduce((a, r) => a + r.loss[m]!, 0) / layers.length;
    assert.ok(
      mean("decoupleq") < mean("gptq"),
      `decoupleQ ${mean("decoupleq")} vs GPTQ ${mean("gptq")}`,
    );
    assert.ok(mean("gptq") < mean("rtn"), `GPTQ ${mean("gptq")} vs RTN ${mean("rtn")}`);
    for (const b of blocks) {
      assert.ok(b.mseAfter <= b.mseBefore, `block ${b.layer}: ${b.mseBefore} → ${b.mseAfter}`);
    }
    assert.ok(
      blocks.some((b) => b.mseAfter < 0.95 * b.mseBefore),
      "stage 2 lowered no block's error",
    );
    // what was emitted is a valid quantization of each weight
    for (const [name, ql] of linears) {
      const W = await ckpt.read(name);
      const Wq = dequantize(ql);
      const rel = Math.sqrt(
        W.reduce((a, w, i) => a + (w - Wq[i]) ** 2, 0) / W.reduce((a, w) => a + w * w, 0),
      );
      assert.ok(rel < 0.5, `${name}: relative weight error ${rel}`);
    }
    ckpt.close();
  },
});

/** quantizeModel options: stories260K, decoupleQ W2 g32, `samples` calibration lines of 64. */
function w2g32Options(iters: number, samples: number) {
  return {
    model: sharedPath("models/stories260K-hf"),
    tokenizer: sharedPath("models/stories260K/tok512.bin"),
    method: "decoupleq",
    bits: 2,
    groupSize: 32,
    iters,
    compare: false,
    calib: {
      path: sharedPath("data/tinystories/TinyStories-valid-sample.txt"),
      samples,
      seqLen: 64,
      seed: 0,
    },
  } as const;
}

Deno.test({
  name: "an interrupted quantization resumes at its last finished block and gives the same file",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const opts = w2g32Options(2, 3);
      const whole = `${dir}/whole.lowbit`, cut = `${dir}/cut.lowbit`;
      await quantizeModel({ ...opts, out: whole, log: () => {} });
      // stop in the middle of block 2; the file and the state of block 2's inputs remain
      const stop = (l: string) => {
        if (l.startsWith("layer 2 wo")) throw new Error("interrupted");
      };
      await assert.rejects(quantizeModel({ ...opts, out: cut, log: stop }), /interrupted/);
      const state = JSON.parse(await Deno.readTextFile(`${cut}.resume.json`));
      assert.equal(state.next, 2);
      const lines: string[] = [];
      const r = await quantizeModel({ ...opts, out: cut, resume: true, log: (l) => lines.push(l) });
      assert.ok(lines.some((l) => l.startsWith("resuming") && l.includes("block 2 of 5")));
      assert.ok(!lines.some((l) => l.startsWith("layer 1 ")), "blocks 0 and 1 were not redone");
      assert.equal(r.layers.length, 35); // the reports of the first run's blocks are kept
      assert.deepEqual(await Deno.readFile(cut), await Deno.readFile(whole));
      await assert.rejects(Deno.stat(`${cut}.resume.json`), Deno.errors.NotFound);
      // a state left by other settings is refused
      await assert.rejects(quantizeModel({ ...opts, out: cut, log: stop }), /interrupted/);
      await assert.rejects(
        quantizeModel({ ...opts, bits: 3, out: cut, resume: true, log: () => {} }),
        /other settings/,
      );
    }),
});

Deno.test({
  name:
    "the end-to-end stage (on windows of the text) rewrites the file: lower KL, same codes, settings in the header",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const opts = { ...w2g32Options(1, 4), log: () => {} };
      const plain = `${dir}/plain.lowbit`, tuned = `${dir}/tuned.lowbit`;
      await quantizeModel({ ...opts, out: plain });
      const r = await quantizeModel({
        ...opts,
        out: tuned,
        e2e: { epochs: 2, lr: 1e-2, samples: 6, windows: true },
      });
      assert.ok(r.e2e && r.e2e.improved && r.e2e.after < r.e2e.before, JSON.stringify(r.e2e));
      const [a, b] = [await openLowbit(plain), await openLowbit(tuned)];
      assert.deepEqual(b.header.quantization.e2e, {
        epochs: 2,
        lr: 1e-2,
        samples: 6,
        windows: true,
      });
      assert.equal(a.header.quantization.e2e, undefined);
      const name = T.w1(0);
      const [pa, pb] = [await a.readPacked(name), await b.readPacked(name)];
      assert.deepEqual(pb.qweight, pa.qweight); // the codes are frozen
      assert.notDeepEqual(pb.sz, pa.sz); // the scales and zeros moved
      assert.notDeepEqual(await b.read(T.norm), await a.read(T.norm));
      a.close();
      b.close();
    }),
});
