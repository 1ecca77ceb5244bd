/**
 * `deno task bench serve`: the HTTP server under load. Starts the real server in-process on
 * 127.0.0.1 with stories260K (real) or the SmolLM2-135M shape (synthetic weights, the novels
 * tokenizer), then 1, 4 and 16 concurrent clients each stream completions; reports total
 * generated tokens/s and p50/p99 time to first token. Results: stdout and bench/RESULTS.md.
 *
 *   deno task bench serve [--models stories,smollm] [--clients 1,4,16] [--tokens 64] [--requests 2]
 */
import { parseArgs } from "node:util";
import { loadModel } from "../runtime/model/load.ts";
import { Engine } from "../runtime/model/engine.ts";
import { startServer } from "../server.ts";
import { cachedSyntheticCheckpoint, smolLm2_135mConfig } from "../tests/synthetic.ts";
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
  let ttft = 0, n = 0, buf = "";
  const dec = new TextDecoder();
  for await (const chunk of res.body) {
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
      models: { type: "string", default: "stories,smollm" },
      clients: { type: "string", default: "1,4,16" },
      tokens: { type: "string", default: "64" },
      requests: { type: "string", default: "2" },
    },
  });
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
