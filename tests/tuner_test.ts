/**
 * The kernel tuner (kernels/tuner.ts) and its cache (kernels/tune_cache.ts) on lavapipe: every
 * variant the tuner enumerates for small odd shapes equals the float64 reference (CPU shapes and
 * the GPU layout's split-K shapes), a wrong variant is rejected and never chosen, the choice is
 * a pure function of the timings, the cache round-trips, a corrupt or wrong-version file is
 * ignored with one warning, and entries for another adapter are not used.
 */
import assert from "node:assert/strict";
import { Gpu } from "../kernels/gpu.ts";
import type { Epilogue } from "../kernels/epilogue.ts";
import { MAX_Q_BATCH } from "../kernels/matvec_q.ts";
import {
  candidates,
  chooseVariant,
  tunedEntries,
  type TuneJob,
  tuneJob,
  type TuneOptions,
  type TuneResult,
} from "../kernels/tuner.ts";
import {
  adapterId,
  gpuAdapterId,
  loadTunedShapes,
  readTuneCache,
  saveTuned,
  TUNE_CACHE_VERSION,
  tuneCachePath,
  tunedAttentionFor,
  tunedFor,
} from "../kernels/tune_cache.ts";
import {
  describeShape,
  parseTuneKey,
  tunedShapeProblem,
  type TuneKey,
  tuneKeyString,
} from "../kernels/tune_key.ts";
import { qKernelShape } from "../runtime/model/forward.ts";
import { autoTune, layerShapes, tunePlan } from "../runtime/model/tune_plan.ts";
import { defaultKvType } from "../runtime/model/run_state.ts";
import { tinyConfig } from "./synthetic.ts";
import { testGpu, testGpuLayout, withTempDir } from "./helpers.ts";

const HD = 8, NH = 4, NKV = 2; // qkv: head dim, heads, kv heads
const qkv: Epilogue = { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: true };
const store = (N: number): Epilogue => ({ kind: "store", offset: 0, ld: N });

/** A key over `e` with the given fields (buffer weights, no norm, x in storage by default). */
function key(
  k: Partial<TuneKey> & Pick<TuneKey, "family" | "bits" | "groupSize" | "rows" | "K">,
  e: Epilogue,
): TuneKey {
  return { tokens: 1, norm: false, weights: "buffer", xUniform: false, epilogue: e.kind, ...k };
}

/** A job with the runtime's heuristic shape as the default. */
function job(gpu: Gpu, k: TuneKey, e: Epilogue): TuneJob {
  return { key: k, epilogue: e, default: qKernelShape(gpu, k, e, false) };
}

/** Tunes and asserts that every variant ran and matched the reference. */
async function allCorrect(gpu: Gpu, j: TuneJob, opts: TuneOptions): Promise<TuneResult> {
  const r = await tuneJob(gpu, j, opts);
  assert.ok(r.variants.length >= 2, `${r.name}: only ${r.variants.length} variants`);
  for (const v of r.variants) {
    assert.equal(v.error, null, `${r.name} ${describeShape(v.shape)}: ${v.error}`);
    assert.ok(Number.isFinite(v.us) && v.us > 0, `${r.name}: time ${v.us}`);
  }
  assert.ok(r.best >= 0 && r.shape !== null);
  assert.deepEqual(r.variants[0].shape, j.default, "the heuristic shape is tried first");
  return r;
}

Deno.test("tuner: every CPU-shape variant equals the reference on odd shapes", async () => {
  const gpu = await testGpu();
  // bits 3, G 32, 37 rows, K 96, fused norm
  const a = key(
    { family: "matvec_q", bits: 3, groupSize: 32, rows: 37, K: 96, norm: true },
    store(37),
  );
  await allCorrect(gpu, job(gpu, a, store(37)), { space: { upt: [4, 8] } });
  // bits 4, one group per row, 20 rows, K 200: a batched step of 3 rows, texture weights, x uniform
  const add: Epilogue = { kind: "add" };
  const b = key({
    family: "matmul_q",
    bits: 4,
    groupSize: 0,
    rows: 20,
    K: 200,
    tokens: 3,
    weights: "texture",
    xUniform: true,
  }, add);
  await allCorrect(gpu, job(gpu, b, add), { space: { upt: [4] } });
  // a pair epilogue: gateup over 58 rows, K 172 (a short last group), prefill with tt 4 and 8
  const gateup: Epilogue = { kind: "gateup", hidden: 29 };
  const c = key(
    { family: "matmul_q", bits: 2, groupSize: 64, rows: 58, K: 172, tokens: 0 },
    gateup,
  );
  await allCorrect(gpu, job(gpu, c, gateup), {
    space: { upt: [2], tt: [4, 8] },
    prefillTokens: 11,
  });
});

