/**
 * Tests of decoupleQ stage 2: the CPU block forward/backward (quantize/block_math.ts) against
 * central finite differences and against ReferenceModel, and tuneBlock (quantize/stage2.ts) on
 * a synthetic 2-bit RTN block. Also prints the cost of one epoch on the novels-5M block shape.
 * Then the end-to-end stage (quantize/e2e.ts): the whole model's KL gradient against central
 * differences, and tuneEndToEnd on a synthetic 2-bit model.
 */
import assert from "node:assert/strict";
import {
  BlockMath,
  type BlockParams,
  createGrads,
  LINEAR_KEYS,
  type LinearKey,
  linearShapes,
  rmsnormForward,
} from "../quantize/block_math.ts";
import { type E2EModel, ModelMath, tuneEndToEnd } from "../quantize/e2e.ts";
import { blockMse, type Stage2Block, tuneBlock } from "../quantize/stage2.ts";
import { rtnQuantize } from "../quantize/rtn.ts";
import { type ModelConfig, tensorNames as TN } from "../runtime/checkpoint/config.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { rng } from "./helpers.ts";
import { syntheticConfig } from "./synthetic.ts";

/** Roughly normal samples of variance 1: the sum of three uniforms on [−1, 1). */
function gauss(r: () => number): () => number {
  return () => r() + r() + r();
}

/** Random float block parameters: W ~ (N, K) scaled 1/√K, norm weights around 1. */
function randomParams(c: ModelConfig, seed: number, wScale = 1): BlockParams {
  const r = rng(seed), g = gauss(r);
  const shapes = linearShapes(c);
  const linears = {} as Record<LinearKey, Float32Array>;
  for (const key of LINEAR_KEYS) {
    const [N, K] = shapes[key];
    linears[key] = Float32Array.from({ length: N * K }, () => (wScale * g()) / Math.sqrt(K));
  }
  const norm = () => Float32Array.from({ length: c.dim }, () => 1 + 0.3 * r());
  const vec = (n: number) => Float32Array.from({ length: n }, () => 0.2 * r());
  const qd = c.nHeads * c.headDim, kvd = c.nKvHeads * c.headDim;
  return {
    linears,
    attnNorm: norm(),
    ffnNorm: norm(),
    bias: c.qkvBias ? { bq: vec(qd), bk: vec(kvd), bv: vec(kvd) } : null,
  };
}

function randomInput(T: number, dim: number, seed: number): Float32Array {
  const g = gauss(rng(seed));
  return Float32Array.from({ length: T * dim }, g);
}

/** Float64 copies of every tensor of `p` (so finite differences are not rounded to float32). */
function toF64(p: BlockParams): BlockParams {
  const linears = {} as Record<LinearKey, Float64Array>;
  for (const key of LINEAR_KEYS) linears[key] = Float64Array.from(p.linears[key]);
  return {
    linears,
    attnNorm: Float64Array.from(p.attnNorm),
    ffnNorm: Float64Array.from(p.ffnNorm),
    bias: p.bias
      ? {
        bq: Float64Array.from(p.bias.bq),
        bk: Float64Array.from(p.bias.bk),
        bv: Float64Array.from(p.bias.bv),
      }
      : null,
  };
}

const tinyBlock = (qkvBias: boolean) =>
  syntheticConfig({
    dim: 16,
    nHeads: 2,
    nKvHeads: 1,
    headDim: 8,
    hiddenDim: 24,
    qkvBias,
    ropeTheta: 10,
  });

/**
 * Checks `analytic` against central differences (step h) of `loss` in every entry of v: the
 * worst error relative to the largest difference quotient must stay below `tol`. Returns it.
 */
