/**
 * Every client error of the server in OpenAI's shape (status, type, param, code), and a seeded
 * fuzz of malformed requests: each gets a 4xx JSON error and the server keeps serving.
 */
import assert from "node:assert/strict";
import { createApp, startServer } from "../server.ts";
import { Engine, type Job, type JobStats } from "../runtime/model/engine.ts";
import { loadModel } from "../runtime/model/load.ts";
import { haveShared, rng, sharedPath, testGpu } from "./helpers.ts";

const have = await haveShared("models/stories260K-hf/tokenizer.json");
const ID = "stories260K";
const loaded = have
  ? await loadModel(sharedPath("models/stories260K-hf"), { gpu: await testGpu(), quiet: true })
  : null;
const engine = loaded ? new Engine(loaded.model, loaded.tokenizer, ID) : null;
/** The app over `engine`, answering Requests directly (no socket). */
const app = engine ? createApp(engine, { maxTokensLimit: 64, maxBodyBytes: 64 << 10 }) : null;

interface Case {
  name: string;
  path?: string;
  method?: string;
  /** A JSON value (stringified) or raw text. */
  body?: unknown;
  raw?: string;
  contentType?: string;
  status: number;
  param?: string | null;
  code?: string;
  type?: string;
}

const comp = (extra: Record<string, unknown>) => ({ prompt: "Hi", max_tokens: 2, ...extra });
const chat = (extra: Record<string, unknown>) => ({
  messages: [{ role: "user", content: "Hi" }],
  max_tokens: 2,
  ...extra,
});

