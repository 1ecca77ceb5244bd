/**
 * The HTTP server end to end on the real stories260K model: the official `openai` client
 * (completions and chat, plain and streamed), raw fetch for usage, stop strings, include_usage,
 * tokenize/detokenize, metrics and MessagePack, plus client disconnects, a full queue and
 * concurrent requests.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { pack as packBuffer, unpack } from "msgpackr";
import { createApp, type RunningServer, startServer } from "../server.ts";
import { Engine, type EngineOptions, type Job, type JobStats } from "../runtime/model/engine.ts";
import { loadModel } from "../runtime/model/load.ts";
import { HfTokenizer } from "../runtime/tokenizer/tokenizer_hf.ts";
import { StopFilter } from "../runtime/http/stop.ts";
import type { Tokenizer } from "../runtime/tokenizer/tokenizer.ts";
import { haveShared, rng, sharedPath, testGpu } from "./helpers.ts";

const pack = (v: unknown) => new Uint8Array(packBuffer(v));
const MODEL_REL = "models/stories260K-hf";
const have = await haveShared(`${MODEL_REL}/tokenizer.json`);
const MODEL_DIR = sharedPath(MODEL_REL);
const ID = "stories260K";
const PROMPT = "Once upon a time";

/** A chat template written for the test (the model has none): BOS text, "role: content" lines. */
const TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n" +
  "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

async function load(ctx?: number) {
  const { model } = await loadModel(MODEL_DIR, { gpu: await testGpu(), quiet: true, ctx });
  const json = await Deno.readTextFile(`${MODEL_DIR}/tokenizer.json`);
  const config = JSON.parse(await Deno.readTextFile(`${MODEL_DIR}/tokenizer_config.json`));
  const tokenizer = new HfTokenizer(json, JSON.stringify({ ...config, chat_template: TEMPLATE }));
  return { model, tokenizer };
}
const shared = have ? await load() : null;

/** An Engine that counts its live jobs and decode steps (to see aborted jobs end). */
class TrackingEngine extends Engine {
  active = 0;
  steps = 0;
  /** The step log: the job ids of each batched decode step. */
  log: number[][] = [];
  override async *submit(job: Job): AsyncGenerator<number, JobStats> {
    this.active++;
    try {
      return yield* super.submit(job);
    } finally {
      this.active--;
    }
  }
}

async function withServer(
  fn: (s: RunningServer, engine: TrackingEngine, tok: Tokenizer) => Promise<void>,
  opts: { engine?: EngineOptions; maxTokensLimit?: number; separateModel?: boolean; ctx?: number } =
    {},
) {
  const { model, tokenizer } = opts.separateModel || opts.ctx ? await load(opts.ctx) : shared!;
  const engine: TrackingEngine = new TrackingEngine(model, tokenizer, ID, {
    ...opts.engine,
    onStep: (ids) => {
      engine.steps++;
      engine.log.push(ids);
    },
  });
  const ac = new AbortController();
  const s = startServer(engine, {
    port: 0,
    quiet: true,
    signal: ac.signal,
    maxTokensLimit: opts.maxTokensLimit,
  });
  try {
    await fn(s, engine, tokenizer);
  } finally {
    ac.abort();
    await s.server.finished;
  }
}

const client = (s: RunningServer) =>
  new OpenAI({ baseURL: `${s.url}/v1`, apiKey: "unused", maxRetries: 0 });

