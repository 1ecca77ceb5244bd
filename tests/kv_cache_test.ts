/**
 * The f16 KV cache (KvType in kernels/epilogue.ts): the qkv epilogue's packed writes and both
 * attention kernels' reads against float64 TypeScript references that round K and V to f16, with
 * the cache in storage buffers (GPU adapters) and in textures (CPU adapters), on odd shapes; then
 * on the real models, perplexity with the f16 cache within 0.1% of the f32 cache, and the
 * documented greedy text of stories260K with either cache.
 */
import assert from "node:assert/strict";
import type { Epilogue, KvSource, KvType } from "../kernels/epilogue.ts";
import { F16_MAX } from "../kernels/epilogue.ts";
import { matmulBindings, matmulGrid, matmulPipeline } from "../kernels/matmul.ts";
import {
  attentionGrid,
  attentionGroup,
  attentionPipeline,
  type AttentionVariant,
} from "../kernels/attention.ts";
import type { StepRow } from "../kernels/common.ts";
import type { Gpu } from "../kernels/gpu.ts";
import { loadModel } from "../runtime/model/load.ts";
import { generate } from "../runtime/model/generate.ts";
import { GREEDY } from "../runtime/model/model.ts";
import { createRunState } from "../runtime/model/run_state.ts";
import { kvCacheOption } from "../runtime/cli/cli.ts";
import { perplexity } from "../runtime/reference/perplexity.ts";
import {
  haveShared,
  maxAbsDiff,
  rng,
  sharedPath,
  stories260KGreedyText,
  testGpu,
  testGpuLayout,
} from "./helpers.ts";
import { Harness, kvHalves, kvUnhalves } from "./kernel_harness.ts";
import { tinyConfig } from "./synthetic.ts";

const gpu = await testGpu();

function randArray(r: () => number, n: number, scale = 1): Float32Array {
  return Float32Array.from({ length: n }, () => scale * r());
}

/** The spacing of f16 values around |x| (subnormals below 2⁻¹⁴). */
function f16Ulp(x: number): number {
  const a = Math.abs(x);
  return a < 2 ** -14 ? 2 ** -24 : 2 ** (Math.floor(Math.log2(a)) - 10);
}

/** What the f16 cache holds of x: clamped to f16's finite range, rounded to f16. */
const toF16 = (x: number) => Math.f16round(Math.min(F16_MAX, Math.max(-F16_MAX, x)));

