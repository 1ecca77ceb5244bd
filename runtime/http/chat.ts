/**
 * `POST /v1/chat/completions`: messages rendered with the tokenizer's chat template, then
 * generated as the assistant's reply.
 */
import type { Context } from "hono";
import { TokenizerError } from "../errors.ts";
import { readBody } from "./body.ts";
import { ApiError } from "./errors.ts";
import { checkModel, parseGenParams, parseMessages } from "./params.ts";
import {
  checkPromptLength,
  checkTextLength,
  completionBudget,
  maxTokensParam,
  type ServerContext,
} from "./context.ts";
import { type Format, respond } from "./respond.ts";
import { encodeChat } from "../tokenizer/chat_template.ts";

const format: Format = {
  idPrefix: "chatcmpl",
  object: "chat.completion",
  chunkObject: "chat.completion.chunk",
  choice: (text, finish) => ({
    index: 0,
    message: { role: "assistant", content: text },
    logprobs: null,
    finish_reason: finish,
  }),
  opening: {
    index: 0,
    delta: { role: "assistant", content: "" },
    logprobs: null,
    finish_reason: null,
  },
  delta: (text, finish) => ({
    index: 0,
    delta: finish ? {} : { content: text },
    logprobs: null,
    finish_reason: finish,
  }),
};

export function chatCompletions(ctx: ServerContext) {
  return async (c: Context): Promise<Response> => {
    const t0 = performance.now();
    const { engine } = ctx;
    const body = await readBody(c);
    checkModel(body, engine.modelId);
    const n = engine.contextLength;
    const messages = parseMessages(body, n);
    const vocab = Math.min(engine.model.config.vocabSize, engine.tokenizer.vocabSize);
    const params = parseGenParams(body, ctx.maxTokensLimit, vocab);
    checkTextLength(messages.map((m) => m.content).join(""), "messages", n);
    let text: string;
    try {
      text = engine.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true });
    } catch (e) {
      if (!(e instanceof TokenizerError)) throw e;
      throw templateError(e);
    }
    checkTextLength(text, "messages", n);
    const prompt = encodeChat(engine.tokenizer, text);
    checkPromptLength(prompt, "messages", n);
    const budget = completionBudget(
      prompt.length,
      params.maxTokens,
      ctx.maxTokensLimit,
      "messages",
      maxTokensParam(body),
      n,
    );
    return await respond(c, ctx, prompt, params, budget, format, t0);
  };
}

const logged = new Set<string>();

/**
 * The client's view of a chat template failure: the tokenizer's message names its file, so it
 * goes to the server log (once per distinct message) and the client gets one without paths.
 */
function templateError(e: TokenizerError): ApiError {
  if (logged.size < 100 && !logged.has(e.message)) {
    logged.add(e.message);
    console.error(`chat template: ${e.message}`);
  }
  const message = e.cause instanceof Error
    ? `the model's chat template could not render these messages: ${e.cause.message}`
    : "this model has no chat template, so chat messages cannot be rendered; use " +
      "/v1/completions with a plain prompt";
  return new ApiError(400, message, { param: "messages", code: "chat_template_error" });
}
