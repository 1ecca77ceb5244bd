/**
 * End-to-end tuning of the float part. decoupleQ's point is that once the integer codes q are
 * fixed, the scales s, zeros z and norm weights are ordinary float parameters that can be
 * trained (arXiv 2404.12759, §3.4 and §5). Stage 2 trains them block by block against each
 * block's float output; this stage trains all of them together, with the final norm, against
 * the float model's next-token distributions: the mean over calibration tokens of
 * KL(p_float ‖ p_quant), with q and the logits layer frozen.
 *
 * Gradients: d KL/d logits = p_quant − p_float per token, back through the logits layer, the
 * final RMSNorm and every block ({@link BlockMath.backward}), then onto s and z as in stage 2.
 * The whole model's float part is held in memory (float64), so this is for models whose
 * forward and backward passes fit the host; all the arithmetic is on the CPU.
 */
import type { ModelConfig } from "../runtime/checkpoint/config.ts";
import { ParameterError, ShapeError } from "../runtime/errors.ts";
import { mulberry32 } from "../runtime/model/sampling.ts";
import {
  BlockMath,
  createGrads,
  type FloatArray,
  gemmABt,
  LINEAR_KEYS,
  type LinearKey,
  linearShapes,
  rmsnormBackward,
  rmsnormForward,
  transpose,
  zeroGrads,
} from "./block_math.ts";
import type { QuantizedLinear } from "../runtime/format/qtensor.ts";
import {
  blockParamsAdam,
  cosineFactor,
  dequantInto,
  miniBatches,
  normParam,
  type Stage2Block,
} from "./stage2.ts";

/** The quantized model as this stage sees it: the blocks, the final norm, the logits layer. */
export interface E2EModel {
  blocks: Stage2Block[];
  finalNorm: Float32Array; // (dim)
  /** The logits layer (vocab, dim), frozen: the float one, or the dequantized one if packed. */
  head: FloatArray;
}

export interface E2EOptions {
  epochs?: number;
  /** Relative Adam learning rate, as stage 2's (default {@link E2E_DEFAULTS}.lr). */
  lr?: number;
  batchTokens?: number;
  seed?: number;
  log?: (line: string) => void;
}

export const E2E_DEFAULTS = { epochs: 2, lr: 3e-3, batchTokens: 256, seed: 0 } as const;

/** The KL before and after tuning is measured on (at most) this many of the sequences. */
export const E2E_KL_SEQUENCES = 128;

export interface E2EHistory {
  /**
   * Mean KL per token (nats): of the input model and of the returned one on the first
   * {@link E2E_KL_SEQUENCES} sequences, and of each epoch's training steps on all of them.
   */
  before: number;
  train: number[];
  after: number;
  /** False when the tuned state was no better than the input, which is then returned. */
  improved: boolean;
}

/** Forward and backward passes of the whole model over one sequence at a time. */
export class ModelMath {
  readonly bms: BlockMath[];
  readonly #c: ModelConfig;
  readonly #head: Float64Array; // (V, dim)
  readonly #headT: Float64Array; // (dim, V)
  readonly #gF: Float64Array;
  readonly #x: Float64Array; // final residual (T, dim)
  readonly #xn: Float64Array;
  readonly #inv: Float64Array;
  readonly #logits: Float64Array; // (T, V)
  readonly #tLogits: Float64Array;
  readonly #dxn: Float64Array;
  readonly #dx: Float64Array[];

