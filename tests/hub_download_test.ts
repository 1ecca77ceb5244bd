/**
 * runtime/checkpoint/hub_download.ts against a local stand-in for the Hugging Face Hub: the two URLs
 * `@huggingface/hub` calls (`/api/models/{repo}/tree/{rev}` to list, `/{repo}/resolve/{rev}/{file}`
 * probed with `Range: bytes=0-0`, then fetched whole), answered the way the hub answers them.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import {
  DEFAULT_MODEL,
  defaultCacheDir,
  DownloadError,
  downloadModel,
  ensureDefaultModel,
  modelCachePath,
} from "../runtime/checkpoint/hub_download.ts";
import { defaultModelW4 } from "../server.ts";
import { openLowbit } from "../runtime/format/lowbit_reader.ts";
import { loadModel } from "../runtime/model/load.ts";
import { generate } from "../runtime/model/generate.ts";
import { GREEDY } from "../runtime/model/model.ts";
import { haveShared, sharedPath, testGpu } from "./helpers.ts";

type Repo = Map<string, { bytes: Uint8Array<ArrayBuffer>; lfs: boolean; damaged?: boolean }>;

const text = (s: string) => new TextEncoder().encode(s);
function randomBytes(n: number, seed: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) out[i] = (s = (Math.imul(s, 1103515245) + 12345) >>> 0) >>> 24;
  return out;
}

const single: Repo = new Map([
  ["config.json", { bytes: text('{"model_type": "llama"}'), lfs: false }],
  ["tokenizer.json", { bytes: text('{"model": {}}'), lfs: false }],
  ["tokenizer_config.json", { bytes: text('{"bos_token": "<s>"}'), lfs: false }],
  ["README.md", { bytes: text("# not fetched"), lfs: false }],
  ["model.safetensors", { bytes: randomBytes(1_500_000, 1), lfs: true }],
]);
const sharded: Repo = new Map([
  ["config.json", { bytes: text("{}"), lfs: false }],
  ["generation_config.json", { bytes: text('{"eos_token_id": 2}'), lfs: false }],
  ["tokenizer.json", { bytes: text("{}"), lfs: false }],
  ["tokenizer_config.json", { bytes: text("{}"), lfs: false }],
  [
    "model.safetensors.index.json",
    {
      bytes: text(JSON.stringify({
        weight_map: {
          a: "model-00001-of-00002.safetensors",
          b: "model-00002-of-00002.safetensors",
          c: "model-00001-of-00002.safetensors",
        },
      })),
      lfs: false,
    },
  ],
  ["model-00001-of-00002.safetensors", { bytes: randomBytes(1000, 2), lfs: true }],
  ["model-00002-of-00002.safetensors", { bytes: randomBytes(2000, 3), lfs: true }],
]);
const damaged: Repo = new Map([...single].map(([k, v]) => [k, { ...v }]));
damaged.get("model.safetensors")!.damaged = true;
const repos = new Map<string, Repo>([
  ["test-org/tiny", single],
  ["test-org/sharded", sharded],
  ["test-org/damaged", damaged],
  [DEFAULT_MODEL, single],
]);

const gitOid = (b: Uint8Array) =>
  createHash("sha1").update(`blob ${b.length}\0`).update(b).digest("hex");
const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/** Every request the stand-in saw, as "METHOD path [range]". */
const log: string[] = [];

function hub(req: Request): Response {
  const url = new URL(req.url);
  const range = req.headers.get("range");
  log.push(`${req.method} ${url.pathname}${range ? ` ${range}` : ""}`);
  const tree = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)$/.exec(url.pathname);
  if (tree) {
    const repo = repos.get(tree[1]);
    if (!repo) {
      return Response.json({ error: "Repository not found" }, {
        status: 404,
        headers: { "X-Error-Code": "RepoNotFound" },
      });
    }
    return Response.json([...repo].map(([path, f]) => ({
      type: "file",
      path,
      size: f.bytes.length,
      oid: gitOid(f.lfs ? text(`pointer ${path}`) : f.bytes),
      ...(f.lfs ? { lfs: { oid: sha256(f.bytes), size: f.bytes.length, pointerSize: 134 } } : {}),
    })));
  }
  const resolve = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
  const file = resolve ? repos.get(resolve[1])?.get(resolve[3]) : undefined;
  if (!file) {
    return Response.json({ error: "Entry not found" }, {
      status: 404,
      headers: { "X-Error-Code": "EntryNotFound" },
    });
  }
  const bytes = file.damaged ? randomBytes(file.bytes.length, 99) : file.bytes;
  const etag = `"${file.lfs ? sha256(file.bytes) : gitOid(file.bytes)}"`;
  if (range === "bytes=0-0") {
    return new Response(bytes.slice(0, 1), {
      status: 206,
      headers: { "Content-Range": `bytes 0-0/${bytes.length}`, ETag: etag },
    });
  }
  return new Response(bytes, { headers: { ETag: etag, "Content-Length": `${bytes.length}` } });
}

async function withHub(fn: (hubUrl: string, cacheDir: string) => Promise<void>) {
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, hub);
  const cacheDir = await Deno.makeTempDir({ prefix: "lowbit_hub_test_" });
  try {
    await fn(`http://127.0.0.1:${server.addr.port}`, cacheDir);
  } finally {
    await server.shutdown();
    await Deno.remove(cacheDir, { recursive: true });
  }
}

const downloads = () => log.filter((l) => l.includes("/resolve/"));

