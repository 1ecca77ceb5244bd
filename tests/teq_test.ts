/**
 * TEQ: the fold of every group kind leaves the float model's logits unchanged (synthetic GQA
 * models, tied and untied, with q/k/v biases, and the real models); the straight-through
 * gradient with respect to s agrees with finite differences of the smooth part; training s
 * lowers the fake-quantized loss; a non-finite or non-positive s is refused.
 */
import nodeAssert from "node:assert/strict";
import type { Checkpoint, TensorInfo } from "../runtime/checkpoint/checkpoint.ts";
import {
  expectedShapes,
  type ModelConfig,
  tensorNames as T,
} from "../runtime/checkpoint/config.ts";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { NumericalError, ParameterError } from "../runtime/errors.ts";
import {
  checkScales,
  identityScales,
  loadScales,
  saveScales,
  teqCheckpoint,
  type TeqGroup,
  teqGroups,
  type TeqScales,
} from "../quantize/teq_fold.ts";
import {
  linearWarmupFactor,
  type TeqLoss,
  TeqMath,
  type TeqParams,
  type TeqSequence,
  type TeqSte,
  trainTeq,
} from "../quantize/teq.ts";
import { quantizeModel } from "../quantize/quantize_model.ts";
import { openLowbit } from "../runtime/format/lowbit_reader.ts";
import { inspectText } from "../runtime/cli/inspect_cmd.ts";
import { syntheticConfig, syntheticTensor } from "./synthetic.ts";
import { haveShared, mulberry32, sharedPath, withTempDir } from "./helpers.ts";

const assert = (v: unknown, msg?: string) => nodeAssert.ok(v, msg);
const assertEquals = <V>(a: V, b: V, msg?: string) => nodeAssert.deepEqual(a, b, msg);
const assertLess = (a: number, b: number, msg?: string) =>
  nodeAssert.ok(a < b, msg ?? `${a} < ${b}`);
const assertGreater = (a: number, b: number, msg?: string) =>
  nodeAssert.ok(a > b, msg ?? `${a} > ${b}`);
// deno-lint-ignore no-explicit-any
type ErrorClass = new (...args: any[]) => Error;
const matches = (cls: ErrorClass, text: string) => (e: unknown) =>
  e instanceof cls && e.message.includes(text);
const assertThrows = (fn: () => unknown, cls: ErrorClass, text = "") =>
  nodeAssert.throws(fn, matches(cls, text));
const assertRejects = (fn: () => Promise<unknown>, cls: ErrorClass, text = "") =>
  nodeAssert.rejects(fn, matches(cls, text));

/** An in-memory checkpoint of `weights` (float32, canonical names). */
function memoryCheckpoint(c: ModelConfig, weights: Map<string, Float32Array>): Checkpoint {
  const tensors = new Map<string, TensorInfo>(
    [...expectedShapes(c)].map(([name, shape]) => [name, { name, dtype: "F32" as const, shape }]),
  );
  return {
    path: "memory",
    config: c,
    tensors,
    read(name, r0 = 0, r1) {
      const shape = tensors.get(name)!.shape, K = shape.length === 1 ? 1 : shape[1];
      const w = weights.get(name)!;
      return Promise.resolve(w.slice(r0 * K, (r1 ?? w.length / K) * K));
    },
    close() {},
  };
}

function syntheticWeights(c: ModelConfig, seed: number): Map<string, Float32Array> {
  return new Map([...expectedShapes(c)].map(([n, shape]) => [n, syntheticTensor(n, shape, seed)]));
}

/** Scales drawn log-uniformly in [1/4, 4] for the groups `pick` selects, 1 for the others. */
function randomScales(groups: TeqGroup[], seed: number, pick = (_g: TeqGroup) => true) {
  const u = mulberry32(seed), s = identityScales(groups);
  for (const g of groups) if (pick(g)) s.set(g.key, s.get(g.key)!.map(() => 4 ** (2 * u() - 1)));
  return s;
}

/** The logits of a few tokens run in order, concatenated. */
async function logits(ckpt: Checkpoint, tokens: number[]): Promise<Float64Array> {
  const m = await ReferenceModel.load(ckpt);
  const out = new Float64Array(tokens.length * ckpt.config.vocabSize);
  tokens.forEach((t, p) => out.set(m.forward(t, p), p * ckpt.config.vocabSize));
  return out;
}

/** max |a − b| / max |a|. */
function relDiff(a: Float64Array, b: Float64Array): number {
  let d = 0, m = 0;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(a[i]));
  }
  return d / m;
}

const TOKENS = [1, 17, 5, 42, 9, 3, 77, 12];

