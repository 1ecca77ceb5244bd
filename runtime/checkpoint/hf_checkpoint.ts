/**
 * Hugging Face checkpoints: `config.json` + safetensors (single or sharded) of
 * LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM. The canonical layout is the HF
 * layout, so tensors are passed through unchanged.
 */
import type { Checkpoint, TensorInfo } from "./checkpoint.ts";
import {
  expectedTensors,
  hfArchitectures,
  type Llama3RopeScaling,
  type ModelConfig,
} from "./config.ts";
import { checkModelConfig } from "./config_check.ts";
import { ModelFormatError, ParameterError, ShapeError, UnsupportedModelError } from "../errors.ts";
import { isSupportedDtype, joinPath, SafetensorsSet } from "./safetensors.ts";

/** The config.json key of each ModelConfig field, for messages. */
const hfKeys: Partial<Record<keyof ModelConfig, string>> = {
  dim: "hidden_size",
  hiddenDim: "intermediate_size",
  nLayers: "num_hidden_layers",
  nHeads: "num_attention_heads",
  nKvHeads: "num_key_value_heads",
  vocabSize: "vocab_size",
  seqLen: "max_position_embeddings",
  normEps: "rms_norm_eps",
  ropeTheta: "rope_theta",
  ropeScaling: "rope_scaling",
  bosId: "bos_token_id",
  eosIds: "eos_token_id",
};

type Json = Record<string, unknown>;

/** Reads a required positive integer field. */
function posInt(cfg: Json, key: string, path: string): number {
  const v = cfg[key];
  if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) {
    throw new ModelFormatError(
      `${path}: "${key}" must be a positive integer, got ${JSON.stringify(v)}`,
    );
  }
  return v;
}

/** Reads an optional number field, with a default when absent or null. */
function num(cfg: Json, key: string, dflt: number, path: string): number {
  const v = cfg[key] ?? dflt;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new ModelFormatError(`${path}: "${key}" must be a number, got ${JSON.stringify(v)}`);
  }
  return v;
}

/** `rope_scaling` → Llama3RopeScaling, null for none; other types are unsupported. */
function parseRopeScaling(raw: unknown, path: string): Llama3RopeScaling | null {
  if (raw === undefined || raw === null) return null;
  if (typeof raw !== "object" || Array.isArray(raw)) {
    throw new ModelFormatError(`${path}: "rope_scaling" must be an object or null`);
  }
  const rs = raw as Json;
  const type = rs.rope_type ?? rs.type;
  if (type === "default") return null; // HF's name for plain RoPE
  if (type !== "llama3") {
    throw new UnsupportedModelError(
      `${path}: rope_scaling type ${JSON.stringify(type)} is not supported (only "llama3")`,
    );
  }
  const f = (k: string) => {
    const v = rs[k];
    if (typeof v !== "number" || !(v > 0)) {
      throw new ModelFormatError(
        `${path}: rope_scaling.${k} must be a positive number, got ${JSON.stringify(v)}`,
      );
    }
    return v;
  };
  return {
    factor: f("factor"),
    lowFreqFactor: f("low_freq_factor"),
    highFreqFactor: f("high_freq_factor"),
    originalMaxPositionEmbeddings: f("original_max_position_embeddings"),
  };
}

/**
 * Parses a `config.json` object into a ModelConfig. `path` names the file in messages.
 * Throws UnsupportedModelError for other architectures or options lowbit does not implement.
 */
