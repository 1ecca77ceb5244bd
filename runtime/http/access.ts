/**
 * Who may call the server: an API key (`Authorization: Bearer KEY`, compared in constant time)
 * and cross-origin access from browsers (CORS), both off by default.
 */
import type { Context, MiddlewareHandler } from "hono";
import { cors } from "hono/cors";
import { createHash, timingSafeEqual } from "node:crypto";
import { ParameterError } from "../errors.ts";
import { ApiError, toResponse } from "./errors.ts";

const digest = (s: string) => createHash("sha256").update(s).digest();

/** The key of an `Authorization: Bearer KEY` header, or null. */
function bearer(header: string | undefined): string | null {
  const m = /^\s*Bearer\s+(\S+)\s*$/i.exec(header ?? "");
  return m ? m[1] : null;
}

/**
 * Middleware answering 401 (OpenAI's `invalid_api_key`) unless the request carries
 * `Authorization: Bearer KEY`; paths in `open` need no key. The comparison runs over SHA-256
 * digests of equal length, so its time does not depend on the key; the key is never logged.
 */
export function requireApiKey(key: string, open: string[]): MiddlewareHandler {
  const want = digest(key);
  const free = new Set(open);
  return async (c: Context, next) => {
    if (free.has(c.req.path)) return await next();
    const header = c.req.header("Authorization");
    const got = bearer(header);
    if (got !== null && timingSafeEqual(digest(got), want)) return await next();
    const message = header === undefined
      ? "You didn't provide an API key: send it as the header Authorization: Bearer KEY"
      : got === null
      ? "The Authorization header must be Bearer KEY"
      : "Incorrect API key provided";
    return toResponse(
      c,
      new ApiError(401, message, {
        code: "invalid_api_key",
        headers: { "WWW-Authenticate": 'Bearer realm="lowbit"' },
      }),
    );
  };
}

/**
 * CORS for `origins` (`*` allows any): answers preflight requests and sets
 * Access-Control-Allow-Origin on the responses to allowed origins; requests from other origins
 * get no CORS headers, so browsers withhold the response.
 */
export function corsFor(origins: string[]): MiddlewareHandler {
  return cors({
    origin: origins.includes("*") ? "*" : origins,
    allowMethods: ["GET", "POST", "OPTIONS"],
    allowHeaders: ["Authorization", "Content-Type", "Accept"],
    exposeHeaders: ["Retry-After"],
    maxAge: 600,
  });
}

/** `--cors` values (repeatable, each a comma list) as origins; each must be `*` or an origin. */
export function parseCorsOrigins(values: string[]): string[] {
  const origins = values.flatMap((v) => v.split(",")).map((o) => o.trim()).filter(Boolean);
  for (const o of origins) {
    if (o === "*") continue;
    let url: URL | null = null;
    try {
      url = new URL(o);
    } catch {
      // reported below
    }
    if (!url || url.origin !== o || !/^https?:$/.test(url.protocol)) {
      throw new ParameterError(
        `--cors must be * or an origin such as https://example.com (scheme, host and port, ` +
          `no path or trailing slash); got "${o}"`,
      );
    }
  }
  return origins;
}

/**
 * The API key from `--api-key`, `--api-key-file` (its content, trimmed) or the environment
 * variable LOWBIT_API_KEY, in that order; undefined when none is set. An empty key is an error,
 * never "no key": a deployment whose secret came out empty must not serve without one.
 */
export async function resolveApiKey(
  flag: string | undefined,
  file: string | undefined,
  env: string | undefined,
): Promise<string | undefined> {
  if (flag !== undefined && file !== undefined) {
    throw new ParameterError("give --api-key or --api-key-file, not both");
  }
  let key: string | undefined, from: string;
  if (flag !== undefined) [key, from] = [flag, "--api-key"];
  else if (file !== undefined) {
    from = `--api-key-file ${file}`;
    try {
      key = await Deno.readTextFile(file);
    } catch (e) {
      const why = e instanceof Deno.errors.NotFound ? "no such file" : (e as Error).message;
      throw new ParameterError(`${from}: cannot read it (${why})`);
    }
  } else [key, from] = [env, "LOWBIT_API_KEY"];
  if (key === undefined) return undefined;
  key = key.trim();
  if (key === "") throw new ParameterError(`${from} is empty; give a non-empty API key`);
  if (/\s/.test(key)) throw new ParameterError(`${from}: the API key must not contain spaces`);
  return key;
}
