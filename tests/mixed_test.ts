/**
 * Mixed precision to a budget (issue 17): CVXQ's dual ascent and MixQuant's bisection on
 * synthetic distortion curves with known optima, budgets and their errors, and real mixed
 * stories260K files through the writer, the reader, inspect and the GPU.
 */
import assert from "node:assert/strict";
import {
  analyticDistortion,
  CANDIDATES,
  checkAllocator,
  costOf,
  dualAscent,
  fillBudget,
  lagrangianChoice,
  type LinearCosts,
  mixQuant,
  mixQuantChoice,
  parseFormats,
  parseSize,
  rateOf,
  uniformChoice,
} from "../quantize/allocate.ts";
import { quantizeModel } from "../quantize/quantize_model.ts";
import { allocateFormats } from "../quantize/mixed.ts";
import { openLowbit } from "../runtime/format/lowbit_reader.ts";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { calibrationSequences } from "../quantize/calibration.ts";
import { bitsPerWeight, unpackQ } from "../runtime/format/pack.ts";
import { rtnQuantize } from "../quantize/rtn.ts";
import { dequantize } from "../runtime/format/qtensor.ts";
import { inspectText } from "../runtime/cli/inspect_cmd.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { GpuModel, GREEDY } from "../runtime/model/model.ts";
import { generate } from "../runtime/model/generate.ts";
import { argmax } from "../runtime/model/sampling.ts";
import { ParameterError } from "../runtime/errors.ts";
import { haveShared, mulberry32, sharedPath, testGpu, withTempDir } from "./helpers.ts";

const MODEL = "models/stories260K-hf", TEXT = "data/tinystories/TinyStories-valid-sample.txt";
const have = await haveShared(MODEL, TEXT);

/** Layers of equal size, candidates 2/3/4 bits (bpw = bits), D = c·4^−b with random c. */
function convexLayers(L: number, seed: number, n = 1000): LinearCosts[] {
  const u = mulberry32(seed);
  return Array.from({ length: L }, (_, i) => {
    const c = 10 ** (4 * u());
    return { name: `l${i}`, n, bpw: [2, 3, 4], cost: [2, 3, 4].map((b) => c * 4 ** -b) };
  });
}

/** The exact optimum by enumeration: min Σ cost within the budget. */
function bruteForce(layers: LinearCosts[], budget: number): { cost: number; rate: number } {
  let best = { cost: Infinity, rate: 0 };
  const F = layers[0].bpw.length, choice = layers.map(() => 0);
  for (let idx = 0; idx < F ** layers.length; idx++) {
    let r = idx;
    for (let i = 0; i < layers.length; i++, r = Math.floor(r / F)) choice[i] = r % F;
    const rate = rateOf(layers, choice);
    if (rate > budget + 1e-12) continue;
    const cost = costOf(layers, choice);
    if (cost < best.cost) best = { cost, rate };
  }
  return best;
}

Deno.test("dual ascent: meets a budget exactly where the candidates allow, at the optimum", () => {
  for (const seed of [1, 2, 3]) {
    const layers = convexLayers(7, seed);
    // equal layers of bpw 2, 3, 4: every multiple of 1/7 in [2, 4] is reachable
    for (let k = 0; k <= 14; k++) {
      const budget = 2 + k / 7;
      const r = dualAscent(layers, budget);
      assert.ok(r.rate <= budget + 1e-12, `rate ${r.rate} exceeds ${budget}`);
      assert.ok(Math.abs(r.rate - budget) < 1e-9, `rate ${r.rate}, budget ${budget}`);
      const opt = bruteForce(layers, budget);
      assert.ok(Math.abs(r.cost - opt.cost) <= 1e-9 * opt.cost, `${r.cost} vs ${opt.cost}`);
    }
  }
});