/** A rotate-half RoPE table (ctx, headDim/2) of (cos, sin), f32 as the runtime stores it. */
function ropeTable(ctx: number, hd: number): Float32Array {
  const half = hd / 2, t = new Float32Array(ctx * hd);
  for (let p = 0; p < ctx; p++) {
    for (let i = 0; i < half; i++) {
      const f = p / Math.pow(10000, (2 * i) / hd);
      t[(p * half + i) * 2] = Math.cos(f);
      t[(p * half + i) * 2 + 1] = Math.sin(f);
    }
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// the qkv epilogue writing the f16 cache
// ---------------------------------------------------------------------------------------------

const NH = 6, NKV = 2;

/**
 * One matmul with the qkv epilogue over `ntok` tokens from position `pos` (kv "buffer": buffer
 * weights, the GPU kernel; "texture": texture weights and cache, the CPU kernel), the cache
 * read back and checked against the float64 products with bias and RoPE, clamped and rounded to
 * f16: within one f16 step (WGSL may round to either neighbour) plus the f32 products' error.
 * Some biases of 1e5 push K and V values past f16's range (the clamp). Rows not written keep
 * their contents bit for bit.
 */
async function qkvCase(h: Harness, kv: KvSource, hd: number, ntok: number, pos: number, seed = 1) {
  const r = rng(seed);
  const K = 52, half = hd / 2, qd = NH * hd, kvd = NKV * hd, rows = qd + 2 * kvd;
  const ctx = pos + ntok + 2;
  const w = randArray(r, rows * K), x = randArray(r, ntok * K, 2), bias = randArray(r, rows);
  // out-of-range values: K rows (before RoPE) and V rows of both KV heads
  for (const row of [qd + 1, qd + hd + half, qd + kvd + 2, qd + kvd + hd + 3]) bias[row] = 1e5;
  bias[qd + kvd + hd + half + 1] = -1e5;
  const rope = ropeTable(ctx, hd);
  const init = { k: randArray(r, ctx * kvd, 3), v: randArray(r, ctx * kvd, 3) };
  const want = { k: Float64Array.from(init.k, toF16), v: Float64Array.from(init.v, toF16) };
  const tol = { k: new Float64Array(ctx * kvd), v: new Float64Array(ctx * kvd) };
  for (let t = 0; t < ntok; t++) {
    const p = pos + t;
    const dot = (row: number) => {
      let s = 0, n = 0;
      for (let k = 0; k < K; k++) {
        s += w[row * K + k] * x[t * K + k];
        n += Math.abs(w[row * K + k] * x[t * K + k]);
      }
      return [s + bias[row], n];
    };
    for (let head = NH; head < NH + 2 * NKV; head++) {
      const isK = head < NH + NKV, kvh = head - (isK ? NH : NH + NKV);
      for (let i = 0; i < half; i++) {
        const ra = head * hd + i, rb = ra + half;
        let [a, na] = dot(ra), [b, nb] = dot(rb);
        if (isK) {
          const cs = rope[(p * half + i) * 2], sn = rope[(p * half + i) * 2 + 1];
          [a, b] = [a * cs - b * sn, b * cs + a * sn];
          na = nb = na + nb;
        }
        // f32 products, bias and RoPE: well under 1e-6 of the absolute sums
        const f32Tol = (n: number) => 1e-6 * (n + Math.abs(bias[ra]) + Math.abs(bias[rb]) + 1);
        const o = p * kvd + kvh * hd + i, dst = isK ? "k" : "v";
        for (const [j, val, n] of [[o, a, na], [o + half, b, nb]]) {
          want[dst][j] = toF16(val);
          tol[dst][j] = f32Tol(n) + f16Ulp(want[dst][j]); // and one f16 step
        }
      }
    }
  }
  const tex = kv === "texture";
  const epilogue: Epilogue = {
    kind: "qkv",
    nHeads: NH,
    nKvHeads: NKV,
    headDim: hd,
    bias: true,
    kv,
    kvType: "f16",
  };
  const v = {
    format: "f32" as const,
    rows,
    K,
    epilogue,
    ...(tex ? { weights: "texture" as const, upt: 1, upw: 8, tt: 4 } : {}),
  };
  const cache = (a: Float32Array) =>
    tex ? h.kvTexture(a, kvd, hd, "f16") : h.buffer(kvHalves(a, kvd, hd));
  const bufs = {
    step: h.step({ pos, ntok }),
    x: h.buffer(x),
    w: tex ? h.weightTexture(w, K, "f32") : h.weights(w, "f32"),
    q: h.buffer(new Float32Array(ntok * qd)),
    kcache: cache(init.k),
    vcache: cache(init.v),
    rope: h.buffer(rope),
    bias: h.buffer(bias),
  };
  const pipeline = matmulPipeline(gpu, v);
  h.run({ pipeline, names: matmulBindings(v), bufs, grid: matmulGrid(v, ntok) });
  const read = async (c: GPUBuffer | GPUTexture) =>
    c instanceof GPUTexture
      ? await h.readKvTexture(c, kvd, hd, "f16")
      : kvUnhalves(await h.readU32(c, ctx * kvd / 2), kvd, hd);
  const got = { k: await read(bufs.kcache), v: await read(bufs.vcache) };
  let clamped = 0;
  for (const c of ["k", "v"] as const) {
    for (let j = 0; j < ctx * kvd; j++) {
      const d = Math.abs(got[c][j] - want[c][j]);
      const where = `${kv} hd ${hd} ${c}cache[pos ${Math.floor(j / kvd)}, ${j % kvd}]`;
      if (tol[c][j] === 0) assert.equal(got[c][j], want[c][j], `${where} was overwritten`);
      else assert.ok(d <= tol[c][j], `${where} = ${got[c][j]}, want ${want[c][j]}`);
      if (tol[c][j] > 0 && Math.abs(got[c][j]) === F16_MAX) clamped++;
    }
  }
  assert.ok(clamped >= 2 * ntok, `${kv} hd ${hd}: only ${clamped} values clamped to ±${F16_MAX}`);
  h.release();
}

Deno.test("qkv epilogue, f16 cache: RoPE, then clamped and rounded, in buffers and textures", async () => {
  const h = new Harness(gpu);
  await qkvCase(h, "buffer", 24, 5, 9, 11);
  await qkvCase(h, "texture", 8, 7, 3, 12);
});

// ---------------------------------------------------------------------------------------------
// attention over the f16 cache
// ---------------------------------------------------------------------------------------------

/** Causal GQA attention in float64 over (·, kvd) K and V for the step's rows. */
function attentionRef(
  v: AttentionVariant,
  q: Float32Array,
  kc: ArrayLike<number>,
  vc: ArrayLike<number>,
  rows: StepRow[],
): Float64Array {
  const { nHeads, nKvHeads, headDim: hd } = v;
  const qd = nHeads * hd, kvd = nKvHeads * hd, group = nHeads / nKvHeads;
  const out = new Float64Array(rows.length * qd);
  rows.forEach(({ pos, kvBase }, t) => {
    for (let hh = 0; hh < nHeads; hh++) {
      const ko = Math.floor(hh / group) * hd;
      const s = new Float64Array(pos + 1);
      for (let j = 0; j <= pos; j++) {
        let a = 0;
        for (let d = 0; d < hd; d++) a += q[t * qd + hh * hd + d] * kc[(kvBase + j) * kvd + ko + d];
        s[j] = a / Math.sqrt(hd);
      }
      const max = Math.max(...s);
      let sum = 0;
      for (let j = 0; j <= pos; j++) sum += s[j] = Math.exp(s[j] - max);
      for (let d = 0; d < hd; d++) {
        let a = 0;
        for (let j = 0; j <= pos; j++) a += s[j] * vc[(kvBase + j) * kvd + ko + d];
        out[t * qd + hh * hd + d] = a / sum;
      }
    }
  });
  return out;
}

/**
 * Steps of each case: one token at 70 (more keys than a workgroup, not a multiple of it), five
 * tokens at 37.., and two sequences in one step (slots of 80 rows, out of order).
 */
const STEPS: StepRow[][] = [
  [{ pos: 70, kvBase: 0, tokenBase: 0 }],
  Array.from({ length: 5 }, (_, t) => ({ pos: 37 + t, kvBase: 0, tokenBase: 0 })),
  [{ pos: 12, kvBase: 80, tokenBase: 0 }, { pos: 50, kvBase: 0, tokenBase: 0 }],
];

async function attentionCase(h: Harness, v: AttentionVariant, seed: number) {
  const qd = v.nHeads * v.headDim, kvd = v.nKvHeads * v.headDim, ctx = 160;
  const tex = v.kv === "texture";
  for (const rows of STEPS) {
    const r = rng(seed++);
    const ntok = rows.length;
    const q = randArray(r, (ntok + 1) * qd, 2.5);
    const kc = randArray(r, ctx * kvd), vc = randArray(r, ctx * kvd);
    const o0 = randArray(r, (ntok + 1) * qd, 10);
    const uniformQ = tex && ntok === 1;
    const cache = (a: Float32Array) =>
      tex ? h.kvTexture(a, kvd, v.headDim, "f16") : h.buffer(kvHalves(a, kvd, v.headDim));
    const variant = { ...v, qUniform: uniformQ };
    const bufs = {
      step: h.step({ pos: rows[0].pos, ntok, rows }),
      q: uniformQ ? h.uniform(q, qd * 4, "q") : h.buffer(q),
      kcache: cache(kc),
      vcache: cache(vc),
      out: h.buffer(o0),
    };
    h.run({
      pipeline: attentionPipeline(gpu, variant),
      names: ["step", "q", "kcache", "vcache", "out"],
      bufs,
      grid: attentionGrid(variant, ntok),
    });
    const got = await h.readF32(bufs.out, o0.length);
    const r16 = (a: Float32Array) => Float64Array.from(a, (x) => Math.f16round(x));
    const want = attentionRef(v, q, r16(kc), r16(vc), rows);
    const what = `attention ${tex ? `texture gq ${v.gq}` : `buffer wg ${v.wg}`} ` +
      `${v.nHeads}/${v.nKvHeads}×${v.headDim} rows ${JSON.stringify(rows.map((r) => r.pos))}`;
    const err = maxAbsDiff(got.subarray(0, ntok * qd), want);
    assert.ok(err < 1e-6, `${what}: |got − f16 reference| = ${err}`);
    // the rounding is visible at this tolerance: the unrounded reference is 10× further off
    const f32Err = maxAbsDiff(got.subarray(0, ntok * qd), attentionRef(v, q, kc, vc, rows));
    assert.ok(f32Err > 1e-5, `${what}: the f16 rounding of K and V changed nothing (${f32Err})`);
    assert.deepEqual(got.subarray(ntok * qd), o0.subarray(ntok * qd), `${what}: row past the step`);
    h.release();
  }
}

Deno.test("attention over an f16 cache in storage buffers: GQA 6/2, headDim 8 and 24", async () => {
  const h = new Harness(gpu);
  await attentionCase(h, { nHeads: 6, nKvHeads: 2, headDim: 8, wg: 64, kvType: "f16" }, 100);
  await attentionCase(h, { nHeads: 6, nKvHeads: 2, headDim: 24, wg: 32, kvType: "f16" }, 200);
});

Deno.test("attention over an f16 cache in textures: GQA 6/2, headDim 8 and 24, uniform q", async () => {
  const h = new Harness(gpu);
  for (const [hd, seed] of [[8, 300], [24, 400]]) {
    const v = { nHeads: 6, nKvHeads: 2, headDim: hd, wg: 8, kv: "texture" as const };
    await attentionCase(h, { ...v, kvType: "f16", gq: attentionGroup(6, 2, hd) }, seed);
  }
});

// ---------------------------------------------------------------------------------------------
// the option
// ---------------------------------------------------------------------------------------------

Deno.test("--kv-cache and kvType: f16 or f32, anything else one line naming the option", async () => {
  assert.equal(kvCacheOption(undefined), undefined);
  assert.equal(kvCacheOption("f16"), "f16");
  assert.throws(() => kvCacheOption("F16"), {
    name: "ParameterError",
    message: '--kv-cache must be f16 or f32; got "F16"',
  });
  assert.throws(
    () => createRunState(gpu, tinyConfig, 8, 4, 1, "bf16" as KvType),
    /the KV cache type must be f16 or f32; got "bf16"/,
  );
  // the CLIs refuse it before any work (no model is opened before the check)
  const root = new URL("..", import.meta.url).pathname;
  const runs = [
    ["runtime/cli/generate_cmd.ts", "--model", "none"],
    ["runtime/cli/eval_cmd.ts", "--model", "none", "--text", "none"],
    ["server.ts", "--model", "none"],
  ];
  for (const [script, ...args] of runs) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--no-check", script, ...args, "--kv-cache", "q8"],
      cwd: root,
      env: { XDG_RUNTIME_DIR: "/tmp" },
      stdout: "null",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr).trim();
    assert.equal(out.code, 1, `${script}: ${err}`);
    assert.equal(err, 'error: --kv-cache must be f16 or f32; got "q8"', script);
  }
});

