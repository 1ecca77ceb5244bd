/**
 * decoupleQ stage 2 (arXiv 2404.12759, §3.4): per decoder block, with the integer codes q of
 * its seven linear layers frozen, tune their float scales s and zeros z (per row and group) and
 * the block's two RMSNorm weights with Adam, minimizing the mean squared error between the
 * quantized block's output and the full-precision block's output on the calibration set (both
 * fed the same inputs: the outputs of the already-quantized blocks before it).
 *
 * Ŵ[n, k] = s[n, g]·q[n, k] + z[n, g], so dL/ds[n, g] = Σ_{k∈g} dL/dŴ[n, k]·q[n, k] and
 * dL/dz[n, g] = Σ_{k∈g} dL/dŴ[n, k], with dL/dŴ from {@link BlockMath.backward}.
 *
 * The state returned is the best one seen on the calibration set, measured exactly as returned
 * (s, z rounded to fp16, norm weights to float32): never worse than the input.
 */
import type { ModelConfig } from "../runtime/checkpoint/config.ts";
import { ParameterError, ShapeError } from "../runtime/errors.ts";
import { mulberry32 } from "../runtime/model/sampling.ts";
import {
  type BlockConfig,
  type BlockGrads,
  BlockMath,
  type BlockParams,
  createGrads,
  type FloatArray,
  LINEAR_KEYS,
  type LinearKey,
  linearShapes,
  zeroGrads,
} from "./block_math.ts";
import { checkQuantizedLinear, nGroups, type QuantizedLinear } from "../runtime/format/qtensor.ts";

/** One quantized decoder block: the tunable state of stage 2 (biases stay fixed). */
export interface Stage2Block {
  linears: Record<LinearKey, QuantizedLinear>;
  attnNorm: Float32Array; // (dim)
  ffnNorm: Float32Array; // (dim)
  /** q/k/v biases, required when config.qkvBias. */
  bias?: { bq: Float32Array; bk: Float32Array; bv: Float32Array } | null;
}

export interface Stage2Options {
  /** Passes over the calibration set (default {@link STAGE2_DEFAULTS}.epochs). */
  epochs?: number;
  /**
   * Relative learning rate: each parameter group's Adam lr is `lr` times its scale, mean|s| of
   * the layer for its s and z, mean|g| for a norm weight (default {@link STAGE2_DEFAULTS}.lr).
   */
  lr?: number;
  /** Tokens per mini-batch: whole sequences are added until at least this many. */
  batchTokens?: number;
  /** Learning-rate schedule over all steps: constant, or cosine decay to 0 (default). */
  schedule?: "constant" | "cosine";
  /** Seed of the per-epoch shuffle of the sequences. */
  seed?: number;
  log?: (line: string) => void;
}

/**
 * Defaults, from sweeps on synthetic 2/3/4-bit RTN blocks: a relative lr of 1e-2 with cosine
 * decay was best or near best both with few steps (~10: 3e-2 does slightly better there) and
 * with many (~300: 3e-3..3e-2 all converge, 1e-2 cosine lowest); 1e-3 is far too slow.
 * 256-token mini-batches: one calibration sequence per step at the usual lengths.
 */
export const STAGE2_DEFAULTS = {
  epochs: 5,
  lr: 1e-2,
  batchTokens: 256,
  schedule: "cosine",
  seed: 0,
} as const;

export interface Stage2History {
  /** MSE of the input block. */
  before: number;
  /** Mean mini-batch MSE during each epoch (float parameters, before the step). */
  train: number[];
  /** MSE after each epoch, with s, z rounded to fp16 (norm weights to float32). */
  epochs: number[];
  /** MSE of the returned block (the best of `before` and `epochs`). */
  after: number;
  /** The epoch whose state is returned (1-based), 0 when the input was best. */
  bestEpoch: number;
}

export interface Stage2Result {
  /** The tuned block: new scale/zero/norm arrays; q and the biases are the input's arrays. */
  block: Stage2Block;
  history: Stage2History;
  /** Wall time of each epoch, its evaluation included (ms). */
  epochMs: number[];
  /** Total wall time (ms). */
  ms: number;
}

const BETA1 = 0.9, BETA2 = 0.999, ADAM_EPS = 1e-8;

/** One tensor Adam updates, with its own learning rate (and betas: Adam's by default). */
export class AdamParam {
  readonly grad: Float64Array;
  readonly #m: Float64Array;
  readonly #v: Float64Array;
  constructor(
    readonly value: Float64Array,
    readonly lr: number,
    readonly betas: readonly [number, number] = [BETA1, BETA2],
  ) {
    this.grad = new Float64Array(value.length);
    this.#m = new Float64Array(value.length);
    this.#v = new Float64Array(value.length);
  }

