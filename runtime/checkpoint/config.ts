/** The model hyper-parameters every reader produces and every engine consumes. */

/** Llama 3 style frequency scaling of RoPE (`rope_scaling.rope_type == "llama3"`). */
export interface Llama3RopeScaling {
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

/** Hugging Face architectures lowbit runs; Qwen2 adds q/k/v biases. */
export const hfArchitectures = [
  "LlamaForCausalLM",
  "MistralForCausalLM",
  "Qwen2ForCausalLM",
] as const;

/** Every `architecture` a ModelConfig may name: the Hugging Face ones and llama2.c's. */
export const modelArchitectures: readonly string[] = [...hfArchitectures, "llama2.c"];

export interface ModelConfig {
  /** Architecture as named by the source (`LlamaForCausalLM`, `llama2.c`, ...). */
  architecture: string;
  dim: number; // hidden size
  hiddenDim: number; // FFN intermediate size
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number; // usually dim / nHeads
  vocabSize: number;
  seqLen: number; // maximum context
  normEps: number;
  ropeTheta: number;
  ropeScaling: Llama3RopeScaling | null;
  tiedEmbeddings: boolean;
  /** q/k/v projections carry biases (Qwen2). */
  qkvBias: boolean;
  bosId: number;
  /** Token ids that end generation. */
  eosIds: number[];
}

/**
 * Canonical tensor names (Hugging Face Llama names). Every reader exposes its tensors under
 * these names, in Hugging Face layout: q/k rows ordered for rotate-half RoPE, `[out, in]`.
 */
export const tensorNames = {
  embed: "model.embed_tokens.weight", // (vocab, dim)
  norm: "model.norm.weight", // (dim)
  lmHead: "lm_head.weight", // (vocab, dim); absent when tied
  attnNorm: (l: number) => `model.layers.${l}.input_layernorm.weight`, // (dim)
  wq: (l: number) => `model.layers.${l}.self_attn.q_proj.weight`, // (nHeads*headDim, dim)
  wk: (l: number) => `model.layers.${l}.self_attn.k_proj.weight`, // (nKvHeads*headDim, dim)
  wv: (l: number) => `model.layers.${l}.self_attn.v_proj.weight`, // (nKvHeads*headDim, dim)
  bq: (l: number) => `model.layers.${l}.self_attn.q_proj.bias`, // (nHeads*headDim)
  bk: (l: number) => `model.layers.${l}.self_attn.k_proj.bias`, // (nKvHeads*headDim)
  bv: (l: number) => `model.layers.${l}.self_attn.v_proj.bias`, // (nKvHeads*headDim)
  wo: (l: number) => `model.layers.${l}.self_attn.o_proj.weight`, // (dim, nHeads*headDim)
  ffnNorm: (l: number) => `model.layers.${l}.post_attention_layernorm.weight`, // (dim)
  w1: (l: number) => `model.layers.${l}.mlp.gate_proj.weight`, // (hiddenDim, dim)
  w3: (l: number) => `model.layers.${l}.mlp.up_proj.weight`, // (hiddenDim, dim)
  w2: (l: number) => `model.layers.${l}.mlp.down_proj.weight`, // (dim, hiddenDim)
} as const;

/**
 * Every tensor of a model with this config and its expected shape, canonical names, lazily:
 * readers check a file's tensors against it one by one, so a config claiming absurd sizes fails
 * at its first missing tensor instead of building a structure per claimed layer.
 */
export function* expectedTensors(c: ModelConfig): Generator<[string, number[]]> {
  const qDim = c.nHeads * c.headDim, kvDim = c.nKvHeads * c.headDim;
  yield [tensorNames.embed, [c.vocabSize, c.dim]];
  yield [tensorNames.norm, [c.dim]];
  if (!c.tiedEmbeddings) yield [tensorNames.lmHead, [c.vocabSize, c.dim]];
  for (let l = 0; l < c.nLayers; l++) {
    yield [tensorNames.attnNorm(l), [c.dim]];
    yield [tensorNames.wq(l), [qDim, c.dim]];
    yield [tensorNames.wk(l), [kvDim, c.dim]];
    yield [tensorNames.wv(l), [kvDim, c.dim]];
    if (c.qkvBias) {
      yield [tensorNames.bq(l), [qDim]];
      yield [tensorNames.bk(l), [kvDim]];
      yield [tensorNames.bv(l), [kvDim]];
    }
    yield [tensorNames.wo(l), [c.dim, qDim]];
    yield [tensorNames.ffnNorm(l), [c.dim]];
    yield [tensorNames.w1(l), [c.hiddenDim, c.dim]];
    yield [tensorNames.w3(l), [c.hiddenDim, c.dim]];
    yield [tensorNames.w2(l), [c.dim, c.hiddenDim]];
  }
}

/** The expected shape of every tensor of a model with this config, keyed by canonical name. */
export function expectedShapes(c: ModelConfig): Map<string, number[]> {
  return new Map(expectedTensors(c));
}

/**
 * RoPE inverse frequencies for one head (length headDim/2), with llama3 scaling applied.
 * Pair i rotates dimensions (i, i + headDim/2) (rotate-half convention).
 */
export function ropeInvFreq(c: ModelConfig): Float64Array {
  const half = c.headDim / 2;
  const f = new Float64Array(half);
  for (let i = 0; i < half; i++) f[i] = 1 / Math.pow(c.ropeTheta, (2 * i) / c.headDim);
  const s = c.ropeScaling;
  if (s) {
    const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const wavelen = (2 * Math.PI) / f[i];
      if (wavelen > lowWavelen) f[i] = f[i] / s.factor;
      else if (wavelen >= highWavelen) {
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) /
          (s.highFreqFactor - s.lowFreqFactor);
        f[i] = (1 - smooth) * f[i] / s.factor + smooth * f[i];
      }
    }
  }
  return f;
}
