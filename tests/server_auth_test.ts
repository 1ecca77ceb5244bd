/**
 * Access control of the server: the API key (401 in OpenAI's shape, constant-time check, /health
 * open, /metrics behind the key unless public; the official client), CORS preflight and
 * headers, and how the key and origins are read from options, a file and the environment.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { createApp, startServer } from "../server.ts";
import { Engine } from "../runtime/model/engine.ts";
import { loadModel } from "../runtime/model/load.ts";
import { parseCorsOrigins, resolveApiKey } from "../runtime/http/access.ts";
import { ParameterError } from "../runtime/errors.ts";
import { haveShared, sharedPath, testGpu, withTempDir } from "./helpers.ts";

const have = await haveShared("models/stories260K-hf/tokenizer.json");
const ID = "stories260K";
const KEY = "sk-test-0123456789abcdef";
const loaded = have
  ? await loadModel(sharedPath("models/stories260K-hf"), { gpu: await testGpu(), quiet: true })
  : null;
const engine = loaded ? new Engine(loaded.model, loaded.tokenizer, ID) : null;

function call(
  app: ReturnType<typeof createApp>,
  path: string,
  opts: { method?: string; headers?: Record<string, string>; body?: unknown } = {},
) {
  const method = opts.method ?? (opts.body === undefined ? "GET" : "POST");
  return app.request(path, {
    method,
    headers: opts.headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
}

async function assert401(res: Response, what: string, secrets: string[] = [KEY]) {
  assert.equal(res.status, 401, what);
  assert.match(res.headers.get("www-authenticate") ?? "", /^Bearer/, what);
  const text = await res.text();
  for (const s of secrets) assert.ok(!text.includes(s), `${what} shows the key: ${text}`);
  const e = JSON.parse(text).error;
  assert.deepEqual(
    { type: e.type, param: e.param, code: e.code },
    { type: "invalid_request_error", param: null, code: "invalid_api_key" },
    what,
  );
}

const BODIES: Record<string, unknown> = {
  "/v1/completions": { prompt: "Once", max_tokens: 2, temperature: 0 },
  "/v1/chat/completions": { messages: [{ role: "user", content: "Hi" }], max_tokens: 2 },
  "/tokenize": { prompt: "Hi" },
  "/detokenize": { tokens: [1, 2] },
};

Deno.test({
  name: "--api-key: every /v1/*, /tokenize, /detokenize and /metrics request needs the key",
  ignore: !have,
  fn: async () => {
    const app = createApp(engine!, { apiKey: KEY });
    const paths = [
      "/v1/models",
      `/v1/models/${ID}`,
      "/metrics",
      "/v1/nothing",
      ...Object.keys(BODIES),
    ];
    const wrong: Record<string, string>[] = [
      {},
      { Authorization: `Basic ${btoa(`user:${KEY}`)}` },
      { Authorization: "Bearer" },
      { Authorization: "Bearer sk-wrong" },
      { Authorization: `Bearer ${KEY}x` },
      { Authorization: `Bearer ${KEY.slice(0, -1)}` },
      { Authorization: `${KEY}` },
    ];
    for (const path of paths) {
      for (const headers of wrong) {
        const what = `${path} ${JSON.stringify(headers)}`;
        await assert401(await call(app, path, { headers, body: BODIES[path] }), what, [
          KEY,
          "sk-wrong",
        ]);
      }
    }
    for (const auth of [`Bearer ${KEY}`, `bearer ${KEY}`, `  Bearer   ${KEY} `]) {
      for (const path of ["/v1/models", "/metrics", ...Object.keys(BODIES)]) {
        const res = await call(app, path, { headers: { Authorization: auth }, body: BODIES[path] });
        const ok = path === "/v1/chat/completions" ? 400 : 200; // the model has no chat template
        assert.equal(res.status, ok, `${path} with ${JSON.stringify(auth)}: ${await res.text()}`);
      }
    }
    const h = await call(app, "/health");
    assert.equal(h.status, 200);
    assert.equal((await h.json()).status, "ok");
    // --metrics-public opens /metrics only
    const open = createApp(engine!, { apiKey: KEY, metricsPublic: true });
    assert.equal((await call(open, "/metrics")).status, 200);
    await assert401(await call(open, "/v1/models"), "metrics-public /v1/models");
    // no key configured: all open
    assert.equal((await call(createApp(engine!), "/v1/models")).status, 200);
  },
});

Deno.test({
  name: "--api-key with the official openai client: the right key works, a wrong one is a 401",
  ignore: !have,
  fn: async () => {
    const ac = new AbortController();
    const s = startServer(engine!, { port: 0, quiet: true, signal: ac.signal, apiKey: KEY });
    try {
      const good = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: KEY, maxRetries: 0 });
      const r = await good.completions.create({ model: ID, prompt: "Once", max_tokens: 3 });
      assert.equal(r.usage?.completion_tokens, 3);
      const bad = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: "sk-nope", maxRetries: 0 });
      await assert.rejects(
        bad.completions.create({ model: ID, prompt: "Once", max_tokens: 3 }),
        (e: unknown) => e instanceof OpenAI.AuthenticationError && e.code === "invalid_api_key",
      );
    } finally {
      ac.abort();
      await s.server.finished;
    }
  },
});

Deno.test({
  name: "--cors: preflight answered (without the key), allowed origins get the headers",
  ignore: !have,
  fn: async () => {
    const site = "https://chat.example.com";
    const app = createApp(engine!, { apiKey: KEY, cors: [site, "http://localhost:3000"] });
    const preflight = (origin: string) =>
      call(app, "/v1/chat/completions", {
        method: "OPTIONS",
        headers: {
          Origin: origin,
          "Access-Control-Request-Method": "POST",
          "Access-Control-Request-Headers": "authorization, content-type",
        },
      });
    const pre = await preflight(site);
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get("access-control-allow-origin"), site);
    assert.match(pre.headers.get("access-control-allow-headers")!, /Authorization/);
    assert.match(pre.headers.get("access-control-allow-headers")!, /Content-Type/);
    assert.match(pre.headers.get("access-control-allow-methods")!, /POST/);
    assert.match(pre.headers.get("vary")!, /Origin/);
    const other = await preflight("https://evil.example");
    assert.equal(other.headers.get("access-control-allow-origin"), null);
    // the real request: allowed origin gets the header, also on a 401 (so the page can read it)
    const auth = { Authorization: `Bearer ${KEY}` };
    const ok = await call(app, "/tokenize", {
      headers: { ...auth, Origin: site },
      body: { prompt: "Hi" },
    });
    assert.equal(ok.status, 200);
    assert.equal(ok.headers.get("access-control-allow-origin"), site);
    const denied = await call(app, "/tokenize", {
      headers: { Origin: site },
      body: { prompt: "" },
    });
    assert.equal(denied.status, 401);
    assert.equal(denied.headers.get("access-control-allow-origin"), site);
    const evil = await call(app, "/tokenize", {
      headers: { ...auth, Origin: "https://evil.example" },
      body: { prompt: "Hi" },
    });
    assert.equal(evil.headers.get("access-control-allow-origin"), null);
    // any origin
    const any = createApp(engine!, { cors: ["*"] });
    const r = await call(any, "/v1/models", { headers: { Origin: "https://x.example" } });
    assert.equal(r.headers.get("access-control-allow-origin"), "*");
    // off by default: no headers, and OPTIONS is not a method of the routes
    const off = createApp(engine!);
    const r2 = await call(off, "/v1/models", { headers: { Origin: site } });
    assert.equal(r2.headers.get("access-control-allow-origin"), null);
    await r2.body?.cancel();
    const o = await call(off, "/v1/models", { method: "OPTIONS", headers: { Origin: site } });
    assert.equal(o.status, 405);
    await o.body?.cancel();
  },
});

Deno.test("API key sources: flag, file (trimmed), environment; empty or unreadable is an error", async () => {
  assert.equal(await resolveApiKey(undefined, undefined, undefined), undefined);
  assert.equal(await resolveApiKey("k1", undefined, "k3"), "k1");
  assert.equal(await resolveApiKey(undefined, undefined, " k3\n"), "k3");
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/key`, "  k2\n");
    await Deno.writeTextFile(`${dir}/empty`, " \n");
    assert.equal(await resolveApiKey(undefined, `${dir}/key`, "k3"), "k2");
    const fails: [string | undefined, string | undefined, string | undefined, RegExp][] = [
      ["k1", `${dir}/key`, undefined, /not both/],
      [undefined, `${dir}/missing`, undefined, /--api-key-file .*missing: cannot read it/],
      [undefined, dir, undefined, /cannot read it/],
      [undefined, `${dir}/empty`, undefined, /--api-key-file .* is empty/],
      ["", undefined, undefined, /--api-key is empty/],
      [undefined, undefined, "", /LOWBIT_API_KEY is empty/],
      ["a b", undefined, undefined, /must not contain spaces/],
    ];
    for (const [flag, file, env, re] of fails) {
      await assert.rejects(resolveApiKey(flag, file, env), (e: Error) => {
        assert.ok(e instanceof ParameterError);
        assert.match(e.message, re);
        assert.ok(!e.message.includes("k1") && !e.message.includes("a b"), e.message);
        return true;
      });
    }
  });
});

Deno.test("--cors values: repeatable, comma lists, * ; anything but an origin is an error", () => {
  assert.deepEqual(parseCorsOrigins([]), []);
  assert.deepEqual(parseCorsOrigins(["https://a.example,http://localhost:3000", "*"]), [
    "https://a.example",
    "http://localhost:3000",
    "*",
  ]);
  for (const bad of ["a.example", "https://a.example/", "https://a.example/x", "ftp://a.example"]) {
    assert.throws(() => parseCorsOrigins([bad]), /--cors must be \* or an origin/, bad);
  }
});