Deno.test("tuner: every GPU-layout variant (split K) equals the reference on odd shapes", async () => {
  const gpu = await testGpuLayout();
  const small = { tpr: [8, 16], upt: [1, 2], slots: [4] };
  const a = key(
    { family: "matvec_q", bits: 3, groupSize: 32, rows: 37, K: 96, norm: true },
    store(37),
  );
  const ra = await allCorrect(gpu, job(gpu, a, store(37)), { space: small });
  assert.ok(ra.variants.some((v) => v.shape.tpr === 16), "tpr 16 was tried");
  // qkv (GQA, bias, RoPE) in prefill: 64 rows, K 128
  const b = key({
    family: "matmul_q",
    bits: 4,
    groupSize: 32,
    rows: (NH + 2 * NKV) * HD,
    K: 128,
    tokens: 0,
  }, qkv);
  await allCorrect(gpu, job(gpu, b, qkv), {
    space: { tpr: [16], upt: [1, 2], slots: [2], tt: [4] },
    prefillTokens: 5,
  });
  // the largest batched decode step, bits 2 per row
  const add: Epilogue = { kind: "add" };
  const c = key({
    family: "matmul_q",
    bits: 2,
    groupSize: 0,
    rows: 20,
    K: 200,
    tokens: MAX_Q_BATCH,
  }, add);
  await allCorrect(gpu, job(gpu, c, add), { space: { tpr: [16], upt: [1], slots: [2, 4] } });
});

Deno.test("tuner: a wrong variant is rejected and never chosen, however fast", async () => {
  const gpu = await testGpu();
  const k = key({ family: "matvec_q", bits: 4, groupSize: 32, rows: 21, K: 64 }, store(21));
  const j = job(gpu, k, store(21));
  const r = await tuneJob(gpu, j, {
    space: { upt: [4, 8] },
    // variant 1 adds 1 to every output, and is the "fastest"
    transformWgsl: (w, _s, i) => (i === 1 ? w.replace("= acc.x;", "= acc.x + 1.0;") : w),
    time: (_s, i) => (i === 1 ? 1 : [10, 0, 12, 13][i]),
  });
  assert.equal(r.variants.length, 3);
  assert.match(r.variants[1].error ?? "", /wrong output: y\[\d+\]/);
  assert.ok(Number.isNaN(r.variants[1].us));
  assert.equal(r.variants.filter((v) => v.error !== null).length, 1);
  assert.equal(r.best, 0, "the fastest correct variant");
  assert.equal(r.us, 10);
  assert.deepEqual(tunedEntries([r]).map(([n]) => n), [tuneKeyString(k)]);
  // a WGSL that does not compile is rejected too
  const broken = await tuneJob(gpu, j, {
    space: { upt: [4] },
    transformWgsl: (w, _s, i) => (i === 1 ? w.replace("fn main", "fn main(") : w),
    time: () => 5,
  });
  assert.match(broken.variants[1].error ?? "", /does not run/);
  assert.equal(broken.best, 0);
  // the qkv epilogue's outputs are checked too (GPU layout, prefill): a wrong q is caught
  const layout = await testGpuLayout();
  const kq = key({
    family: "matmul_q",
    bits: 2,
    groupSize: 32,
    rows: (NH + 2 * NKV) * HD,
    K: 64,
    tokens: 0,
  }, qkv);
  const rq = await tuneJob(layout, job(layout, kq, qkv), {
    space: { tpr: [8], upt: [1], slots: [4], tt: [2] },
    prefillTokens: 3,
    transformWgsl: (w, _s, i) => (i === 1 ? w.replace("q[o] = v.x;", "q[o] = v.x * 0.5;") : w),
    time: (_s, i) => 10 - i,
  });
  assert.equal(rq.variants.length, 2);
  assert.equal(rq.variants[0].error, null);
  assert.match(rq.variants[1].error ?? "", /wrong output: q\[\d+\]/);
  assert.equal(rq.best, 0);
});