function checkGradient(
  name: string,
  v: Float64Array,
  analytic: Float64Array,
  loss: () => number,
  h: number,
  tol: number,
): number {
  let maxErr = 0, maxRef = 0;
  for (let i = 0; i < v.length; i++) {
    const v0 = v[i];
    v[i] = v0 + h;
    const lp = loss();
    v[i] = v0 - h;
    const lm = loss();
    v[i] = v0;
    const fd = (lp - lm) / (2 * h);
    maxErr = Math.max(maxErr, Math.abs(fd - analytic[i]));
    maxRef = Math.max(maxRef, Math.abs(fd));
  }
  const rel = maxErr / maxRef;
  assert.ok(maxRef > 0, `${name}: zero gradient`);
  assert.ok(rel < tol, `${name}: relative error ${rel.toExponential(2)}`);
  return rel;
}

for (const qkvBias of [false, true]) {
  Deno.test(`block backward matches central differences (qkvBias ${qkvBias})`, () => {
    const c = tinyBlock(qkvBias), T = 5;
    const p = toF64(randomParams(c, 11 + Number(qkvBias), 1.5));
    const x = Float64Array.from(randomInput(T, c.dim, 5));
    const R = Float64Array.from(randomInput(T, c.dim, 6)); // L = Σ out ⊙ R
    const bm = new BlockMath(c, T);
    const loss = () => {
      bm.setParams(p);
      const out = bm.forward(x, T);
      let s = 0;
      for (let i = 0; i < out.length; i++) s += out[i] * R[i];
      return s;
    };
    loss();
    const grads = createGrads(c), dx = new Float64Array(T * c.dim);
    bm.backward(R, grads, dx);

    const check = (name: string, v: Float64Array, analytic: Float64Array) =>
      checkGradient(name, v, analytic, loss, 1e-5, 1e-6);
    const errs: number[] = [];
    for (const key of LINEAR_KEYS) {
      errs.push(check(key, p.linears[key] as Float64Array, grads.linears[key]));
    }
    errs.push(check("attnNorm", p.attnNorm as Float64Array, grads.attnNorm));
    errs.push(check("ffnNorm", p.ffnNorm as Float64Array, grads.ffnNorm));
    errs.push(check("x", x, dx)); // dL/dx as well
    console.log(`worst relative error ${Math.max(...errs).toExponential(2)}`);
  });
}

Deno.test("block forward equals ReferenceModel's decoder layer", () => {
  for (const qkvBias of [false, true]) {
    // One layer, lm_head = identity and final norm = 1: logits_t = rmsnorm(block(x)_t).
    const dim = 32, T = 12;
    const c = syntheticConfig({
      dim,
      nHeads: 4,
      nKvHeads: 2,
      headDim: 8,
      hiddenDim: 48,
      nLayers: 1,
      vocabSize: dim,
      qkvBias,
      ropeTheta: 500,
      ropeScaling: qkvBias
        ? { factor: 4, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 16 }
        : null,
    });
    const p = randomParams(c, 21, 1.5);
    const x = randomInput(T, dim, 22);
    const w = new Map<string, Float32Array>();
    const embed = new Float32Array(dim * dim);
    embed.set(x);
    w.set(TN.embed, embed);
    w.set(TN.norm, new Float32Array(dim).fill(1));
    const eye = new Float32Array(dim * dim);
    for (let i = 0; i < dim; i++) eye[i * dim + i] = 1;
    w.set(TN.lmHead, eye);
    w.set(TN.attnNorm(0), p.attnNorm as Float32Array);
    w.set(TN.ffnNorm(0), p.ffnNorm as Float32Array);
    for (const key of LINEAR_KEYS) w.set(TN[key](0), p.linears[key] as Float32Array);
    if (p.bias) {
      w.set(TN.bq(0), p.bias.bq as Float32Array);
      w.set(TN.bk(0), p.bias.bk as Float32Array);
      w.set(TN.bv(0), p.bias.bv as Float32Array);
    }
    const ref = new ReferenceModel(c, w);
    const bm = new BlockMath(c, T);
    bm.setParams(p);
    const out = bm.forward(x, T);
    let maxDiff = 0;
    for (let t = 0; t < T; t++) {
      const logits = ref.forward(t, t);
      const row = out.subarray(t * dim, (t + 1) * dim);
      let ss = 0;
      for (let i = 0; i < dim; i++) ss += row[i] * row[i];
      const inv = 1 / Math.sqrt(ss / dim + c.normEps);
      for (let i = 0; i < dim; i++) maxDiff = Math.max(maxDiff, Math.abs(row[i] * inv - logits[i]));
      // The block changes the residual stream by more than rounding: a real comparison.
      let moved = 0;
      for (let i = 0; i < dim; i++) moved = Math.max(moved, Math.abs(row[i] - x[t * dim + i]));
      assert.ok(moved > 0.1, `token ${t}: block output ≈ its input`);
    }
    assert.ok(maxDiff < 1e-10, `qkvBias ${qkvBias}: max |Δ| ${maxDiff}`);
  }
});

