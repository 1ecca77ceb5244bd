/**
 * The dense (f32/f16) matrix kernels in the tuner (kernels/tune_dense.ts) and their cache entries
 * (kernels/dense_key.ts, kernels/tune_cache.ts) on lavapipe: every candidate equals the float64
 * reference on odd shapes (37 rows, K = 100: an odd count of vec4s, the f16 texture's padded last
 * texel) for f32, f16 and f16p, in the texture layout (testGpu) and the GPU buffer layout
 * (testGpuLayout: the decode matrix-vector kernel and the batched steps' lane kernel), with every
 * epilogue the forward plans run (store, add, gateup, qkv; the norm fused where they fuse it); a
 * wrong variant is rejected and never chosen; keys print and parse back and shapes are checked
 * against the kernels and the device; the plan lists a model's dense kernels; entries round-trip
 * through the cache beside the other kernels', the forward plan's Builder compiles the tuned
 * shapes, the first run on a GPU tunes a dense model's kernels, and a corrupt or impossible entry
 * is ignored with one warning.
 */
import assert from "node:assert/strict";
import type { DenseFormat } from "../kernels/common.ts";
import {
  denseKernelShape,
  type DenseKey,
  denseKeyString,
  denseShapeProblem,
  parseDenseKey,
} from "../kernels/dense_key.ts";
import type { Epilogue } from "../kernels/epilogue.ts";
import { Gpu } from "../kernels/gpu.ts";
import {
  denseCandidates,
  type DenseJob,
  type DenseSpace,
  type DenseTuneOptions,
  tuneDenseJob,
} from "../kernels/tune_dense.ts";
import {
  gpuAdapterId,
  loadTunedShapes,
  readTuneCache,
  saveTuned,
  TUNE_CACHE_VERSION,
  tunedFor,
} from "../kernels/tune_cache.ts";
import { describeShape, type TunedShape } from "../kernels/tune_key.ts";
import { tunedEntries } from "../kernels/tuner.ts";
import { Builder } from "../runtime/model/forward.ts";
import { allocDense } from "../runtime/model/gpu_weights.ts";
import { createRunState, type RunState } from "../runtime/model/run_state.ts";
import { autoTune, densePlan, layerShapes, type PlanWeights } from "../runtime/model/tune_plan.ts";
import { tinyConfig } from "./synthetic.ts";
import { testGpu, testGpuLayout, withTempDir } from "./helpers.ts";

const HD = 8, NH = 4, NKV = 2; // qkv: head dim, heads, KV heads: 64 rows
const QKV_ROWS = (NH + 2 * NKV) * HD;
const qkv: Epilogue = { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: true };
const store = (N: number): Epilogue => ({ kind: "store", offset: 0, ld: N });
const add: Epilogue = { kind: "add" };
const gateup = (hidden: number): Epilogue => ({ kind: "gateup", hidden });
/** K = 100: 25 vec4s (odd), 13 f16 texels a row, the last half padding. */
const K = 100;

/** A key over `e` (buffer weights, no norm, one token, x in storage by default). */
function key(
  k: Partial<DenseKey> & Pick<DenseKey, "family" | "format" | "rows">,
  e: Epilogue,
): DenseKey {
  return { K, tokens: 1, norm: false, weights: "buffer", xUniform: false, epilogue: e.kind, ...k };
}

/** A job with the runtime's heuristic shape as the default. */
function job(gpu: Gpu, k: DenseKey, e: Epilogue): DenseJob {
  return { key: k, epilogue: e, default: denseKernelShape(gpu, k, false) };
}

/** One timed dispatch each: the test is the check, not the timing. */
const FAST: DenseTuneOptions = { dispatches: 1, repeats: 1 };

/** Tunes and asserts that every variant ran and matched the reference. */
async function allCorrect(gpu: Gpu, j: DenseJob, space: DenseTuneOptions["space"]) {
  const r = await tuneDenseJob(gpu, j, { ...FAST, space });
  assert.ok(r.variants.length >= 2, `${r.name}: only ${r.variants.length} variants`);
  assert.deepEqual(r.variants[0].shape, j.default, "the heuristic shape is tried first");
  for (const v of r.variants) {
    assert.equal(v.error, null, `${r.name} ${describeShape(v.shape)}: ${v.error}`);
    assert.ok(Number.isFinite(v.us) && v.us > 0, `${r.name}: time ${v.us}`);
  }
  assert.ok(r.best >= 0 && r.shape !== null && Number.isFinite(r.defaultUs));
  return r;
}

