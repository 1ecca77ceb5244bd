/**
 * The shapes of real Llama-family models that synthetic checkpoints, the benchmarks and the kernel
 * tuner use (the weights are random; only dimensions, RoPE and token ids are the models').
 */
import type { ModelConfig } from "./config.ts";

/** HuggingFaceTB/SmolLM2-135M's shape (bos/eos as in the base model's config.json). */
export const smolLm2_135mConfig: ModelConfig = {
  architecture: "LlamaForCausalLM",
  dim: 576,
  hiddenDim: 1536,
  nLayers: 30,
  nHeads: 9,
  nKvHeads: 3,
  headDim: 64,
  vocabSize: 49152,
  seqLen: 8192,
  normEps: 1e-5,
  ropeTheta: 100000,
  ropeScaling: null,
  tiedEmbeddings: true,
  qkvBias: false,
  bosId: 0,
  eosIds: [0],
};

/** A Llama-3.2-1B-like shape, with its llama3 RoPE scaling. */
export const llama32_1bLikeConfig: ModelConfig = {
  architecture: "LlamaForCausalLM",
  dim: 2048,
  hiddenDim: 8192,
  nLayers: 16,
  nHeads: 32,
  nKvHeads: 8,
  headDim: 64,
  vocabSize: 128256,
  seqLen: 131072,
  normEps: 1e-5,
  ropeTheta: 500000,
  ropeScaling: {
    factor: 32,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  },
  tiedEmbeddings: true,
  qkvBias: false,
  bosId: 128000,
  eosIds: [128001],
};

/**
 * Llama-2-7B's shape (the figures issue 19's goals are stated for): full multi-head attention,
 * untied, RoPE base 10000.
 */
export const llama2_7bConfig: ModelConfig = {
  ...llama32_1bLikeConfig,
  dim: 4096,
  hiddenDim: 11008,
  nLayers: 32,
  nHeads: 32,
  nKvHeads: 32,
  headDim: 128,
  vocabSize: 32000,
  seqLen: 4096,
  ropeTheta: 10000,
  ropeScaling: null,
  tiedEmbeddings: false,
  bosId: 1,
  eosIds: [2],
};
