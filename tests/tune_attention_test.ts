/**
 * The attention kernel in the tuner (kernels/tune_attention.ts) and its cache entries
 * (kernels/attention_key.ts, kernels/tune_cache.ts) on lavapipe: every candidate equals the
 * float64 reference on odd shapes (GQA, head dim 8 and 16, f32 and f16 cache, texture and buffer
 * layouts, decode and prefill), a wrong variant is rejected and never chosen, keys print and
 * parse back, attention entries round-trip through the cache beside the quantized ones and the
 * forward plan's Builder uses them, and a corrupt or impossible entry is ignored with a warning.
 */
import assert from "node:assert/strict";
import { attentionShape } from "../kernels/attention.ts";
import {
  attentionKernelShape,
  type AttentionKey,
  attentionKeyString,
  attentionShapeProblem,
  describeAttentionShape,
  parseAttentionKey,
} from "../kernels/attention_key.ts";
import { Gpu } from "../kernels/gpu.ts";
import {
  attentionCandidates,
  type AttentionJob,
  type AttentionTuneOptions,
  tuneAttentionJob,
} from "../kernels/tune_attention.ts";
import {
  gpuAdapterId,
  loadTunedShapes,
  readTuneCache,
  saveTuned,
  TUNE_CACHE_VERSION,
  tunedAttentionFor,
  tunedFor,
} from "../kernels/tune_cache.ts";
import { tunedEntries } from "../kernels/tuner.ts";
import { Builder } from "../runtime/model/forward.ts";
import { createRunState, defaultKvType } from "../runtime/model/run_state.ts";
import { attentionPlan } from "../runtime/model/tune_plan.ts";
import { tinyConfig } from "./synthetic.ts";
import { testGpu, testGpuLayout, withTempDir } from "./helpers.ts";

/** GQA 6/2 (three query heads per KV head), as the runtime builds its key. */
function key(gpu: Gpu, k: Partial<AttentionKey> & Pick<AttentionKey, "headDim">): AttentionKey {
  const kv = gpu.isCpu ? "texture" : "buffer";
  const decode = k.decode ?? true;
  return {
    family: "attention",
    nHeads: 6,
    nKvHeads: 2,
    kvType: "f32",
    kv,
    decode,
    qUniform: kv === "texture" && decode,
    ...k,
  };
}

function job(gpu: Gpu, k: AttentionKey): AttentionJob {
  return { key: k, default: attentionKernelShape(gpu, k, false) };
}

/**
 * Position 70: 71 keys, several chunks of every wg up to 64 and a multiple of none; a prefill of
 * 5 tokens (lengths 67..71). One timed dispatch each: the test is the check, not the timing.
 */
const SMALL: AttentionTuneOptions = { position: 70, prefillTokens: 5, dispatches: 1, repeats: 1 };

Deno.test("attention tuner: every candidate equals the float64 reference on odd shapes", async () => {
  const cases: [Gpu, AttentionKey, AttentionTuneOptions["space"]][] = [];
  const cpu = await testGpu(), layout = await testGpuLayout();
  // textures: the whole CPU space (wg 4..32 × gq 1, 3), head dim 8, f32, decode with q uniform
  cases.push([cpu, key(cpu, { headDim: 8 }), undefined]);
  // textures: head dim 16, f16 cache, prefill
  cases.push([cpu, key(cpu, { headDim: 16, kvType: "f16", decode: false }), { wg: [4, 16] }]);
  // buffers (the GPU layout): head dim 16, f32, prefill; head dim 8, f16, decode
  // (wg 128: one chunk of 71 keys, threads past the last key)
  cases.push([layout, key(layout, { headDim: 16, decode: false }), { wg: [4, 32] }]);
  cases.push([layout, key(layout, { headDim: 8, kvType: "f16" }), { wg: [16, 128] }]);
  for (const [gpu, k, space] of cases) {
    const j = job(gpu, k);
    const r = await tuneAttentionJob(gpu, j, { ...SMALL, space });
    assert.ok(r.variants.length >= 3, `${r.name}: only ${r.variants.length} variants`);
    assert.deepEqual(r.variants[0].shape, j.default, "the heuristic shape is tried first");
    for (const v of r.variants) {
      const what = `${r.name} ${describeAttentionShape(v.shape)}`;
      assert.equal(v.error, null, `${what}: ${v.error}`);
      assert.ok(Number.isFinite(v.us) && v.us > 0, `${what}: time ${v.us}`);
    }
    assert.ok(r.best >= 0 && r.shape !== null && Number.isFinite(r.defaultUs));
    if (space === undefined) {
      const gqs = new Set(r.variants.map((v) => v.shape.gq));
      assert.deepEqual([...gqs].sort(), [1, 3], `${r.name}: both head groups`);
      assert.equal(r.variants.length, 8, `${r.name}: 4 wg × 2 gq`);
    }
  }
});

