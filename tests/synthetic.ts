/**
 * Synthetic Hugging Face checkpoints for tests and benchmarks: a config.json and seeded random
 * weights written as (optionally sharded) safetensors, one tensor at a time in bounded chunks,
 * so a 1B-parameter checkpoint is written without holding it in memory.
 */
import type { DType } from "../runtime/checkpoint/checkpoint.ts";
import { expectedShapes, type ModelConfig } from "../runtime/checkpoint/config.ts";
import { ParameterError } from "../runtime/errors.ts";
import { pcgHash } from "../runtime/model/sampling.ts";
import { joinPath } from "../runtime/checkpoint/safetensors.ts";

export {
  llama2_7bConfig,
  llama32_1bLikeConfig,
  smolLm2_135mConfig,
} from "../runtime/checkpoint/shapes.ts";

/** A small Llama for fast tests: GQA (4 heads, 2 KV heads), untied. */
export const tinyConfig: ModelConfig = {
  architecture: "LlamaForCausalLM",
  dim: 64,
  hiddenDim: 128,
  nLayers: 2,
  nHeads: 4,
  nKvHeads: 2,
  headDim: 16,
  vocabSize: 256,
  seqLen: 128,
  normEps: 1e-5,
  ropeTheta: 10000,
  ropeScaling: null,
  tiedEmbeddings: false,
  qkvBias: false,
  bosId: 1,
  eosIds: [2],
};

/** `partial` over `tinyConfig`; headDim follows dim / nHeads unless given. */
export function syntheticConfig(partial: Partial<ModelConfig> = {}): ModelConfig {
  const c = { ...tinyConfig, ...partial };
  if (partial.headDim === undefined) c.headDim = c.dim / c.nHeads;
  if (partial.architecture === undefined && c.qkvBias) c.architecture = "Qwen2ForCausalLM";
  return c;
}

/** The Hugging Face `config.json` object for a config. */
export function hfConfigJson(c: ModelConfig): Record<string, unknown> {
  const s = c.ropeScaling;
  return {
    architectures: [c.architecture],
    model_type: c.architecture === "Qwen2ForCausalLM" ? "qwen2" : "llama",
    hidden_size: c.dim,
    intermediate_size: c.hiddenDim,
    num_hidden_layers: c.nLayers,
    num_attention_heads: c.nHeads,
    num_key_value_heads: c.nKvHeads,
    head_dim: c.headDim,
    vocab_size: c.vocabSize,
    max_position_embeddings: c.seqLen,
    rms_norm_eps: c.normEps,
    rope_theta: c.ropeTheta,
    rope_scaling: s
      ? {
        rope_type: "llama3",
        factor: s.factor,
        low_freq_factor: s.lowFreqFactor,
        high_freq_factor: s.highFreqFactor,
        original_max_position_embeddings: s.originalMaxPositionEmbeddings,
      }
      : null,
    hidden_act: "silu",
    tie_word_embeddings: c.tiedEmbeddings,
    bos_token_id: c.bosId,
    eos_token_id: c.eosIds.length === 1 ? c.eosIds[0] : c.eosIds,
  };
}

/** FNV-1a of a string, as the per-tensor stream seed. */
function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/**
 * The values of tensor `name` in float32, yielded in chunks of at most `chunk` elements:
 * norm weights 1 ± 0.1, biases ±0.1·scale, matrices uniform with std scale/sqrt(fan_in).
 * Depends only on (name, shape, seed, scale), not on chunking, sharding or dtype.
 */
export function* syntheticTensorChunks(
  name: string,
  shape: number[],
  seed: number,
  scale = 1,
  chunk = 1 << 20,
): Generator<Float32Array> {
  const size = shape.reduce((a, b) => a * b, 1);
  let state = pcgHash(seed ^ fnv1a(name)) || 1;
  // [center, half-width] of the uniform distribution.
  const isNorm = name.endsWith("norm.weight");
  const center = isNorm ? 1 : 0;
  const half = isNorm
    ? 0.1
    : shape.length === 1
    ? 0.1 * scale
    : Math.sqrt(3) * scale / Math.sqrt(shape[shape.length - 1]);
  for (let start = 0; start < size; start += chunk) {
    const out = new Float32Array(Math.min(chunk, size - start));
    for (let i = 0; i < out.length; i++) {
      // xorshift32: fast and good enough for weights.
      state ^= state << 13;
      state ^= state >>> 17;
      state ^= state << 5;
      out[i] = center + half * (((state >>> 0) / 4294967296) * 2 - 1);
    }
    yield out;
  }
}