async function post(s: RunningServer, path: string, body: unknown, headers = {}) {
  const res = await fetch(`${s.url}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
  return { status: res.status, headers: res.headers, json: await res.json() };
}

/** The `data:` payloads of an SSE body. */
async function sse(res: Response): Promise<string[]> {
  const text = await res.text();
  return text.split("\n\n").filter((e) => e.startsWith("data: ")).map((e) => e.slice(6));
}

/** `deno task generate`'s greedy text for `prompt` (its stdout, without the echoed prompt). */
async function cliGreedy(prompt: string, maxTokens: number): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "runtime/cli/generate_cmd.ts",
      "--model",
      MODEL_DIR,
      "--prompt",
      prompt,
      "--temperature",
      "0",
      "--max-tokens",
      String(maxTokens),
    ],
    cwd: new URL("..", import.meta.url).pathname,
    env: { XDG_RUNTIME_DIR: "/tmp" },
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  const text = new TextDecoder().decode(out.stdout);
  assert.ok(text.startsWith(prompt) && text.endsWith("\n"));
  return text.slice(prompt.length, -1);
}

Deno.test({
  name: "openai client: greedy completions equal `deno task generate`, plain and streamed",
  ignore: !have,
  fn: () =>
    withServer(async (s, _engine, tok) => {
      const expected = await cliGreedy(PROMPT, 40);
      const openai = client(s);
      const r = await openai.completions.create({
        model: ID,
        prompt: PROMPT,
        max_tokens: 40,
        temperature: 0,
      });
      assert.equal(r.object, "text_completion");
      assert.match(r.id, /^cmpl-/);
      assert.equal(r.model, ID);
      assert.equal(r.choices[0].text, expected);
      assert.equal(r.choices[0].finish_reason, "length");
      const promptTokens = tok.encode(PROMPT).length;
      assert.deepEqual(r.usage, {
        prompt_tokens: promptTokens,
        completion_tokens: 40,
        total_tokens: promptTokens + 40,
      });

      const stream = await openai.completions.create({
        model: ID,
        prompt: PROMPT,
        max_tokens: 40,
        temperature: 0,
        stream: true,
      });
      let text = "", finish = null;
      for await (const chunk of stream) {
        text += chunk.choices[0].text;
        finish = chunk.choices[0].finish_reason ?? finish;
      }
      assert.equal(text, expected);
      assert.equal(finish, "length");
    }),
});

Deno.test({
  name:
    "openai client: chat renders the template (its BOS text, no second BOS), plain and streamed",
  ignore: !have,
  fn: () =>
    withServer(async (s, _engine, tok) => {
      const messages = [
        { role: "system" as const, content: "You tell stories." },
        { role: "user" as const, content: "Tell me about a cat." },
      ];
      const ids = tok.encode(tok.applyChatTemplate(messages, { addGenerationPrompt: true }), {
        bos: false,
      });
      assert.equal(ids[0], tok.bosId);
      assert.equal(ids.filter((t) => t === tok.bosId).length, 1);
      // the same ids as a completions prompt give the reference text
      const ref = await post(s, "/v1/completions", { prompt: ids, max_tokens: 30, temperature: 0 });
      assert.equal(ref.status, 200);

      const openai = client(s);
      const r = await openai.chat.completions.create({
        model: ID,
        messages,
        max_tokens: 30,
        temperature: 0,
      });
      assert.equal(r.object, "chat.completion");
      assert.match(r.id, /^chatcmpl-/);
      assert.equal(r.choices[0].message.role, "assistant");
      assert.equal(r.choices[0].message.content, ref.json.choices[0].text);
      assert.equal(r.usage?.prompt_tokens, ids.length);

      const stream = await openai.chat.completions.create({
        model: ID,
        messages,
        max_tokens: 30,
        temperature: 0,
        stream: true,
      });
      const chunks = [];
      for await (const chunk of stream) chunks.push(chunk);
      assert.equal(chunks[0].choices[0].delta.role, "assistant");
      assert.equal(chunks[0].object, "chat.completion.chunk");
      const content = chunks.map((c) => c.choices[0]?.delta.content ?? "").join("");
      assert.equal(content, r.choices[0].message.content);
      assert.equal(chunks.at(-1)!.choices[0].finish_reason, r.choices[0].finish_reason);
    }),
});

Deno.test({
  name: "chat's default max_tokens is the rest of the context",
  ignore: !have,
  fn: () =>
    withServer(async (s, _engine, tok) => {
      let story = "";
      const size = () =>
        tok.encode(
          tok.applyChatTemplate([{ role: "user", content: story }], {
            addGenerationPrompt: true,
          }),
          { bos: false },
        ).length;
      while (size() < 80) story += "Lily and Ben went to the park. ";
      const r = await post(s, "/v1/chat/completions", {
        messages: [{ role: "user", content: story }],
        temperature: 0,
      });
      assert.equal(r.status, 200);
      const u = r.json.usage;
      assert.equal(u.prompt_tokens, size());
      assert.ok(r.json.choices[0].finish_reason === "stop" || u.total_tokens === 96, u);
    }, { ctx: 96 }),
});

Deno.test({
  name: "stop strings cut the text before the first one (plain and streamed); include_usage",
  ignore: !have,
  fn: () =>
    withServer(async (s) => {
      const base = { prompt: PROMPT, max_tokens: 40, temperature: 0 };
      const full = (await post(s, "/v1/completions", base)).json.choices[0].text as string;
      // a stop string spanning tokens, and an earlier one in a list
      const late = full.slice(20, 27), early = full.slice(8, 12);
      for (
        const [stop, cut] of [[late, full.indexOf(late)], [[late, early], full.indexOf(early)]]
      ) {
        const r = await post(s, "/v1/completions", { ...base, stop });
        assert.equal(r.json.choices[0].text, full.slice(0, cut as number), JSON.stringify(stop));
        assert.equal(r.json.choices[0].finish_reason, "stop");
        assert.ok(r.json.usage.completion_tokens < 40);

        const res = await fetch(`${s.url}/v1/completions`, {
          method: "POST",
          body: JSON.stringify({
            ...base,
            stop,
            stream: true,
            stream_options: { include_usage: true },
          }),
        });
        assert.equal(res.headers.get("content-type"), "text/event-stream");
        const events = await sse(res);
        assert.equal(events.at(-1), "[DONE]");
        const chunks = events.slice(0, -1).map((e) => JSON.parse(e));
        const usage = chunks.at(-1);
        assert.deepEqual(usage.choices, []);
        assert.equal(usage.usage.completion_tokens, r.json.usage.completion_tokens);
        assert.equal(usage.usage.total_tokens, r.json.usage.total_tokens);
        const text = chunks.slice(0, -1).map((c) => c.choices[0].text).join("");
        assert.equal(text, r.json.choices[0].text);
        assert.equal(chunks.at(-2).choices[0].finish_reason, "stop");
        assert.ok(chunks.slice(0, -1).every((c) => c.usage === null));
      }
      const none = await post(s, "/v1/completions", { ...base, stop: ["zzqx"] });
      assert.equal(none.json.choices[0].text, full);
      assert.equal(none.json.choices[0].finish_reason, "length");
      // the default max_tokens of completions is 16
      const d = await post(s, "/v1/completions", { prompt: PROMPT, temperature: 0 });
      assert.equal(d.json.usage.completion_tokens, 16);
    }),
});

Deno.test({
  name: "tokenize/detokenize round trip; models, health; metrics after some requests",
  ignore: !have,
  fn: () =>
    withServer(async (s, _engine, tok) => {
      const text = "Lily and Ben went to the park.";
      const t = await post(s, "/tokenize", { prompt: text });
      assert.deepEqual(t.json.tokens, tok.encode(text));
      assert.equal(t.json.count, t.json.tokens.length);
      const noBos = await post(s, "/tokenize", { prompt: text, add_special_tokens: false });
      assert.deepEqual(noBos.json.tokens, t.json.tokens.slice(1));
      const d = await post(s, "/detokenize", { tokens: t.json.tokens });
      assert.deepEqual(d.json, { prompt: text });

      const models = await (await fetch(`${s.url}/v1/models`)).json();
      assert.equal(models.object, "list");
      assert.equal(models.data[0].id, ID);
      assert.equal((await client(s).models.list()).data[0].id, ID);
      assert.equal((await fetch(`${s.url}/v1/models/${ID}`)).status, 200);
      assert.equal((await (await fetch(`${s.url}/health`)).json()).status, "ok");

      await post(s, "/v1/completions", { prompt: PROMPT, max_tokens: 5, temperature: 0 });
      await post(s, "/v1/completions", { prompt: PROMPT, max_tokens: 7, temperature: 0 });
      await post(s, "/v1/completions", { prompt: PROMPT, max_tokens: -1 });
      const res = await fetch(`${s.url}/metrics`);
      assert.match(res.headers.get("content-type")!, /^text\/plain/);
      const m = await res.text();
      const value = (line: string) => {
        const hit = m.split("\n").find((l) => l.startsWith(line + " "));
        assert.ok(hit, `no ${line} in\n${m}`);
        return Number(hit.slice(line.length + 1));
      };
      assert.equal(value('lowbit_requests_total{endpoint="/v1/completions",status="200"}'), 2);
      assert.equal(value('lowbit_requests_total{endpoint="/v1/completions",status="400"}'), 1);
      assert.equal(value('lowbit_requests_total{endpoint="/tokenize",status="200"}'), 2);
      assert.equal(value("lowbit_prompt_tokens_total"), 2 * tok.encode(PROMPT).length);
      assert.equal(value("lowbit_generation_tokens_total"), 12);
      assert.equal(value("lowbit_queue_depth"), 0);
      assert.equal(value("lowbit_time_to_first_token_seconds_count"), 2);
      assert.equal(value('lowbit_time_to_first_token_seconds_bucket{le="+Inf"}'), 2);
      assert.equal(value("lowbit_time_per_output_token_seconds_count"), 2);
      assert.match(m, /# TYPE lowbit_time_per_output_token_seconds histogram/);
    }),
});

Deno.test({
  name: "MessagePack request and response bodies",
  ignore: !have,
  fn: () =>
    withServer(async (s, _engine, tok) => {
      const body = { prompt: PROMPT, max_tokens: 12, temperature: 0 };
      const json = await post(s, "/v1/completions", body);
      const res = await fetch(`${s.url}/v1/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/msgpack", Accept: "application/msgpack" },
        body: pack(body),
      });
      assert.equal(res.status, 200);
      assert.equal(res.headers.get("content-type"), "application/msgpack");
      const r = unpack(new Uint8Array(await res.arrayBuffer()));
      assert.equal(r.choices[0].text, json.json.choices[0].text);
      assert.deepEqual(r.usage, json.json.usage);
      // a msgpack request with a JSON answer, and a msgpack error
      const t = await fetch(`${s.url}/tokenize`, {
        method: "POST",
        headers: { "Content-Type": "application/msgpack" },
        body: pack({ prompt: "Hi" }),
      });
      assert.equal((await t.json()).count, tok.encode("Hi").length);
      const e = await fetch(`${s.url}/tokenize`, {
        method: "POST",
        headers: { "Content-Type": "application/msgpack", Accept: "application/msgpack" },
        body: pack({ prompt: 5 }),
      });
      assert.equal(e.status, 400);
      assert.equal(unpack(new Uint8Array(await e.arrayBuffer())).error.param, "prompt");
    }),
});