const CASES: Case[] = [
  {
    name: "malformed JSON",
    raw: '{"prompt": "Hi",',
    status: 400,
    param: null,
    code: "invalid_body",
  },
  { name: "empty body", raw: "", status: 400, param: null, code: "invalid_body" },
  { name: "a JSON array body", body: [1, 2], status: 400, param: null, code: "invalid_body" },
  { name: "invalid UTF-8", raw: "\uFFFF", status: 400, code: "invalid_body" },
  { name: "prompt missing", body: { max_tokens: 2 }, status: 400, param: "prompt" },
  { name: "prompt a number", body: comp({ prompt: 5 }), status: 400, param: "prompt" },
  { name: "two prompts", body: comp({ prompt: ["a", "b"] }), status: 400, param: "prompt" },
  {
    name: "token id out of range",
    body: comp({ prompt: [1, 9999] }),
    status: 400,
    param: "prompt[1]",
  },
  {
    name: "max_tokens a string",
    body: comp({ max_tokens: "2" }),
    status: 400,
    param: "max_tokens",
    code: "invalid_type",
  },
  { name: "max_tokens 0", body: comp({ max_tokens: 0 }), status: 400, param: "max_tokens" },
  { name: "max_tokens negative", body: comp({ max_tokens: -5 }), status: 400, param: "max_tokens" },
  {
    name: "max_tokens fractional",
    body: comp({ max_tokens: 1.5 }),
    status: 400,
    param: "max_tokens",
  },
  { name: "max_tokens huge", body: comp({ max_tokens: 1e308 }), status: 400, param: "max_tokens" },
  {
    name: "max_tokens above --max-tokens-limit",
    body: comp({ max_tokens: 65 }),
    status: 400,
    param: "max_tokens",
    code: "max_tokens_exceeded",
  },
  {
    name: "temperature negative",
    body: comp({ temperature: -1 }),
    status: 400,
    param: "temperature",
  },
  {
    name: "temperature above 2",
    body: comp({ temperature: 2.5 }),
    status: 400,
    param: "temperature",
  },
  {
    name: "temperature a string",
    body: comp({ temperature: "hot" }),
    status: 400,
    param: "temperature",
  },
  { name: "top_p 0", body: comp({ top_p: 0 }), status: 400, param: "top_p" },
  { name: "top_p above 1", body: comp({ top_p: 1.5 }), status: 400, param: "top_p" },
  { name: "top_k below -1", body: comp({ top_k: -2 }), status: 400, param: "top_k" },
  { name: "seed fractional", body: comp({ seed: 0.5 }), status: 400, param: "seed" },
  { name: "stop a number", body: comp({ stop: 7 }), status: 400, param: "stop" },
  { name: "stop with a number", body: comp({ stop: ["a", 7] }), status: 400, param: "stop[1]" },
  { name: "stop empty string", body: comp({ stop: "" }), status: 400, param: "stop[0]" },
  {
    name: "five stop strings",
    body: comp({ stop: ["a", "b", "c", "d", "e"] }),
    status: 400,
    param: "stop",
  },
  { name: "n 2", body: comp({ n: 2 }), status: 400, param: "n", code: "unsupported" },
  { name: "stream a string", body: comp({ stream: "yes" }), status: 400, param: "stream" },
  {
    name: "stream_options without stream",
    body: comp({ stream_options: { include_usage: true } }),
    status: 400,
    param: "stream_options",
  },
  { name: "logprobs asked for", body: comp({ logprobs: 2 }), status: 400, param: "logprobs" },
  {
    name: "unknown model",
    body: comp({ model: "gpt-4" }),
    status: 404,
    param: "model",
    code: "model_not_found",
  },
  { name: "model a number", body: comp({ model: 4 }), status: 400, param: "model" },
  {
    name: "prompt longer than the context (token ids)",
    body: comp({ prompt: Array(600).fill(300) }),
    status: 400,
    param: "prompt",
    code: "context_length_exceeded",
  },
  {
    name: "prompt longer than the context (text)",
    body: comp({ prompt: "Lily went to the park. ".repeat(150) }),
    status: 400,
    param: "prompt",
    code: "context_length_exceeded",
  },
  {
    name: "prompt far longer than the context (not tokenized)",
    body: comp({ prompt: "a".repeat(60000) }),
    status: 400,
    param: "prompt",
    code: "context_length_exceeded",
  },
  {
    name: "body over the size limit",
    body: comp({ prompt: "a".repeat(70000) }),
    status: 413,
    code: "payload_too_large",
  },
  {
    name: "chat: messages missing",
    path: "/v1/chat/completions",
    body: {},
    status: 400,
    param: "messages",
  },
  {
    name: "chat: messages empty",
    path: "/v1/chat/completions",
    body: chat({ messages: [] }),
    status: 400,
    param: "messages",
  },
  {
    name: "chat: bad role",
    path: "/v1/chat/completions",
    body: chat({ messages: [{ role: "wizard", content: "x" }] }),
    status: 400,
    param: "messages[0].role",
  },
  {
    name: "chat: content a number",
    path: "/v1/chat/completions",
    body: chat({ messages: [{ role: "user", content: 3 }] }),
    status: 400,
    param: "messages[0].content",
  },
  {
    name: "chat: an image part",
    path: "/v1/chat/completions",
    body: chat({ messages: [{ role: "user", content: [{ type: "image_url" }] }] }),
    status: 400,
    param: "messages[0].content[0]",
  },
  {
    name: "chat: the model has no chat template",
    path: "/v1/chat/completions",
    body: chat({}),
    status: 400,
    param: "messages",
    code: "chat_template_error",
  },
  { name: "tokenize: no prompt", path: "/tokenize", body: {}, status: 400, param: "prompt" },
  {
    name: "detokenize: not ids",
    path: "/detokenize",
    body: { tokens: ["a"] },
    status: 400,
    param: "tokens[0]",
  },
  { name: "detokenize: no tokens", path: "/detokenize", body: {}, status: 400, param: "tokens" },
  { name: "unknown route", path: "/v1/nothing", body: {}, status: 404, code: "unknown_url" },
  { name: "GET an unknown route", path: "/v2", method: "GET", status: 404 },
  {
    name: "wrong method",
    path: "/v1/completions",
    method: "GET",
    status: 405,
    code: "method_not_allowed",
  },
  { name: "wrong method (models)", path: "/v1/models", method: "DELETE", status: 405 },
  {
    name: "unknown model id",
    path: "/v1/models/gpt-4",
    method: "GET",
    status: 404,
    code: "model_not_found",
  },
  {
    name: "unknown model id with a slash",
    path: "/v1/models/org/model",
    method: "GET",
    status: 404,
    code: "model_not_found",
  },
  {
    name: "prompt + max_tokens beyond the context",
    body: comp({ prompt: Array(500).fill(300), max_tokens: 20 }),
    status: 400,
    param: "max_tokens",
    code: "context_length_exceeded",
  },
  {
    name: "prompt + max_completion_tokens beyond the context",
    body: { prompt: Array(500).fill(300), max_completion_tokens: 13 },
    status: 400,
    param: "max_completion_tokens",
    code: "context_length_exceeded",
  },
  {
    name: "chat: more messages than the context",
    path: "/v1/chat/completions",
    body: chat({ messages: Array(600).fill({ role: "user", content: "" }) }),
    status: 400,
    param: "messages",
    code: "context_length_exceeded",
  },
];