Deno.test("dense tuner: every texture-layout candidate equals the float64 reference", async () => {
  const gpu = await testGpu();
  const tex = { weights: "texture" as const };
  // the whole CPU space (upt 2..16) on f32 store+norm, x and g uniform
  const a = key(
    { family: "matvec", format: "f32", rows: 37, norm: true, xUniform: true, ...tex },
    store(37),
  );
  const ra = await allCorrect(gpu, job(gpu, a, store(37)), undefined);
  assert.deepEqual(ra.variants.map((v) => v.shape.upt), [1, 2, 4, 8, 16]);
  assert.ok(ra.variants.every((v) => v.shape.tpr === 1 && v.shape.upw === 8 * v.shape.upt));
  // f16 (the texture layout of both f16 formats): gateup+norm, qkv+norm with x uniform, add
  const cases: [DenseFormat, Epilogue, number, boolean, boolean, number][] = [
    ["f16", gateup(29), 58, true, false, 16],
    ["f16p", qkv, QKV_ROWS, true, true, 2],
    ["f16", add, 37, false, true, 8],
  ];
  for (const [format, e, rows, norm, xUniform, upt] of cases) {
    const k = key({ family: "matvec", format, rows, norm, xUniform, ...tex }, e);
    await allCorrect(gpu, job(gpu, k, e), { upt: [upt] });
  }
});

Deno.test("dense tuner: every GPU-layout candidate (matvec, lane) equals the reference", async () => {
  const gpu = await testGpuLayout();
  const f16: DenseFormat = gpu.shaderF16 ? "f16" : "f16p";
  // decode: every epilogue, the norm fused where the plan fuses it; tpr 8 and 16 (K has 25
  // vec4s: at tpr 16 a thread has one or two), upw 2..8, beside the heuristic (tpr 8 upw 32)
  const mv: [DenseFormat, Epilogue, number, boolean, Partial<DenseSpace>][] = [
    ["f32", store(37), 37, true, { tpr: [8, 16], slots: [4] }],
    [f16, qkv, QKV_ROWS, true, { tpr: [16], slots: [2] }],
    ["f16p", gateup(29), 58, true, { tpr: [8], slots: [8] }],
    ["f32", add, 37, false, { tpr: [16], slots: [4] }],
  ];
  for (const [format, e, rows, norm, space] of mv) {
    await allCorrect(gpu, job(gpu, key({ family: "matvec", format, rows, norm }, e), e), space);
  }
  // batched steps: the lane kernel at the plan's 8 rows and at odd counts (its cost grows with
  // the rows, unrolled: 32 are left to the Builder's test)
  const lane: [DenseFormat, Epilogue, number, number][] = [
    [f16, gateup(29), 58, 3],
    ["f32", qkv, QKV_ROWS, 5],
    ["f16p", add, 37, 8],
    [f16, store(37), 37, 2],
  ];
  for (const [format, e, rows, tokens] of lane) {
    const k = key({ family: "matmul_lane", format, rows, tokens }, e);
    const r = await allCorrect(gpu, job(gpu, k, e), { tpr: [8], slots: [4] });
    assert.ok(r.variants.every((v) => v.shape.tt === tokens), r.name);
  }
});