Deno.test("tuner: chooseVariant is the fastest correct variant, ties to the first", () => {
  const ok = (us: number) => ({ us, error: null });
  const bad = { us: NaN, error: "wrong output" };
  assert.equal(chooseVariant([ok(5), ok(3), ok(3), { us: 1, error: "wrong output" }]), 1);
  assert.equal(chooseVariant([bad, ok(7), ok(Infinity), ok(NaN)]), 1);
  assert.equal(chooseVariant([ok(2), ok(2)]), 0);
  assert.equal(chooseVariant([bad, bad]), -1);
  assert.equal(chooseVariant([]), -1);
  const t = [ok(4), ok(9), ok(1.5), ok(1.5), ok(2)];
  assert.equal(chooseVariant(t), 2);
  assert.equal(chooseVariant(t), chooseVariant(t.map((x) => ({ ...x }))));
});

Deno.test("tuner: candidates are valid, unique, heuristic first, within the limits", async () => {
  for (const gpu of [await testGpu(), await testGpuLayout()]) {
    for (const tokens of [1, 8, MAX_Q_BATCH, 0]) {
      const family = tokens === 1 ? "matvec_q" : "matmul_q";
      const k = key({ family, bits: 3, groupSize: 128, rows: 1376, K: 256, tokens }, {
        kind: "gateup",
        hidden: 688,
      });
      const def = qKernelShape(gpu, k, { kind: "gateup", hidden: 688 }, false);
      const list = candidates(gpu, k, def);
      assert.deepEqual(list[0], def);
      assert.ok(list.length >= (gpu.isCpu ? 2 : 10), `${tuneKeyString(k)}: ${list.length}`);
      const names = list.map(describeShape);
      assert.equal(new Set(names).size, names.length, "no duplicates");
      for (const s of list) {
        assert.equal(tunedShapeProblem(k, s, gpu.device.limits), null, describeShape(s));
        assert.ok(gpu.isCpu ? s.tpr === 1 && s.upw === 8 * s.upt || s === def : s.tpr >= 8);
      }
    }
  }
});

Deno.test("tune keys: print and parse back; bad shapes are named", () => {
  const k = key({ family: "matvec_q", bits: 2, groupSize: 0, rows: 576, K: 1536, norm: true }, {
    kind: "gateup",
    hidden: 288,
  });
  const name = tuneKeyString(k);
  assert.equal(name, "matvec_q q2g1536 576x1536 b1 gateup+norm buffer");
  assert.deepEqual(parseTuneKey(name), { ...k, groupSize: 1536 });
  const p = key({
    family: "matmul_q",
    bits: 4,
    groupSize: 64,
    rows: 100,
    K: 64,
    tokens: 0,
    weights: "texture",
  }, store(100));
  assert.deepEqual(parseTuneKey(tuneKeyString(p)), p);
  for (
    const bad of [
      "",
      "matvec_q q5g32 1x4 b1 store buffer",
      "matvec_q q4g32 8x64 prefill store buffer",
      "matvec_q q4g48 100x64 b1 store buffer",
    ]
  ) {
    assert.equal(parseTuneKey(bad), null, bad);
  }
  assert.match(tunedShapeProblem(k, { tpr: 3, upw: 8, upt: 2 })!, /bad thread shape/);
  assert.match(tunedShapeProblem(k, { tpr: 1, upw: 8, upt: 2, tt: 4 })!, /no tt/);
  const b8 = { ...p, tokens: 8, weights: "buffer" as const };
  assert.match(tunedShapeProblem(b8, { tpr: 32, upw: 8, upt: 2, tt: 4 })!, /needs tt = 8/);
  assert.match(
    tunedShapeProblem(b8, { tpr: 256, upw: 32, upt: 1, tt: 8 }, {
      maxComputeInvocationsPerWorkgroup: 1024,
      maxComputeWorkgroupStorageSize: 32768,
    })!,
    /workgroup memory|exceed/,
  );
  assert.equal(tunedShapeProblem(b8, { tpr: 32, upw: 8, upt: 2, tt: 8 }), null);
});

/** A Gpu on the test device under another adapter name, with no tuned shapes yet. */
async function namedGpu(name: string, isCpu = false): Promise<Gpu> {
  const g = await testGpu();
  const gpu = new Gpu(g.device, name, g.shaderF16, g.timestamps, isCpu);
  gpu.driver = "1:2";
  return gpu;
}

