/**
 * `deno task bench serve`: the HTTP server under load, in two parts.
 *
 * - throughput: the real server in-process on 127.0.0.1 with stories260K (real) or the
 *   SmolLM2-135M shape (synthetic weights, the novels tokenizer), then 1, 4 and 16 concurrent
 *   clients each stream completions; total generated tokens/s and p50/p99 time to first token.
 * - load: `server.ts` as its own process (stories260K, 8 slots): `--load-clients` (64)
 *   concurrent streaming clients (p50/p99 time to first token and inter-token latency, errors),
 *   then the server's RSS before and after `--sequential` (1,000) sequential requests, and a
 *   SIGTERM that must drain and exit 0.
 *
 * Results: stdout and bench/RESULTS.md (sections "serve" and "serve load").
 *
 *   deno task bench serve [--part throughput,load] [--models stories,smollm] [--clients 1,4,16]
 *     [--tokens 64] [--requests 2] [--load-clients 64] [--load-tokens 32] [--sequential 1000]
 */
import { parseArgs } from "node:util";
import { loadModel } from "../runtime/model/load.ts";
import { Engine } from "../runtime/model/engine.ts";
import { startServer } from "../server.ts";
import { cachedSyntheticCheckpoint, smolLm2_135mConfig } from "../tests/synthetic.ts";
import { rssOf, spawnServer, sseData } from "../tests/server_process.ts";
import { recordResults, table, today } from "./results.ts";

const SHARED = new URL("../../shared/", import.meta.url).pathname;

async function modelPaths(name: string): Promise<{ path: string; tokenizer?: string }> {
  if (name === "stories") return { path: `${SHARED}models/stories260K-hf` };
  const dir = await cachedSyntheticCheckpoint("/tmp/lowbit-bench/smollm-f16", smolLm2_135mConfig);
  return { path: dir, tokenizer: `${SHARED}data/novels/tokenizer/tokenizer.json` };
}

/** One streaming completion; returns its time to first token and token count. */
async function client(
  url: string,
  seed: number,
  tokens: number,
): Promise<{ ttft: number; n: number }> {
  const t0 = performance.now();
  const body = await streamRequest(url, tokens, seed);
  let ttft = 0, n = 0, buf = "";
  const dec = new TextDecoder();
  for await (const chunk of body) {
    if (ttft === 0) ttft = performance.now() - t0;
    buf += dec.decode(chunk, { stream: true });
    for (const m of buf.matchAll(/"completion_tokens":(\d+)/g)) n = Number(m[1]);
  }
  return { ttft, n };
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};

export async function benchServe(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      part: { type: "string", default: "throughput,load" },
      models: { type: "string", default: "stories,smollm" },
      clients: { type: "string", default: "1,4,16" },
      tokens: { type: "string", default: "64" },
      requests: { type: "string", default: "2" },
      "load-clients": { type: "string", default: "64" },
      "load-tokens": { type: "string", default: "32" },
      sequential: { type: "string", default: "1000" },
    },
  });
  const parts = values.part!.split(",");
  if (parts.includes("throughput")) await throughput(values);
  if (parts.includes("load")) {
    await load(
      Number(values["load-clients"]),
      Number(values["load-tokens"]),
      Number(values.sequential),
    );
  }
}

async function throughput(
  values: { models?: string; clients?: string; tokens?: string; requests?: string },
): Promise<void> {
  const tokens = Number(values.tokens), perClient = Number(values.requests);
  const rows: (string | number)[][] = [];
  let adapter = "";
  for (const name of values.models!.split(",")) {
    const { path, tokenizer } = await modelPaths(name);
    const { model, tokenizer: tok, gpu } = await loadModel(path, {
      tokenizer,
      quiet: true,
      ctx: 256,
    });
    adapter = gpu.adapterName;
    const engine = new Engine(model, tok, name, { slots: 8 });
    const ac = new AbortController();
    const { url } = startServer(engine, { port: 0, quiet: true, signal: ac.signal });
    await client(url, 0, 4); // warm-up: compile the pipelines
    for (const c of values.clients!.split(",").map(Number)) {
      const t0 = performance.now();
      const results = (await Promise.all(
        Array.from({ length: c }, async (_, i) => {
          const out = [];
          for (let r = 0; r < perClient; r++) out.push(await client(url, i * 100 + r, tokens));
          return out;
        }),
      )).flat();
      const seconds = (performance.now() - t0) / 1000;
      const total = results.reduce((a, r) => a + r.n, 0);
      const ttfts = results.map((r) => r.ttft);
      const row = [
        name,
        c,
        results.length,
        (total / seconds).toFixed(1),
        pct(ttfts, 50).toFixed(0),
        pct(ttfts, 99).toFixed(0),
      ];
      console.log(`${name} ${c} clients: ${row[3]} tok/s, TTFT p50 ${row[4]} ms, p99 ${row[5]} ms`);
      rows.push(row);
    }
    ac.abort();
  }
  await recordResults(
    "serve",
    adapter,
    `${today()}. Streaming /v1/completions, prompt "Once upon a time", ${tokens} tokens each, ` +
      `temperature 0.8, ${perClient} requests per client, engine with 8 slots; SmolLM2 shape: synthetic ` +
      `weights.\n\n${
        table(["model", "clients", "requests", "total tok/s", "TTFT p50 ms", "TTFT p99 ms"], rows)
      }`,
  );
}