const waitFor = async (cond: () => boolean, ms: number) => {
  const end = performance.now() + ms;
  while (!cond() && performance.now() < end) await new Promise((r) => setTimeout(r, 10));
  return cond();
};

Deno.test({
  name: "a client that disconnects mid-stream ends its engine job; the server keeps serving",
  ignore: !have,
  fn: () =>
    withServer(async (s, engine) => {
      for (const stream of [true, false]) {
        const ac = new AbortController();
        const res = fetch(`${s.url}/v1/completions`, {
          method: "POST",
          body: JSON.stringify({ prompt: PROMPT, max_tokens: 500, stream }),
          signal: ac.signal,
        });
        if (stream) {
          const reader = (await res).body!.getReader();
          for (let got = 0; got < 3;) got += (await reader.read()).value ? 1 : 0;
          ac.abort();
          await reader.cancel().catch(() => {});
        } else {
          assert.ok(await waitFor(() => engine.steps > 20, 5000));
          ac.abort();
          await res.catch(() => {});
        }
        assert.ok(await waitFor(() => engine.active === 0, 3000), "the job did not end");
        const steps = engine.steps;
        assert.ok(steps < 400, `the aborted job ran ${steps} steps`);
        await new Promise((r) => setTimeout(r, 150));
        assert.equal(engine.steps, steps);
        const ok = await post(s, "/v1/completions", { prompt: PROMPT, max_tokens: 4 });
        assert.equal(ok.status, 200);
        engine.steps = 0;
      }
    }),
});

