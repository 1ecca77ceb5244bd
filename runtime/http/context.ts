/** What every handler is built from: the engine, the metrics and the server's limits. */
import type { Engine } from "../model/engine.ts";
import type { Metrics } from "./metrics.ts";
import { ApiError } from "./errors.ts";

export interface ServerContext {
  engine: Engine;
  metrics: Metrics;
  /** Largest max_tokens a request may ask for (--max-tokens-limit). */
  maxTokensLimit: number;
}

/**
 * Characters per context token beyond which a prompt is rejected without tokenizing it: real
 * text averages 3–5, and tokenizing runs on the event loop (about 10 µs a character), so a huge
 * prompt must not reach the tokenizer.
 */
export const MAX_CHARS_PER_TOKEN = 16;

/** A 400 `context_length_exceeded` for `param`. */
export function contextExceeded(param: string, what: string, ctx: number): ApiError {
  return new ApiError(
    400,
    `${what}; this model's context length is ${ctx} tokens, and generating needs at least one ` +
      `more: shorten the ${param}`,
    { param, code: "context_length_exceeded" },
  );
}

/** Rejects text so long that it cannot fit the context (before it reaches the tokenizer). */
export function checkTextLength(text: string, param: string, ctx: number): void {
  if (text.length > ctx * MAX_CHARS_PER_TOKEN) {
    throw contextExceeded(param, `the ${param} has ${text.length} characters`, ctx);
  }
}

/** Rejects a tokenized prompt that leaves no room to generate. */
export function checkPromptLength(ids: number[], param: string, ctx: number): void {
  if (ids.length >= ctx) {
    throw contextExceeded(param, `the ${param} has ${ids.length} tokens`, ctx);
  }
  if (ids.length === 0) {
    throw new ApiError(400, `the ${param} encodes to no tokens; give some text`, {
      param,
      code: "invalid_value",
    });
  }
}

/** The name the request gave its length limit: max_completion_tokens when present, else max_tokens. */
export function maxTokensParam(body: Record<string, unknown>): string {
  const v = body.max_completion_tokens;
  return v !== undefined && v !== null ? "max_completion_tokens" : "max_tokens";
}

/**
 * How many tokens to generate after a prompt of `promptTokens`: an explicit `maxTokens` must fit
 * in the rest of the context (else a 400 `context_length_exceeded` naming both numbers, as
 * vLLM's); without one, `fallback` (the endpoint's default) is clipped to the room left.
 */
export function completionBudget(
  promptTokens: number,
  maxTokens: number | undefined,
  fallback: number,
  where: "prompt" | "messages",
  param: string,
  ctx: number,
): number {
  const room = ctx - promptTokens;
  if (maxTokens === undefined) return Math.min(fallback, room);
  if (maxTokens > room) {
    throw new ApiError(
      400,
      `This model's maximum context length is ${ctx} tokens. However, you requested ` +
        `${promptTokens + maxTokens} tokens (${promptTokens} in the ${where}, ${maxTokens} in ` +
        `the completion). Please reduce the length of the ${where} or ${param}.`,
      { param, code: "context_length_exceeded" },
    );
  }
  return maxTokens;
}