async function call(c: Case): Promise<Response> {
  const method = c.method ?? "POST";
  const body = method === "GET" || method === "HEAD"
    ? undefined
    : c.raw !== undefined
    ? c.raw
    : c.body === undefined
    ? undefined
    : JSON.stringify(c.body);
  const headers: Record<string, string> = {};
  if (body !== undefined) headers["Content-Type"] = c.contentType ?? "application/json";
  if (c.name === "invalid UTF-8") {
    return await app!.request(c.path ?? "/v1/completions", {
      method,
      headers,
      body: new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]),
    });
  }
  return await app!.request(c.path ?? "/v1/completions", { method, headers, body });
}

/** Checks the OpenAI error shape; returns the error object. */
async function errorOf(res: Response, what: string) {
  assert.equal(res.headers.get("content-type"), "application/json", what);
  const json = await res.json();
  assert.deepEqual(Object.keys(json), ["error"], what);
  const e = json.error;
  assert.deepEqual(Object.keys(e).sort(), ["code", "message", "param", "type"], what);
  assert.equal(typeof e.message, "string", what);
  assert.ok(e.message.length > 0, what);
  assert.ok(e.param === null || typeof e.param === "string", what);
  assert.ok(e.code === null || typeof e.code === "string", what);
  return e;
}

Deno.test({
  name: "each client error: status, type, param and code",
  ignore: !have,
  fn: async () => {
    for (const c of CASES) {
      const res = await call(c);
      assert.equal(res.status, c.status, `${c.name}: ${res.status}`);
      const e = await errorOf(res, c.name);
      assert.equal(e.type, c.type ?? "invalid_request_error", c.name);
      if (c.param !== undefined) assert.equal(e.param, c.param, `${c.name}: ${e.message}`);
      if (c.code !== undefined) assert.equal(e.code, c.code, `${c.name}: ${e.message}`);
      if (c.status === 405) assert.ok(res.headers.get("allow"), c.name);
    }
  },
});

Deno.test({
  name: "a full queue answers 429 with Retry-After, also for a stream",
  ignore: !have,
  fn: async () => {
    const full = createApp(new Engine(loaded!.model, loaded!.tokenizer, ID, { maxQueue: 0 }));
    for (const stream of [false, true]) {
      const res = await full.request("/v1/completions", {
        method: "POST",
        body: JSON.stringify(comp({ stream })),
      });
      assert.equal(res.status, 429);
      assert.ok(Number(res.headers.get("retry-after")) >= 1);
      const e = await errorOf(res, "queue full");
      assert.equal(e.type, "rate_limit_error");
      assert.equal(e.code, "queue_full");
    }
  },
});

// ---- fuzz ----

const ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"];
/** Per endpoint, the fields the server reads, each with values it must reject. */
const BAD: Record<string, Record<string, unknown[]>> = {};
const garbage = [{}, [], true, { a: [{ b: null }] }, [[[]]], 1e308, -1e308];
const common = {
  model: ["nope", 3, ...garbage],
  max_tokens: [-1, 0, 1.5, "16", 65, 2 ** 53 + 2, ...garbage],
  temperature: [-0.1, 2.01, "1", ...garbage],
  top_p: [0, -1, 1.01, "0.5", ...garbage],
  top_k: [-2, 0.5, "3", ...garbage],
  seed: [0.5, "7", ...garbage],
  stop: [5, [1], [""], ["a", "b", "c", "d", "e"], [null], {}, [{}], true],
  n: [0, 2, -1, "1", 1.5, ...garbage],
  stream: ["true", 1, "x".repeat(50), ...garbage.filter((g) => g !== true)],
  stream_options: [{ include_usage: true }, 5, "x"],
};
BAD["/v1/completions"] = {
  ...common,
  prompt: [5, [], ["a", "b"], [-1], [1.5], [99999], ...garbage],
};
BAD["/v1/chat/completions"] = {
  ...common,
  messages: [
    [],
    [{}],
    [{ role: "user" }, 5],
    [{ role: 5, content: "x" }],
    [{ role: "user", content: {} }],
    [{ role: "user", content: [{ type: "text" }] }],
    ...garbage,
  ],
};
BAD["/tokenize"] = { model: common.model, prompt: [5, null, [], {}, true, 1e308] };
BAD["/detokenize"] = {
  model: common.model,
  tokens: [["a"], [-1], [1e9], [1.5], {}, "1 2", [[1]], null],
};
const GOOD: Record<string, Record<string, unknown>> = {
  "/v1/completions": { prompt: "Hi", max_tokens: 2 },
  "/v1/chat/completions": { messages: [{ role: "user", content: "Hi" }], max_tokens: 2 },
  "/tokenize": { prompt: "Hi" },
  "/detokenize": { tokens: [1, 2] },
};

/** A random malformed request for a random endpoint (seeded). */
function malformed(
  r: () => number,
): { path: string; method: string; body?: BodyInit; type?: string } {
  const pick = <T>(xs: T[]): T => xs[Math.floor(((r() + 1) / 2) * xs.length)];
  const path = pick(ENDPOINTS);
  const good = GOOD[path];
  const json = JSON.stringify(good);
  switch (
    pick(["field", "field", "field", "truncated", "top", "empty", "ctype", "bytes", "route"])
  ) {
    case "field": {
      const name = pick(Object.keys(BAD[path]));
      return {
        path,
        method: "POST",
        body: JSON.stringify({ ...good, [name]: pick(BAD[path][name]) }),
      };
    }
    case "truncated":
      return {
        path,
        method: "POST",
        body: json.slice(0, Math.floor(((r() + 1) / 2) * (json.length - 1))),
      };
    case "top":
      return {
        path,
        method: "POST",
        body: JSON.stringify(pick([null, 5, "s", [good], true, [], -1e308])),
      };
    case "empty":
      return { path, method: "POST", body: "" };
    case "bytes": {
      const bytes = Uint8Array.from(
        { length: 1 + Math.floor((r() + 1) * 40) },
        () => (r() + 1) * 128,
      );
      return {
        path,
        method: "POST",
        body: bytes,
        type: pick(["application/msgpack", "application/json"]),
      };
    }
    case "ctype": // JSON sent as MessagePack, or garbage as JSON under another type
      return pick([
        { path, method: "POST", body: json, type: "application/msgpack" },
        {
          path,
          method: "POST",
          body: "prompt=Hi&max_tokens=2",
          type: "application/x-www-form-urlencoded",
        },
        {
          path,
          method: "POST",
          body: new Uint8Array([0xc1, 0xff, 0x00]),
          type: "application/msgpack",
        },
      ]);
    default:
      return pick([
        { path: `${path}/x`, method: "POST", body: json },
        { path, method: pick(["GET", "PUT", "DELETE", "PATCH"]) },
      ]);
  }
}