Deno.test("dual ascent: never exceeds a budget between reachable rates, and beats uniform", () => {
  const u = mulberry32(9);
  // unequal sizes, candidates with scale overhead (bpw not integers), non-convex steps
  const layers: LinearCosts[] = Array.from({ length: 6 }, (_, i) => {
    const n = 64 * (1 + Math.floor(8 * u())), c = 10 ** (3 * u());
    const bpw = [2.5, 3, 3.5, 4.5, 5];
    return { name: `l${i}`, n, bpw, cost: bpw.map((r) => c * 2 ** (-2 * r) * (0.8 + 0.4 * u())) };
  });
  for (const budget of [2.5, 2.61, 2.9, 3.33, 3.9, 4.4, 5]) {
    const r = dualAscent(layers, budget);
    assert.ok(r.rate <= budget + 1e-12, `rate ${r.rate} exceeds ${budget}`);
    const opt = bruteForce(layers, budget);
    assert.ok(r.cost >= opt.cost * (1 - 1e-12));
    // the Lagrangian + fill lands within 5% of the exact knapsack optimum here
    assert.ok(r.cost <= opt.cost * 1.05, `cost ${r.cost} vs optimum ${opt.cost} at ${budget}`);
    const uni = uniformChoice(
      layers,
      layers[0].bpw.map((b) => ({ bits: 2, groupSize: b })),
      budget,
    );
    assert.ok(r.cost <= costOf(layers, uni) * (1 + 1e-12));
  }
});

Deno.test("lagrangian choice: a larger λ never raises the rate; fill only lowers the cost", () => {
  const layers = convexLayers(12, 4);
  let prev = Infinity;
  for (let lg = -40; lg <= 10; lg += 0.5) {
    const r = rateOf(layers, lagrangianChoice(layers, 2 ** lg));
    assert.ok(r <= prev + 1e-12);
    prev = r;
  }
  const start = layers.map(() => 0);
  const { choice } = fillBudget(layers, start, 3.2);
  assert.ok(rateOf(layers, choice) <= 3.2 + 1e-12);
  assert.ok(costOf(layers, choice) < costOf(layers, start));
});

Deno.test("mixquant: bisection on QEM gives the most accurate choice within the budget", () => {
  const layers = convexLayers(9, 5);
  // make the ratios E(b)/E(4) differ between layers, as real weight distributions do
  layers.forEach((l, i) => (l.cost = l.cost.map((c, f) => c * (1 + 0.3 * i * (2 - f)))));
  for (const budget of [2, 2.4, 3, 3.5, 4]) {
    const r = mixQuant(layers, budget);
    assert.ok(r.rate <= budget + 1e-12, `rate ${r.rate} exceeds ${budget}`);
    assert.deepEqual(r.choice, mixQuantChoice(layers, r.qem));
    // each layer the cheapest format within QEM of its own widest one
    r.choice.forEach((f, i) => {
      const l = layers[i];
      assert.ok(l.cost[f] <= r.qem * l.cost[2]);
      for (let g = 0; g < f; g++) assert.ok(l.cost[g] > r.qem * l.cost[2]);
    });
    // a slightly smaller QEM would exceed the budget (unless none is needed)
    if (r.qem > 1) {
      assert.ok(rateOf(layers, mixQuantChoice(layers, r.qem * (1 - 1e-6))) > budget);
    }
  }
});

Deno.test("analytic distortion tracks the measured RTN output error under H = I", () => {
  const N = 64, K = 128, u = mulberry32(3);
  const W = Float64Array.from({ length: N * K }, () => (u() + u() + u() - 1.5) * 0.1);
  const fs = CANDIDATES;
  const model = analyticDistortion(W, N, K, K, fs); // tr(I) = K
  fs.forEach((f, i) => {
    const Wq = dequantize(rtnQuantize(W, N, K, f), new Float64Array(N * K));
    let e = 0;
    for (let j = 0; j < N * K; j++) e += (Wq[j] - W[j]) ** 2; // tr(ΔW·I·ΔWᵀ)
    const ratio = model[i] / e;
    assert.ok(ratio > 0.5 && ratio < 2, `${f.bits} g${f.groupSize}: model/measured ${ratio}`);
  });
});