/** One streaming completion against a server process: arrival times of its text chunks. */
async function timedStream(
  url: string,
  seed: number,
  tokens: number,
): Promise<{ ttft: number; gaps: number[]; n: number }> {
  const t0 = performance.now();
  const body = await streamRequest(url, tokens, seed);
  const times: number[] = [];
  let buf = "", n = 0, done = false;
  const dec = new TextDecoder();
  for await (const chunk of body) {
    const now = performance.now();
    buf += dec.decode(chunk, { stream: true });
    const cut = buf.lastIndexOf("\n\n");
    if (cut < 0) continue;
    for (const data of sseData(buf.slice(0, cut + 2))) {
      if (data === "[DONE]") {
        done = true;
        continue;
      }
      const c = JSON.parse(data);
      if (c.error) throw new Error(`stream error: ${c.error.message}`);
      if (c.usage) n = c.usage.completion_tokens;
      if (c.choices?.[0]?.text) times.push(now);
    }
    buf = buf.slice(cut + 2);
  }
  if (!done) throw new Error("the stream ended without [DONE]");
  return { ttft: times[0] - t0, gaps: times.slice(1).map((t, i) => t - times[i]), n };
}

/** The load part: concurrent streams, then RSS over sequential requests, then a SIGTERM. */
async function load(clients: number, tokens: number, sequential: number): Promise<void> {
  const s = await spawnServer([
    "--model",
    `${SHARED}models/stories260K-hf`,
    "--port",
    "0",
    "--slots",
    "8",
    "--ctx",
    "256",
  ]);
  try {
    await timedStream(s.url, 0, 4); // warm-up: compile the pipelines
    const adapter = /context \d+ tokens \| (.*?) \|/.exec(s.log())?.[1] ?? "unknown adapter";
    const t0 = performance.now();
    const outcomes = await Promise.all(
      Array.from({ length: clients }, (_, i) => timedStream(s.url, i + 1, tokens).catch((e) => e)),
    );
    const seconds = (performance.now() - t0) / 1000;
    const ok = outcomes.filter((o) => !(o instanceof Error));
    const errors = outcomes.length - ok.length;
    for (const e of outcomes.filter((o) => o instanceof Error).slice(0, 3)) console.error(e);
    const ttft = ok.map((o) => o.ttft), gaps = ok.flatMap((o) => o.gaps);
    const total = ok.reduce((a, o) => a + o.n, 0);
    console.log(
      `${clients} concurrent streams: ${errors} errors, ${(total / seconds).toFixed(1)} tok/s, ` +
        `TTFT p50 ${pct(ttft, 50).toFixed(0)} / p99 ${pct(ttft, 99).toFixed(0)} ms, ` +
        `ITL p50 ${pct(gaps, 50).toFixed(1)} / p99 ${pct(gaps, 99).toFixed(1)} ms`,
    );

    const before = rssOf(s.child.pid);
    let seqErrors = 0;
    const t1 = performance.now();
    for (let i = 0; i < sequential; i++) {
      const stream = i % 2 === 1;
      const res = await fetch(`${s.url}/v1/completions`, {
        method: "POST",
        body: JSON.stringify({ prompt: "Once upon a time", max_tokens: 8, seed: i, stream }),
      });
      const body = await res.text();
      if (res.status !== 200 || (stream && !body.trimEnd().endsWith("[DONE]"))) seqErrors++;
    }
    const seqSeconds = (performance.now() - t1) / 1000;
    const after = rssOf(s.child.pid);
    const mib = (b: number) => (b / 2 ** 20).toFixed(1);
    console.log(
      `${sequential} sequential requests in ${seqSeconds.toFixed(1)} s, ${seqErrors} errors: ` +
        `server RSS ${mib(before)} -> ${mib(after)} MiB`,
    );
    s.child.kill("SIGTERM");
    const exit = (await s.status).code;
    console.log(`SIGTERM: exit ${exit}`);
    const rows = [
      ["concurrent streaming clients", clients],
      ["errors", errors],
      ["total tok/s", (total / seconds).toFixed(1)],
      ["TTFT p50 / p99 ms", `${pct(ttft, 50).toFixed(0)} / ${pct(ttft, 99).toFixed(0)}`],
      ["inter-token p50 / p99 ms", `${pct(gaps, 50).toFixed(1)} / ${pct(gaps, 99).toFixed(1)}`],
      [`sequential requests (errors)`, `${sequential} (${seqErrors})`],
      ["server RSS before / after MiB", `${mib(before)} / ${mib(after)}`],
      ["exit status after SIGTERM", exit],
    ];
    await recordResults(
      "serve load",
      adapter,
      `${today()}. server.ts as its own process on 127.0.0.1, stories260K-hf, --slots 8 ` +
        `(default --max-queue 64), --ctx 256. ${clients} clients at once, each one streaming ` +
        `/v1/completions of ${tokens} tokens (prompt "Once upon a time", temperature 0.8); ` +
        `inter-token latency: the gaps between a stream's text chunks as the client reads them ` +
        `(the engine hands tokens over in read-backs of 8 steps, so most gaps are near 0). Then ` +
        `${sequential} sequential requests of 8 tokens, streamed and not in turn; RSS from ` +
        `/proc/PID/status.\n\n${table(["figure", "value"], rows)}`,
    );
  } finally {
    try {
      s.child.kill("SIGKILL");
    } catch {
      // already gone
    }
    await s.status;
  }
}

/** The body of a streamed /v1/completions request of `tokens` tokens ("Once upon a time"). */
async function streamRequest(
  url: string,
  tokens: number,
  seed: number,
): Promise<ReadableStream<Uint8Array>> {
  const res = await fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      prompt: "Once upon a time",
      max_tokens: tokens,
      stream: true,
      seed,
      temperature: 0.8,
      stream_options: { include_usage: true },
    }),
  });
  if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  return res.body;
}