Deno.test("dense tuner: a wrong variant is rejected and never chosen, however fast", async () => {
  // texture f16: variant 1 adds 1 to every output and is the "fastest"; variant 2 does not compile
  const cpu = await testGpu();
  const t = key({ family: "matvec", format: "f16", rows: 37, weights: "texture" }, store(37));
  const rt = await tuneDenseJob(cpu, job(cpu, t, store(37)), {
    ...FAST,
    space: { upt: [2, 4] },
    transformWgsl: (w, _s, i) =>
      i === 1
        ? w.replace("= acc.x;", "= acc.x + 1.0;")
        : i === 2
        ? w.replace("fn main(", "fn main(oops ")
        : w,
    time: (_s, i) => (i === 1 ? 1 : 10 + i),
  });
  assert.equal(rt.variants.length, 3);
  assert.match(rt.variants[1].error ?? "", /wrong output: y\[\d+\]/);
  assert.match(rt.variants[2].error ?? "", /does not run/);
  assert.ok(rt.variants.slice(1).every((v) => Number.isNaN(v.us)));
  assert.equal(rt.best, 0);
  assert.deepEqual(tunedEntries([rt]), [[rt.name, {
    ...rt.variants[0].shape,
    us: 10,
    defaultUs: 10,
  }]]);
  // buffers: a variant that skips the last vec4 of K (of 25) is caught
  const layout = await testGpuLayout();
  const b = key({ family: "matvec", format: "f32", rows: 37, norm: true }, store(37));
  const rb = await tuneDenseJob(layout, job(layout, b, store(37)), {
    ...FAST,
    space: { tpr: [8], slots: [4] },
    transformWgsl: (w, _s, i) => {
      if (i !== 1) return w;
      const out = w.replace("for (var k = t; k < 25u;", "for (var k = t; k < 24u;");
      assert.notEqual(out, w, "the kernel loops over K as the test expects");
      return out;
    },
    time: (_s, i) => 10 - i,
  });
  assert.equal(rb.variants.length, 2);
  assert.match(rb.variants[1].error ?? "", /wrong output: y\[\d+\]/);
  assert.equal(rb.best, 0);
  // the lane kernel's qkv outputs are checked too: a wrong q is caught
  const l = key({ family: "matmul_lane", format: "f32", rows: QKV_ROWS, tokens: 3 }, qkv);
  const rl = await tuneDenseJob(layout, job(layout, l, qkv), {
    ...FAST,
    space: { tpr: [8], slots: [4] },
    transformWgsl: (w, _s, i) => (i === 1 ? w.replace("q[o] = v.x;", "q[o] = v.x * 0.5;") : w),
    time: (_s, i) => 10 - i,
  });
  assert.equal(rl.variants.length, 2);
  assert.match(rl.variants[1].error ?? "", /wrong output: q\[\d+\]/);
  assert.equal(rl.best, 0);
  assert.deepEqual(rl.shape, rl.variants[0].shape);
});