for (
  const [label, partial] of [
    ["GQA, untied", {}],
    ["GQA, tied", { tiedEmbeddings: true }],
    ["GQA, q/k/v biases", { qkvBias: true }],
  ] as [string, Partial<ModelConfig>][]
) {
  Deno.test(`teq fold: every group kind keeps the logits (${label})`, async () => {
    const c = syntheticConfig(partial);
    assertLess(c.nKvHeads, c.nHeads); // v → o under grouped-query attention
    const ckpt = memoryCheckpoint(c, syntheticWeights(c, 3));
    const base = await logits(ckpt, TOKENS);
    const groups = teqGroups(c, { head: true });
    for (const kind of ["attn", "vo", "ffn", "down", "head", "all"]) {
      const s = randomScales(groups, 7, (g) => kind === "all" || g.kind === kind);
      const folded = teqCheckpoint(ckpt, groups, s);
      const rel = relDiff(base, await logits(folded, TOKENS));
      assertLess(rel, 1e-5, `${kind}: relative logit difference ${rel}`);
      // the test can fail: the same s without the producers' 1/s changes the logits
      const broken = groups.map((g) => ({ ...g, producers: [] }));
      const relBroken = relDiff(base, await logits(teqCheckpoint(ckpt, broken, s), TOKENS));
      assertGreater(relBroken, 1e-3, `${kind}: consumers alone must change the logits`);
    }
    if (c.tiedEmbeddings) {
      const folded = teqCheckpoint(ckpt, groups, randomScales(groups, 1));
      assertEquals(folded.config.tiedEmbeddings, false); // the head group unties the file
      assertEquals(await folded.read(T.embed), await ckpt.read(T.embed));
    }
  });
}

Deno.test("teq fold: row ranges fold as the whole tensor", async () => {
  const c = syntheticConfig({});
  const ckpt = memoryCheckpoint(c, syntheticWeights(c, 4));
  const groups = teqGroups(c, { head: true });
  const folded = teqCheckpoint(ckpt, groups, randomScales(groups, 2));
  for (const name of [T.wv(1), T.w3(0), T.attnNorm(1), T.lmHead]) {
    const all = await folded.read(name), K = all.length / ckpt.tensors.get(name)!.shape[0];
    assertEquals(await folded.read(name, 3, 7), all.slice(3 * K, 7 * K));
  }
});

for (
  const [model, dir] of [
    ["stories260K", "models/stories260K-hf"],
    ["novels-5M", "models/novels-5M"],
  ]
) {
  const have = await haveShared(dir);
  Deno.test({
    name: `teq fold: ${model}'s folded float logits equal the original's within 1e-5`,
    ignore: !have,
    fn: async () => {
      const ckpt = await openCheckpoint(sharedPath(dir));
      try {
        const groups = teqGroups(ckpt.config, { head: true });
        const base = await logits(ckpt, TOKENS);
        const folded = teqCheckpoint(ckpt, groups, randomScales(groups, 11));
        const rel = relDiff(base, await logits(folded, TOKENS));
        assertLess(rel, 1e-5, `relative logit difference ${rel}`);
      } finally {
        ckpt.close();
      }
    },
  });
}

// ---------------------------------------------------------------------------------------------
// Training.

const tinyC = syntheticConfig({
  dim: 16,
  hiddenDim: 24,
  nLayers: 2,
  nHeads: 4,
  nKvHeads: 2,
  vocabSize: 40,
  seqLen: 16,
});

/** Float64 parameters of a synthetic model for TeqMath (lm_head as its own tensor). */
function params(c: ModelConfig, seed: number, outliers = 0): TeqParams {
  const p: TeqParams = new Map();
  for (const [n, shape] of expectedShapes({ ...c, tiedEmbeddings: false })) {
    if (n === T.embed) continue;
    p.set(n, Float64Array.from(syntheticTensor(n, shape, seed)));
  }
  // a few input channels with large activations, as real models have
  for (let l = 0; l < c.nLayers && outliers > 0; l++) {
    for (const n of [T.attnNorm(l), T.ffnNorm(l)]) {
      const g = p.get(n)!;
      for (let k = 0; k < g.length; k += Math.floor(g.length / 4)) g[k] *= outliers;
    }
  }
  return p;
}