// ---------------------------------------------------------------------------------------------
// real models
// ---------------------------------------------------------------------------------------------

const haveStories = await haveShared(
  "models/stories260K-hf",
  "models/stories260K/stories260K.bin",
  "data/tinystories/TinyStories-valid-sample.txt",
);
const haveNovels = await haveShared("models/novels-5M", "data/novels/heldout.txt");

/**
 * Perplexity of the model at `dir` on the first `maxTokens` tokens of `text` with each cache
 * type; checks what each run state holds (its type, and the f16 one's KV bytes half the f32's).
 */
async function perplexities(
  dir: string,
  textPath: string,
  opts: { maxTokens: number; perLine?: boolean; ctx?: number },
  gpus: Record<KvType, Gpu>,
): Promise<Record<KvType, number>> {
  const text = await Deno.readTextFile(textPath);
  const out = {} as Record<KvType, number>;
  const bytes = {} as Record<KvType, number>;
  let kvElems = 0;
  for (const kvType of ["f16", "f32"] as const) {
    const { model, tokenizer } = await loadModel(dir, {
      gpu: gpus[kvType],
      quiet: true,
      ctx: opts.ctx,
      kvType,
    });
    assert.equal(model.state.kvType, kvType);
    const c = model.config;
    kvElems = 2 * c.nLayers * model.ctx * c.nKvHeads * c.headDim;
    bytes[kvType] = model.state.bytes;
    const r = await perplexity(model, tokenizer, text, opts);
    assert.equal(r.tokens, opts.maxTokens);
    out[kvType] = r.perplexity;
  }
  // the f16 cache takes 2 bytes an element, the f32 one 4; all else is the same
  assert.equal(bytes.f32 - bytes.f16, 2 * kvElems);
  return out;
}