Deno.test({
  name:
    "with --max-queue 1 and 2 slots, concurrent long requests: some get 429 with Retry-After, others finish",
  ignore: !have,
  fn: () =>
    withServer(async (s) => {
      const send = (stream: boolean) =>
        fetch(`${s.url}/v1/completions`, {
          method: "POST",
          body: JSON.stringify({ prompt: PROMPT, max_tokens: 100, temperature: 0, stream }),
        }).then(async (r) => ({ r, body: await r.text() }));
      const results = await Promise.all([false, true, false, true, false, true].map(send));
      const ok = results.filter((x) => x.r.status === 200);
      const full = results.filter((x) => x.r.status === 429);
      assert.equal(ok.length + full.length, results.length);
      assert.ok(ok.length >= 2 && full.length >= 1, results.map((x) => x.r.status).join());
      for (const { r, body } of full) {
        assert.ok(Number(r.headers.get("retry-after")) >= 1);
        const e = JSON.parse(body).error;
        assert.equal(e.type, "rate_limit_error");
        assert.equal(e.code, "queue_full");
      }
      for (const { r, body } of ok) {
        if (r.headers.get("content-type") === "text/event-stream") {
          assert.ok(body.trimEnd().endsWith("data: [DONE]"));
        } else assert.equal(JSON.parse(body).usage.completion_tokens, 100);
      }
    }, { engine: { maxQueue: 1, slots: 2 }, separateModel: true }),
});

