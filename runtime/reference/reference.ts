/**
 * A plain CPU reference forward pass (float64 accumulation), one token at a time, in the style
 * of llama2.c run.c's `forward()`. It is the ground truth the GPU engine is tested against:
 * keep it simple and obviously right rather than fast.
 */
import type { Checkpoint } from "../checkpoint/checkpoint.ts";
import {
  expectedShapes,
  type ModelConfig,
  ropeInvFreq,
  tensorNames as N,
} from "../checkpoint/config.ts";
import { ParameterError, ShapeError } from "../errors.ts";

/** out[i] = Σ_j w[i*n + j] · x[j] (+ b[i]); w is (out.length, n) row-major. */
function matvec(out: Float64Array, w: Float32Array, x: Float64Array, b?: Float32Array): void {
  const n = x.length;
  for (let i = 0; i < out.length; i++) {
    let s = 0;
    const row = i * n;
    for (let j = 0; j < n; j++) s += w[row + j] * x[j];
    out[i] = b ? s + b[i] : s;
  }
}

/** out = x · w / sqrt(mean(x²) + eps). */
function rmsnorm(out: Float64Array, x: Float64Array, w: Float32Array, eps: number): void {
  let ss = 0;
  for (let i = 0; i < x.length; i++) ss += x[i] * x[i];
  const inv = 1 / Math.sqrt(ss / x.length + eps);
  for (let i = 0; i < x.length; i++) out[i] = x[i] * inv * w[i];
}

/** Rotate-half RoPE in place on `nh` heads of size hd: dims (i, i + hd/2) rotate by pos·f[i]. */
function rope(v: Float64Array, nh: number, hd: number, cos: Float64Array, sin: Float64Array) {
  const half = hd / 2;
  for (let h = 0; h < nh; h++) {
    const o = h * hd;
    for (let i = 0; i < half; i++) {
      const x0 = v[o + i], x1 = v[o + i + half];
      v[o + i] = x0 * cos[i] - x1 * sin[i];
      v[o + i + half] = x0 * sin[i] + x1 * cos[i];
    }
  }
}

/** The float64 reference model with its own KV cache. */
export class ReferenceModel {
  readonly config: ModelConfig;
  #w: Map<string, Float32Array>;
  #invFreq: Float64Array;
  /** Per layer, per cached position: key and value vectors (kvDim). */
  #keys: Float64Array[][];
  #values: Float64Array[][];

  /** Reads every tensor of the checkpoint (fine for the small models the reference serves). */
  static async load(ckpt: Checkpoint): Promise<ReferenceModel> {
    const weights = new Map<string, Float32Array>();
    for (const name of expectedShapes(ckpt.config).keys()) {
      weights.set(name, await ckpt.read(name));
    }
    return new ReferenceModel(ckpt.config, weights);
  }

  /** `weights`: every tensor of `expectedShapes(config)`, canonical names and layout. */
  constructor(config: ModelConfig, weights: Map<string, Float32Array>) {
    for (const [name, shape] of expectedShapes(config)) {
      const w = weights.get(name);
      const size = shape.reduce((a, b) => a * b, 1);
      if (!w || w.length !== size) {
        throw new ShapeError(
          `ReferenceModel: tensor ${name} has ${w ? w.length : "no"} elements, ` +
            `config implies [${shape}] = ${size}`,
        );
      }
    }
    this.config = config;
    this.#w = weights;
    this.#invFreq = ropeInvFreq(config);
    this.#keys = Array.from({ length: config.nLayers }, () => []);
    this.#values = Array.from({ length: config.nLayers }, () => []);
  }

  /** Number of positions in the KV cache. */
  get cachedPositions(): number {
    return this.#keys[0]?.length ?? 0;
  }