Deno.test("downloads the serving files into the cache, then downloads nothing", async () => {
  await withHub(async (hubUrl, cacheDir) => {
    log.length = 0;
    const dir = await downloadModel("test-org/tiny", { hubUrl, cacheDir, quiet: true });
    assert.equal(dir, modelCachePath("test-org/tiny", "main", cacheDir));
    for (const [path, f] of single) {
      if (path === "README.md") continue;
      assert.deepEqual(await Deno.readFile(join(dir, path)), f.bytes, path);
    }
    await assert.rejects(Deno.stat(join(dir, "README.md")), Deno.errors.NotFound);
    assert.ok(log.includes("GET /test-org/tiny/resolve/main/model.safetensors"), log.join("\n"));

    log.length = 0;
    assert.equal(await downloadModel("test-org/tiny", { hubUrl, cacheDir, quiet: true }), dir);
    assert.deepEqual(downloads(), [], "a second call fetched files");
    assert.deepEqual(log, ["GET /api/models/test-org/tiny/tree/main"]);

    // a file lost from the cache is fetched again, alone
    await Deno.remove(join(dir, "tokenizer.json"));
    log.length = 0;
    await downloadModel("test-org/tiny", { hubUrl, cacheDir, quiet: true });
    assert.deepEqual(
      [...new Set(downloads().map((l) => l.split(" ")[1]))],
      ["/test-org/tiny/resolve/main/tokenizer.json"],
    );

    // the hub unreachable: the complete cached copy is used
    const offline = () =>
      Promise.reject(new TypeError("error sending request: connection refused"));
    const again = await downloadModel("test-org/tiny", {
      hubUrl,
      cacheDir,
      quiet: true,
      fetch: offline as typeof fetch,
    });
    assert.equal(again, dir);
  });
});

Deno.test("a sharded checkpoint: the index, every shard it names, generation_config.json", async () => {
  await withHub(async (hubUrl, cacheDir) => {
    const dir = await downloadModel("test-org/sharded", { hubUrl, cacheDir, quiet: true });
    for (const [path, f] of sharded) {
      assert.deepEqual(await Deno.readFile(join(dir, path)), f.bytes, path);
    }
  });
});

Deno.test("an unknown repository, or a file that arrives damaged, is a clear error", async () => {
  await withHub(async (hubUrl, cacheDir) => {
    await assert.rejects(
      downloadModel("test-org/missing", { hubUrl, cacheDir, quiet: true }),
      (e: Error) => {
        assert.ok(e instanceof DownloadError);
        assert.match(e.message, /test-org\/missing \(revision main\) on http.* was not found/);
        return true;
      },
    );
    await assert.rejects(
      downloadModel("test-org/damaged", { hubUrl, cacheDir, quiet: true }),
      /model\.safetensors of test-org\/damaged arrived damaged/,
    );
    const dir = modelCachePath("test-org/damaged", "main", cacheDir);
    await assert.rejects(Deno.stat(join(dir, "model.safetensors")), Deno.errors.NotFound);
    await assert.rejects(
      Deno.stat(join(dir, "model.safetensors.incomplete")),
      Deno.errors.NotFound,
    );
  });
});

Deno.test("ensureDefaultModel downloads the default model into $LOWBIT_CACHE", async () => {
  await withHub(async (hubUrl, cacheDir) => {
    const before = Deno.env.get("LOWBIT_CACHE");
    Deno.env.set("LOWBIT_CACHE", cacheDir);
    try {
      assert.equal(defaultCacheDir(), cacheDir);
      const dir = await ensureDefaultModel({ hubUrl, quiet: true });
      assert.equal(dir, modelCachePath(DEFAULT_MODEL, "main", cacheDir));
      assert.ok(dir.endsWith("models/HuggingFaceTB--SmolLM2-135M-Instruct/main"));
      assert.deepEqual(
        await Deno.readFile(join(dir, "config.json")),
        single.get("config.json")!.bytes,
      );
    } finally {
      if (before === undefined) Deno.env.delete("LOWBIT_CACHE");
      else Deno.env.set("LOWBIT_CACHE", before);
    }
  });
});

Deno.test({
  name: "serve's default model: downloaded, quantized once to W4 g128, reused, and it generates",
  ignore: !(await haveShared("models/stories260K-hf")),
  fn: async () => {
    const src = sharedPath("models/stories260K-hf");
    const files = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"];
    repos.set(
      "test-org/stories",
      new Map(
        await Promise.all(files.map(async (f) =>
          [f, {
            bytes: await Deno.readFile(join(src, f)),
            lfs: f.endsWith(".safetensors"),
          }] as const
        )),
      ),
    );
    await withHub(async (hubUrl, cacheDir) => {
      const path = await defaultModelW4("test-org/stories", { hubUrl, cacheDir, quiet: true });
      assert.ok(path.endsWith("model-w4g128.lowbit"));
      const file = await openLowbit(path);
      assert.equal(file.header.quantization.method, "rtn");
      assert.equal(file.tensors.get("model.layers.0.self_attn.q_proj.weight")!.quant?.bits, 4);
      file.close();
      const mtime = (await Deno.stat(path)).mtime;
      assert.equal(
        await defaultModelW4("test-org/stories", { hubUrl, cacheDir, quiet: true }),
        path,
      );
      assert.deepEqual((await Deno.stat(path)).mtime, mtime, "the second call must reuse the file");
      const { model, tokenizer } = await loadModel(path, { gpu: await testGpu(), quiet: true });
      const ids: number[] = [];
      const prompt = tokenizer.encode("Once upon a time", { bos: true });
      for await (
        const id of generate(model, { prompt, maxTokens: 8, sampling: GREEDY, stopIds: [] })
      ) ids.push(id);
      assert.equal(ids.length, 8);
    });
  },
});