/** A synthetic block quantized with RTN, and the float block's outputs as targets. */
function syntheticProblem(
  c: ModelConfig,
  lengths: number[],
  seed: number,
  bits: 2 | 3 | 4,
  groupSize: number,
) {
  const p = randomParams(c, seed);
  const inputs = lengths.map((T, i) => randomInput(T, c.dim, seed * 100 + i));
  const bm = new BlockMath(c, Math.max(...lengths));
  bm.setParams(p);
  const targets = inputs.map((x, i) => Float32Array.from(bm.forward(x, lengths[i])));
  const shapes = linearShapes(c);
  const linears = {} as Stage2Block["linears"];
  for (const key of LINEAR_KEYS) {
    const [N, K] = shapes[key];
    linears[key] = rtnQuantize(p.linears[key], N, K, { bits, groupSize });
  }
  const block: Stage2Block = {
    linears,
    attnNorm: p.attnNorm as Float32Array,
    ffnNorm: p.ffnNorm as Float32Array,
  };
  return { block, inputs, targets };
}

Deno.test("tuneBlock lowers a 2-bit RTN block's output MSE, codes untouched", () => {
  const c = syntheticConfig({ dim: 64, hiddenDim: 172, nHeads: 8, nKvHeads: 4, headDim: 8 });
  const { block, inputs, targets } = syntheticProblem(c, [32, 48, 64, 40, 56, 64], 3, 2, 32);
  const q0 = Object.fromEntries(LINEAR_KEYS.map((k) => [k, block.linears[k].q.slice()]));
  const s0 = Object.fromEntries(LINEAR_KEYS.map((k) => [k, block.linears[k].scale.slice()]));
  const r = tuneBlock(c, block, inputs, targets, { seed: 1 });
  const h = r.history;
  console.log(
    `synthetic 2-bit g32 block: MSE ${h.before.toExponential(3)} → ${h.after.toExponential(3)} ` +
      `(${(h.after / h.before).toFixed(3)}×), epochs [${
        h.epochs.map((e) => e.toExponential(3)).join(", ")
      }], ${r.ms.toFixed(0)} ms`,
  );
  assert.ok(h.after < 0.8 * h.before, `MSE ${h.before} → ${h.after}`);
  assert.ok(h.after <= h.before && h.epochs.every((e) => e >= h.after));
  assert.equal(h.after, Math.min(h.before, ...h.epochs));
  // The returned block measures what the history says, and its s, z are fp16 values.
  assert.equal(blockMse(c, r.block, inputs, targets), h.after);
  for (const key of LINEAR_KEYS) {
    const ql = r.block.linears[key];
    for (const a of [ql.scale, ql.zero]) {
      assert.ok(a.every((v) => Math.f16round(v) === v), `${key}: s/z not fp16-exact`);
    }
    // Codes untouched; the input's s unchanged; the output's s new arrays.
    assert.deepEqual(block.linears[key].q, q0[key]);
    assert.equal(ql.q, block.linears[key].q);
    assert.deepEqual(block.linears[key].scale, s0[key]);
    assert.notEqual(ql.scale, block.linears[key].scale);
  }
});