  /** Empties the KV cache. */
  reset(): void {
    for (const k of this.#keys) k.length = 0;
    for (const v of this.#values) v.length = 0;
  }

  #get(name: string): Float32Array {
    return this.#w.get(name)!;
  }

  /**
   * Runs `token` at position `pos` (positions 0..pos-1 must be cached; later ones are dropped)
   * and returns the logits (vocabSize).
   */
  forward(token: number, pos: number): Float64Array {
    const c = this.config;
    if (!Number.isInteger(token) || token < 0 || token >= c.vocabSize) {
      throw new ParameterError(`token ${token} outside the vocabulary [0, ${c.vocabSize})`);
    }
    if (!Number.isInteger(pos) || pos < 0 || pos > this.cachedPositions || pos >= c.seqLen) {
      throw new ParameterError(
        `position ${pos} invalid: ${this.cachedPositions} positions cached, context ${c.seqLen}`,
      );
    }
    const { dim, hiddenDim, nHeads, nKvHeads, headDim: hd, normEps: eps } = c;
    const qDim = nHeads * hd, kvDim = nKvHeads * hd, group = nHeads / nKvHeads;
    const scale = 1 / Math.sqrt(hd);
    const xb = new Float64Array(dim), q = new Float64Array(qDim), att = new Float64Array(qDim);
    const hb = new Float64Array(hiddenDim), hb2 = new Float64Array(hiddenDim);
    const proj = new Float64Array(dim);
    const cos = this.#invFreq.map((f) => Math.cos(pos * f));
    const sin = this.#invFreq.map((f) => Math.sin(pos * f));

    // Embedding row of the token.
    const x = Float64Array.from(this.#get(N.embed).subarray(token * dim, (token + 1) * dim));

    for (let l = 0; l < c.nLayers; l++) {
      // Attention norm.
      rmsnorm(xb, x, this.#get(N.attnNorm(l)), eps);
      // q, k, v projections (+ biases for Qwen2).
      const k = new Float64Array(kvDim), v = new Float64Array(kvDim);
      const bias = (name: string) => (c.qkvBias ? this.#get(name) : undefined);
      matvec(q, this.#get(N.wq(l)), xb, bias(N.bq(l)));
      matvec(k, this.#get(N.wk(l)), xb, bias(N.bk(l)));
      matvec(v, this.#get(N.wv(l)), xb, bias(N.bv(l)));
      // RoPE on q and k.
      rope(q, nHeads, hd, cos, sin);
      rope(k, nKvHeads, hd, cos, sin);
      // KV cache write at pos (dropping any later positions).
      const keys = this.#keys[l], values = this.#values[l];
      keys.length = pos;
      values.length = pos;
      keys.push(k);
      values.push(v);
      // Causal attention over positions 0..pos; head h reads kv head floor(h / group).
      for (let h = 0; h < nHeads; h++) {
        const qo = h * hd, ko = Math.floor(h / group) * hd;
        const scores = new Float64Array(pos + 1);
        let max = -Infinity;
        for (let t = 0; t <= pos; t++) {
          let s = 0;
          for (let i = 0; i < hd; i++) s += q[qo + i] * keys[t][ko + i];
          scores[t] = s * scale;
          max = Math.max(max, scores[t]);
        }
        let sum = 0;
        for (let t = 0; t <= pos; t++) sum += scores[t] = Math.exp(scores[t] - max);
        for (let i = 0; i < hd; i++) {
          let acc = 0;
          for (let t = 0; t <= pos; t++) acc += scores[t] * values[t][ko + i];
          att[qo + i] = acc / sum;
        }
      }
      // Output projection and residual.
      matvec(proj, this.#get(N.wo(l)), att);
      for (let i = 0; i < dim; i++) x[i] += proj[i];
      // FFN norm.
      rmsnorm(xb, x, this.#get(N.ffnNorm(l)), eps);
      // SwiGLU: silu(gate) * up, then down projection and residual.
      matvec(hb, this.#get(N.w1(l)), xb);
      matvec(hb2, this.#get(N.w3(l)), xb);
      for (let i = 0; i < hiddenDim; i++) hb[i] = (hb[i] / (1 + Math.exp(-hb[i]))) * hb2[i];
      matvec(proj, this.#get(N.w2(l)), hb);
      for (let i = 0; i < dim; i++) x[i] += proj[i];
    }

    // Final norm and classifier (the embedding when tied).
    rmsnorm(xb, x, this.#get(N.norm), eps);
    const logits = new Float64Array(c.vocabSize);
    matvec(logits, this.#get(c.tiedEmbeddings ? N.embed : N.lmHead), xb);
    return logits;
  }
}