  /** One Adam step (step count `t` ≥ 1, bias-corrected), the lr multiplied by `factor`. */
  step(t: number, factor: number): void {
    const { value: p, grad: g } = this, m = this.#m, v = this.#v, [b1, b2] = this.betas;
    const c1 = 1 / (1 - b1 ** t), c2 = 1 / (1 - b2 ** t), lr = this.lr * factor;
    for (let i = 0; i < p.length; i++) {
      const gi = g[i];
      m[i] = b1 * m[i] + (1 - b1) * gi;
      v[i] = b2 * v[i] + (1 - b2) * gi * gi;
      p[i] -= (lr * m[i] * c1) / (Math.sqrt(v[i] * c2) + ADAM_EPS);
    }
  }
}

/** Ŵ = s·q + z (float64) from explicit s, z of the shape of `ql`'s. */
export function dequantInto(out: Float64Array, ql: QuantizedLinear, s: FloatArray, z: FloatArray) {
  const { N, K, groupSize: G, q } = ql, nG = nGroups(K, G);
  for (let n = 0; n < N; n++) {
    for (let g = 0; g < nG; g++) {
      const sv = s[n * nG + g], zv = z[n * nG + g], k2 = Math.min(K, (g + 1) * G);
      for (let k = g * G; k < k2; k++) out[n * K + k] = sv * q[n * K + k] + zv;
    }
  }
}

/** ds[n, g] = Σ_{k∈g} dŴ[n, k]·q[n, k], dz[n, g] = Σ_{k∈g} dŴ[n, k] (overwritten). */
function scaleZeroGrads(
  dW: Float64Array,
  ql: QuantizedLinear,
  ds: Float64Array,
  dz: Float64Array,
) {
  const { N, K, groupSize: G, q } = ql, nG = nGroups(K, G);
  for (let n = 0; n < N; n++) {
    for (let g = 0; g < nG; g++) {
      const k2 = Math.min(K, (g + 1) * G);
      let a = 0, b = 0;
      for (let k = g * G; k < k2; k++) {
        const d = dW[n * K + k];
        a += d * q[n * K + k];
        b += d;
      }
      ds[n * nG + g] = a;
      dz[n * nG + g] = b;
    }
  }
}

/** Sequence lengths of `inputs`/`targets` ((T, dim) each), checked. */
function sequenceLengths(c: BlockConfig, inputs: FloatArray[], targets: FloatArray[]): number[] {
  if (inputs.length === 0 || inputs.length !== targets.length) {
    throw new ShapeError(`stage 2: ${inputs.length} inputs for ${targets.length} targets`);
  }
  return inputs.map((x, i) => {
    const T = x.length / c.dim;
    if (!Number.isInteger(T) || T < 1 || targets[i].length !== x.length) {
      throw new ShapeError(
        `stage 2: sequence ${i}: input of ${x.length} and target of ${targets[i].length} ` +
          `entries, expected (T, ${c.dim}) both`,
      );
    }
    return T;
  });
}

function checkBlock(c: BlockConfig, block: Stage2Block): void {
  const shapes = linearShapes(c);
  for (const key of LINEAR_KEYS) {
    const ql = block.linears[key];
    if (!ql) throw new ShapeError(`stage 2: block has no ${key}`);
    checkQuantizedLinear(ql);
    if (ql.N !== shapes[key][0] || ql.K !== shapes[key][1]) {
      throw new ShapeError(`stage 2: ${key} is (${ql.N}, ${ql.K}), expected (${shapes[key]})`);
    }
  }
  if (c.qkvBias && !block.bias) throw new ShapeError("stage 2: config.qkvBias needs the biases");
}

/** Σ (out − target)² over every sequence, with `bm`'s current parameters. */
function sumSquaredError(
  bm: BlockMath,
  inputs: FloatArray[],
  targets: FloatArray[],
  lengths: number[],
): number {
  let sum = 0;
  for (let i = 0; i < inputs.length; i++) {
    const out = bm.forward(inputs[i], lengths[i]), y = targets[i];
    for (let j = 0; j < out.length; j++) {
      const d = out[j] - y[j];
      sum += d * d;
    }
  }
  return sum;
}

/** The float64 block parameters of a quantized block (Ŵ dequantized). */
function blockParams(c: BlockConfig, block: Stage2Block): BlockParams {
  const shapes = linearShapes(c);
  const linears = {} as Record<LinearKey, Float64Array>;
  for (const key of LINEAR_KEYS) {
    const ql = block.linears[key];
    linears[key] = new Float64Array(shapes[key][0] * shapes[key][1]);
    dequantInto(linears[key], ql, ql.scale, ql.zero);
  }
  return { linears, attnNorm: block.attnNorm, ffnNorm: block.ffnNorm, bias: block.bias };
}