/** Runs `fn` with console.warn captured; returns the warnings. */
function captureWarn(fn: () => void): string[] {
  const seen: string[] = [];
  const orig = console.warn;
  console.warn = (...a: unknown[]) => void seen.push(a.join(" "));
  try {
    fn();
  } finally {
    console.warn = orig;
  }
  return seen;
}

Deno.test("tune cache: round-trips, and the forward plan's shape lookup uses it", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/sub/tune.json`;
    const gpu = await namedGpu("test adapter A");
    const k = key({ family: "matmul_q", bits: 3, groupSize: 64, rows: 96, K: 128, tokens: 8 }, {
      kind: "add",
    });
    const m = key(
      { family: "matvec_q", bits: 4, groupSize: 128, rows: 512, K: 256, norm: true },
      store(512),
    );
    const entries: [string, { tpr: number; upw: number; upt: number; tt?: number; us: number }][] =
      [
        [tuneKeyString(k), { tpr: 16, upw: 4, upt: 2, tt: 8, us: 12.5 }],
        [tuneKeyString(m), { tpr: 64, upw: 2, upt: 1, us: 3 }],
      ];
    const warns = captureWarn(() => saveTuned(path, gpuAdapterId(gpu), entries));
    assert.deepEqual(warns, [], "a missing file is an empty cache, silently");
    const file = readTuneCache(path, { warn: (w) => assert.fail(w) });
    assert.equal(file.version, TUNE_CACHE_VERSION);
    assert.deepEqual(file.adapters[gpuAdapterId(gpu)].shapes, Object.fromEntries(entries));
    assert.deepEqual([...Deno.readDirSync(`${dir}/sub`)].map((e) => e.name), ["tune.json"]);
    // merging keeps the other entries; a second adapter gets its own
    saveTuned(path, "other", [[tuneKeyString(m), { tpr: 8, upw: 8, upt: 2 }]]);
    saveTuned(path, gpuAdapterId(gpu), [[tuneKeyString(m), { tpr: 32, upw: 4, upt: 1 }]]);
    const t = tunedFor(readTuneCache(path), gpuAdapterId(gpu));
    assert.deepEqual(t.get(tuneKeyString(k)), { tpr: 16, upw: 4, upt: 2, tt: 8 });
    assert.deepEqual(t.get(tuneKeyString(m)), { tpr: 32, upw: 4, upt: 1 });
    // the Gpu reads it and the forward plan's lookup returns the tuned shape as it is
    assert.deepEqual(captureWarn(() => loadTunedShapes(gpu, path)), []);
    assert.equal(gpu.tuneCache, path);
    assert.deepEqual(qKernelShape(gpu, k, { kind: "add" }), { tpr: 16, upw: 4, upt: 2, tt: 8 });
    assert.deepEqual(qKernelShape(gpu, m, store(512)), { tpr: 32, upw: 4, upt: 1 });
    const heuristic = qKernelShape(gpu, m, store(512), false);
    assert.notDeepEqual(heuristic, { tpr: 32, upw: 4, upt: 1 });
    // an untuned key falls back to the heuristic
    const u = { ...m, rows: 513 };
    assert.deepEqual(qKernelShape(gpu, u, store(513)), qKernelShape(gpu, u, store(513), false));
  });
});

Deno.test("tune cache: corrupt, wrong-version and stale files are ignored with a warning", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/tune.json`;
    const gpu = await namedGpu("test adapter B");
    const id = gpuAdapterId(gpu);
    const m = tuneKeyString(
      key({ family: "matvec_q", bits: 4, groupSize: 32, rows: 64, K: 64 }, store(64)),
    );
    const good = { tpr: 16, upw: 4, upt: 2 };
    const cases: [string, string, RegExp][] = [
      ["bad JSON", `{"version": 1, "adapters": {`, /not valid JSON/],
      [
        "wrong version",
        JSON.stringify({ version: 99, adapters: { [id]: { shapes: { [m]: good } } } }),
        /version 99/,
      ],
      ["not an object", "[1, 2]", /not a JSON object/],
      [
        "wrong types",
        JSON.stringify({
          version: 1,
          adapters: { [id]: { shapes: { [m]: { ...good, tpr: "16" } } } },
        }),
        /integers/,
      ],
      [
        "bad key",
        JSON.stringify({ version: 1, adapters: { [id]: { shapes: { "matvec q4": good } } } }),
        /not a kernel key/,
      ],
      [
        "invalid shape",
        JSON.stringify({
          version: 1,
          adapters: { [id]: { shapes: { [m]: { tpr: 6, upw: 4, upt: 2 } } } },
        }),
        /bad thread shape/,
      ],
      [
        "shapes not an object",
        JSON.stringify({ version: 1, adapters: { [id]: { shapes: 3 } } }),
        /not an object/,
      ],
    ];
    for (const [what, text, why] of cases) {
      Deno.writeTextFileSync(path, text);
      gpu.tuned.set("stale", good);
      const warns = captureWarn(() => loadTunedShapes(gpu, path));
      assert.equal(warns.length, 1, `${what}: ${warns.join(" | ")}`);
      assert.ok(warns[0].includes(path), `${what}: the warning names the file: ${warns[0]}`);
      assert.match(warns[0], why, what);
      assert.equal(gpu.tuned.size, 0, `${what}: nothing is used`);
    }
    // entries made for another adapter (another GPU or driver) are not used
    const otherDriver = adapterId(gpu.adapterName, "9:9");
    Deno.writeTextFileSync(
      path,
      JSON.stringify({
        version: TUNE_CACHE_VERSION,
        adapters: { [otherDriver]: { shapes: { [m]: good } } },
      }),
    );
    const warns = captureWarn(() => loadTunedShapes(gpu, path));
    assert.equal(gpu.tuned.size, 0);
    assert.equal(warns.length, 1);
    assert.match(warns[0], /no entries for adapter/);
    assert.ok(warns[0].includes(otherDriver));
    // and the same file read as that adapter is used
    const other = await namedGpu(gpu.adapterName);
    other.driver = "9:9";
    assert.deepEqual(captureWarn(() => loadTunedShapes(other, path)), []);
    assert.deepEqual(other.tuned.get(m), good);
  });
});

