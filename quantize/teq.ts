/**
 * TEQ's training (arXiv 2310.10944): the per-channel scales s of every group ({@link teqGroups})
 * are trained with Adam while the folded model's weights are fake-quantized on every step at the
 * target bits and group size (min–max RTN, or the diag(H)-weighted clip of calibrated RTN), with
 * the straight-through estimator through the rounding: d Ŵ/d W' = I, as the reference code's
 * FakeAffineTensorQuantFunction. Only s trains; the original weights stay fixed.
 *
 * The loss is the e2e stage's: the mean over calibration tokens of KL(p_float ‖ p_quant) of the
 * next-token distributions, or (`ce`) the reference code's causal-LM cross-entropy. Gradients:
 * d loss/d logits back through the logits layer, the final RMSNorm and every block
 * ({@link BlockMath.backward}) onto each folded tensor W' = W·c/r, then onto s:
 * dL/dc[k] = Σ_n G[n, k]·W'[n, k]/c[k] and dL/dr[n] = −Σ_k G[n, k]·W'[n, k]/r[n].
 * s is clamped at {@link S_MIN} (no gradient below it, as torch.clip).
 *
 * CPU float64, the whole model in memory: meant for small models, as the e2e stage.
 */
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import {
  expectedShapes,
  type ModelConfig,
  tensorNames as T,
} from "../runtime/checkpoint/config.ts";
import { NumericalError, ParameterError, ShapeError } from "../runtime/errors.ts";
import { mulberry32 } from "../runtime/model/sampling.ts";
import { type Bits, effectiveGroupSize } from "../runtime/format/qtensor.ts";
import type { Gpu } from "../kernels/gpu.ts";
import {
  type BlockGrads,
  BlockMath,
  createGrads,
  type FloatArray,
  gemmABt,
  LINEAR_KEYS,
  linearBackward,
  type LinearKey,
  rmsnormBackward,
  rmsnormForward,
  transpose,
  zeroGrads,
} from "./block_math.ts";
import { rtnQuantize } from "./rtn.ts";
import { AdamParam, dequantInto, miniBatches } from "./stage2.ts";
import { logSumExp } from "./e2e.ts";
import { BlockRunner, CAPTURE, linearName } from "./block_runner.ts";
import { embedInputs, floatFinalHidden } from "./sequential.ts";
import {
  checkScales,
  foldRows,
  identityScales,
  loadScales,
  S_MIN,
  saveScales,
  tensorFolds,
  teqCheckpoint,
  type TeqGroup,
  teqGroups,
  type TeqScales,
} from "./teq_fold.ts";

export type TeqLoss = "kl" | "ce";

/** The fake quantizer's grid: min–max RTN, or calibrated RTN's diag(H)-weighted clip. */
export type TeqGrid = "minmax" | "hdiag";

export interface TeqOptions {
  bits: Bits;
  groupSize: number;
  /** Optimizer steps (default {@link TEQ_DEFAULTS}). */
  steps?: number;
  lr?: number;
  /** Sequences per step. */
  batch?: number;
  loss?: TeqLoss;
  grid?: TeqGrid;
  /** The straight-through estimator ({@link FakeQuant.ste}; default "identity"). */
  ste?: TeqSte;
  seed?: number;
  log?: (line: string) => void;
}

/** The reference code's defaults (Adam, lr 1e-3, betas (0.9, 0.9), 1000 steps, 5% warm-up). */
export const TEQ_DEFAULTS = {
  steps: 1000,
  lr: 1e-3,
  batch: 1,
  loss: "kl",
  betas: [0.9, 0.9] as [number, number],
  warmup: 0.05,
  seed: 0,
  /** Measurements of the loss during training; the best measured scales are returned. */
  evaluations: 10,
} as const;

/** The loss before and after is measured on the first sequences holding this many tokens. */
export const TEQ_EVAL_TOKENS = 2048;

/** The float model as TEQ trains on it: block tensors, final norm, logits layer (float64). */
export type TeqParams = Map<string, Float64Array>;

/** One calibration sequence: its token ids, the first block's input, the float teacher. */
export interface TeqSequence {
  tokens: number[];
  /** Embedding rows (T, dim). */
  input: FloatArray;
  /** The float model's final-normed hidden states (T, dim); needed by the KL loss. */
  teacher?: FloatArray;
}