/**
 * Mean squared error, over every token and channel, between the quantized block's outputs on
 * `inputs` and `targets` (each (T, dim) per sequence).
 */
export function blockMse(
  config: ModelConfig | BlockConfig,
  block: Stage2Block,
  inputs: FloatArray[],
  targets: FloatArray[],
): number {
  const lengths = sequenceLengths(config, inputs, targets);
  checkBlock(config, block);
  const bm = new BlockMath(config, Math.max(...lengths));
  bm.setParams(blockParams(config, block));
  const count = lengths.reduce((a, b) => a + b, 0) * config.dim;
  return sumSquaredError(bm, inputs, targets, lengths) / count;
}

/** Shuffled sequence indices grouped into mini-batches of ≥ batchTokens tokens. */
export function miniBatches(
  lengths: number[],
  batchTokens: number,
  rand: () => number,
): number[][] {
  const order = lengths.map((_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const batches: number[][] = [];
  let cur: number[] = [], tokens = 0;
  for (const i of order) {
    cur.push(i);
    tokens += lengths[i];
    if (tokens >= batchTokens) {
      batches.push(cur);
      cur = [];
      tokens = 0;
    }
  }
  if (cur.length > 0) batches.push(cur);
  return batches;
}

/** The learning-rate factor of step 1, 2, … of `totalSteps` on a cosine schedule: 1 → 0. */
export function cosineFactor(step: number, totalSteps: number): number {
  return 0.5 * (1 + Math.cos(Math.PI * Math.min(1, (step - 1) / totalSteps)));
}

/** An Adam parameter for a norm weight vector, its lr `lrRel` times mean|g|. */
export function normParam(g: Float32Array, lrRel: number): AdamParam {
  return new AdamParam(Float64Array.from(g), lrRel * (meanAbs(g) || 1));
}

/**
 * The trainable float part of a quantized block: float64 masters of each linear layer's s and z
 * (lr `lrRel` times the layer's mean|s|) and of the two norm weights, with their Adam state.
 */
export function blockParamsAdam(block: Stage2Block, lrRel: number) {
  const s = {} as Record<LinearKey, AdamParam>, z = {} as Record<LinearKey, AdamParam>;
  for (const key of LINEAR_KEYS) {
    const ql = block.linears[key];
    const ref = meanAbs(ql.scale) || meanAbs(ql.zero) || 1;
    s[key] = new AdamParam(Float64Array.from(ql.scale), lrRel * ref);
    z[key] = new AdamParam(Float64Array.from(ql.zero), lrRel * ref);
  }
  const g1 = normParam(block.attnNorm, lrRel), g2 = normParam(block.ffnNorm, lrRel);
  /** Sets every parameter's gradient from the block's dL/dŴ and norm gradients. */
  const setGrads = (grads: BlockGrads) => {
    for (const key of LINEAR_KEYS) {
      scaleZeroGrads(grads.linears[key], block.linears[key], s[key].grad, z[key].grad);
    }
    g1.grad.set(grads.attnNorm);
    g2.grad.set(grads.ffnNorm);
  };
  return { s, z, g1, g2, all: [...LINEAR_KEYS.flatMap((k) => [s[k], z[k]]), g1, g2], setGrads };
}

function meanAbs(a: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i]);
  return s / a.length;
}

/**
 * Tunes the scales, zeros and norm weights of one quantized block (codes frozen) so that its
 * outputs on `inputs` approach `targets` (the full-precision block's outputs on the same
 * inputs), per sequence (T, dim). See {@link Stage2Options} for the knobs.
 */
