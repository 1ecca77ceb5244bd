/** `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`. */
import type { Context } from "hono";
import { send } from "./body.ts";
import { ApiError } from "./errors.ts";
import type { ServerContext } from "./context.ts";

const CREATED = Math.floor(Date.now() / 1000);

function modelCard(ctx: ServerContext) {
  return {
    id: ctx.engine.modelId,
    object: "model",
    created: CREATED,
    owned_by: "lowbit",
    max_model_len: ctx.engine.contextLength,
  };
}

export function listModels(ctx: ServerContext) {
  return (c: Context): Response => send(c, { object: "list", data: [modelCard(ctx)] });
}

export function getModel(ctx: ServerContext) {
  return (c: Context): Response => {
    const id = c.req.param("model");
    if (id !== ctx.engine.modelId) {
      throw new ApiError(404, `The model \`${id}\` does not exist`, {
        param: "model",
        code: "model_not_found",
      });
    }
    return send(c, modelCard(ctx));
  };
}

/** `GET /health`: 200 `{"status": "ok"}`, or 503 `{"status": "draining"}` while shutting down. */
export function health(ctx: ServerContext) {
  return (c: Context): Response => {
    const { engine } = ctx;
    const draining = engine.draining;
    return send(c, {
      status: draining ? "draining" : "ok",
      model: engine.modelId,
      queue_depth: engine.queueDepth,
      running: engine.running,
    }, draining ? 503 : 200);
  };
}