Deno.test("dense keys: print and parse back; shapes are checked against kernels and device", () => {
  const m = key({ family: "matvec", format: "f16", rows: 576, K: 1536, norm: true }, gateup(288));
  assert.equal(denseKeyString(m), "matvec f16 576x1536 gateup+norm buffer");
  assert.deepEqual(parseDenseKey(denseKeyString(m)), m);
  const l = key(
    { family: "matmul_lane", format: "f16", rows: 576, K: 1536, tokens: 8 },
    gateup(288),
  );
  assert.equal(denseKeyString(l), "matmul_lane f16 576x1536 b8 gateup buffer");
  assert.deepEqual(parseDenseKey(denseKeyString(l)), l);
  const t = key({
    family: "matvec",
    format: "f16p",
    rows: 37,
    weights: "texture",
    xUniform: true,
    norm: true,
  }, store(37));
  assert.equal(denseKeyString(t), "matvec f16p 37x100 store+norm texture+xu");
  assert.deepEqual(parseDenseKey(denseKeyString(t)), t);
  for (
    const bad of [
      "matvec f16 37x100 qkv buffer", // a pair epilogue over odd rows
      "matvec f16 64x102 add buffer", // K not a multiple of 4
      "matvec f16 64x100 b1 add buffer", // matvec takes no row count
      "matmul_lane f16 64x100 add buffer", // the lane kernel needs one
      "matmul_lane f16 64x100 b33 add buffer", // beyond the lane kernel's 32
      "matmul_lane f16 64x100 b8 add+norm buffer", // no fused norm
      "matmul_lane f16 64x100 b8 add texture", // buffers only
      "matvec f16 64x100 add buffer+xu", // uniform x needs textures
      "matvec bf16 64x100 add buffer",
      "matvec f16 064x100 add buffer",
      "matvec_q q4g32 64x64 b1 store buffer",
    ]
  ) {
    assert.equal(parseDenseKey(bad), null, bad);
  }
  const limits = { maxComputeInvocationsPerWorkgroup: 256, maxComputeWorkgroupStorageSize: 16384 };
  const p = (k: DenseKey, s: TunedShape) => denseShapeProblem(k, s, limits);
  assert.match(p(m, { tpr: 24, upw: 4, upt: 1 })!, /power of two/);
  assert.match(p(m, { tpr: 8, upw: 3, upt: 1 })!, /fused norm needs tpr·upw a power of two/);
  assert.equal(p({ ...m, norm: false }, { tpr: 8, upw: 3, upt: 1 }), null);
  assert.match(p(m, { tpr: 32, upw: 4, upt: 2 })!, /upt = 1/);
  assert.match(p(m, { tpr: 32, upw: 4, upt: 1, tt: 8 })!, /no tt/);
  assert.match(
    p(m, { tpr: 64, upw: 8, upt: 1 })!,
    /512 threads per workgroup exceed the device's 256/,
  );
  // the fused norm's x (4 bytes an input) and sums (8 a thread): 4·4096 + 8·64 > 16 KiB
  assert.match(
    p({ ...m, K: 4096 }, { tpr: 64, upw: 1, upt: 1 })!,
    /16896 bytes of workgroup memory/,
  );
  assert.match(p(l, { tpr: 32, upw: 4, upt: 1, tt: 4 })!, /needs tt = 8/);
  assert.match(p(l, { tpr: 1, upw: 4, upt: 1, tt: 8 })!, /power of two ≥ 2/);
  // the lane kernel's sums: WG·tt·8 bytes (64 threads × 32 rows = 16 KiB fits, 128 does not)
  const l32 = { ...l, tokens: 32 };
  assert.equal(p(l32, { tpr: 32, upw: 2, upt: 1, tt: 32 }), null);
  assert.match(p(l32, { tpr: 32, upw: 4, upt: 1, tt: 32 })!, /32768 bytes of workgroup memory/);
  assert.match(p(t, { tpr: 2, upw: 16, upt: 2 })!, /tpr = 1/);
  assert.match(p(t, { tpr: 1, upw: 12, upt: 8 })!, /no multiple of upt/);
  assert.match(p(t, { tpr: 1, upw: 8 * 512, upt: 2 })!, /2048 threads/);
  assert.equal(p(t, { tpr: 1, upw: 16, upt: 2 }), null);
  assert.match(p(m, { tpr: "32" as unknown as number, upw: 4, upt: 1 })!, /integers/);
});

Deno.test("dense tuner: candidates are valid, unique, heuristic first, within the limits", async () => {
  const cpu = await testGpu(), layout = await testGpuLayout();
  const f16: DenseFormat = "f16p";
  const tex = key(
    { family: "matvec", format: f16, rows: 1376, K: 256, weights: "texture" },
    gateup(688),
  );
  const gpuKeys = [
    key({ family: "matvec", format: f16, rows: 1376, K: 2048, norm: true }, gateup(688)),
    key({ family: "matmul_lane", format: f16, rows: 1376, K: 2048, tokens: 8 }, gateup(688)),
    key({ family: "matmul_lane", format: f16, rows: 1376, K: 2048, tokens: 32 }, gateup(688)),
  ];
  for (const [gpu, k] of [[cpu, tex], ...gpuKeys.map((k) => [layout, k] as const)] as const) {
    const def = denseKernelShape(gpu, k, false);
    const list = denseCandidates(gpu, k, def);
    const name = denseKeyString(k);
    assert.deepEqual(list[0], def, name);
    const names = list.map(describeShape);
    assert.equal(new Set(names).size, names.length, `${name}: no duplicates`);
    for (const s of list) {
      assert.equal(denseShapeProblem(k, s, gpu.device.limits), null, describeShape(s));
    }
    const rest = list.slice(1);
    if (k.weights === "texture") {
      // the heuristic (4 row pairs a thread), then the others of 2..16
      assert.deepEqual(list.map((s) => s.upt), [4, 2, 8, 16], name);
      assert.ok(list.every((s) => s.tpr === 1 && s.upw === 8 * s.upt), name);
      continue;
    }
    for (const s of rest) {
      const threads = s.tpr * s.upw;
      assert.ok([8, 16, 32, 64, 128].includes(s.tpr) && s.upw >= 1 && s.upw <= 8, describeShape(s));
      assert.ok(threads >= 32 && threads <= 1024 && s.upt === 1, describeShape(s));
      if (k.family === "matmul_lane") {
        assert.equal(s.tt, k.tokens);
        assert.ok(8 * threads * k.tokens <= gpu.device.limits.maxComputeWorkgroupStorageSize);
      }
    }
    // 5 tpr × 4 upw but tpr 8 upw 1, 2 and tpr 16 upw 1 (under 32 threads) and the heuristic
    // (tpr 64 upw 4; tpr 32 upw 4 for 8 rows, upw 2 for 32); at 8 rows 1024 threads' sums
    // (64 KiB) pass lavapipe's 32 KiB, at 32 rows 32..128 threads fit (11 pairs)
    const want = k.family === "matvec" ? 16 : k.tokens === 8 ? 15 : 10;
    assert.equal(rest.length, want, `${name}: ${rest.map(describeShape).join("; ")}`);
  }
});