export function tuneBlock(
  config: ModelConfig | BlockConfig,
  block: Stage2Block,
  inputs: FloatArray[],
  targets: FloatArray[],
  opts: Stage2Options = {},
): Stage2Result {
  const t0 = performance.now();
  const c = config;
  const lengths = sequenceLengths(c, inputs, targets);
  checkBlock(c, block);
  const epochs = opts.epochs ?? STAGE2_DEFAULTS.epochs;
  const lrRel = opts.lr ?? STAGE2_DEFAULTS.lr;
  const batchTokens = opts.batchTokens ?? STAGE2_DEFAULTS.batchTokens;
  if (!Number.isInteger(epochs) || epochs < 0) {
    throw new ParameterError(`stage 2: epochs must be a non-negative integer, got ${epochs}`);
  }
  if (!(lrRel > 0) || !(batchTokens >= 1)) {
    throw new ParameterError(`stage 2: lr ${lrRel} and batchTokens ${batchTokens} must be > 0`);
  }
  const log = opts.log ?? (() => {});
  const rand = mulberry32(opts.seed ?? STAGE2_DEFAULTS.seed);
  const bm = new BlockMath(c, Math.max(...lengths));
  const count = lengths.reduce((a, b) => a + b, 0) * c.dim;

  // The parameters being trained (float64 masters) and their Adam state.
  const { s, z, g1, g2, all, setGrads } = blockParamsAdam(block, lrRel);

  // Float64 parameters handed to the block: Ŵ from the masters (or from a rounded candidate).
  const shapes = linearShapes(c);
  const What = {} as Record<LinearKey, Float64Array>;
  for (const key of LINEAR_KEYS) What[key] = new Float64Array(shapes[key][0] * shapes[key][1]);
  const params = (sz: (k: LinearKey) => [FloatArray, FloatArray], a: FloatArray, f: FloatArray) => {
    for (const key of LINEAR_KEYS) dequantInto(What[key], block.linears[key], ...sz(key));
    return { linears: What, attnNorm: a, ffnNorm: f, bias: block.bias } as BlockParams;
  };

  // The candidate as it would be returned: s, z in fp16, norm weights in float32.
  const rounded = () => {
    const sz = {} as Record<LinearKey, [Float32Array, Float32Array]>;
    for (const key of LINEAR_KEYS) {
      sz[key] = [
        Float32Array.from(s[key].value, Math.f16round),
        Float32Array.from(z[key].value, Math.f16round),
      ];
    }
    return { sz, g1: Float32Array.from(g1.value), g2: Float32Array.from(g2.value) };
  };
  type Candidate = ReturnType<typeof rounded>;
  const mseOf = (cand: Candidate) => {
    bm.setParams(params((k) => cand.sz[k], cand.g1, cand.g2));
    return sumSquaredError(bm, inputs, targets, lengths) / count;
  };

  // The input (its s, z already fp16 by QuantizedLinear's contract) is the first candidate.
  let best = rounded();
  const before = mseOf(best);
  const history: Stage2History = { before, train: [], epochs: [], after: before, bestEpoch: 0 };
  log(`stage 2: MSE before ${before.toExponential(4)}`);
  // Gradients of MSE / before: the scale of the loss is irrelevant to Adam but for its eps.
  const lossScale = before > 0 ? 1 / before : 1;

  const schedule = opts.schedule ?? STAGE2_DEFAULTS.schedule;
  const totalSteps = epochs * miniBatches(lengths, batchTokens, () => 0).length;
  const grads = createGrads(c);
  const dOutBuf = new Float64Array(Math.max(...lengths) * c.dim);
  let step = 0;
  const epochMs: number[] = [];
  for (let epoch = 1; epoch <= epochs && before > 0; epoch++) {
    const te = performance.now();
    let trainSum = 0;
    for (const batch of miniBatches(lengths, batchTokens, rand)) {
      bm.setParams(params((k) => [s[k].value, z[k].value], g1.value, g2.value));
      zeroGrads(grads);
      const n = batch.reduce((a, i) => a + lengths[i], 0) * c.dim;
      for (const i of batch) {
        const out = bm.forward(inputs[i], lengths[i]), y = targets[i];
        const dOut = dOutBuf.subarray(0, out.length);
        for (let j = 0; j < out.length; j++) {
          const d = out[j] - y[j];
          trainSum += d * d;
          dOut[j] = (2 * d * lossScale) / n;
        }
        bm.backward(dOut, grads);
      }
      setGrads(grads);
      step++;
      const factor = schedule === "cosine" ? cosineFactor(step, totalSteps) : 1;
      for (const p of all) p.step(step, factor);
    }
    const cand = rounded();
    const mse = mseOf(cand);
    history.train.push(trainSum / count);
    history.epochs.push(mse);
    epochMs.push(performance.now() - te);
    if (mse < history.after) {
      history.after = mse;
      history.bestEpoch = epoch;
      best = cand;
    }
    log(
      `stage 2: epoch ${epoch}: train ${(trainSum / count).toExponential(4)}, ` +
        `MSE ${mse.toExponential(4)} (fp16 s, z), ${epochMs[epoch - 1].toFixed(0)} ms`,
    );
  }

  const linears = {} as Record<LinearKey, QuantizedLinear>;
  for (const key of LINEAR_KEYS) {
    const [scale, zero] = best.sz[key];
    linears[key] = { ...block.linears[key], scale, zero };
  }
  return {
    block: { linears, attnNorm: best.g1, ffnNorm: best.g2, bias: block.bias },
    history,
    epochMs,
    ms: performance.now() - t0,
  };
}
