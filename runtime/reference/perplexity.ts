/**
 * Perplexity of a model on a text, with the windowing of the reference figures in
 * ../shared/models/README.md:
 *
 * - the text is tokenized without BOS (line endings normalized to "\n", as Python's text mode
 *   reads them) and cut into consecutive, non-overlapping windows of N − 1 tokens (the last one
 *   shorter), N = the context (default: the model's, at most 2048);
 * - each window w₁..wₙ is scored as the sequence [BOS, w₁, …, wₙ]: every token of the window is
 *   predicted from BOS and the window tokens before it (w₁ from BOS alone), no context crosses
 *   a window boundary;
 * - perplexity = exp(mean NLL over all scored tokens), NLL = −log softmax(logits)[target] in
 *   float64.
 *
 * Per-line mode scores each non-empty line on its own (BOS first, split into windows the same
 * way when longer), as the TinyStories figure is measured.
 */
import type { ModelConfig } from "../checkpoint/config.ts";
import { NumericalError, ParameterError } from "../errors.ts";
import type { ReferenceModel } from "./reference.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";

/** What perplexity needs of a model; GpuModel has it. */
export interface LogitsModel {
  config: Pick<ModelConfig, "vocabSize" | "bosId">;
  /** Context length (positions a call may span). */
  ctx: number;
  /** Logits at every position of `ids` run from position `pos`, (ids.length, vocab). */
  logitsAt(pos: number, ids: number[]): Promise<Float32Array | Float64Array>;
}

export interface PerplexityOptions {
  /** Context N: windows of N − 1 tokens, each scored after BOS (default: model.ctx). */
  ctx?: number;
  /** Score each non-empty line separately (default false: the whole text as one stream). */
  perLine?: boolean;
  /** Score only the first N tokens of the text. */
  maxTokens?: number;
  /** Called after each window with (tokens scored, tokens in all). */
  onProgress?: (done: number, total: number) => void;
}

export interface PerplexityResult {
  perplexity: number;
  /** Mean negative log-likelihood, nats per token. */
  meanNll: number;
  /** Tokens scored. */
  tokens: number;
  /** Text tokens per window (N − 1). */
  windowTokens: number;
  windows: number;
}

/** Consecutive, non-overlapping windows of at most `size` tokens covering `tokens`. */
export function splitWindows(tokens: number[], size: number): number[][] {
  if (!Number.isInteger(size) || size < 1) {
    throw new ParameterError(`window size must be a positive integer; got ${size}`);
  }
  const out: number[][] = [];
  for (let i = 0; i < tokens.length; i += size) out.push(tokens.slice(i, i + size));
  return out;
}

/** Σⱼ −log softmax(logits row j)[targets[j]] in float64; logits is (≥ targets.length, vocab). */
export function sumNll(logits: ArrayLike<number>, vocab: number, targets: number[]): number {
  let total = 0;
  for (let j = 0; j < targets.length; j++) {
    const o = j * vocab;
    let max = -Infinity;
    for (let i = 0; i < vocab; i++) if (logits[o + i] > max) max = logits[o + i];
    let sum = 0;
    for (let i = 0; i < vocab; i++) sum += Math.exp(logits[o + i] - max);
    const nll = Math.log(sum) + max - logits[o + targets[j]];
    if (!Number.isFinite(nll)) {
      throw new NumericalError(
        `perplexity: non-finite NLL ${nll} predicting token ${targets[j]} at window position ` +
          `${j}: the logits hold NaN or Inf`,
      );
    }
    total += nll;
  }
  return total;
}

/**
 * Σ NLL of one window: the model runs [BOS, w₁ … wₙ₋₁] (the logits after wₙ are not needed)
 * and row j of the logits predicts wⱼ₊₁.
 */
export async function windowNll(model: LogitsModel, window: number[]): Promise<number> {
  if (window.length === 0) return 0;
  const input = [model.config.bosId, ...window.slice(0, -1)];
  return sumNll(await model.logitsAt(0, input), model.config.vocabSize, window);
}

/** Encodes the first `maxTokens` tokens of `text` (all of it when undefined). */
export function encodePrefix(tokenizer: Tokenizer, text: string, maxTokens?: number): number[] {
  if (maxTokens === undefined) return tokenizer.encode(text, { bos: false });
  // Encode prefixes ending at a line break, doubling until they hold maxTokens + 64 tokens:
  // tokens that far before the cut do not depend on the text after it.
  for (let chars = 8 * (maxTokens + 64);; chars *= 2) {
    if (chars >= text.length) return tokenizer.encode(text, { bos: false }).slice(0, maxTokens);
    const cut = text.lastIndexOf("\n", chars);
    if (cut <= 0) continue;
    const ids = tokenizer.encode(text.slice(0, cut), { bos: false });
    if (ids.length >= maxTokens + 64) return ids.slice(0, maxTokens);
  }
}

/** The windows of `text`: the documented windowing of the whole text, or of each line. */
export function textWindows(
  tokenizer: Tokenizer,
  text: string,
  windowTokens: number,
  opts: { perLine?: boolean; maxTokens?: number } = {},
): number[][] {
  const { maxTokens } = opts;
  if (maxTokens !== undefined && (!Number.isInteger(maxTokens) || maxTokens < 1)) {
    throw new ParameterError(`max tokens must be a positive integer; got ${maxTokens}`);
  }
  const normalized = text.replace(/\r\n?/g, "\n");
  if (!opts.perLine) {
    return splitWindows(encodePrefix(tokenizer, normalized, maxTokens), windowTokens);
  }
  const windows: number[][] = [];
  let left = maxTokens ?? Infinity;
  for (const line of normalized.split("\n")) {
    if (left <= 0) break;
    if (line.trim() === "") continue;
    const ids = tokenizer.encode(line, { bos: false }).slice(0, left);
    left -= ids.length;
    windows.push(...splitWindows(ids, windowTokens));
  }
  return windows;
}

/** Perplexity of `model` on `text`; see the module comment for the windowing. */
export async function perplexity(
  model: LogitsModel,
  tokenizer: Tokenizer,
  text: string,
  opts: PerplexityOptions = {},
): Promise<PerplexityResult> {
  const ctx = opts.ctx ?? model.ctx;
  if (!Number.isInteger(ctx) || ctx < 2 || ctx > model.ctx) {
    throw new ParameterError(`ctx must be an integer in [2, ${model.ctx}]; got ${ctx}`);
  }
  const windows = textWindows(tokenizer, text, ctx - 1, opts);
  const total = windows.reduce((a, w) => a + w.length, 0);
  if (total === 0) throw new ParameterError("perplexity: the text has no tokens to score");
  let nll = 0, done = 0;
  for (const w of windows) {
    nll += await windowNll(model, w);
    done += w.length;
    opts.onProgress?.(done, total);
  }
  const meanNll = nll / total;
  return {
    perplexity: Math.exp(meanNll),
    meanNll,
    tokens: total,
    windowTokens: ctx - 1,
    windows: windows.length,
  };
}

/** The float64 CPU reference as a LogitsModel (slow; exact). */
export function referenceLogitsModel(ref: ReferenceModel, ctx?: number): LogitsModel {
  const V = ref.config.vocabSize;
  return {
    config: ref.config,
    ctx: ctx ?? Math.min(ref.config.seqLen, 2048),
    logitsAt(pos, ids) {
      const out = new Float64Array(ids.length * V);
      ids.forEach((id, j) => out.set(ref.forward(id, pos + j), j * V));
      return Promise.resolve(out);
    },
  };
}