/** Drops the last key (the token itself) from the softmax: off by one key in 71. */
function dropLastKey(wgsl: string): string {
  const out = wgsl.replace("let len = row.x + 1u;", "let len = row.x;");
  if (out === wgsl) throw new Error("the kernel no longer computes len as the test expects");
  return out;
}

Deno.test("attention tuner: a wrong variant is rejected and never chosen, however fast", async () => {
  for (const gpu of [await testGpu(), await testGpuLayout()]) {
    const k = key(gpu, { headDim: 8 });
    const j = job(gpu, k);
    const r = await tuneAttentionJob(gpu, j, {
      ...SMALL,
      space: { wg: [4, 16], gq: [j.default.gq] },
      // variant 1 misses one key of 71 and is the "fastest"; variant 2 does not compile
      transformWgsl: (w, _s, i) =>
        i === 1 ? dropLastKey(w) : i === 2 ? w.replace("fn main(", "fn main(oops ") : w,
      time: (_s, i) => (i === 1 ? 1 : 10 + i),
    });
    assert.equal(r.variants.length, 3, r.name);
    assert.match(r.variants[1].error ?? "", /wrong output: out\[\d+\]/, r.name);
    assert.match(r.variants[2].error ?? "", /does not run/, r.name);
    assert.ok(r.variants.slice(1).every((v) => Number.isNaN(v.us)));
    assert.equal(r.variants[0].error, null);
    assert.equal(r.best, 0, r.name);
    assert.deepEqual(r.shape, j.default);
    assert.deepEqual(tunedEntries([r]), [[r.name, { ...j.default, us: 10, defaultUs: 10 }]]);
  }
});

Deno.test("attention keys: print and parse back; shapes and candidates are checked", async () => {
  const k: AttentionKey = {
    family: "attention",
    nHeads: 32,
    nKvHeads: 8,
    headDim: 128,
    kvType: "f16",
    kv: "buffer",
    decode: true,
    qUniform: false,
  };
  assert.equal(attentionKeyString(k), "attention h32 kv8 d128 f16 buffer decode");
  assert.deepEqual(parseAttentionKey(attentionKeyString(k)), k);
  const t = { ...k, kv: "texture" as const, qUniform: true, kvType: "f32" as const };
  assert.equal(attentionKeyString(t), "attention h32 kv8 d128 f32 texture decode+qu");
  assert.deepEqual(parseAttentionKey(attentionKeyString(t)), t);
  const p = { ...k, decode: false };
  assert.deepEqual(parseAttentionKey("attention h32 kv8 d128 f16 buffer prefill"), p);
  for (
    const bad of [
      "attention h6 kv4 d8 f32 buffer decode", // 6 heads over 4 KV heads
      "attention h6 kv2 d7 f32 buffer decode", // odd head dim
      "attention h6 kv2 d8 f32 buffer decode+qu", // uniform q needs textures
      "attention h6 kv2 d8 f32 texture prefill+qu", // and decode
      "attention h6 kv2 d8 bf16 buffer decode",
      "attention h06 kv2 d8 f32 buffer decode",
    ]
  ) {
    assert.equal(parseAttentionKey(bad), null, bad);
  }
  const limits = { maxComputeInvocationsPerWorkgroup: 256, maxComputeWorkgroupStorageSize: 16384 };
  assert.match(attentionShapeProblem(k, { wg: 24, gq: 1 })!, /power of two/);
  assert.match(attentionShapeProblem(k, { wg: 32, gq: 2 })!, /one head: gq must be 1/);
  assert.match(attentionShapeProblem(t, { wg: 8, gq: 3 })!, /must divide/);
  assert.match(attentionShapeProblem(k, { wg: 512, gq: 1 }, limits)!, /threads per workgroup/);
  assert.match(attentionShapeProblem(t, { wg: 32, gq: 4 }, limits)!, /workgroup memory/);
  assert.equal(attentionShapeProblem(t, { wg: 8, gq: 2 }, limits), null);

  // the spaces: CPU textures wg 4..32 × gq with gq·headDim ≤ 64; GPU buffers wg 16..256, gq 1
  const cpu = await testGpu(), layout = await testGpuLayout();
  const ck = { ...key(cpu, { headDim: 16 }), nHeads: 8, nKvHeads: 1 };
  const list = attentionCandidates(cpu, ck, attentionShape(cpu, ck));
  assert.deepEqual(list[0], { wg: 8, gq: 4 }, "the heuristic first");
  const names = list.map(describeAttentionShape);
  assert.equal(new Set(names).size, names.length, "no duplicates");
  assert.deepEqual(names.slice(1, 5), ["wg 4 gq 1", "wg 8 gq 1", "wg 16 gq 1", "wg 32 gq 1"]);
  assert.deepEqual([...new Set(list.map((s) => s.gq))].sort(), [1, 2, 4]);
  const gk = key(layout, { headDim: 64 });
  assert.deepEqual(
    attentionCandidates(layout, gk, attentionShape(layout, gk)).map(describeAttentionShape),
    ["wg 64 gq 1", "wg 16 gq 1", "wg 32 gq 1", "wg 128 gq 1", "wg 256 gq 1"],
  );
});