Deno.test("tune cache path: LOWBIT_TUNE_CACHE, then XDG_CACHE_HOME, then ~/.cache", () => {
  const env = (vars: Record<string, string>) => (n: string) => vars[n];
  assert.equal(tuneCachePath(env({ LOWBIT_TUNE_CACHE: "/x/t.json", HOME: "/h" })), "/x/t.json");
  assert.equal(tuneCachePath(env({ XDG_CACHE_HOME: "/c", HOME: "/h" })), "/c/lowbit/tune.json");
  assert.equal(tuneCachePath(env({ HOME: "/h" })), "/h/.cache/lowbit/tune.json");
});

Deno.test("tune plan: one job per distinct kernel of the forward plans, heuristic defaults", async () => {
  const c = { ...tinyConfig, nLayers: 3 };
  for (const gpu of [await testGpu(), await testGpuLayout()]) {
    const weights = gpu.isCpu ? "texture" as const : "buffer" as const;
    const q = (rows: number, K: number) => ({
      format: "q",
      bits: 4 as const,
      groupSize: 32,
      K,
      weights,
      chunks: [{ rowStart: 0, rows }],
    });
    const layer = layerShapes(c, q);
    const w = {
      layers: [layer, layer, layer],
      lmHead: { format: "f16", K: c.dim, weights, chunks: [] },
    };
    const jobs = tunePlan(gpu, c, w, { batchRows: [8, MAX_Q_BATCH] });
    const names = jobs.map((j) => tuneKeyString(j.key));
    assert.equal(new Set(names).size, names.length, "distinct");
    // wo and w2 differ in K here (64 vs 128): 4 matrices × (decode, 2 batched, prefill)
    assert.equal(jobs.length, 16, names.join("\n"));
    const tex = gpu.isCpu ? " texture+xu" : " buffer";
    assert.ok(names.includes(`matvec_q q4g32 128x64 b1 qkv+norm${tex}`), names.join("\n"));
    assert.ok(names.includes(`matmul_q q4g32 256x64 b8 gateup+norm${tex}`), names.join("\n"));
    assert.ok(
      names.includes(`matmul_q q4g32 64x128 prefill add${gpu.isCpu ? " texture" : " buffer"}`),
    );
    for (const j of jobs) assert.deepEqual(j.default, qKernelShape(gpu, j.key, j.epilogue, false));
    // no dense matrix is tuned; a packed logits layer is, beside w13 of the same shape (256x64:
    // the tuner draws those weights once)
    const withHead = tunePlan(gpu, c, { ...w, lmHead: q(c.vocabSize, c.dim) }, {
      batchRows: [],
      prefill: false,
    });
    assert.deepEqual(
      withHead.map((j) => j.key.family + j.key.epilogue),
      ["matvec_qqkv", "matvec_qadd", "matvec_qgateup", "matvec_qstore", "matvec_qadd"],
    );
  }
});

