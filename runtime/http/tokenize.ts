/** `POST /tokenize` ({prompt} → {tokens, count}) and `POST /detokenize` ({tokens} → {prompt}). */
import type { Context } from "hono";
import { readBody, send } from "./body.ts";
import { badParam } from "./errors.ts";
import { checkModel, checkTokenId, optBool } from "./params.ts";
import { checkTextLength, MAX_CHARS_PER_TOKEN, type ServerContext } from "./context.ts";

export function tokenize(ctx: ServerContext) {
  return async (c: Context): Promise<Response> => {
    const { engine } = ctx;
    const body = await readBody(c);
    checkModel(body, engine.modelId);
    const prompt = body.prompt;
    if (typeof prompt !== "string") {
      throw badParam(
        "prompt",
        "prompt must be a string",
        prompt === undefined ? "missing" : "invalid_type",
      );
    }
    checkTextLength(prompt, "prompt", engine.contextLength);
    const bos = optBool(body, "add_special_tokens") ?? true;
    const tokens = engine.tokenizer.encode(prompt, { bos });
    return send(c, { tokens, count: tokens.length, max_model_len: engine.contextLength });
  };
}

export function detokenize(ctx: ServerContext) {
  return async (c: Context): Promise<Response> => {
    const { engine } = ctx;
    const body = await readBody(c);
    checkModel(body, engine.modelId);
    const tokens = body.tokens;
    const max = engine.contextLength * MAX_CHARS_PER_TOKEN;
    if (!Array.isArray(tokens) || tokens.length > max) {
      throw badParam(
        "tokens",
        `tokens must be an array of at most ${max} token ids`,
        tokens === undefined ? "missing" : "invalid_type",
      );
    }
    const vocab = Math.min(engine.model.config.vocabSize, engine.tokenizer.vocabSize);
    tokens.forEach((id, i) => checkTokenId(id, i, "tokens", vocab));
    return send(c, { prompt: engine.tokenizer.decode(tokens as number[]) });
  };
}