/** Random token sequences, their embedding rows, and the float model's hidden states. */
function sequences(c: ModelConfig, p: TeqParams, n: number, len: number, seed: number) {
  const u = mulberry32(seed), embed = syntheticTensor(T.embed, [c.vocabSize, c.dim], seed);
  const float = new TeqMath(c, p, teqGroups(c, { head: false }), null, "kl", len);
  float.setScales(identityScales(teqGroups(c, { head: false })));
  return Array.from({ length: n }, (): TeqSequence => {
    const tokens = Array.from({ length: len }, () => Math.floor(u() * c.vocabSize));
    const input = new Float64Array(len * c.dim);
    tokens.forEach((t, i) => input.set(embed.subarray(t * c.dim, (t + 1) * c.dim), i * c.dim));
    return { tokens, input, teacher: float.finalHidden(input, len) };
  });
}

for (
  const [loss, ste] of [["kl", "identity"], ["ce", "identity"], ["kl", "grid"]] as [
    TeqLoss,
    TeqSte,
  ][]
) {
  Deno.test(`teq: the ${ste} straight-through gradient of the ${loss} loss matches finite differences of the smooth part`, () => {
    const c = tinyC, p = params(c, 5, 4), groups = teqGroups(c, { head: true });
    const [seq] = sequences(c, p, 1, 7, 9);
    const m = new TeqMath(c, p, groups, { bits: 2, groupSize: 8, ste }, loss, 7);
    const u = mulberry32(21), s0 = identityScales(groups);
    for (const s of s0.values()) for (let i = 0; i < s.length; i++) s[i] = 0.6 + u();
    m.setScales(s0);
    m.zeroGrads();
    m.lossSum(seq, 1);
    const ds = m.scaleGrads(new Set(groups.map((g) => g.key)));
    const f = (key: string, i: number, h: number) => {
      const s: TeqScales = new Map([...s0].map(([k, v]) => [k, Float64Array.from(v)]));
      s.get(key)![i] += h;
      m.setScales(s, true); // rounding offsets frozen at s0
      return m.lossSum(seq);
    };
    let checked = 0;
    for (const g of groups) {
      for (const i of [0, Math.floor(g.size / 2), g.size - 1]) {
        const h = 1e-6, fd = (f(g.key, i, h) - f(g.key, i, -h)) / (2 * h);
        const an = ds.get(g.key)![i];
        assertLess(Math.abs(fd - an), 1e-6 + 1e-4 * Math.abs(fd), `${g.key}[${i}]: ${an} vs ${fd}`);
        checked += Math.abs(an) > 1e-8 ? 1 : 0;
      }
    }
    assertGreater(checked, groups.length); // gradients are not all zero
  });
}

Deno.test("teq: training s lowers the fake-quantized loss on a synthetic model with outlier channels", () => {
  const c = { ...tinyC, nLayers: 1, dim: 32, hiddenDim: 48, headDim: 8 };
  const p = params(c, 6, 8), groups = teqGroups(c, { head: false });
  const seqs = sequences(c, p, 6, 12, 4);
  const logs: string[] = [];
  const r = trainTeq(c, p, groups, seqs, {
    bits: 3,
    groupSize: 16,
    steps: 120,
    lr: 1e-2,
    log: (l) => logs.push(l),
  });
  assert(r.history.improved);
  assertLess(r.history.after, 0.9 * r.history.before, JSON.stringify(r.history));
  assert(logs.some((l) => /step 120\/120: loss .* steps\/s/.test(l)), logs.join("\n"));
  // the trained scales are not all 1
  assert([...r.scales.values()].some((s) => s.some((v) => Math.abs(v - 1) > 1e-3)));
});

Deno.test("teq: the learning-rate schedule warms up linearly, then decays linearly", () => {
  assertEquals(linearWarmupFactor(1, 100, 5), 0.2);
  assertEquals(linearWarmupFactor(5, 100, 5), 1);
  assertEquals(linearWarmupFactor(6, 100, 5), 1);
  assertEquals(linearWarmupFactor(100, 100, 5), 1 / 95);
});

// ---------------------------------------------------------------------------------------------
// Bad scales.

Deno.test("teq: a non-finite or non-positive s is refused with a clear error", () => {
  const groups = teqGroups(tinyC, { head: false });
  for (const bad of [NaN, Infinity, 0, -1]) {
    const s = identityScales(groups);
    s.get("1.down")![3] = bad;
    assertThrows(() => checkScales(groups, s), NumericalError, `s[3] of group "1.down" is ${bad}`);
    const ckpt = memoryCheckpoint(tinyC, syntheticWeights(tinyC, 1));
    assertThrows(() => teqCheckpoint(ckpt, groups, s), NumericalError);
  }
  const short = identityScales(groups);
  short.set("0.attn", new Float64Array(3).fill(1));
  assertThrows(() => checkScales(groups, short), ParameterError, "has 3 scales, needs 16");
});