/** All of `syntheticTensorChunks` in one array (for tests on small tensors). */
export function syntheticTensor(
  name: string,
  shape: number[],
  seed: number,
  scale = 1,
): Float32Array {
  const out = new Float32Array(shape.reduce((a, b) => a * b, 1));
  let o = 0;
  for (const c of syntheticTensorChunks(name, shape, seed, scale)) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

/** Little-endian bytes of float32 values in `dtype` (F16: round to nearest; BF16: ties-even). */
export function encodeDtype(values: Float32Array, dtype: DType): Uint8Array {
  if (dtype === "F32") return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  if (dtype === "F16") return new Uint8Array(Float16Array.from(values).buffer);
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i];
    out[i] = (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return new Uint8Array(out.buffer);
}

/** `values` rounded to `dtype` and back, as a reader of the written file returns them. */
export function roundToDtype(values: Float32Array, dtype: DType): Float32Array {
  const bytes = encodeDtype(Float32Array.from(values), dtype);
  if (dtype === "F32") return Float32Array.from(values);
  if (dtype === "F16") return Float32Array.from(new Float16Array(bytes.buffer));
  const h = new Uint16Array(bytes.buffer);
  return new Float32Array(Uint32Array.from(h, (x) => x << 16).buffer);
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
}

/** Options of `writeSyntheticHfCheckpoint`. */
export interface SyntheticOptions {
  dtype: DType;
  /** Number of safetensors files; > 1 adds model.safetensors.index.json. */
  shards: number;
  seed: number;
  /** Multiplies the std of matrices and biases (default 1). */
  scale?: number;
}

/** Splits tensors into `shards` contiguous, non-empty groups of about equal bytes. */
function shardGroups<T extends { bytes: number }>(items: T[], shards: number): T[][] {
  const total = items.reduce((a, t) => a + t.bytes, 0);
  const groups: T[][] = [[]];
  let acc = 0;
  items.forEach((t, i) => {
    const last = groups[groups.length - 1];
    const mustSplit = items.length - i <= shards - groups.length;
    if (
      last.length && groups.length < shards && (acc >= groups.length * total / shards || mustSplit)
    ) {
      groups.push([]);
    }
    groups[groups.length - 1].push(t);
    acc += t.bytes;
  });
  return groups;
}

/**
 * `dir` holding a synthetic F16 checkpoint of `config` (seed 1), written on first use (with a
 * note on stderr) and reused while its config.json exists: the benchmarks' model cache.
 */
export async function cachedSyntheticCheckpoint(
  dir: string,
  config: Partial<ModelConfig>,
  shards = 1,
): Promise<string> {
  if (!(await Deno.stat(`${dir}/config.json`).then(() => true, () => false))) {
    console.error(`writing a synthetic F16 checkpoint to ${dir} (once)...`);
    await writeSyntheticHfCheckpoint(dir, config, { dtype: "F16", shards, seed: 1 });
  }
  return dir;
}

/**
 * Writes `dir/config.json` and seeded random weights for `syntheticConfig(config)` as
 * safetensors (`model.safetensors`, or `model-0000k-of-0000n.safetensors` + index when
 * shards > 1). Returns the full config.
 */
export async function writeSyntheticHfCheckpoint(
  dir: string,
  config: Partial<ModelConfig>,
  opts: SyntheticOptions,
): Promise<ModelConfig> {
  const c = syntheticConfig(config);
  const elemBytes = opts.dtype === "F32" ? 4 : 2;
  const items = [...expectedShapes(c)].map(([name, shape]) => ({
    name,
    shape,
    bytes: shape.reduce((a, b) => a * b, 1) * elemBytes,
  }));
  if (!Number.isInteger(opts.shards) || opts.shards < 1 || opts.shards > items.length) {
    throw new ParameterError(`shards ${opts.shards} must be in [1, ${items.length}]`);
  }
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(joinPath(dir, "config.json"), JSON.stringify(hfConfigJson(c), null, 2));
  const groups = shardGroups(items, opts.shards);
  const pad = (n: number) => String(n).padStart(5, "0");
  const weightMap: Record<string, string> = {};
  let totalSize = 0;
  for (const [g, group] of groups.entries()) {
    const fileName = groups.length === 1
      ? "model.safetensors"
      : `model-${pad(g + 1)}-of-${pad(groups.length)}.safetensors`;
    // Header: offsets within this shard's data area, padded with spaces to 8 bytes.
    const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
    let off = 0;
    for (const t of group) {
      header[t.name] = { dtype: opts.dtype, shape: t.shape, data_offsets: [off, off + t.bytes] };
      off += t.bytes;
      weightMap[t.name] = fileName;
    }
    totalSize += off;
    let json = JSON.stringify(header);
    json += " ".repeat((8 - (json.length % 8)) % 8);
    const prefix = new Uint8Array(8 + json.length);
    new DataView(prefix.buffer).setBigUint64(0, BigInt(json.length), true);
    prefix.set(new TextEncoder().encode(json), 8);
    const file = await Deno.open(joinPath(dir, fileName), {
      write: true,
      create: true,
      truncate: true,
    });
    try {
      await writeAll(file, prefix);
      for (const t of group) {
        for (const chunk of syntheticTensorChunks(t.name, t.shape, opts.seed, opts.scale)) {
          await writeAll(file, encodeDtype(chunk, opts.dtype));
        }
      }
    } finally {
      file.close();
    }
  }
  if (groups.length > 1) {
    const index = { metadata: { total_size: totalSize }, weight_map: weightMap };
    await Deno.writeTextFile(
      joinPath(dir, "model.safetensors.index.json"),
      JSON.stringify(index, null, 2),
    );
  }
  return c;
}