/** The dense matrices of `c` (one layer per config layer), `weights`-resident, one chunk each. */
function denseWeights(format: DenseFormat, weights: "buffer" | "texture"): PlanWeights {
  const c = tinyConfig;
  const m = (rows: number, K: number) => ({
    format,
    K,
    weights,
    chunks: [{ rowStart: 0, rows }],
  });
  const layer = layerShapes(c, m);
  return { layers: [layer, layer], lmHead: m(c.vocabSize, c.dim) };
}

Deno.test("dense plan: every dense matrix's decode kernel, the lane kernel on GPU layouts", async () => {
  const c = tinyConfig; // dim 64, hidden 128, 4 heads over 2 of 16: qkv 128 rows
  const cpu = await testGpu(), layout = await testGpuLayout();
  const names = (jobs: DenseJob[]) => jobs.map((j) => denseKeyString(j.key));
  assert.deepEqual(names(densePlan(cpu, c, denseWeights("f16", "texture"))), [
    "matvec f16 128x64 qkv+norm texture+xu",
    "matvec f16 64x64 add texture+xu",
    "matvec f16 256x64 gateup+norm texture+xu",
    "matvec f16 256x64 store+norm texture+xu", // beside w13: the same weights' shape
    "matvec f16 64x128 add texture+xu",
  ]);
  const g = densePlan(layout, c, denseWeights("f32", "buffer"), { batchRows: [8, 32] });
  assert.deepEqual(names(g).slice(0, 6), [
    "matvec f32 128x64 qkv+norm buffer",
    "matmul_lane f32 128x64 b8 qkv buffer",
    "matmul_lane f32 128x64 b32 qkv buffer",
    "matvec f32 64x64 add buffer",
    "matmul_lane f32 64x64 b8 add buffer",
    "matmul_lane f32 64x64 b32 add buffer",
  ]);
  assert.equal(g.length, 15, names(g).join("\n"));
  assert.ok(names(g).includes("matmul_lane f32 256x64 b32 store buffer"));
  for (const gpu of [cpu, layout]) {
    for (const j of densePlan(gpu, c, denseWeights("f16", "buffer"))) {
      assert.deepEqual(j.default, denseKernelShape(gpu, j.key, false));
    }
  }
  // packed, missing and chunkless matrices are not the dense plan's
  const mixed = denseWeights("f32", "buffer");
  const q = { ...mixed.lmHead, format: "q", bits: 4 as const, groupSize: 32 };
  const none = { ...mixed.lmHead, format: "missing" };
  const only = {
    layers: [{ wqkv: q, wo: none, w13: { ...q, chunks: [] }, w2: q }],
    lmHead: mixed.lmHead,
  };
  assert.deepEqual(names(densePlan(layout, c, only, { batchRows: [] })), [
    "matvec f32 256x64 store+norm buffer",
  ]);
});

/** A Gpu on the test device under its own adapter name, nothing tuned yet. */
async function namedGpu(name: string, isCpu = false): Promise<Gpu> {
  const g = await testGpu();
  return new Gpu(g.device, name, g.shaderF16, g.timestamps, isCpu);
}

function releaseState(state: RunState): void {
  for (const buf of Object.values(state)) if (buf instanceof GPUBuffer) buf.destroy();
  for (const kv of [...state.kcache, ...state.vcache]) kv.destroy();
}