Deno.test("attention plan: the run state's keys, decode and prefill, heuristic defaults", async () => {
  const c = tinyConfig; // 4 heads over 2, head dim 16
  const cpu = await testGpu(), layout = await testGpuLayout();
  const t = defaultKvType(cpu);
  const names = (jobs: AttentionJob[]) => jobs.map((j) => attentionKeyString(j.key));
  assert.deepEqual(names(attentionPlan(cpu, c)), [
    `attention h4 kv2 d16 ${t} texture decode+qu`,
    `attention h4 kv2 d16 ${t} texture prefill`,
  ]);
  assert.deepEqual(names(attentionPlan(layout, c, { kvType: "f32" })), [
    "attention h4 kv2 d16 f32 buffer decode",
    "attention h4 kv2 d16 f32 buffer prefill",
  ]);
  // the batched decode steps run the prefill kernel: it stays while they are tuned
  assert.equal(attentionPlan(layout, c, { prefill: false }).length, 2);
  assert.deepEqual(names(attentionPlan(layout, c, { prefill: false, batchRows: [] })), [
    `attention h4 kv2 d16 ${t} buffer decode`,
  ]);
  // nHeads·headDim = 18: q cannot be a vec4 uniform
  const odd = { ...c, nHeads: 3, nKvHeads: 1, headDim: 6 };
  assert.equal(names(attentionPlan(cpu, odd))[0], `attention h3 kv1 d6 ${t} texture decode`);
  for (const gpu of [cpu, layout]) {
    for (const j of attentionPlan(gpu, c)) assert.deepEqual(j.default, attentionShape(gpu, j.key));
  }
});

/** A GPU-layout Gpu on the test device under its own adapter name, nothing tuned yet. */
async function namedGpu(name: string): Promise<Gpu> {
  const g = await testGpu();
  return new Gpu(g.device, name, g.shaderF16, g.timestamps, false);
}