function assertClose(what: string, p: Record<KvType, number>) {
  const rel = Math.abs(p.f16 - p.f32) / p.f32;
  console.log(`${what}: perplexity f16 ${p.f16}, f32 ${p.f32} (relative ${rel.toExponential(2)})`);
  assert.ok(rel < 1e-3, `${what}: f16 ${p.f16} vs f32 ${p.f32}: ${rel} ≥ 0.1%`);
  assert.notEqual(p.f16, p.f32, `${what}: f16 and f32 caches gave the same perplexity`);
}

Deno.test({
  name: "stories260K, 2000 tokens: perplexity with the f16 cache within 0.1% of f32 " +
    "(textures, and the buffer layout)",
  ignore: !haveStories,
  fn: async () => {
    const dir = sharedPath("models/stories260K-hf");
    const text = sharedPath("data/tinystories/TinyStories-valid-sample.txt");
    const opts = { maxTokens: 2000, perLine: true };
    assertClose(
      "stories260K textures",
      await perplexities(dir, text, opts, { f16: gpu, f32: gpu }),
    );
    const layout = await testGpuLayout();
    assertClose(
      "stories260K f16 buffers vs f32 textures",
      await perplexities(dir, text, { maxTokens: 500, perLine: true }, { f16: layout, f32: gpu }),
    );
  },
});