Deno.test("budget parsing and unknown allocators are clear errors", () => {
  assert.equal(parseSize("900MB"), 900e6);
  assert.equal(parseSize("1.5GiB"), 1.5 * 1024 ** 3);
  assert.equal(parseSize("350kB"), 350e3);
  assert.throws(() => parseSize("big"), /--size-budget: "big" is not a size/);
  assert.deepEqual(parseFormats("W2g64, 3g32,w4 g128"), [
    { bits: 2, groupSize: 64 },
    { bits: 3, groupSize: 32 },
    { bits: 4, groupSize: 128 },
  ]);
  assert.throws(() => parseFormats("W5g32"), /"W5g32" is not a format/);
  assert.throws(() => checkAllocator("greedy"), /--allocator must be cvxq, .*; got "greedy"/);
  const layers = convexLayers(3, 1);
  assert.throws(() => dualAscent(layers, 1.9), /unreachable: .* 2\.000 to 4\.000 bits/);
  assert.throws(() => mixQuant(layers, 4.1), /unreachable/);
});

Deno.test({
  name: "quantize: unreachable budgets and unknown allocators fail before any work",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const base = {
        model: sharedPath(MODEL),
        out: `${dir}/m.lowbit`,
        method: "rtn" as const,
        bits: 4 as const,
        groupSize: 128,
      };
      const cases: [Record<string, unknown>, RegExp][] = [
        [{ budget: { bitsPerWeight: 2.2 }, allocator: "cvxq" }, /--bits-budget 2.2 is unreachable/],
        [{ budget: { bitsPerWeight: 6 }, allocator: "mixquant" }, /unreachable: .* to 5\.\d+ bits/],
        [
          { budget: { bytes: 100_000 }, allocator: "cvxq" },
          /--size-budget 100000 bytes .* unreachable/,
        ],
        [{ budget: { bitsPerWeight: 3 }, allocator: "best" }, /--allocator must be/],
      ];
      for (const [budget, re] of cases) {
        await assert.rejects(
          quantizeModel({ ...base, budget: budget as never, log: () => {} }),
          (e: Error) => e instanceof ParameterError && re.test(e.message),
        );
        await assert.rejects(Deno.stat(base.out), Deno.errors.NotFound);
      }
    }),
});

Deno.test({
  name: "mixquant stories260K to 3.0 bits: the mixed file round-trips and its GPU greedy " +
    "tokens equal the CPU reference on the same dequantized weights",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const out = `${dir}/mixed.lowbit`;
      const r = await quantizeModel({
        model: sharedPath(MODEL),
        out,
        method: "rtn",
        bits: 4,
        groupSize: 128,
        budget: { budget: { bitsPerWeight: 3 }, allocator: "mixquant" },
        log: () => {},
      });
      const a = r.allocation!;
      assert.ok((a.bitsPerWeight as number) <= 3 && (a.bitsPerWeight as number) > 2.98);
      const file = await openLowbit(out);
      const ckpt = await openCheckpoint(sharedPath(MODEL));
      try {
        const q = file.header.tensors.filter((e) => e.dtype === "Q");
        assert.equal(q.length, 35);
        assert.ok(new Set(q.map((e) => `${e.bits} ${e.groupSize}`)).size > 1, "not mixed");
        let bits = 0, n = 0;
        for (const e of q) {
          const row = a.rows.find((x) => x.name === e.name)!;
          assert.equal(`W${e.bits} g${e.groupSize}`, row.choice);
          const [N, K] = e.shape;
          const got = unpackQ(await file.readPacked(e.name), N, K, e.bits!, e.groupSize!);
          const want = rtnQuantize(await ckpt.read(e.name), N, K, {
            bits: e.bits!,
            groupSize: e.groupSize!,
          });
          assert.deepEqual(got.q, want.q);
          assert.deepEqual(got.scale, want.scale);
          bits += N * K * bitsPerWeight(N, K, e.bits!, e.groupSize!);
          n += N * K;
        }
        assert.ok(Math.abs(bits / n - (a.bitsPerWeight as number)) < 1e-12);
        const alloc = file.header.quantization.allocation as Record<string, unknown>;
        assert.equal(alloc.allocator, "mixquant");
        assert.ok((alloc.qem as number) > 1);
        const text = await inspectText(file);
        assert.match(text, /packed formats/);
        assert.match(text, /linear layers: bits\/weight\s+(2\.9[89]\d|3\.000)/);

        // an f32 KV cache, as the reference holds K and V (f16's rounding can flip a near tie)
        const model = await GpuModel.load(await testGpu(), file, { kvType: "f32" });
        const ids: number[] = [];
        for await (
          const id of generate(model, { prompt: [1], maxTokens: 60, sampling: GREEDY, stopIds: [] })
        ) ids.push(id);
        const ref = await ReferenceModel.load(file);
        const want: number[] = [];
        let tok = 1;
        for (let p = 0; p < 60; p++) want.push(tok = argmax(ref.forward(tok, p)));
        assert.deepEqual(ids, want);
      } finally {
        ckpt.close();
        file.close();
      }
    }),
});