Deno.test("dense tune cache: round-trips beside the other kernels; the Builder compiles it", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/tune.json`;
    const c = tinyConfig;
    const gpu = await namedGpu("test adapter dense");
    const cpu = await namedGpu("test adapter dense CPU", true);
    const mv = "matvec f32 64x64 add buffer";
    const lane = "matmul_lane f32 64x64 b8 add buffer";
    const tex = "matvec f32 64x64 add texture+xu";
    const q = "matvec_q q4g32 64x64 b1 store buffer";
    const entries: [string, TunedShape & { us?: number }][] = [
      [mv, { tpr: 16, upw: 4, upt: 1, us: 3.5 }],
      [lane, { tpr: 16, upw: 2, upt: 1, tt: 8 }],
      [q, { tpr: 16, upw: 4, upt: 2 }],
    ];
    saveTuned(path, gpuAdapterId(gpu), entries);
    saveTuned(path, gpuAdapterId(cpu), [[tex, { tpr: 1, upw: 16, upt: 2 }]]);
    const file = readTuneCache(path, { warn: (w) => assert.fail(w) });
    assert.equal(file.version, TUNE_CACHE_VERSION);
    assert.deepEqual(file.adapters[gpuAdapterId(gpu)].shapes, Object.fromEntries(entries));
    assert.deepEqual(tunedFor(file, gpuAdapterId(gpu)).get(mv), { tpr: 16, upw: 4, upt: 1 });
    loadTunedShapes(gpu, path, (w) => assert.fail(w));
    loadTunedShapes(cpu, path, (w) => assert.fail(w));
    // the lookup: the tuned shape for its key, the heuristic for the others and untuned
    const mk = parseDenseKey(mv)!;
    assert.deepEqual(denseKernelShape(gpu, mk), { tpr: 16, upw: 4, upt: 1 });
    assert.deepEqual(denseKernelShape(gpu, mk, false), { tpr: 8, upw: 32, upt: 1 });
    assert.deepEqual(denseKernelShape(gpu, { ...mk, rows: 68 }), { tpr: 8, upw: 32, upt: 1 });
    // the forward plan's Builder compiles the tuned shapes (and the heuristic where none is)
    for (const [g, weights] of [[gpu, "buffer"], [cpu, "texture"]] as const) {
      const state = createRunState(g, c, 16, 8, 1, "f32");
      const W = allocDense(g, "wo", c.dim, c.nHeads * c.headDim, "f32", weights);
      try {
        const label = (b: Builder, decode: boolean): string =>
          (decode
            ? b.matvec(W, add, { x: state.att, y: state.x }, null, "wo")
            : b.matmul(W, add, { x: state.att, y: state.x }, "wo"))[0].pipeline.label;
        if (weights === "buffer") {
          assert.equal(label(new Builder(g, state), true), "matvec_f32_64x64_add_t16u4");
          assert.equal(label(new Builder(g, state, 8), false), "matmul_f32_64x64_add_t16u2b8");
          assert.equal(label(new Builder(g, state, 32), false), "matmul_f32_64x64_add_t32u2b32");
        } else {
          assert.equal(label(new Builder(g, state), true), "matvec_f32T_64x64_b1_add_u16p2U");
        }
      } finally {
        releaseState(state);
        for (const ch of W.chunks) ch.data.destroy();
      }
    }
  });
});

Deno.test("dense tune cache: a corrupt or impossible entry is ignored with a warning", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/tune.json`;
    const gpu = await namedGpu("test adapter dense B");
    const id = gpuAdapterId(gpu);
    const file = (shapes: Record<string, unknown>) =>
      JSON.stringify({ version: TUNE_CACHE_VERSION, adapters: { [id]: { shapes } } });
    const mv = "matvec f16 64x64 store+norm buffer";
    const lane = "matmul_lane f16 64x64 b32 add buffer";
    const tex = "matvec f16 64x64 add texture";
    const ok = { [mv]: { tpr: 16, upw: 4, upt: 1 } };
    const cases: [string, string, RegExp][] = [
      ["tpr not a power of two", file({ [mv]: { tpr: 12, upw: 4, upt: 1 } }), /power of two/],
      ["a norm over 48 threads", file({ [mv]: { tpr: 16, upw: 3, upt: 1 } }), /fused norm/],
      ["tpr a string", file({ [mv]: { tpr: "16", upw: 4, upt: 1 } }), /integers/],
      ["no upt", file({ [mv]: { tpr: 16, upw: 4 } }), /integers/],
      ["tt on matvec", file({ [mv]: { tpr: 16, upw: 4, upt: 1, tt: 8 } }), /no tt/],
      [
        "lane tt not its rows",
        file({ ...ok, [lane]: { tpr: 16, upw: 2, upt: 1, tt: 8 } }),
        /tt = 32/,
      ],
      [
        "lane beyond workgroup memory",
        file({ [lane]: { tpr: 128, upw: 8, upt: 1, tt: 32 } }),
        /exceed the device/,
      ],
      ["texture tpr 2", file({ [tex]: { tpr: 2, upw: 16, upt: 2 } }), /tpr = 1/],
      [
        "too many threads",
        file({ [tex]: { tpr: 1, upw: 1 << 20, upt: 1 } }),
        /threads per workgroup/,
      ],
      [
        "times not numbers",
        file({ [mv]: { tpr: 16, upw: 4, upt: 1, us: "fast" } }),
        /us is not a number/,
      ],
      ["an impossible key", file({ "matvec f16 63x64 gateup buffer": {} }), /not a kernel key/],
      [
        "a lane key with a norm",
        file({ "matmul_lane f16 64x64 b8 add+norm buffer": {} }),
        /not a kernel/,
      ],
      ["an entry not an object", file({ [mv]: 32 }), /not an object/],
    ];
    for (const [what, text, why] of cases) {
      Deno.writeTextFileSync(path, text);
      gpu.tuned.set("stale", { tpr: 1, upw: 8, upt: 1 });
      const warns: string[] = [];
      loadTunedShapes(gpu, path, (w) => warns.push(w));
      assert.equal(warns.length, 1, `${what}: ${warns.join(" | ")}`);
      assert.ok(warns[0].includes(path), `${what}: the warning names the file: ${warns[0]}`);
      assert.match(warns[0], why, what);
      assert.equal(gpu.tuned.size, 0, `${what}: nothing is used`);
    }
    // the same entries, valid, are used
    const good = {
      ...ok,
      [lane]: { tpr: 16, upw: 2, upt: 1, tt: 32 },
      [tex]: { tpr: 1, upw: 16, upt: 2 },
    };
    Deno.writeTextFileSync(path, file(good));
    loadTunedShapes(gpu, path, (w) => assert.fail(w));
    assert.deepEqual(Object.fromEntries(gpu.tuned), good);
  });
});