Deno.test({
  name: "novels-5M, 1020 tokens at ctx 256: perplexity with the f16 cache within 0.1% of f32",
  ignore: !haveNovels,
  fn: async () => {
    const p = await perplexities(
      sharedPath("models/novels-5M"),
      sharedPath("data/novels/heldout.txt"),
      { maxTokens: 1020, ctx: 256 },
      { f16: gpu, f32: gpu },
    );
    assertClose("novels-5M", p);
  },
});

Deno.test({
  name: "stories260K greedy text is the documented one with the f16 cache, the f32 one and the " +
    "default (f16 on adapters with shader-f16)",
  ignore: !haveStories,
  fn: async () => {
    const documented = await stories260KGreedyText();
    for (const kvType of [undefined, "f16", "f32"] as const) {
      const path = sharedPath("models/stories260K/stories260K.bin");
      const { model, tokenizer } = await loadModel(path, { gpu, quiet: true, kvType });
      // without kvType: what generate_test's documented-text test runs
      assert.equal(model.state.kvType, kvType ?? (gpu.shaderF16 ? "f16" : "f32"));
      const prompt = tokenizer.encode("", { bos: true });
      const ids: number[] = [];
      const it = generate(model, {
        prompt,
        maxTokens: 256,
        sampling: GREEDY,
        stopIds: model.config.eosIds,
      });
      for await (const id of it) ids.push(id);
      const text = tokenizer.decode([...prompt, ...ids]);
      assert.equal(text, documented, `KV cache ${kvType ?? "default"}`);
    }
  },
});