Deno.test({
  name: "size budget: the file stays within it, and cvxq's Σ G²·D is below uniform's and " +
    "mixquant's at the same budget (RTN trials on stories260K)",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const ckpt = await openCheckpoint(sharedPath(MODEL));
      const tok = await loadTokenizer(sharedPath(MODEL));
      const seqs = calibrationSequences(tok, await Deno.readTextFile(sharedPath(TEXT)), {
        seqLen: 128,
        samples: 8,
        seed: 0,
      });
      const gpu = await testGpu();
      const total = (
        a: { rows: { candidates: { format: string; cost: number }[]; choice: string }[] },
      ) => a.rows.reduce((s, r) => s + r.candidates.find((c) => c.format === r.choice)!.cost, 0);
      const opts = { method: "rtn" as const, sensitivitySamples: 4 };
      try {
        const cvxq = await allocateFormats(gpu, ckpt, seqs, 3.2, {
          ...opts,
          budget: { bitsPerWeight: 3.2 },
          allocator: "cvxq",
        }, () => {});
        assert.ok((cvxq.record.bitsPerWeight as number) <= 3.2);
        assert.ok((cvxq.record.bitsPerWeight as number) > 3.18);
        assert.ok(cvxq.rows.every((r) => r.G2! > 0 && r.candidates.every((c) => c.D! > 0)));
        // the same costs (G²·D) for the other choices: cvxq minimises them
        const others = cvxq.rows.map((r) => r.candidates.map((c) => c.cost));
        const layers = cvxq.rows.map((r, i) => ({
          name: r.name,
          n: r.N * r.K,
          bpw: r.candidates.map((c) => c.bpw),
          cost: others[i],
        }));
        const uni = uniformChoice(layers, CANDIDATES, 3.2);
        const mq = mixQuant(
          cvxq.rows.map((r, i) => ({ ...layers[i], cost: r.candidates.map((c) => c.E) })),
          3.2,
        ).choice;
        assert.ok(total(cvxq) < costOf(layers, uni), "cvxq not below uniform");
        assert.ok(total(cvxq) <= costOf(layers, mq), "cvxq not below mixquant");
      } finally {
        ckpt.close();
      }
      // a size budget: the whole file within it
      const out = `${dir}/sized.lowbit`, bytes = 175_000;
      await quantizeModel({
        model: sharedPath(MODEL),
        out,
        method: "rtn",
        bits: 4,
        groupSize: 128,
        budget: { budget: { bytes }, allocator: "mixquant" },
        log: () => {},
      });
      const size = (await Deno.stat(out)).size;
      assert.ok(size <= bytes && size > bytes - 15_000, `file ${size} bytes, budget ${bytes}`);
    }),
});
