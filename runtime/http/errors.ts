/**
 * OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status.
 * Handlers throw; one hook ({@link errorHook}) turns whatever was thrown into such a response.
 */
import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import { EngineDrainingError, QueueFullError } from "../model/engine.ts";
import { ParameterError, TokenizerError } from "../errors.ts";
import { send } from "./body.ts";

/** OpenAI's error types. */
export type ErrorType = "invalid_request_error" | "rate_limit_error" | "server_error";

export interface ApiErrorOptions {
  type?: ErrorType;
  /** The request field at fault (`"max_tokens"`, `"messages[2].content"`). */
  param?: string | null;
  code?: string | null;
  headers?: Record<string, string>;
}

/** An error the client caused (or may retry), with its HTTP status. */
export class ApiError extends Error {
  readonly type: ErrorType;
  readonly param: string | null;
  readonly code: string | null;
  readonly headers: Record<string, string>;

  constructor(readonly status: number, message: string, options: ApiErrorOptions = {}) {
    super(message);
    this.name = "ApiError";
    this.type = options.type ?? (status >= 500 ? "server_error" : "invalid_request_error");
    this.param = options.param ?? null;
    this.code = options.code ?? null;
    this.headers = options.headers ?? {};
  }
}

/** A 400 naming the field at fault. */
export function badParam(param: string, message: string, code = "invalid_value"): ApiError {
  return new ApiError(400, message, { param, code });
}

/** Retry-After (seconds) of a 503 `server_draining`. */
export const DRAIN_RETRY_AFTER_S = 5;

/**
 * A 503 `server_draining`: the server is shutting down, so it refuses new requests and, past its
 * drain timeout, gives up on those still waiting.
 */
export function serverDraining(message: string): ApiError {
  return new ApiError(503, message, {
    code: "server_draining",
    headers: { "Retry-After": String(DRAIN_RETRY_AFTER_S) },
  });
}

/**
 * A 500 for an unexpected error: the details (which may name server files) go to the server log
 * under a short id, and the client gets only that id.
 */
export function internalError(err: unknown, where = "internal error"): ApiError {
  const id = crypto.randomUUID().slice(0, 8);
  console.error(`${where} [${id}]:`, err);
  return new ApiError(500, `internal server error [${id}]; the details are in the server log`, {
    code: "internal_error",
  });
}

/** Seconds a client should wait after a 429: the queue's expected drain time. */
export type RetryAfter = (depth: number) => number;

/** The one error hook: maps anything thrown by a handler or middleware to an OpenAI error. */
export function errorHook(retryAfter: RetryAfter) {
  return (err: Error, c: Context): Response => toResponse(c, toApiError(err, retryAfter));
}

function toApiError(err: unknown, retryAfter: RetryAfter): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof QueueFullError) {
    return new ApiError(429, err.message, {
      type: "rate_limit_error",
      code: "queue_full",
      headers: { "Retry-After": String(retryAfter(err.depth)) },
    });
  }
  if (err instanceof EngineDrainingError) {
    return serverDraining(`${err.message}; retry in a few seconds (on another instance)`);
  }
  if (err instanceof ParameterError || err instanceof TokenizerError) {
    return new ApiError(400, err.message, { code: "invalid_value" });
  }
  if (err instanceof HTTPException) {
    const code = err.status === 413 ? "payload_too_large" : null;
    return new ApiError(err.status, err.message || `HTTP ${err.status}`, { code });
  }
  return internalError(err);
}

/** The response for `e`, in the encoding the client accepts. */
export function toResponse(c: Context, e: ApiError): Response {
  const body = { error: { message: e.message, type: e.type, param: e.param, code: e.code } };
  return send(c, body, e.status, e.headers);
}

/** Unknown route: 404, as OpenAI's "Invalid URL". */
export function notFound(c: Context): Response {
  const e = new ApiError(404, `Invalid URL (${c.req.method} ${c.req.path})`, {
    code: "unknown_url",
  });
  return toResponse(c, e);
}

/** A known route with another method: 405 with `Allow`. */
export function methodNotAllowed(c: Context, methods: string[]): Response {
  const allow = methods.join(", ");
  const e = new ApiError(
    405,
    `${c.req.method} is not allowed on ${c.req.path}; use ${allow}`,
    { code: "method_not_allowed", headers: { Allow: allow } },
  );
  return toResponse(c, e);
}