Deno.test("first-run tuning: a GPU's missing kernels are tuned once and cached; not on CPU", async () => {
  await withTempDir(async (dir) => {
    const c = tinyConfig;
    const dense = { format: "f16", K: c.dim, weights: "buffer" as const, chunks: [] };
    // one packed matrix (w2), the rest dense
    const w2 = {
      format: "q",
      bits: 3 as const,
      groupSize: 32,
      K: c.hiddenDim,
      weights: "buffer" as const,
      chunks: [{ rowStart: 0, rows: c.dim }],
    };
    const w = { layers: [{ wqkv: dense, wo: dense, w13: dense, w2 }], lmHead: dense };
    const opts = {
      batchRows: [],
      prefill: false,
      space: { tpr: [16], upt: [1], slots: [2] },
      attention: { space: { wg: [16] }, position: 40 },
      log: () => {},
    };
    const path = `${dir}/tune.json`;
    const saved = Deno.env.get("LOWBIT_TUNE");
    Deno.env.delete("LOWBIT_TUNE");
    try {
      await firstRun(c, w, opts, path);
    } finally {
      if (saved !== undefined) Deno.env.set("LOWBIT_TUNE", saved);
    }
  });
});

/** The first-run test's steps, with LOWBIT_TUNE unset. */
async function firstRun(
  c: typeof tinyConfig,
  w: Parameters<typeof autoTune>[2],
  opts: NonNullable<Parameters<typeof autoTune>[3]>,
  path: string,
): Promise<void> {
  // a Gpu made by hand (no cache) and a CPU adapter are never tuned
  const layout = await testGpuLayout();
  assert.deepEqual(await autoTune(layout, c, w, opts), []);
  const cpu = await namedGpu("test CPU", true);
  cpu.tuneCache = path;
  assert.deepEqual(await autoTune(cpu, c, w, opts), []);
  assert.equal(cpu.tuned.size, 0);
  // a GPU adapter with an empty cache tunes w2's decode kernel and decode attention (no
  // prefill, no batched plans here), and writes the cache
  const gpu = await namedGpu("test GPU C");
  gpu.tuneCache = path;
  const lines: string[] = [];
  const name = "matvec_q q3g32 64x128 b1 add buffer";
  const att = `attention h4 kv2 d16 ${defaultKvType(gpu)} buffer decode`;
  // each choice is in the cache file by the time its progress line shows (an interrupted run
  // keeps it)
  let afterFirst: string[] = [];
  const log = (l: string) => {
    lines.push(l);
    if (/tune 1\/2/.test(l)) {
      afterFirst = Object.keys(readTuneCache(path).adapters[gpuAdapterId(gpu)]?.shapes ?? {});
    }
  };
  const r = await autoTune(gpu, c, w, { ...opts, log });
  assert.deepEqual(afterFirst, [name]);
  assert.deepEqual(r.map((x) => x.name), [name, att]);
  for (const x of r) {
    assert.ok(x.variants.length >= 2 && x.variants.every((v) => v.error === null), x.name);
  }
  assert.match(
    lines.join("\n"),
    /tuning 2 kernel shapes[\s\S]*tune 1\/2 matvec_q q3g32 64x128[\s\S]*tune 2\/2 attention h4/,
  );
  assert.deepEqual(gpu.tuned.get(name), r[0].shape);
  assert.deepEqual(gpu.tunedAttention.get(att), r[1].shape);
  const file = readTuneCache(path);
  assert.deepEqual(tunedFor(file, gpuAdapterId(gpu)).get(name), r[0].shape);
  assert.deepEqual(tunedAttentionFor(file, gpuAdapterId(gpu)).get(att), r[1].shape);
  // the next load finds it cached: nothing to tune; LOWBIT_TUNE=0 turns tuning off
  const again = await namedGpu("test GPU C");
  loadTunedShapes(again, path);
  assert.deepEqual(await autoTune(again, c, w, opts), []);
  const off = await namedGpu("test GPU D");
  off.tuneCache = path;
  Deno.env.set("LOWBIT_TUNE", "0");
  assert.deepEqual(await autoTune(off, c, w, opts), []);
  Deno.env.delete("LOWBIT_TUNE");
  assert.equal((await autoTune(off, c, w, opts)).length, 2);
}