export interface TeqHistory {
  /**
   * Mean loss per token of the fake-quantized model on the measured sequences (the first
   * {@link TEQ_EVAL_TOKENS} tokens' worth): with s = 1, and with the returned s.
   */
  before: number;
  after: number;
  /** False when no measured step beat s = 1, which is then returned. */
  improved: boolean;
  /** The step whose scales are returned (0: s = 1). */
  bestStep: number;
  /** Mean training loss over each logged stretch of steps. */
  train: { step: number; loss: number }[];
  /** The loss on the measured sequences every steps/{@link TEQ_DEFAULTS}.evaluations steps. */
  evals: { step: number; loss: number }[];
}

/** The learning-rate factor of step 1, 2, … of `total`: linear warm-up, then linear decay to 0. */
export function linearWarmupFactor(step: number, total: number, warmup: number): number {
  if (step <= warmup) return step / warmup;
  return Math.max(0, (total - step + 1) / (total - warmup));
}

/** How {@link TeqMath} quantizes: off (the float model), or bits and group size with a grid. */
export interface FakeQuant {
  bits: Bits;
  groupSize: number;
  /** diag(H) of each quantized layer's original input (K); given, the hdiag clip is used. */
  hdiag?: Map<string, Float64Array>;
  /**
   * The straight-through estimator: "identity" (dŴ/dW' = I, the reference code's) or "grid"
   * (straight through the rounding only: Ŵ = W' + σ·δ with δ the frozen rounding offsets in
   * steps σ, and σ ∝ max − min of each group differentiated). Default "identity".
   */
  ste?: TeqSte;
}

/** See {@link FakeQuant.ste}. */
export type TeqSte = "identity" | "grid";

/**
 * Calls `fn` for each (row, group) of W (N, K) in groups of G columns, with the group's
 * columns [k1, k2), its argmin and argmax and max − min.
 */
function eachGroup(
  W: Float64Array,
  N: number,
  K: number,
  G: number,
  fn: (o: number, k1: number, k2: number, kMin: number, kMax: number, range: number) => void,
): void {
  const Ge = effectiveGroupSize(K, G);
  for (let n = 0; n < N; n++) {
    const o = n * K;
    for (let k1 = 0; k1 < K; k1 += Ge) {
      const k2 = Math.min(K, k1 + Ge);
      let kMin = k1, kMax = k1;
      for (let k = k1 + 1; k < k2; k++) {
        if (W[o + k] < W[o + kMin]) kMin = k;
        if (W[o + k] > W[o + kMax]) kMax = k;
      }
      fn(o, k1, k2, kMin, kMax, W[o + kMax] - W[o + kMin]);
    }
  }
}

/**
 * The transformed, fake-quantized model's forward and backward passes, one sequence at a time.
 * {@link setScales} folds s into the float weights and fake-quantizes them; {@link lossSum}
 * runs a sequence (and accumulates gradients); {@link scaleGrads} maps them onto s.
 */
export class TeqMath {
  readonly bms: BlockMath[];
  readonly #c: ModelConfig;
  readonly #groups: TeqGroup[];
  readonly #orig: TeqParams;
  readonly #quantized: Set<string>;
  readonly #fq: FakeQuant | null;
  readonly #loss: TeqLoss;
  readonly #headTrained: boolean;
  readonly #shapes: Map<string, number[]>;
  // the current fold: effective s, the folded W' and what the math runs (Ŵ)
  #eff: TeqScales;
  #folded = new Map<string, Float64Array>();
  #delta = new Map<string, Float64Array>();
  #head!: Float64Array;
  /** The float logits layer: the KL teacher's. */
  readonly #headFloat: Float64Array;
  readonly #headT: Float64Array;
  #gF!: Float64Array;
  // gradients
  readonly #grads: BlockGrads[];
  readonly #dgF: Float64Array;
  readonly #dHead: Float64Array | null;
  // top-of-model buffers
  readonly #x: Float64Array;
  readonly #xn: Float64Array;
  readonly #inv: Float64Array;
  readonly #logits: Float64Array;
  readonly #tLogits: Float64Array;
  readonly #tn: Float64Array;
  readonly #dxn: Float64Array;
  readonly #dx: Float64Array[];
  readonly #sA: Float64Array;
  readonly #sB: Float64Array;