Deno.test("tuneBlock never returns a worse block", () => {
  // A huge learning rate makes every epoch worse: the input must come back.
  const c = syntheticConfig({ dim: 32, hiddenDim: 48, nHeads: 4, nKvHeads: 2, headDim: 8 });
  const { block, inputs, targets } = syntheticProblem(c, [16, 24], 4, 3, 16);
  const r = tuneBlock(c, block, inputs, targets, { epochs: 2, lr: 10 });
  assert.ok(r.history.epochs.every((e) => e > r.history.before));
  assert.equal(r.history.bestEpoch, 0);
  assert.equal(r.history.after, r.history.before);
  for (const key of LINEAR_KEYS) {
    assert.deepEqual(r.block.linears[key].scale, block.linears[key].scale);
    assert.deepEqual(r.block.linears[key].zero, block.linears[key].zero);
  }
  assert.deepEqual(r.block.attnNorm, block.attnNorm);
});

Deno.test("stage 2 cost: one epoch on the novels-5M block shape (printed)", () => {
  const c = syntheticConfig({ dim: 256, hiddenDim: 688, nHeads: 8, nKvHeads: 4, headDim: 32 });
  const { block, inputs, targets } = syntheticProblem(c, Array(16).fill(256), 5, 2, 32);
  const r = tuneBlock(c, block, inputs, targets, { epochs: 1 });
  console.log(
    `novels-5M block (dim 256, hidden 688, 8/4 heads × 32), 16 × 256 tokens: one epoch ` +
      `${(r.epochMs[0] / 1000).toFixed(2)} s (train + evaluation), total ` +
      `${(r.ms / 1000).toFixed(2)} s with the initial evaluation; MSE ` +
      `${r.history.before.toExponential(3)} → ${r.history.after.toExponential(3)}`,
  );
});

// ---------------------------------------------------------------------------------------------
// The end-to-end stage (quantize/e2e.ts).

/** A float model of `c` (random blocks, final norm, head) and its 2-bit RTN copy. */
function syntheticModel(c: ModelConfig, seed: number, bits: 2 | 3 | 4, groupSize: number) {
  const r = rng(seed), g = gauss(r);
  const float = Array.from({ length: c.nLayers }, (_, l) => randomParams(c, seed + 10 * l));
  const shapes = linearShapes(c);
  const blocks: Stage2Block[] = float.map((p) => {
    const linears = {} as Stage2Block["linears"];
    for (const key of LINEAR_KEYS) {
      const [N, K] = shapes[key];
      linears[key] = rtnQuantize(p.linears[key], N, K, { bits, groupSize });
    }
    return { linears, attnNorm: p.attnNorm as Float32Array, ffnNorm: p.ffnNorm as Float32Array };
  });
  const finalNorm = Float32Array.from({ length: c.dim }, () => 1 + 0.3 * r());
  const head = Float32Array.from({ length: c.vocabSize * c.dim }, () => (2 * g()) / c.dim ** 0.5);
  return { float, quantized: { blocks, finalNorm, head } as E2EModel };
}

/** The float model's final-normed hidden states on each input. */
function teacherStates(
  c: ModelConfig,
  float: BlockParams[],
  g: Float32Array,
  inputs: Float32Array[],
) {
  return inputs.map((x0) => {
    const T = x0.length / c.dim;
    let x: Float64Array | Float32Array = x0;
    for (const p of float) {
      const bm = new BlockMath(c, T);
      bm.setParams(p);
      x = Float64Array.from(bm.forward(x, T));
    }
    const y = new Float64Array(T * c.dim);
    rmsnormForward(
      y,
      new Float64Array(T),
      x as Float64Array,
      Float64Array.from(g),
      T,
      c.dim,
      c.normEps,
    );
    return Float32Array.from(y);
  });
}

