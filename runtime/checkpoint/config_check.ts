/**
 * What every reader checks of a model config, whatever its source (`config.json`, a llama2.c
 * header, a `.lowbit` header), before it builds anything from it: sizes that are positive
 * integers within lowbit's limits, heads that divide, a positive epsilon and RoPE base, and
 * BOS/EOS ids inside the vocabulary.
 */
import type { ModelConfig } from "./config.ts";
import { ModelFormatError, UnsupportedModelError } from "../errors.ts";

/**
 * Upper bounds on a config's sizes: well above today's largest models (Llama 3.1 405B: dim
 * 16384, 126 layers; Gemma 3: vocabulary 262144; Llama 4 Scout: 10M context), far below sizes
 * that would exhaust memory once something is allocated per layer, head or token.
 */
export const configLimits = {
  dim: 65536,
  hiddenDim: 262144,
  nLayers: 1024,
  nHeads: 1024,
  nKvHeads: 1024,
  headDim: 1024,
  vocabSize: 4194304,
  seqLen: 16777216,
} as const;

/** How the source spells a field in messages: `"num_hidden_layers"`, `header config.nLayers`. */
export type FieldName = (field: keyof ModelConfig) => string;

const show = (v: unknown) => typeof v === "number" ? String(v) : JSON.stringify(v) ?? "missing";
const isPositive = (v: unknown): v is number =>
  typeof v === "number" && Number.isFinite(v) && v > 0;

/**
 * Throws ModelFormatError (a value no model can have: a non-integer size, heads that do not
 * divide, normEps ≤ 0, a BOS id outside the vocabulary) or UnsupportedModelError (a size above
 * `configLimits`), naming `where`, the field as `name` spells it and the value.
 */
export function checkModelConfig(where: string, c: ModelConfig, name: FieldName): void {
  const bad = (field: keyof ModelConfig, what: string) =>
    new ModelFormatError(`${where}: ${name(field)} is ${show(c[field])}; it must be ${what}`);
  for (
    const [field, limit] of Object.entries(configLimits) as [keyof typeof configLimits, number][]
  ) {
    const v = c[field];
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
      throw bad(field, "a positive integer");
    }
    if (v > limit) {
      throw new UnsupportedModelError(
        `${where}: ${name(field)} is ${v}, above lowbit's limit of ${limit}: a corrupt file?`,
      );
    }
  }
  if (c.headDim % 2 !== 0) throw bad("headDim", "even (RoPE rotates pairs of dimensions)");
  if (c.nHeads % c.nKvHeads !== 0) {
    throw new ModelFormatError(
      `${where}: ${name("nHeads")} ${c.nHeads} is not a multiple of ${name("nKvHeads")} ` +
        `${c.nKvHeads}`,
    );
  }
  if (!isPositive(c.normEps)) throw bad("normEps", "a positive number");
  if (!isPositive(c.ropeTheta)) throw bad("ropeTheta", "a positive number");
  const s = c.ropeScaling;
  if (s && (!Object.values(s).every(isPositive) || !(s.highFreqFactor > s.lowFreqFactor))) {
    throw bad("ropeScaling", "positive factors with highFreqFactor above lowFreqFactor");
  }
  const isToken = (t: unknown) =>
    typeof t === "number" && Number.isSafeInteger(t) && t >= 0 && t < c.vocabSize;
  if (!isToken(c.bosId)) throw bad("bosId", `a token id in [0, ${c.vocabSize})`);
  if (!Array.isArray(c.eosIds) || !c.eosIds.every(isToken)) {
    throw bad("eosIds", `token ids in [0, ${c.vocabSize})`);
  }
}
