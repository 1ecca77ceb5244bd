/**
 * OpenAI's response shapes for a generation, one JSON object or SSE chunks: the parts that differ
 * between completions and chat completions come from a {@link Format}.
 */
import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import { send } from "./body.ts";
import { ApiError, internalError, serverDraining } from "./errors.ts";
import { type FinishReason, Generation, type GenerationRequest } from "./generation.ts";
import type { GenParams } from "./params.ts";
import type { ServerContext } from "./context.ts";

/** How one endpoint shapes its choices. */
export interface Format {
  /** "cmpl" or "chatcmpl". */
  idPrefix: string;
  /** `object` of a whole response and of a stream chunk. */
  object: string;
  chunkObject: string;
  /** The whole response's choice. */
  choice(text: string, finish: FinishReason): Record<string, unknown>;
  /** The first stream chunk's choice, before any text (chat: the assistant role). */
  opening?: Record<string, unknown>;
  /** A stream chunk's choice: a text piece, or the end (text "" and the finish reason). */
  delta(text: string, finish: FinishReason | null): Record<string, unknown>;
}

const usage = (prompt: number, completion: number) => ({
  prompt_tokens: prompt,
  completion_tokens: completion,
  total_tokens: prompt + completion,
});

/**
 * Runs the generation for `prompt` and answers: one object, or an SSE stream ending with
 * `data: [DONE]`. The client's disconnect (request signal, or the stream's abort) ends the job.
 * A job the server aborts (shutdown past the drain timeout) ends a stream with finish_reason
 * "abort" and answers a non-streaming request with a 503.
 */
export async function respond(
  c: Context,
  ctx: ServerContext,
  prompt: number[],
  params: GenParams,
  maxTokens: number,
  format: Format,
  t0: number,
): Promise<Response> {
  const abort = new AbortController();
  const req: GenerationRequest = {
    prompt,
    maxTokens,
    sampling: params.sampling,
    stop: params.stop,
    signal: AbortSignal.any([c.req.raw.signal, abort.signal]),
    t0,
  };
  const gen = await Generation.start(ctx.engine, ctx.metrics, req);
  const head = {
    id: `${format.idPrefix}-${crypto.randomUUID().replaceAll("-", "")}`,
    object: format.object,
    created: Math.floor(Date.now() / 1000),
    model: ctx.engine.modelId,
  };
  if (!params.stream) {
    const r = await gen.collect();
    if (r.finishReason === "abort") {
      throw serverDraining("the server shut down before this request finished; retry it");
    }
    return send(c, {
      ...head,
      choices: [format.choice(r.text, r.finishReason)],
      usage: usage(prompt.length, r.completionTokens),
    });
  }
  const chunkHead = { ...head, object: format.chunkObject };
  const extra = params.includeUsage ? { usage: null } : {};
  const chunk = (choices: unknown[], more: object = extra) =>
    JSON.stringify({ ...chunkHead, choices, ...more });
  return streamSSE(c, async (stream) => {
    stream.onAbort(() => abort.abort());
    try {
      if (format.opening) await stream.writeSSE({ data: chunk([format.opening]) });
      const it = gen.pieces();
      let r = await it.next();
      while (!r.done) {
        await stream.writeSSE({ data: chunk([format.delta(r.value, null)]) });
        r = await it.next();
      }
      await stream.writeSSE({ data: chunk([format.delta("", r.value.finishReason)]) });
      if (params.includeUsage) {
        const u = usage(prompt.length, r.value.completionTokens);
        await stream.writeSSE({ data: chunk([], { usage: u }) });
      }
    } catch (e) {
      // Headers are sent: report the error in the stream, as OpenAI does.
      const error = e instanceof ApiError ? e : internalError(e, "error during a stream");
      await stream.writeSSE({
        data: JSON.stringify({
          error: { message: error.message, type: error.type, param: error.param, code: error.code },
        }),
      });
    } finally {
      await gen.close();
    }
    await stream.writeSSE({ data: "[DONE]" });
  });
}