Deno.test("first-run tuning: a dense model's kernels are tuned on a GPU and cached", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/tune.json`;
    const c = { ...tinyConfig, nLayers: 1 };
    const w = denseWeights("f32", "buffer");
    w.layers = w.layers.slice(0, 1);
    const opts = {
      batchRows: [2],
      prefill: false,
      prefillTokens: 2,
      dense: { space: { tpr: [16], slots: [2] } },
      attention: { space: { wg: [16] }, position: 40 },
      dispatches: 1,
      repeats: 1,
      log: () => {},
    };
    const saved = Deno.env.get("LOWBIT_TUNE");
    Deno.env.delete("LOWBIT_TUNE");
    try {
      const gpu = await namedGpu("test GPU dense");
      gpu.tuneCache = path;
      const r = await autoTune(gpu, c, w, opts);
      const dense = densePlan(gpu, c, w, opts).map((j) => denseKeyString(j.key));
      assert.equal(dense.length, 10, "5 matrices × decode and 2 rows");
      // the dense kernels, then attention (decode, and the batched steps' kernel)
      assert.deepEqual(r.map((x) => x.name).slice(0, 10), dense);
      assert.equal(r.length, 12);
      for (const x of r) {
        assert.ok(x.shape !== null && x.variants.every((v) => v.error === null), x.name);
      }
      const file = tunedFor(readTuneCache(path), gpuAdapterId(gpu));
      for (const [i, name] of dense.entries()) {
        assert.deepEqual(gpu.tuned.get(name), r[i].shape);
        assert.deepEqual(file.get(name), r[i].shape);
      }
      // the next load finds them cached: nothing to tune
      const again = await namedGpu("test GPU dense");
      loadTunedShapes(again, path);
      assert.deepEqual(await autoTune(again, c, w, opts), []);
    } finally {
      if (saved !== undefined) Deno.env.set("LOWBIT_TUNE", saved);
    }
  });
});