Deno.test("attention tune cache: round-trips beside the quantized entries; the Builder uses it", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/tune.json`;
    const gpu = await namedGpu("test adapter attention");
    const c = tinyConfig;
    const base = {
      family: "attention" as const,
      nHeads: c.nHeads,
      nKvHeads: c.nKvHeads,
      headDim: c.headDim,
      kvType: "f32" as const,
      kv: "buffer" as const,
      qUniform: false,
    };
    const decode: AttentionKey = { ...base, decode: true };
    const prefill: AttentionKey = { ...base, decode: false };
    const q = "matvec_q q4g32 64x64 b1 store buffer";
    const entries: [
      string,
      { wg: number; gq: number; us: number } | {
        tpr: number;
        upw: number;
        upt: number;
      },
    ][] = [
      [attentionKeyString(decode), { wg: 16, gq: 1, us: 3.5 }],
      [q, { tpr: 16, upw: 4, upt: 2 }],
    ];
    saveTuned(path, gpuAdapterId(gpu), entries);
    const file = readTuneCache(path, { warn: (w) => assert.fail(w) });
    assert.equal(file.version, TUNE_CACHE_VERSION);
    assert.deepEqual(file.adapters[gpuAdapterId(gpu)].shapes, Object.fromEntries(entries));
    assert.deepEqual([...tunedFor(file, gpuAdapterId(gpu)).keys()], [q]);
    assert.deepEqual(
      [...tunedAttentionFor(file, gpuAdapterId(gpu))],
      [[attentionKeyString(decode), { wg: 16, gq: 1 }]],
    );
    loadTunedShapes(gpu, path, (w) => assert.fail(w));
    assert.deepEqual(gpu.tuned.get(q), { tpr: 16, upw: 4, upt: 2 });
    // the lookup: the tuned shape for its key, the heuristic for the others and untuned
    assert.deepEqual(attentionKernelShape(gpu, decode), { wg: 16, gq: 1 });
    assert.deepEqual(attentionKernelShape(gpu, decode, false), { wg: 64, gq: 1 });
    assert.deepEqual(attentionKernelShape(gpu, prefill), { wg: 64, gq: 1 });
    // the forward plan's Builder compiles the tuned decode kernel and the heuristic prefill one
    const state = createRunState(gpu, c, 16, 4, 1, "f32");
    try {
      const b = new Builder(gpu, state);
      assert.equal(b.attention(c, 0, true).pipeline.label, "attention_4_2_16_w16");
      assert.equal(b.attention(c, 0).pipeline.label, "attention_4_2_16_w64");
    } finally {
      for (const buf of Object.values(state)) if (buf instanceof GPUBuffer) buf.destroy();
      for (const kv of [...state.kcache, ...state.vcache]) kv.destroy();
    }
  });
});

Deno.test("attention tune cache: a corrupt or impossible entry is ignored with a warning", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/tune.json`;
    const gpu = await namedGpu("test adapter attention B");
    const id = gpuAdapterId(gpu);
    const file = (shapes: Record<string, unknown>) =>
      JSON.stringify({ version: TUNE_CACHE_VERSION, adapters: { [id]: { shapes } } });
    const buf = "attention h6 kv2 d8 f32 buffer decode";
    const tex = "attention h6 kv2 d8 f16 texture decode+qu";
    const q = { "matvec_q q4g32 64x64 b1 store buffer": { tpr: 16, upw: 4, upt: 2 } };
    const cases: [string, string, RegExp][] = [
      ["wg not a power of two", file({ ...q, [buf]: { wg: 24, gq: 1 } }), /power of two/],
      ["wg a string", file({ [buf]: { wg: "32", gq: 1 } }), /power of two/],
      ["no gq", file({ [buf]: { wg: 32 } }), /gq must be an integer/],
      ["gq for buffers", file({ [buf]: { wg: 32, gq: 3 } }), /gq must be 1/],
      ["gq no divisor", file({ [tex]: { wg: 8, gq: 2 } }), /must divide/],
      ["too many threads", file({ [tex]: { wg: 1 << 16, gq: 1 } }), /threads per workgroup/],
      ["times not numbers", file({ [buf]: { wg: 32, gq: 1, us: "fast" } }), /us is not a number/],
      ["an impossible key", file({ "attention h6 kv4 d8 f32 buffer decode": {} }), /not a kernel/],
      ["an entry not an object", file({ [buf]: 32 }), /not an object/],
    ];
    for (const [what, text, why] of cases) {
      Deno.writeTextFileSync(path, text);
      gpu.tuned.set("stale", { tpr: 1, upw: 8, upt: 1 });
      gpu.tunedAttention.set("stale", { wg: 8, gq: 1 });
      const warns: string[] = [];
      loadTunedShapes(gpu, path, (w) => warns.push(w));
      assert.equal(warns.length, 1, `${what}: ${warns.join(" | ")}`);
      assert.ok(warns[0].includes(path), `${what}: the warning names the file: ${warns[0]}`);
      assert.match(warns[0], why, what);
      assert.equal(gpu.tuned.size + gpu.tunedAttention.size, 0, `${what}: nothing is used`);
    }
    // the same entries, valid, are used
    Deno.writeTextFileSync(path, file({ ...q, [buf]: { wg: 16, gq: 1 }, [tex]: { wg: 8, gq: 3 } }));
    loadTunedShapes(gpu, path, (w) => assert.fail(w));
    assert.equal(gpu.tuned.size, 1);
    assert.deepEqual(Object.fromEntries(gpu.tunedAttention), {
      [buf]: { wg: 16, gq: 1 },
      [tex]: { wg: 8, gq: 3 },
    });
  });
});