Deno.test({
  name: "a burst of --max-queue + --slots requests is admitted whole; one more gets 429",
  ignore: !have,
  fn: () =>
    withServer(async (s, engine) => {
      const burst = Array.from({ length: 5 }, (_, i) =>
        fetch(`${s.url}/v1/completions`, {
          method: "POST",
          body: JSON.stringify({ prompt: PROMPT, max_tokens: 400, seed: i, stream: true }),
        }).then(async (r) => ({ status: r.status, body: await r.text() })));
      assert.ok(await waitFor(() => engine.running === 2 && engine.queueDepth === 3, 20000));
      const extra = await post(s, "/v1/completions", { prompt: PROMPT, max_tokens: 4 });
      assert.equal(extra.status, 429, JSON.stringify(extra.json));
      assert.equal(extra.json.error.code, "queue_full");
      for (const r of await Promise.all(burst)) {
        assert.equal(r.status, 200, r.body);
        assert.ok(r.body.trimEnd().endsWith("data: [DONE]"));
      }
    }, { engine: { maxQueue: 3, slots: 2 }, separateModel: true }),
});

Deno.test({
  name: "while the engine drains: 503 server_draining with Retry-After, /health 503 " +
    '"draining", /metrics still served',
  ignore: !have,
  fn: () =>
    withServer(async (s, engine) => {
      await engine.drain();
      for (const path of ["/v1/completions", "/tokenize"]) {
        const r = await post(s, path, { prompt: PROMPT, max_tokens: 4 });
        assert.equal(r.status, 503, path);
        assert.equal(r.json.error.code, "server_draining");
        assert.equal(r.json.error.type, "server_error");
        assert.ok(Number(r.headers.get("retry-after")) >= 1);
      }
      const h = await fetch(`${s.url}/health`);
      assert.equal(h.status, 503);
      assert.equal((await h.json()).status, "draining");
      const m = await fetch(`${s.url}/metrics`);
      assert.equal(m.status, 200);
      await m.body?.cancel();
    }, { separateModel: true }),
});