Deno.test("model KL backward matches central differences", () => {
  const c = syntheticConfig({ ...tinyBlock(false), nLayers: 2, vocabSize: 11 }), T = 4;
  const { float, quantized } = syntheticModel(c, 21, 2, 8);
  const p = float.map(toF64);
  const x = Float64Array.from(randomInput(T, c.dim, 7));
  const teacher = Float64Array.from(randomInput(T, c.dim, 8));
  const gF = Float64Array.from(quantized.finalNorm);
  const mm = new ModelMath(c, quantized.head, T);
  const kl = () => {
    p.forEach((b, l) => mm.bms[l].setParams(b));
    mm.setFinalNorm(gF);
    return mm.klSum(x, teacher, T);
  };
  kl();
  const grads = {
    blocks: p.map(() => createGrads(c)),
    finalNorm: new Float64Array(c.dim),
    scale: 1,
  };
  p.forEach((b, l) => mm.bms[l].setParams(b));
  const k0 = mm.klSum(x, teacher, T, grads);
  assert.ok(k0 > 0.01, `KL ${k0}: the teacher is not the model`);
  const check = (name: string, v: Float64Array, analytic: Float64Array) =>
    checkGradient(name, v, analytic, kl, 1e-6, 1e-5);
  check("final norm", gF, grads.finalNorm);
  for (const l of [0, 1]) {
    check(`block ${l} w1`, p[l].linears.w1 as Float64Array, grads.blocks[l].linears.w1);
    check(`block ${l} wq`, p[l].linears.wq as Float64Array, grads.blocks[l].linears.wq);
    check(`block ${l} attnNorm`, p[l].attnNorm as Float64Array, grads.blocks[l].attnNorm);
  }
});

Deno.test("tuneEndToEnd lowers a 2-bit model's KL to the float model, codes untouched", () => {
  const c = syntheticConfig({
    dim: 32,
    hiddenDim: 48,
    nHeads: 4,
    nKvHeads: 2,
    headDim: 8,
    vocabSize: 64,
  });
  const { float, quantized } = syntheticModel(c, 5, 2, 16);
  const inputs = [24, 32, 16, 32, 28, 20].map((T, i) => randomInput(T, c.dim, 40 + i));
  const teacher = teacherStates(c, float, quantized.finalNorm, inputs);
  const q0 = quantized.blocks.map((b) => b.linears.w2.q.slice());
  const r = tuneEndToEnd(c, quantized, inputs, teacher, { epochs: 4, lr: 1e-2, batchTokens: 64 });
  const h = r.history;
  console.log(
    `synthetic 2-bit g16 model: KL ${h.before.toExponential(3)} → ${h.after.toExponential(3)}`,
  );
  assert.ok(h.improved && h.after < 0.8 * h.before, `KL ${h.before} → ${h.after}`);
  r.model.blocks.forEach((b, l) => {
    assert.deepEqual(b.linears.w2.q, q0[l]);
    for (const key of LINEAR_KEYS) {
      for (const a of [b.linears[key].scale, b.linears[key].zero]) {
        assert.ok(a.every((v) => Math.f16round(v) === v), `${key}: s/z not fp16-exact`);
      }
    }
  });
  // what the history reports is what comes back: tuning the result from there starts at `after`
  const again = tuneEndToEnd(c, r.model, inputs, teacher, { epochs: 0 });
  assert.equal(again.history.before, h.after);
});

Deno.test("tuneEndToEnd never returns a worse model", () => {
  const c = syntheticConfig({
    dim: 16,
    hiddenDim: 24,
    nHeads: 2,
    nKvHeads: 1,
    headDim: 8,
    vocabSize: 32,
  });
  const { float, quantized } = syntheticModel(c, 6, 3, 8);
  const inputs = [12, 16].map((T, i) => randomInput(T, c.dim, 50 + i));
  const teacher = teacherStates(c, float, quantized.finalNorm, inputs);
  const r = tuneEndToEnd(c, quantized, inputs, teacher, { epochs: 2, lr: 30 });
  assert.equal(r.history.improved, false);
  assert.equal(r.model, quantized);
  assert.equal(r.history.after, r.history.before);
});