  /**
   * `params`: every block tensor, `model.norm.weight` and `lm_head.weight` (the embedding when
   * tied). The block linears and, with a `head` group, the logits layer are fake-quantized
   * (none with `fq` null).
   */
  constructor(
    config: ModelConfig,
    params: TeqParams,
    groups: TeqGroup[],
    fq: FakeQuant | null,
    loss: TeqLoss,
    maxT: number,
  ) {
    const c = config, D = c.dim, V = c.vocabSize;
    this.#c = c;
    this.#groups = groups;
    this.#orig = params;
    this.#fq = fq;
    this.#loss = loss;
    this.#headTrained = groups.some((g) => g.kind === "head");
    this.#shapes = expectedShapes({ ...c, tiedEmbeddings: false });
    for (const name of [T.norm, T.lmHead]) {
      if (!params.has(name)) throw new ShapeError(`TEQ: the model has no ${name}`);
    }
    this.#quantized = new Set(
      Array.from({ length: c.nLayers }, (_, l) => LINEAR_KEYS.map((k) => linearName(k, l))).flat(),
    );
    if (this.#headTrained) this.#quantized.add(T.lmHead);
    this.bms = Array.from({ length: c.nLayers }, () => new BlockMath(c, maxT));
    this.#grads = this.bms.map(() => createGrads(c));
    this.#dgF = new Float64Array(D);
    this.#dHead = this.#headTrained ? new Float64Array(V * D) : null;
    this.#headT = new Float64Array(V * D);
    this.#headFloat = params.get(T.lmHead)!;
    const f = (n: number) => new Float64Array(maxT * n);
    this.#x = f(D), this.#xn = f(D), this.#inv = f(1), this.#tn = f(D), this.#dxn = f(D);
    this.#logits = f(V), this.#tLogits = f(V);
    this.#dx = [f(D), f(D)];
    this.#sA = f(V), this.#sB = f(D);
    this.#eff = identityScales(groups);
  }

  /**
   * Folds `scales` (clamped at {@link S_MIN}) into the weights and fake-quantizes them. With
   * `frozen`, the rounding offsets Ŵ − W' of the latest unfrozen call are kept instead: the
   * smooth part of the fake quantizer, whose exact derivative is the straight-through one.
   */
  setScales(scales: TeqScales, frozen = false): void {
    const c = this.#c;
    this.#eff = new Map([...scales].map(([k, s]) => [k, s.map((v) => Math.max(v, S_MIN))]));
    const folds = tensorFolds(this.#groups, this.#eff);
    const run = new Map<string, Float64Array>();
    for (const [name, W] of this.#orig) {
      const f = folds.get(name);
      const Wf = f ? foldRows(Float64Array.from(W), W.length / this.#rows(name), f) : W;
      this.#folded.set(name, Wf);
      if (!this.#fq || !this.#quantized.has(name)) {
        run.set(name, Wf);
        continue;
      }
      let d = this.#delta.get(name);
      const grid = this.#fq.ste === "grid", N = this.#rows(name), K = Wf.length / N;
      if (!frozen || !d) {
        const What = this.#fakeQuantize(name, Wf, folds.get(name)?.col);
        d = What.map((v, i) => v - Wf[i]);
        // the grid STE keeps the offsets relative to each group's range
        if (grid) {
          eachGroup(Wf, N, K, this.#fq.groupSize, (o, k1, k2, _a, _b, range) => {
            for (let k = k1; k < k2; k++) d![o + k] = range > 0 ? d![o + k] / range : 0;
          });
        }
        this.#delta.set(name, d);
        run.set(name, What);
      } else if (grid) {
        const What = new Float64Array(Wf.length);
        eachGroup(Wf, N, K, this.#fq.groupSize, (o, k1, k2, _a, _b, range) => {
          for (let k = k1; k < k2; k++) What[o + k] = Wf[o + k] + range * d![o + k];
        });
        run.set(name, What);
      } else run.set(name, Wf.map((v, i) => v + d![i]));
    }
    for (let l = 0; l < c.nLayers; l++) {
      const linears = {} as Record<LinearKey, Float64Array>;
      for (const key of LINEAR_KEYS) linears[key] = run.get(linearName(key, l))!;
      this.bms[l].setParams({
        linears,
        attnNorm: run.get(T.attnNorm(l))!,
        ffnNorm: run.get(T.ffnNorm(l))!,
        bias: c.qkvBias
          ? { bq: run.get(T.bq(l))!, bk: run.get(T.bk(l))!, bv: run.get(T.bv(l))! }
          : null,
      });
    }
    this.#gF = run.get(T.norm)!;
    this.#head = run.get(T.lmHead)!;
    transpose(this.#headT, this.#head, c.vocabSize, c.dim);
  }

  /** Rows of a tensor: its first dimension (a vector's entries). */
  #rows(name: string): number {
    const shape = this.#shapes.get(name);
    if (!shape) throw new ShapeError(`TEQ: no tensor ${name} in this model`);
    return shape[0];
  }

