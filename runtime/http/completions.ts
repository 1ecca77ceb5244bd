/** `POST /v1/completions`: text completion of a prompt (a string or token ids). */
import type { Context } from "hono";
import { readBody } from "./body.ts";
import { checkModel, parseGenParams, parsePrompt } from "./params.ts";
import {
  checkPromptLength,
  checkTextLength,
  completionBudget,
  maxTokensParam,
  type ServerContext,
} from "./context.ts";
import { type Format, respond } from "./respond.ts";

/** OpenAI's default max_tokens for completions. */
export const COMPLETIONS_DEFAULT_MAX_TOKENS = 16;

const format: Format = {
  idPrefix: "cmpl",
  object: "text_completion",
  chunkObject: "text_completion",
  choice: (text, finish) => ({ index: 0, text, logprobs: null, finish_reason: finish }),
  delta: (text, finish) => ({ index: 0, text, logprobs: null, finish_reason: finish }),
};

export function completions(ctx: ServerContext) {
  return async (c: Context): Promise<Response> => {
    const t0 = performance.now();
    const { engine } = ctx;
    const body = await readBody(c);
    checkModel(body, engine.modelId);
    const vocab = Math.min(engine.model.config.vocabSize, engine.tokenizer.vocabSize);
    const p = parsePrompt(body, vocab);
    const params = parseGenParams(body, ctx.maxTokensLimit, vocab);
    const n = engine.contextLength;
    if (typeof p === "string") checkTextLength(p, "prompt", n);
    const prompt = typeof p === "string" ? engine.tokenizer.encode(p, { bos: true }) : p;
    checkPromptLength(prompt, "prompt", n);
    const fallback = Math.min(COMPLETIONS_DEFAULT_MAX_TOKENS, ctx.maxTokensLimit);
    const budget = completionBudget(
      prompt.length,
      params.maxTokens,
      fallback,
      "prompt",
      maxTokensParam(body),
      n,
    );
    return await respond(c, ctx, prompt, params, budget, format, t0);
  };
}
