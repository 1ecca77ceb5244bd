/**
 * `POST /v1/chat/completions`: messages rendered with the tokenizer's chat template, then
 * generated as the assistant's reply.
 */
import type { Context } from "hono";
import { TokenizerError } from "../errors.ts";
import { readBody } from "./body.ts";
import { ApiError } from "./errors.ts";
import { checkModel, parseGenParams, parseMessages } from "./params.ts";
import { checkPromptLength, checkTextLength, type ServerContext } from "./context.ts";
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
    const params = parseGenParams(body, ctx.maxTokensLimit);
    checkTextLength(messages.map((m) => m.content).join(""), "messages", n);
    let text: string;
    try {
      text = engine.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true });
    } catch (e) {
      if (!(e instanceof TokenizerError)) throw e;
      throw new ApiError(400, e.message, { param: "messages", code: "chat_template_error" });
    }
    checkTextLength(text, "messages", n);
    const prompt = encodeChat(engine.tokenizer, text);
    checkPromptLength(prompt, "messages", n);
    const room = n - prompt.length;
    const want = params.maxTokens ?? Math.min(room, ctx.maxTokensLimit);
    return await respond(c, ctx, prompt, params, Math.min(want, room), format, t0);
  };
}
