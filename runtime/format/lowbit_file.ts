/**
 * The `.lowbit` model file (docs/FORMAT.md, "The .lowbit file"): what the writer and the reader
 * share. Layout: 16-byte preamble (magic `LOWBIT\0\0`, u32 format version, u32 header length),
 * a MessagePack header (config, tokenizer, quantization settings, tensor table), then the tensor
 * data, every array at a 64-byte-aligned absolute offset.
 */
import type { QuantInfo } from "../checkpoint/checkpoint.ts";
import { modelArchitectures, type ModelConfig } from "../checkpoint/config.ts";
import { checkModelConfig } from "../checkpoint/config_check.ts";
import type { TokenizerData } from "../tokenizer/tokenizer.ts";
import { ModelFormatError, UnsupportedModelError } from "../errors.ts";

/** The 8 bytes every .lowbit file starts with. */
export const LOWBIT_MAGIC = new Uint8Array([0x4c, 0x4f, 0x57, 0x42, 0x49, 0x54, 0, 0]); // "LOWBIT\0\0"
/** The format version this code writes, and the newest it reads. */
export const LOWBIT_VERSION = 1;
/** Magic (8) + version (u32) + header length (u32). */
export const PREAMBLE_BYTES = 16;
/** Every tensor array starts at a multiple of this absolute offset. */
export const LOWBIT_ALIGN = 64;

export type LowbitDType = "F32" | "F16" | "Q";
export const lowbitDTypes: readonly LowbitDType[] = ["F32", "F16", "Q"];

/** How the file was quantized: `method` and the main settings, plus free-form extras. */
export interface LowbitQuantization {
  /** "decoupleq", "gptq", "rtn", or "none" for an unquantized file. */
  method: string;
  bits?: number;
  groupSize?: number;
  [setting: string]: unknown;
}

/** A tensor as the writer is told about it: data sizes follow from shape, dtype and quant. */
export interface LowbitTensorSpec {
  name: string;
  shape: number[];
  dtype: LowbitDType;
  /** Required for dtype "Q" (2-D shape [N, K]). */
  quant?: QuantInfo;
}

/** One entry of the header's tensor table (absolute offsets, bytes). */
export interface LowbitTensorEntry {
  name: string;
  shape: number[];
  dtype: LowbitDType;
  /** F32/F16: the data; Q: the `qweight` array. */
  offset: number;
  bytes: number;
  /** Q only. */
  bits?: 2 | 3 | 4;
  groupSize?: number;
  /** Q only: the `sz` array. */
  szOffset?: number;
  szBytes?: number;
}

/** The decoded header. */
export interface LowbitHeader {
  config: ModelConfig;
  /** The tokenizer (see Tokenizer.toData), or null when the file carries none. */
  tokenizer: TokenizerData | null;
  quantization: LowbitQuantization;
  tensors: LowbitTensorEntry[];
}

export function align(n: number, a = LOWBIT_ALIGN): number {
  return Math.ceil(n / a) * a;
}

export function elementCount(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/**
 * Byte lengths of a tensor's arrays: `data` (F32/F16 values, or Q `qweight`) and, for Q, `sz`.
 * Q: qweight = N·bits·⌈K/32⌉ u32 words, sz = N·⌈K/G⌉ u32 words (G = 0: one group per row).
 */
export function tensorByteSizes(
  t: { shape: number[]; dtype: LowbitDType; bits?: number; groupSize?: number },
): { data: number; sz: number } {
  if (t.dtype === "F32") return { data: 4 * elementCount(t.shape), sz: 0 };
  if (t.dtype === "F16") return { data: 2 * elementCount(t.shape), sz: 0 };
  const [N, K] = t.shape, bits = t.bits!, G = t.groupSize!;
  const groups = G === 0 ? 1 : Math.ceil(K / G);
  return { data: 4 * N * bits * Math.ceil(K / 32), sz: 4 * N * groups };
}

const isPosInt = (v: unknown): v is number =>
  typeof v === "number" && Number.isSafeInteger(v) && v > 0;
const isNonNegInt = (v: unknown): v is number =>
  typeof v === "number" && Number.isSafeInteger(v) && v >= 0;

/**
 * Checks a tensor's shape, dtype and quant settings (not its offsets); returns a problem
 * description, or null when it is valid.
 */
export function tensorProblem(
  t: { shape?: unknown; dtype?: unknown; bits?: unknown; groupSize?: unknown },
): string | null {
  if (!Array.isArray(t.shape) || !t.shape.every(isPosInt)) {
    return `has invalid shape ${JSON.stringify(t.shape)} (positive integers expected)`;
  }
  if (!(lowbitDTypes as readonly unknown[]).includes(t.dtype)) {
    return `has unknown dtype ${JSON.stringify(t.dtype)} (this reader knows ` +
      `${lowbitDTypes.join(", ")})`;
  }
  if (t.dtype !== "Q") return null;
  if (t.shape.length !== 2) return `is packed ("Q") but has shape [${t.shape}], not [N, K]`;
  if (t.bits !== 2 && t.bits !== 3 && t.bits !== 4) {
    return `is packed with bits ${JSON.stringify(t.bits)} (2, 3 or 4 expected)`;
  }
  if (!isNonNegInt(t.groupSize)) {
    return `is packed with group size ${JSON.stringify(t.groupSize)} ` +
      `(0 for one group per row, or a positive integer, expected)`;
  }
  return null;
}

const isNumber = (v: unknown) => typeof v === "number" && Number.isFinite(v);

function isRopeScaling(v: unknown): boolean {
  if (typeof v !== "object" || v === null) return false;
  const r = v as Record<string, unknown>;
  return ["factor", "lowFreqFactor", "highFreqFactor", "originalMaxPositionEmbeddings"]
    .every((k) => isNumber(r[k]));
}

/** The ModelConfig fields that are not numbers: their check and what they must be. */
const configFields: [keyof ModelConfig, (v: unknown) => boolean, string][] = [
  ["architecture", (v) => typeof v === "string", "a string"],
  ["ropeScaling", (v) => v === null || isRopeScaling(v), "nil or a map of 4 numbers"],
  ["tiedEmbeddings", (v) => typeof v === "boolean", "a boolean"],
  ["qkvBias", (v) => typeof v === "boolean", "a boolean"],
];

/**
 * Validates the header's `config` map: the types, a supported architecture, and what every
 * reader checks (`checkModelConfig`: sizes within limits, BOS/EOS in the vocabulary, ...).
 * Throws ModelFormatError or UnsupportedModelError naming the field and the value.
 */
export function checkConfig(path: string, c: unknown): ModelConfig {
  if (typeof c !== "object" || c === null || Array.isArray(c)) {
    throw new ModelFormatError(`${path}: the header has no "config" map`);
  }
  const r = c as Record<string, unknown>;
  for (const [key, ok, what] of configFields) {
    if (!ok(r[key])) {
      throw new ModelFormatError(
        `${path}: header config.${key} is ${JSON.stringify(r[key]) ?? "missing"}; ` +
          `it must be ${what}`,
      );
    }
  }
  if (!modelArchitectures.includes(r.architecture as string)) {
    throw new UnsupportedModelError(
      `${path}: header config.architecture ${JSON.stringify(r.architecture)} is not supported ` +
        `(supported: ${modelArchitectures.join(", ")})`,
    );
  }
  const config = r as unknown as ModelConfig;
  checkModelConfig(path, config, (k) => `header config.${k}`);
  return config;
}