Deno.test("teq: training that goes non-finite stops with a NumericalError", () => {
  const c = tinyC, p = params(c, 5), groups = teqGroups(c, { head: false });
  // the first 3 sequences are the measured ones (2048 tokens' worth): the model is finite there
  const seqs = sequences(c, p, 4, 700, 1);
  seqs[3].input[3] = NaN;
  assertThrows(
    () => trainTeq(c, p, groups, seqs, { bits: 4, groupSize: 8, steps: 4 }),
    NumericalError,
    "the kl loss is NaN",
  );
  // and a model that is not finite from the start is refused before training
  seqs[0].input[3] = NaN;
  assertThrows(
    () => trainTeq(c, p, groups, seqs, { bits: 4, groupSize: 8, steps: 4 }),
    NumericalError,
    "with s = 1 is NaN",
  );
});

Deno.test("teq: saved scales load back; a file with a bad s is refused", async () => {
  await withTempDir(async (dir) => {
    const groups = teqGroups(tinyC, { head: true });
    const s = randomScales(groups, 3);
    await saveScales(`${dir}/s.json`, s, { steps: 3 });
    const back = await loadScales(`${dir}/s.json`, groups);
    assertEquals(back.info.steps, 3);
    for (const g of groups) assertEquals(back.scales.get(g.key), s.get(g.key));
    s.get("0.vo")![1] = NaN; // JSON writes it as null
    await saveScales(`${dir}/bad.json`, s, {});
    await assertRejects(() => loadScales(`${dir}/bad.json`, groups), NumericalError, '"0.vo"');
    await assertRejects(
      () => loadScales(`${dir}/s.json`, teqGroups(tinyC, { head: false })),
      ParameterError,
      'no TEQ group "head"',
    );
  });
});

// ---------------------------------------------------------------------------------------------
// quantize --teq.

const haveStories = await haveShared(
  "models/stories260K-hf",
  "data/tinystories/TinyStories-valid-sample.txt",
);
Deno.test({
  name: "quantize --teq: the header records TEQ; saved scales load back to the same file; " +
    "a bad scales file is refused before any output",
  ignore: !haveStories,
  fn: async () => {
    await withTempDir(async (dir) => {
      const base = {
        model: sharedPath("models/stories260K-hf"),
        method: "rtn" as const,
        bits: 4 as const,
        groupSize: 32,
        quantizeHead: true,
        calib: {
          path: sharedPath("data/tinystories/TinyStories-valid-sample.txt"),
          seqLen: 64,
          samples: 8,
          seed: 0,
        },
        log: () => {},
      };
      const teq = { steps: 6, lr: 0.05, batch: 2 };
      const r = await quantizeModel({
        ...base,
        out: `${dir}/a.lowbit`,
        teq: { ...teq, save: `${dir}/s.json` },
      });
      assert(r.teq);
      const a = await openLowbit(`${dir}/a.lowbit`);
      const b = await quantizeModel({
        ...base,
        out: `${dir}/b.lowbit`,
        teq: { load: `${dir}/s.json` },
      }).then(() => openLowbit(`${dir}/b.lowbit`));
      try {
        const rec = a.header.quantization.teq as Record<string, unknown>;
        assertEquals(
          {
            loss: rec.loss,
            grid: rec.grid,
            steps: rec.steps,
            batch: rec.batch,
            groups: rec.groups,
          },
          { loss: "kl", grid: "hdiag", steps: 6, batch: 2, groups: 21 }, // 5 layers × 4 + head
        );
        assert(Number(rec.lossAfter) <= Number(rec.lossBefore));
        assertEquals(
          (b.header.quantization.teq as Record<string, unknown>).loaded,
          `${dir}/s.json`,
        );
        for (const e of a.header.tensors) {
          const read = (f: typeof a) => e.dtype === "Q" ? f.readPacked(e.name) : f.read(e.name);
          assertEquals(await read(b), await read(a), e.name);
        }
        const text = await inspectText(a);
        assert(/^teq \(scales folded/m.test(text) && /lossAfter/.test(text), text);
      } finally {
        a.close();
        b.close();
      }
      // an s that is not positive never reaches a file
      const s = JSON.parse(await Deno.readTextFile(`${dir}/s.json`));
      s.scales["2.ffn"][5] = -0.5;
      await Deno.writeTextFile(`${dir}/bad.json`, JSON.stringify(s));
      await assertRejects(
        () => quantizeModel({ ...base, out: `${dir}/c.lowbit`, teq: { load: `${dir}/bad.json` } }),
        NumericalError,
        's[5] of group "2.ffn" is -0.5',
      );
      await assertRejects(() => Deno.stat(`${dir}/c.lowbit`), Deno.errors.NotFound);
    });
  },
});