Deno.test({
  name: "16 concurrent greedy requests each give what they give alone",
  ignore: !have,
  fn: () =>
    withServer(async (s) => {
      const prompts = Array.from({ length: 16 }, (_, i) =>
        ["Once upon a time", "The little dog", "Lily saw a", "Tom and Sue"][i % 4] + " " +
        ["went", "was", "had", "liked"][i >> 2]);
      const run = (prompt: string) =>
        post(s, "/v1/completions", { prompt, max_tokens: 12, temperature: 0 })
          .then((r) =>
            r.json.choices[0].text as string
          );
      const alone: string[] = [];
      for (const p of prompts) alone.push(await run(p));
      assert.deepEqual(await Promise.all(prompts.map(run)), alone);
    }),
});

Deno.test({
  name: "16 concurrent streams (seeds, lengths, greedy and sampled) share decode steps, " +
    "each as alone",
  ignore: !have,
  fn: () =>
    withServer(async (s, engine) => {
      const body = (i: number) => ({
        prompt: ["Once upon a time", "The little dog", "Lily saw a", "Tom and Sue"][i % 4],
        max_tokens: 8 + ((i * 13) % 40),
        temperature: i % 2 ? 0.9 : 0,
        seed: 100 + i,
        stream: true,
      });
      const run = async (i: number) => {
        const res = await fetch(`${s.url}/v1/completions`, {
          method: "POST",
          body: JSON.stringify(body(i)),
        });
        assert.equal(res.status, 200);
        const events = await sse(res);
        assert.equal(events.at(-1), "[DONE]");
        return events.slice(0, -1).map((e) => JSON.parse(e).choices[0].text).join("");
      };
      const alone: string[] = [];
      for (let i = 0; i < 16; i++) alone.push(await run(i));
      assert.ok(engine.log.every((ids) => ids.length === 1));
      engine.log = [];
      const together = await Promise.all(Array.from({ length: 16 }, (_, i) => run(i)));
      assert.deepEqual(together, alone);
      const shared = engine.log.filter((ids) => ids.length > 1).length;
      assert.ok(shared > 10, `${shared} of ${engine.log.length} steps shared`);
      assert.ok(new Set(engine.log.flat()).size >= 16);
    }),
});

Deno.test({
  name: "createApp answers a Request directly, without a server",
  ignore: !have,
  fn: async () => {
    const engine = new Engine(shared!.model, shared!.tokenizer, ID);
    const app = createApp(engine);
    const res = await app.request("/v1/models");
    assert.equal((await res.json()).data[0].id, ID);
  },
});

Deno.test("StopFilter: any split of the text gives the text cut before the first stop string", () => {
  const r = rng(7);
  const text = "Lily saw a big dog. The dog was big and happy. The end.";
  const cases: [string[], string][] = [
    [["big and"], "Lily saw a big dog. The dog was "],
    [["The end", "dog."], "Lily saw a big "],
    [["happy", "a big d"], "Lily saw "],
    [["zebra"], text],
    [[". The e", "."], "Lily saw a big dog"],
  ];
  for (const [stops, expected] of cases) {
    for (let trial = 0; trial < 50; trial++) {
      const f = new StopFilter(stops);
      let out = "", stopped = false;
      for (let i = 0; i < text.length && !stopped;) {
        const j = Math.min(text.length, i + 1 + Math.floor((r() + 1) * 4));
        const o = f.push(text.slice(i, j));
        // nothing shown may be part of a stop string's start
        out += o.text;
        stopped = o.stopped;
        i = j;
      }
      if (!stopped) out += f.flush();
      assert.equal(out, expected, `${stops}`);
      assert.equal(stopped, expected !== text);
    }
  }
});