  /** RTN of W' with min–max s, z (or the hdiag clip under the folded diag(H)), dequantized. */
  #fakeQuantize(
    name: string,
    Wf: Float64Array,
    col?: { s: Float64Array; index?: Int32Array },
  ): Float64Array {
    const { bits, groupSize, hdiag } = this.#fq!;
    const N = this.#rows(name), K = Wf.length / N;
    let Hdiag: Float64Array | undefined = hdiag?.get(name);
    if (Hdiag && col) {
      // the folded layer's input is x/c: its diag(H) is H_kk/c_k²
      Hdiag = Hdiag.map((h, k) => h / col.s[col.index ? col.index[k] : k] ** 2);
    }
    const ql = rtnQuantize(Wf, N, K, { bits, groupSize, clip: Hdiag ? "hdiag" : "none", Hdiag });
    const out = new Float64Array(N * K);
    dequantInto(out, ql, ql.scale, ql.zero);
    return out;
  }

  /** The final-normed hidden states (T, dim) of the model as set: a KL teacher, for tests. */
  finalHidden(input: FloatArray, T: number): Float64Array {
    let x: FloatArray = input;
    for (const bm of this.bms) x = bm.forward(x, T);
    const out = new Float64Array(T * this.#c.dim);
    rmsnormForward(out, this.#inv, Float64Array.from(x), this.#gF, T, this.#c.dim, this.#c.normEps);
    return out;
  }

  /** Tokens a sequence of T tokens contributes to the loss. */
  lossTokens(T: number): number {
    return this.#loss === "ce" ? T - 1 : T;
  }

  /** Zeroes the accumulated gradients. */
  zeroGrads(): void {
    this.#grads.forEach(zeroGrads);
    this.#dgF.fill(0);
    this.#dHead?.fill(0);
  }

  /**
   * The loss summed over one sequence's tokens; with `scale`, also backpropagates
   * `scale`·dloss into the accumulated gradients.
   */
  lossSum(seq: TeqSequence, scale?: number): number {
    const c = this.#c, D = c.dim, V = c.vocabSize, T = seq.tokens.length;
    if (seq.input.length !== T * D) {
      throw new ShapeError(`TEQ: input of ${seq.input.length} entries for ${T} tokens × ${D}`);
    }
    let x: FloatArray = seq.input;
    for (const bm of this.bms) x = bm.forward(x, T);
    const X = this.#x, xn = this.#xn, L = this.#logits;
    X.set(x);
    rmsnormForward(xn, this.#inv, X, this.#gF, T, D, c.normEps);
    gemmABt(L, xn, this.#head, T, V, D);
    let loss = 0;
    if (this.#loss === "kl") {
      if (!seq.teacher || seq.teacher.length !== T * D) {
        throw new ShapeError("TEQ: the KL loss needs the float model's hidden states (T, dim)");
      }
      this.#tn.set(seq.teacher);
      gemmABt(this.#tLogits, this.#tn, this.#headFloat, T, V, D);
      const TL = this.#tLogits;
      for (let t = 0; t < T; t++) {
        const o = t * V, ls = logSumExp(L, o, V), lt = logSumExp(TL, o, V);
        for (let v = 0; v < V; v++) {
          const lpt = TL[o + v] - lt, lps = L[o + v] - ls, pt = Math.exp(lpt);
          loss += pt * (lpt - lps);
          if (scale !== undefined) L[o + v] = scale * (Math.exp(lps) - pt);
        }
      }
    } else {
      for (let t = 0; t < T; t++) {
        const o = t * V, ls = logSumExp(L, o, V), next = seq.tokens[t + 1];
        if (t < T - 1) loss += ls - L[o + next];
        if (scale === undefined) continue;
        for (let v = 0; v < V; v++) L[o + v] = t < T - 1 ? scale * Math.exp(L[o + v] - ls) : 0;
        if (t < T - 1) L[o + next] -= scale;
      }
    }
    if (scale === undefined) return loss;
    const dxn = this.#dxn;
    if (this.#dHead) {
      linearBackward(L, xn, this.#headT, T, V, D, this.#dHead, dxn, false, this.#sA, this.#sB);
    } else gemmABt(dxn, L, this.#headT, T, D, V);
    let [dOut, dIn] = this.#dx;
    dOut.fill(0, 0, T * D);
    rmsnormBackward(dxn, X, this.#inv, this.#gF, T, D, dOut, this.#dgF);
    for (let b = this.bms.length - 1; b >= 0; b--) {
      this.bms[b].backward(dOut.subarray(0, T * D), this.#grads[b], dIn);
      [dOut, dIn] = [dIn, dOut];
    }
    return loss;
  }

  /**
   * The accumulated gradients mapped onto the scales of the `trained` groups (the others'
   * entries left zero): straight through the fake quantizer, then through each fold.
   */
  scaleGrads(trained: Set<string>): TeqScales {
    const ds: TeqScales = new Map(this.#groups.map((g) => [g.key, new Float64Array(g.size)]));
    const grad = (name: string): Float64Array | null => {
      if (name === T.norm) return this.#dgF;
      if (name === T.lmHead) return this.#dHead;
      const l = Number(/layers\.(\d+)\./.exec(name)?.[1]);
      if (name === T.attnNorm(l)) return this.#grads[l].attnNorm;
      if (name === T.ffnNorm(l)) return this.#grads[l].ffnNorm;
      const key = LINEAR_KEYS.find((k) => linearName(k, l) === name);
      return key ? this.#grads[l].linears[key] : null; // biases get none
    };
    for (const [name, f] of tensorFolds(this.#groups, this.#eff)) {
      const colOn = f.col && trained.has(f.col.group), rowOn = f.row && trained.has(f.row.group);
      if (!colOn && !rowOn) continue;
      let G = grad(name);
      if (!G) throw new ShapeError(`TEQ: no gradient for ${name}`);
      const W = this.#folded.get(name)!, N = this.#rows(name), K = W.length / N;
      if (this.#fq?.ste === "grid" && this.#quantized.has(name)) {
        // Ŵ = W' + (max − min)·ρ per group: the range's extremes get Σ G·ρ, with opposite signs
        const rho = this.#delta.get(name)!, G0 = G;
        G = Float64Array.from(G0);
        eachGroup(W, N, K, this.#fq.groupSize, (o, k1, k2, kMin, kMax) => {
          let a = 0;
          for (let k = k1; k < k2; k++) a += G0[o + k] * rho[o + k];
          G![o + kMax] += a;
          G![o + kMin] -= a;
        });
      }
      const dc = colOn ? ds.get(f.col!.group)! : null, dr = rowOn ? ds.get(f.row!.group)! : null;
      const cs = f.col?.s, idx = f.col?.index, rs = f.row?.s;
      for (let n = 0; n < N; n++) {
        let rowSum = 0;
        for (let k = 0; k < K; k++) {
          const p = G[n * K + k] * W[n * K + k];
          rowSum += p;
          if (dc) {
            const j = idx ? idx[k] : k;
            dc[j] += p / cs![j];
          }
        }
        if (dr) dr[n] -= rowSum / rs![n];
      }
    }
    return ds;
  }
}

/**
 * Trains the scales of `groups` (those in `frozen` stay 1) on `seqs` and returns them, with the
 * loss before and after. A loss or scale that goes non-finite stops it with a NumericalError.
 */
export function trainTeq(
  config: ModelConfig,
  params: TeqParams,
  groups: TeqGroup[],
  seqs: TeqSequence[],
  opts: TeqOptions & { hdiag?: Map<string, Float64Array>; frozen?: Set<string> },
): { scales: TeqScales; history: TeqHistory; seconds: number } {
  const t0 = performance.now();
  const steps = opts.steps ?? TEQ_DEFAULTS.steps, lr = opts.lr ?? TEQ_DEFAULTS.lr;
  const batch = opts.batch ?? TEQ_DEFAULTS.batch, lossKind = opts.loss ?? TEQ_DEFAULTS.loss;
  if (!Number.isInteger(steps) || steps < 0 || !(lr > 0 && Number.isFinite(lr))) {
    throw new ParameterError(`TEQ: steps ${steps} must be an integer ≥ 0, lr ${lr} > 0`);
  }
  if (!Number.isInteger(batch) || batch < 1) {
    throw new ParameterError(`TEQ: the batch must be a positive integer; got ${batch}`);
  }
  if (seqs.length === 0) throw new ParameterError("TEQ: no calibration sequences");
  if (lossKind === "ce" && seqs.some((s) => s.tokens.length < 2)) {
    throw new ParameterError("TEQ: the ce loss needs sequences of at least 2 tokens");
  }
  const log = opts.log ?? (() => {});
  const grid = opts.grid ?? "minmax";
  if (grid === "hdiag" && !opts.hdiag) {
    throw new ParameterError("TEQ: the hdiag grid needs diag(H)");
  }
  const maxT = Math.max(...seqs.map((s) => s.tokens.length));
  const fq = {
    bits: opts.bits,
    groupSize: opts.groupSize,
    hdiag: grid === "hdiag" ? opts.hdiag : undefined,
    ste: opts.ste,
  };
  const m = new TeqMath(config, params, groups, fq, lossKind, maxT);
  const trained = new Set(groups.map((g) => g.key).filter((k) => !opts.frozen?.has(k)));
  const scales = identityScales(groups);
  const adams = groups.filter((g) => trained.has(g.key)).map((g) =>
    [g.key, new AdamParam(scales.get(g.key)!, lr, TEQ_DEFAULTS.betas)] as const
  );

  // the measured sequences: the first ones holding TEQ_EVAL_TOKENS tokens
  const evalSeqs: TeqSequence[] = [];
  for (let n = 0; evalSeqs.length < seqs.length && n < TEQ_EVAL_TOKENS;) {
    const s = seqs[evalSeqs.length];
    evalSeqs.push(s);
    n += s.tokens.length;
  }
  const evalTokens = evalSeqs.reduce((n, s) => n + m.lossTokens(s.tokens.length), 0);
  const meanLoss = (s: TeqScales) => {
    m.setScales(s);
    return evalSeqs.reduce((a, q) => a + m.lossSum(q), 0) / evalTokens;
  };
  const before = meanLoss(scales);
  if (!Number.isFinite(before)) {
    throw new NumericalError(`TEQ: the ${lossKind} loss of the model with s = 1 is ${before}`);
  }
  const b4 = before.toExponential(4);
  log(
    `teq: ${lossKind} loss ${b4} nats/token with s = 1 (${evalSeqs.length} sequences, ${grid} ` +
      `grid); ${steps} steps of ${batch} sequence(s), lr ${lr}`,
  );

  const rand = mulberry32(opts.seed ?? TEQ_DEFAULTS.seed);
  const ones = seqs.map(() => 1);
  let batches: number[][] = [];
  const warmup = Math.floor(steps * TEQ_DEFAULTS.warmup);
  const train: TeqHistory["train"] = [];
  let stretch = 0, stretchTokens = 0, tLog = performance.now(), stepLog = 0;
  const every = Math.max(1, Math.min(25, Math.round(steps / 20)));
  const evalEvery = Math.max(1, Math.round(steps / TEQ_DEFAULTS.evaluations));
  const evals: TeqHistory["evals"] = [];
  let best = { step: 0, loss: before, scales: identityScales(groups) };
  for (let step = 1; step <= steps; step++) {
    if (batches.length === 0) batches = miniBatches(ones, batch, rand);
    const b = batches.shift()!;
    m.setScales(scales);
    m.zeroGrads();
    const n = b.reduce((a, i) => a + m.lossTokens(seqs[i].tokens.length), 0);
    let loss = 0;
    for (const i of b) loss += m.lossSum(seqs[i], 1 / n);
    if (!Number.isFinite(loss)) {
      throw new NumericalError(`TEQ: step ${step}: the ${lossKind} loss is ${loss / n}`);
    }
    const ds = m.scaleGrads(trained);
    for (const [key, d] of ds) { // clamped entries get no gradient, as torch.clip
      const s = scales.get(key)!;
      for (let i = 0; i < d.length; i++) if (s[i] < S_MIN) d[i] = 0;
    }
    const factor = warmup > 0 ? linearWarmupFactor(step, steps, warmup) : 1;
    for (const [key, a] of adams) {
      a.grad.set(ds.get(key)!);
      a.step(step, factor);
      const s = a.value;
      for (let i = 0; i < s.length; i++) {
        if (!Number.isFinite(s[i])) {
          throw new NumericalError(
            `TEQ: step ${step}: s[${i}] of group "${key}" went ${s[i]} (loss ` +
              `${(loss / n).toExponential(4)}); lower --teq-lr`,
          );
        }
      }
    }
    stretch += loss;
    stretchTokens += n;
    if (step % every === 0 || step === steps) {
      const now = performance.now();
      train.push({ step, loss: stretch / stretchTokens });
      log(
        `teq: step ${step}/${steps}: loss ${(stretch / stretchTokens).toExponential(4)}, ` +
          `${((step - stepLog) / ((now - tLog) / 1000)).toFixed(2)} steps/s`,
      );
      stretch = stretchTokens = 0;
      tLog = now;
      stepLog = step;
    }
    if (step % evalEvery === 0 || step === steps) {
      const loss = meanLoss(clamped(scales));
      evals.push({ step, loss });
      if (loss < best.loss) best = { step, loss, scales: clamped(scales) };
      log(
        `teq: step ${step}: ${lossKind} loss ${loss.toExponential(4)} nats/token on the measured ` +
          `sequences (best ${best.loss.toExponential(4)}, step ${best.step})`,
      );
    }
  }
  const improved = best.step > 0;
  log(
    `teq: ${lossKind} loss ${before.toExponential(4)} → ${best.loss.toExponential(4)} nats/token` +
      (improved ? ` (the scales of step ${best.step})` : ": no step beat s = 1, which is kept"),
  );
  checkScales(groups, best.scales);
  return {
    scales: best.scales,
    history: { before, after: best.loss, improved, bestStep: best.step, train, evals },
    seconds: (performance.now() - t0) / 1000,
  };
}

/** A copy of `scales` clamped at {@link S_MIN}, as the fold uses them. */
function clamped(scales: TeqScales): TeqScales {
  return new Map([...scales].map(([k, s]) => [k, s.map((v) => Math.max(v, S_MIN))]));
}

/** Every tensor TEQ reads, float64: block tensors, final norm, logits layer (`lm_head`). */
export async function teqParams(ckpt: Checkpoint): Promise<TeqParams> {
  const c = ckpt.config, p: TeqParams = new Map();
  const read = async (name: string, from = name) =>
    p.set(name, Float64Array.from(await ckpt.read(from)));
  for (let l = 0; l < c.nLayers; l++) {
    for (const key of LINEAR_KEYS) await read(linearName(key, l));
    await read(T.attnNorm(l));
    await read(T.ffnNorm(l));
    if (c.qkvBias) { for (const b of [T.bq(l), T.bk(l), T.bv(l)]) await read(b); }
  }
  await read(T.norm);
  await read(T.lmHead, c.tiedEmbeddings ? T.embed : T.lmHead);
  return p;
}

/**
 * diag(H) = Σ_t x_t² per input channel of every linear layer (and the logits layer), from the
 * float model's activations on `seqs` (GPU forward passes): the hdiag grid's statistics.
 */
export async function floatInputDiag(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
): Promise<Map<string, Float64Array>> {
  const c = ckpt.config, out = new Map<string, Float64Array>();
  const sumSq = (X: Float32Array[]) => {
    const K = X[0].length / seqs[0].length, d = new Float64Array(K);
    for (const x of X) for (let i = 0; i < x.length; i++) d[i % K] += x[i] * x[i];
    return d;
  };
  const runner = BlockRunner.create(gpu, c, Math.max(...seqs.map((s) => s.length)));
  let x = await embedInputs(ckpt, seqs);
  const captures = [
    { capture: CAPTURE.qkvInput, keys: ["wq", "wk", "wv"] },
    { capture: CAPTURE.oInput, keys: ["wo"] },
    { capture: CAPTURE.gateUpInput, keys: ["w1", "w3"] },
    { capture: CAPTURE.downInput, keys: ["w2"] },
  ];
  for (let l = 0; l < c.nLayers; l++) {
    await runner.loadLayer(ckpt, l);
    for (const { capture, keys } of captures) {
      const d = sumSq(await runner.run(x, capture));
      for (const k of keys) out.set(linearName(k, l), d);
    }
    x = await runner.run(x, CAPTURE.output);
  }
  out.set(T.lmHead, sumSq(await floatFinalHidden(gpu, ckpt, seqs)));
  return out;
}

/** What {@link runTeq} needs of the float model and the data. */
export interface RunTeqOptions extends TeqOptions {
  groups: TeqGroup[];
}

/**
 * TEQ on a checkpoint: the float weights and the calibration data (embedding rows; the float
 * model's final hidden states for KL; diag(H) for the hdiag grid) gathered with the GPU, then
 * {@link trainTeq}. With q/k/v biases the v → o groups stay at s = 1 (the bias gets no gradient).
 */
export async function runTeq(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
  opts: RunTeqOptions,
): Promise<{ scales: TeqScales; history: TeqHistory; seconds: number }> {
  const t0 = performance.now();
  const log = opts.log ?? (() => {});
  const c = ckpt.config, loss = opts.loss ?? TEQ_DEFAULTS.loss;
  const params = await teqParams(ckpt);
  const inputs = await embedInputs(ckpt, seqs);
  const teacher = loss === "kl" ? await floatFinalHidden(gpu, ckpt, seqs) : null;
  const hdiag = opts.grid === "hdiag" ? await floatInputDiag(gpu, ckpt, seqs) : undefined;
  const frozen = new Set(
    c.qkvBias ? opts.groups.filter((g) => g.kind === "vo").map((g) => g.key) : [],
  );
  if (frozen.size) log("teq: q/k/v biases: the v → o groups keep s = 1");
  log(
    `teq: ${opts.groups.length} groups, ${seqs.length} sequences ` +
      `(${seqs.reduce((n, s) => n + s.length, 0)} tokens)`,
  );
  const r = trainTeq(
    c,
    params,
    opts.groups,
    seqs.map((tokens, i) => ({ tokens, input: inputs[i], teacher: teacher?.[i] })),
    { ...opts, hdiag, frozen },
  );
  return { ...r, seconds: (performance.now() - t0) / 1000 };
}

/** TEQ's settings as quantizeModel takes them (`--teq-*`). */
export interface TeqSettings {
  steps?: number;
  lr?: number;
  batch?: number;
  loss?: TeqLoss;
  ste?: TeqSte;
  seed?: number;
  /** Write the trained scales here (JSON, {@link saveScales}). */
  save?: string;
  /** Use the scales of this file instead of training. */
  load?: string;
}

/** What the header records under `quantization.teq`. */
export interface TeqRecord {
  loss: TeqLoss;
  grid: TeqGrid;
  ste: TeqSte;
  steps: number;
  lr: number;
  batch: number;
  sequences: number;
  tokens: number;
  /** Mean loss per token of the fake-quantized model with s = 1 and with the scales used. */
  lossBefore: number;
  lossAfter: number;
  improved: boolean;
  /** The measured step whose scales were kept (0: none beat s = 1). */
  bestStep: number;
  /** Training time (that of the run which trained them, when loaded). */
  seconds: number;
  groups: number;
  /** The --teq-load file the scales came from. */
  loaded?: string;
}

/**
 * TEQ before quantization: trains (or loads) the scales and returns the checkpoint with them
 * folded in, which the chosen method then quantizes, and the header's record. The fake
 * quantizer uses the method's starting grid: calibrated RTN's hdiag clip for rtn, min–max RTN
 * for gptq and decoupleq.
 */
export async function teqTransform(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
  o: TeqSettings & {
    method: string;
    bits: Bits;
    groupSize: number;
    quantizeHead: boolean;
    log?: (line: string) => void;
  },
): Promise<{ ckpt: Checkpoint; record: TeqRecord; scales: TeqScales }> {
  const log = o.log ?? (() => {});
  const groups = teqGroups(ckpt.config, { head: o.quantizeHead });
  const grid: TeqGrid = o.method === "rtn" ? "hdiag" : "minmax";
  let scales: TeqScales, record: TeqRecord;
  if (o.load) {
    const f = await loadScales(o.load, groups);
    scales = f.scales;
    record = { ...(f.info as unknown as TeqRecord), loaded: o.load };
    log(`teq: scales of ${groups.length} groups from ${o.load}`);
    for (const k of ["bits", "groupSize"] as const) {
      const v = (f.info as Record<string, unknown>)[k];
      if (v !== undefined && v !== o[k]) log(`teq: note: ${o.load} was trained at ${k} ${v}`);
    }
  } else {
    const r = await runTeq(gpu, ckpt, seqs, { ...o, grid, groups, log });
    scales = r.scales;
    record = {
      loss: o.loss ?? TEQ_DEFAULTS.loss,
      grid,
      ste: o.ste ?? "identity",
      steps: o.steps ?? TEQ_DEFAULTS.steps,
      lr: o.lr ?? TEQ_DEFAULTS.lr,
      batch: o.batch ?? TEQ_DEFAULTS.batch,
      sequences: seqs.length,
      tokens: seqs.reduce((n, s) => n + s.length, 0),
      lossBefore: r.history.before,
      lossAfter: r.history.after,
      improved: r.history.improved,
      bestStep: r.history.bestStep,
      seconds: r.seconds,
      groups: groups.length,
    };
    if (o.save) {
      await saveScales(o.save, scales, { ...record, bits: o.bits, groupSize: o.groupSize });
      log(`teq: scales written to ${o.save}`);
    }
  }
  return { ckpt: teqCheckpoint(ckpt, groups, scales), record, scales };
}