export function parseHfConfig(cfg: Json, path: string): ModelConfig {
  const archs = cfg.architectures;
  const arch = Array.isArray(archs) && archs.length === 1 ? archs[0] : undefined;
  if (!(hfArchitectures as readonly unknown[]).includes(arch)) {
    throw new UnsupportedModelError(
      `${path}: architecture ${JSON.stringify(archs ?? null)} is not supported ` +
        `(supported: ${hfArchitectures.join(", ")})`,
    );
  }
  const act = cfg.hidden_act ?? "silu";
  if (act !== "silu") {
    throw new UnsupportedModelError(`${path}: hidden_act ${JSON.stringify(act)} (only silu)`);
  }
  const isQwen2 = arch === "Qwen2ForCausalLM";
  // Llama's attention_bias also adds an o_proj bias, and mlp_bias biases the FFN: neither is
  // in the canonical tensor set.
  for (const key of ["attention_bias", "mlp_bias"]) {
    if (!isQwen2 && cfg[key] === true) {
      throw new UnsupportedModelError(`${path}: "${key}": true is not supported`);
    }
  }
  const dim = posInt(cfg, "hidden_size", path);
  const nHeads = posInt(cfg, "num_attention_heads", path);
  const nKvHeads = cfg.num_key_value_heads == null
    ? nHeads
    : posInt(cfg, "num_key_value_heads", path);
  const headDim = cfg.head_dim == null ? dim / nHeads : posInt(cfg, "head_dim", path);
  // Sliding-window attention is not implemented; within the window it equals full attention,
  // so the usable context is capped at the window.
  let seqLen = posInt(cfg, "max_position_embeddings", path);
  const window = cfg.sliding_window;
  const windowOn = isQwen2 ? cfg.use_sliding_window === true : true;
  if (windowOn && typeof window === "number" && window > 0) seqLen = Math.min(seqLen, window);
  const eos = cfg.eos_token_id ?? 2; // HF LlamaConfig defaults: bos 1, eos 2
  const config = {
    architecture: arch as string,
    dim,
    hiddenDim: posInt(cfg, "intermediate_size", path),
    nLayers: posInt(cfg, "num_hidden_layers", path),
    nHeads,
    nKvHeads,
    headDim,
    vocabSize: posInt(cfg, "vocab_size", path),
    seqLen,
    normEps: num(cfg, "rms_norm_eps", 1e-6, path),
    ropeTheta: num(cfg, "rope_theta", 10000, path),
    ropeScaling: parseRopeScaling(cfg.rope_scaling, path),
    // HF's Llama, Mistral and Qwen2 configs all default to untied.
    tiedEmbeddings: cfg.tie_word_embeddings === true,
    qkvBias: isQwen2,
    bosId: cfg.bos_token_id ?? 1,
    eosIds: Array.isArray(eos) ? eos : [eos],
  } as ModelConfig;
  const headDimName = cfg.head_dim == null
    ? `the head dimension (hidden_size ${dim} / num_attention_heads ${nHeads})`
    : `"head_dim"`;
  checkModelConfig(path, config, (k) => k === "headDim" ? headDimName : `"${hfKeys[k] ?? k}"`);
  return config;
}

/** Reads and parses `dir/config.json`. */
export async function readHfConfig(dir: string): Promise<ModelConfig> {
  const path = joinPath(dir, "config.json");
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new ModelFormatError(`${dir}: no config.json`, { cause: e });
    }
    throw e;
  }
  let cfg: unknown;
  try {
    cfg = JSON.parse(text);
  } catch (e) {
    throw new ModelFormatError(`${path}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  if (typeof cfg !== "object" || cfg === null || Array.isArray(cfg)) {
    throw new ModelFormatError(`${path}: not a JSON object`);
  }
  return parseHfConfig(cfg as Json, path);
}

/**
 * Opens a Hugging Face checkpoint directory. Every tensor the config implies must be present
 * with the implied shape and a supported dtype; other tensors (e.g. `rotary_emb.inv_freq`, or
 * `lm_head.weight` of a tied model) are ignored.
 */
export async function openHfCheckpoint(dir: string): Promise<Checkpoint> {
  const config = await readHfConfig(dir);
  const set = await SafetensorsSet.open(dir);
  try {
    const tensors = new Map<string, TensorInfo>();
    for (const [name, shape] of expectedTensors(config)) {
      const t = set.tensors.get(name);
      if (!t) {
        const where = set.files.size === 1 ? [...set.files.keys()][0] : `${dir} (all shards)`;
        throw new ModelFormatError(
          `${where}: tensor ${name} is missing; config.json requires it with shape [${shape}]`,
        );
      }
      if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
        throw new ShapeError(
          `${t.path}: tensor ${name} has shape [${t.shape}], config.json implies [${shape}]`,
        );
      }
      if (!isSupportedDtype(t.dtype)) {
        throw new UnsupportedModelError(
          `${t.path}: tensor ${name} has dtype ${t.dtype}; supported: F32, F16, BF16`,
        );
      }
      tensors.set(name, { name, dtype: t.dtype, shape });
    }
    return {
      path: dir,
      config,
      tensors,
      read(name: string, rowStart?: number, rowEnd?: number): Promise<Float32Array> {
        if (!tensors.has(name)) {
          return Promise.reject(new ParameterError(`${dir}: checkpoint has no tensor ${name}`));
        }
        return set.readRows(name, rowStart, rowEnd);
      },
      close: () => set.close(),
    };
  } catch (e) {
    set.close();
    throw e;
  }
}