  constructor(c: ModelConfig, head: FloatArray, maxT: number) {
    this.#c = c;
    const V = c.vocabSize, D = c.dim;
    if (head.length !== V * D) throw new ShapeError(`e2e: head has ${head.length}, not ${V}·${D}`);
    this.bms = Array.from({ length: c.nLayers }, () => new BlockMath(c, maxT));
    this.#head = Float64Array.from(head);
    this.#headT = new Float64Array(V * D);
    transpose(this.#headT, this.#head, V, D);
    this.#gF = new Float64Array(D);
    const f = (n: number) => new Float64Array(maxT * n);
    this.#x = f(D), this.#xn = f(D), this.#inv = f(1), this.#dxn = f(D);
    this.#logits = f(V), this.#tLogits = f(V);
    this.#dx = [f(D), f(D)];
  }

  setFinalNorm(g: FloatArray): void {
    this.#gF.set(g);
  }

  /**
   * Σ over the T tokens of KL(softmax(teacher) ‖ softmax(model)), `teacher` being the float
   * model's final-normed hidden states (T, dim). With `grads`, also backpropagates
   * `scale`·dKL into them.
   */
  klSum(
    x0: FloatArray,
    teacher: FloatArray,
    T: number,
    grads?: { blocks: ReturnType<typeof createGrads>[]; finalNorm: Float64Array; scale: number },
  ): number {
    const c = this.#c, D = c.dim, V = c.vocabSize;
    let x: FloatArray = x0;
    for (const bm of this.bms) x = bm.forward(x, T);
    const X = this.#x;
    X.set(x);
    rmsnormForward(this.#xn, this.#inv, X, this.#gF, T, D, c.normEps);
    gemmABt(this.#logits, this.#xn, this.#head, T, V, D);
    const tn = this.#dxn; // scratch: the teacher's hidden states as float64
    tn.set(teacher);
    gemmABt(this.#tLogits, tn, this.#head, T, V, D);
    let kl = 0;
    const L = this.#logits, TL = this.#tLogits;
    for (let t = 0; t < T; t++) {
      const o = t * V;
      const ls = logSumExp(L, o, V), lt = logSumExp(TL, o, V);
      for (let v = 0; v < V; v++) {
        const lpt = TL[o + v] - lt, lps = L[o + v] - ls, pt = Math.exp(lpt);
        kl += pt * (lpt - lps);
        if (grads) L[o + v] = grads.scale * (Math.exp(lps) - pt); // dKL/dlogit, in place
      }
    }
    if (!grads) return kl;
    gemmABt(this.#dxn, L, this.#headT, T, D, V);
    let [dOut, dIn] = this.#dx;
    dOut.fill(0, 0, T * D);
    rmsnormBackward(this.#dxn, X, this.#inv, this.#gF, T, D, dOut, grads.finalNorm);
    for (let b = this.bms.length - 1; b >= 0; b--) {
      this.bms[b].backward(dOut.subarray(0, T * D), grads.blocks[b], dIn);
      [dOut, dIn] = [dIn, dOut];
    }
    return kl;
  }
}

/** log Σ exp(a[o..o+n)), computed stably. */
export function logSumExp(a: Float64Array, o: number, n: number): number {
  let m = -Infinity;
  for (let i = 0; i < n; i++) if (a[o + i] > m) m = a[o + i];
  let s = 0;
  for (let i = 0; i < n; i++) s += Math.exp(a[o + i] - m);
  return m + Math.log(s);
}

/**
 * Tunes every block's s, z and norm weights and the final norm of `model` (codes frozen) so
 * that its next-token distributions on the calibration sequences approach the float model's.
 * `inputs` are the first block's inputs (the embedding rows, (T, dim) per sequence) and
 * `teacher` the float model's final-normed hidden states on the same sequences.
 */
export function tuneEndToEnd(
  config: ModelConfig,
  model: E2EModel,
  inputs: FloatArray[],
  teacher: FloatArray[],
  opts: E2EOptions = {},
): { model: E2EModel; history: E2EHistory; ms: number } {
  const t0 = performance.now();
  const c = config, D = c.dim;
  if (model.blocks.length !== c.nLayers) {
    throw new ShapeError(`e2e: ${model.blocks.length} blocks for a ${c.nLayers}-layer model`);
  }
  if (inputs.length === 0 || inputs.length !== teacher.length) {
    throw new ShapeError(`e2e: ${inputs.length} inputs for ${teacher.length} teacher sequences`);
  }
  const lengths = inputs.map((x, i) => {
    const T = x.length / D;
    if (!Number.isInteger(T) || T < 1 || teacher[i].length !== x.length) {
      throw new ShapeError(`e2e: sequence ${i}: input ${x.length}, teacher ${teacher[i].length}`);
    }
    return T;
  });
  const epochs = opts.epochs ?? E2E_DEFAULTS.epochs, lrRel = opts.lr ?? E2E_DEFAULTS.lr;
  const batchTokens = opts.batchTokens ?? E2E_DEFAULTS.batchTokens;
  if (!Number.isInteger(epochs) || epochs < 0 || !(lrRel > 0) || !(batchTokens >= 1)) {
    throw new ParameterError(
      `e2e: epochs ${epochs} must be an integer ≥ 0, lr ${lrRel} and batchTokens ` +
        `${batchTokens} > 0`,
    );
  }
  const log = opts.log ?? (() => {});
  const rand = mulberry32(opts.seed ?? E2E_DEFAULTS.seed);
  const mm = new ModelMath(c, model.head, Math.max(...lengths));
  const tokens = lengths.reduce((a, b) => a + b, 0);
  const shapes = linearShapes(c);

  // float64 masters and Adam state, per block
  const params = model.blocks.map((b) => blockParamsAdam(b, lrRel));
  const gF = normParam(model.finalNorm, lrRel);
  const all = [...params.flatMap((p) => p.all), gF];
  const What = model.blocks.map(() => {
    const w = {} as Record<LinearKey, Float64Array>;
    for (const key of LINEAR_KEYS) w[key] = new Float64Array(shapes[key][0] * shapes[key][1]);
    return w;
  });

  /** Loads parameters into the model math: the masters, or their stored (rounded) form. */
  const load = (rounded: boolean) => {
    const r = (a: Float64Array) => rounded ? a.map(Math.f16round) : a;
    model.blocks.forEach((b, l) => {
      const p = params[l];
      for (const key of LINEAR_KEYS) {
        dequantInto(What[l][key], b.linears[key], r(p.s[key].value), r(p.z[key].value));
      }
      const f32 = (a: Float64Array) => rounded ? Float32Array.from(a) : a;
      mm.bms[l].setParams({
        linears: What[l],
        attnNorm: f32(p.g1.value),
        ffnNorm: f32(p.g2.value),
        bias: b.bias,
      });
    });
    mm.setFinalNorm(rounded ? Float32Array.from(gF.value) : gF.value);
  };
  const klSeqs = Math.min(inputs.length, E2E_KL_SEQUENCES);
  const klTokens = lengths.slice(0, klSeqs).reduce((a, b) => a + b, 0);
  const meanKl = () => {
    let kl = 0;
    for (let i = 0; i < klSeqs; i++) kl += mm.klSum(inputs[i], teacher[i], lengths[i]);
    return kl / klTokens;
  };

  load(true);
  const before = meanKl();
  log(`e2e: KL before ${before.toExponential(4)} nats/token (${klSeqs} sequences)`);
  const grads = {
    blocks: model.blocks.map(() => createGrads(c)),
    finalNorm: new Float64Array(D),
    scale: 0,
  };
  const totalSteps = epochs * miniBatches(lengths, batchTokens, () => 0).length;
  const train: number[] = [];
  let step = 0;
  for (let epoch = 1; epoch <= epochs; epoch++) {
    const te = performance.now();
    let sum = 0;
    for (const batch of miniBatches(lengths, batchTokens, rand)) {
      load(false);
      grads.blocks.forEach(zeroGrads);
      grads.finalNorm.fill(0);
      const n = batch.reduce((a, i) => a + lengths[i], 0);
      grads.scale = 1 / (n * Math.max(before, 1e-12)); // Adam is scale-free but for its eps
      for (const i of batch) sum += mm.klSum(inputs[i], teacher[i], lengths[i], grads);
      params.forEach((p, l) => p.setGrads(grads.blocks[l]));
      gF.grad.set(grads.finalNorm);
      step++;
      for (const p of all) p.step(step, cosineFactor(step, totalSteps));
    }
    train.push(sum / tokens);
    log(
      `e2e: epoch ${epoch}: train KL ${(sum / tokens).toExponential(4)} ` +
        `(${((performance.now() - te) / 1000).toFixed(0)} s)`,
    );
  }
  load(true);
  const after = epochs > 0 ? meanKl() : before;
  log(`e2e: KL after ${after.toExponential(4)} nats/token (fp16 s, z)`);
  const improved = after < before;
  const out: E2EModel = !improved ? model : {
    head: model.head,
    finalNorm: Float32Array.from(gF.value),
    blocks: model.blocks.map((b, l) => {
      const p = params[l];
      const linears = {} as Record<LinearKey, QuantizedLinear>;
      for (const key of LINEAR_KEYS) {
        linears[key] = {
          ...b.linears[key],
          scale: Float32Array.from(p.s[key].value, Math.f16round),
          zero: Float32Array.from(p.z[key].value, Math.f16round),
        };
      }
      return {
        linears,
        attnNorm: Float32Array.from(p.g1.value),
        ffnNorm: Float32Array.from(p.g2.value),
        bias: b.bias,
      };
    }),
  };
  return {
    model: out,
    history: { before, train, after: Math.min(before, after), improved },
    ms: performance.now() - t0,
  };
}