Deno.test({
  name: "fuzz: 200 malformed requests each get a 4xx OpenAI error; then a normal one succeeds",
  ignore: !have,
  fn: async () => {
    const ac = new AbortController();
    const s = startServer(engine!, {
      port: 0,
      quiet: true,
      signal: ac.signal,
      maxTokensLimit: 64,
      maxBodyBytes: 64 << 10,
    });
    try {
      const r = rng(20240611);
      const send = async (i: number) => {
        const m = malformed(r);
        const what = `#${i} ${m.method} ${m.path} ${String(m.body).slice(0, 120)}`;
        const res = await fetch(`${s.url}${m.path}`, {
          method: m.method,
          body: m.body,
          headers: { "Content-Type": m.type ?? "application/json" },
        });
        assert.ok(res.status >= 400 && res.status < 500, `${what} → ${res.status}`);
        await errorOf(res, what);
      };
      // in batches of 8 concurrent requests
      for (let i = 0; i < 200; i += 8) {
        await Promise.all(Array.from({ length: Math.min(8, 200 - i) }, (_, j) => send(i + j)));
      }
      const res = await fetch(`${s.url}/v1/completions`, {
        method: "POST",
        body: JSON.stringify({ prompt: "Once upon a time", max_tokens: 4, temperature: 0 }),
      });
      assert.equal(res.status, 200);
      assert.equal((await res.json()).usage.completion_tokens, 4);
    } finally {
      ac.abort();
      await s.server.finished;
    }
  },
});

Deno.test({
  name: "max_tokens beyond the context: a 400 naming both numbers; without max_tokens, no error",
  ignore: !have,
  fn: async () => {
    const ctx = engine!.contextLength;
    const post = (body: unknown) =>
      app!.request("/v1/completions", { method: "POST", body: JSON.stringify(body) });
    const res = await post({ prompt: Array(500).fill(300), max_tokens: 20 });
    const e = await errorOf(res, "max_tokens beyond the context");
    assert.match(e.message, new RegExp(`maximum context length is ${ctx} tokens`));
    assert.match(e.message, /requested 520 tokens \(500 in the prompt, 20 in the completion\)/);
    // exactly full: fits
    const fits = await post({ prompt: Array(ctx - 3).fill(300), max_tokens: 3, temperature: 0 });
    assert.equal(fits.status, 200, await fits.clone().text());
    assert.equal((await fits.json()).usage.total_tokens, ctx);
    // no max_tokens: the default (16) is clipped to the 5 tokens left, as usage reports
    const clip = await post({ prompt: Array(ctx - 5).fill(300), temperature: 0 });
    assert.equal(clip.status, 200);
    const u = (await clip.json()).usage;
    assert.ok(u.completion_tokens <= 5 && u.total_tokens <= ctx, JSON.stringify(u));
  },
});

/** Absolute paths of this machine that an error message must not show. */
const SERVER_PATHS = [sharedPath(""), new URL("..", import.meta.url).pathname, Deno.cwd()];

Deno.test({
  name: "errors show no server paths: a model without a chat template, an internal error",
  ignore: !have,
  fn: async () => {
    const res = await app!.request("/v1/chat/completions", {
      method: "POST",
      body: JSON.stringify(chat({})),
    });
    const e = await errorOf(res, "no chat template");
    assert.equal(e.code, "chat_template_error");
    for (const p of SERVER_PATHS) assert.ok(!e.message.includes(p), e.message);
    assert.doesNotMatch(e.message, /tokenizer\.(json|bin)|tok512/);
    assert.match(e.message, /no chat template/);

    // an engine that fails as a missing file would: the 500 names no path, before or mid-stream
    const secret = `${sharedPath("models")}/secret.bin`;
    class Failing extends Engine {
      override async *submit(job: Job): AsyncGenerator<number, JobStats> {
        if (job.maxTokens === 2) throw new Error(`ENOENT: no such file ${secret}`);
        yield 300;
        throw new Error(`EIO: read failed on ${secret}`);
      }
    }
    const failing = createApp(new Failing(loaded!.model, loaded!.tokenizer, ID));
    for (
      const [body, stream] of [[comp({}), false], [comp({ max_tokens: 3, stream: true }), true]]
    ) {
      const r = await failing.request("/v1/completions", {
        method: "POST",
        body: JSON.stringify(body),
      });
      const text = await r.text();
      for (const p of SERVER_PATHS) assert.ok(!text.includes(p), text);
      assert.ok(!text.includes("secret.bin"), text);
      if (stream) {
        assert.equal(r.status, 200);
        assert.match(text, /"code":"internal_error"/);
        assert.ok(text.trimEnd().endsWith("data: [DONE]"), text);
      } else {
        assert.equal(r.status, 500);
        assert.match(JSON.parse(text).error.message, /internal server error \[\w+\]; the details/);
      }
    }
  },
});
