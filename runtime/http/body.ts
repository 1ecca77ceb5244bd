/**
 * Request and response bodies: JSON, or MessagePack (msgpackr) when the request's Content-Type
 * is `application/msgpack` and, for responses, when the Accept header asks for it.
 */
import type { Context } from "hono";
import { pack, unpack } from "msgpackr";
import { ApiError } from "./errors.ts";

export const MSGPACK = "application/msgpack";
const MSGPACK_TYPES = [MSGPACK, "application/x-msgpack", "application/vnd.msgpack"];

const isMsgpack = (mediaType: string | undefined) =>
  mediaType !== undefined && MSGPACK_TYPES.some((t) => mediaType.toLowerCase().includes(t));

/** Whether the client's Accept header asks for MessagePack. */
export function wantsMsgpack(c: Context): boolean {
  return isMsgpack(c.req.header("Accept"));
}

/**
 * The request body as an object: MessagePack when Content-Type says so, JSON otherwise (whatever
 * the Content-Type, as curl's `-d` sends form-encoded). Throws a 400 for an empty, malformed or
 * non-object body.
 */
export async function readBody(c: Context): Promise<Record<string, unknown>> {
  let bytes: Uint8Array;
  try {
    bytes = new Uint8Array(await c.req.arrayBuffer());
  } catch (e) {
    throw new ApiError(400, `the request body could not be read: ${(e as Error).message}`);
  }
  const msgpack = isMsgpack(c.req.header("Content-Type"));
  const format = msgpack ? "MessagePack" : "JSON";
  if (bytes.length === 0) {
    throw new ApiError(400, `the request body is empty; send a ${format} object`, {
      code: "invalid_body",
    });
  }
  let value: unknown;
  try {
    value = msgpack
      ? unpack(bytes)
      : JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new ApiError(400, `the request body is not valid ${format}: ${(e as Error).message}`, {
      code: "invalid_body",
    });
  }
  if (
    typeof value !== "object" || value === null || Array.isArray(value) ||
    value instanceof Uint8Array
  ) {
    const got = value === null ? "null" : Array.isArray(value) ? "an array" : typeof value;
    throw new ApiError(400, `the request body must be a ${format} object; got ${got}`, {
      code: "invalid_body",
    });
  }
  return value as Record<string, unknown>;
}

/** `body` as JSON, or as MessagePack when the client accepts it, with `status` and `headers`. */
export function send(
  c: Context,
  body: unknown,
  status = 200,
  headers: Record<string, string> = {},
): Response {
  if (wantsMsgpack(c)) {
    return new Response(new Uint8Array(pack(body)), {
      status,
      headers: { ...headers, "Content-Type": MSGPACK },
    });
  }
  return new Response(JSON.stringify(body), {
    status,
    headers: { ...headers, "Content-Type": "application/json" },
  });
}
