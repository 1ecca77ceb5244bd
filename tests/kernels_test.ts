/**
 * Every WGSL kernel against a plain float64 TypeScript reference, on odd shapes: units not a
 * multiple of the workgroup size, K a multiple of 4 but not of 32, token counts not a multiple of
 * the prefill token tile, pos ≠ 0, each dense format, both matvec thread shapes (one thread per
 * unit as on CPUs, a split K as on GPUs: CI only has lavapipe, so both are checked here). The
 * CPU-adapter variants too: dense weights in textures (matvec with x and g from uniform or storage
 * buffers, matmul), the KV cache in textures (qkv epilogue, attention), the embedding table in a
 * texture, and the one-SIMD-group sampler with uniform or storage logits, with logit bias,
 * penalties, min-p and the per-slot sampler history.
 */
import assert from "node:assert/strict";
import type { DenseFormat, StepRow, WeightSource } from "../kernels/common.ts";
import type { Epilogue, KvSource } from "../kernels/epilogue.ts";
import type { Bindable } from "../kernels/gpu.ts";
import {
  matvecBindings,
  matvecGrid,
  matvecPipeline,
  type MatvecVariant,
} from "../kernels/matvec.ts";
import {
  matmulBindings,
  matmulGrid,
  matmulLaneShape,
  matmulPipeline,
  type MatmulVariant,
} from "../kernels/matmul.ts";
import { rmsnormGrid, rmsnormPipeline } from "../kernels/rmsnorm.ts";
import { embedGrid, embedPipeline, type EmbedVariant } from "../kernels/embed.ts";
import { attentionGrid, attentionPipeline, type AttentionVariant } from "../kernels/attention.ts";
import { type SampleOptions, samplePipeline } from "../kernels/sample.ts";
import {
  adjustPipeline,
  historyPipeline,
  packSamplerConfig,
  SAMPLER_CFG_WORDS,
  type SlotSampling,
} from "../kernels/penalties.ts";
import {
  adjustLogits,
  type Logits,
  sample,
  type SamplingHistory,
  type SamplingParams,
  uniform,
} from "../runtime/model/sampling.ts";
import { rng, testGpu } from "./helpers.ts";
import { Harness, type Job } from "./kernel_harness.ts";

const gpu = await testGpu();
const FORMATS: DenseFormat[] = gpu.shaderF16 ? ["f32", "f16", "f16p"] : ["f32", "f16p"];

/** Largest error seen per kernel, relative to its tolerance scale (printed at the end). */
const worst = new Map<string, number>();

/**
 * Asserts |got − want| ≤ tol · scale elementwise; where scale is 0 the value must be unchanged
 * (bit-exact: untouched memory, copies). Records the largest relative error under `name`.
 */
function check(
  name: string,
  what: string,
  got: Float32Array,
  want: ArrayLike<number>,
  scale: ArrayLike<number>,
  tol: number,
): void {
  let m = 0;
  for (let i = 0; i < want.length; i++) {
    if (scale[i] === 0) {
      if (!Object.is(got[i], Math.fround(want[i]))) {
        assert.fail(`${what}: [${i}] = ${got[i]} should be left at ${want[i]}`);
      }
      continue;
    }
    const e = Math.abs(got[i] - want[i]) / scale[i];
    if (!(e <= tol)) {
      assert.fail(`${what}: [${i}] = ${got[i]}, want ${want[i]} (error ${e} × scale > ${tol})`);
    }
    m = Math.max(m, e);
  }
  worst.set(name, Math.max(worst.get(name) ?? 0, m));
}

function randArray(r: () => number, n: number, scale = 1, shift = 0): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = shift + scale * r();
  return a;
}

/** The weights as the kernel sees them: f16 formats round to f16. */
function asStored(w: Float32Array, format: DenseFormat): Float64Array {
  return format === "f32" ? Float64Array.from(w) : Float64Array.from(w, (v) => Math.f16round(v));
}

function norm2(a: ArrayLike<number>, start = 0, n = a.length): number {
  let s = 0;
  for (let i = start; i < start + n; i++) s += a[i] * a[i];
  return Math.sqrt(s);
}

const silu = (g: number) => g / (1 + Math.exp(-g));

/** A rotate-half RoPE table (ctx, headDim/2) of (cos, sin), f32 as the runtime stores it. */
function ropeTable(ctx: number, headDim: number): Float32Array {
  const half = headDim / 2;
  const t = new Float32Array(ctx * half * 2);
  for (let p = 0; p < ctx; p++) {
    for (let i = 0; i < half; i++) {
      const f = 1 / Math.pow(10000, (2 * i) / headDim);
      t[(p * half + i) * 2] = Math.cos(p * f);
      t[(p * half + i) * 2 + 1] = Math.sin(p * f);
    }
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// matvec and matmul with each epilogue
// ---------------------------------------------------------------------------------------------

type EpiCase =
  | { kind: "store" }
  | { kind: "add" }
  | { kind: "gateup" }
  | { kind: "qkv"; headDim: number; bias: boolean };

const STORE_ROWS = 75, STORE_SPLIT = 40, STORE_BASE = 9, STORE_LD = 91;
const HIDDEN = 37, NH = 6, NKV = 2;
/** Relative tolerance of the linear kernels, in units of ||w_row||·||x||. */
const LIN_TOL = 1e-5;

interface LinearCase {
  op: "matvec" | "matmul";
  format: DenseFormat;
  epi: EpiCase;
  K: number;
  ntok: number; // 1 for matvec
  pos: number;
  norm: number | null; // eps of the fused RMSNorm (matvec only)
  tpr: number;
  upw: number;
  seed: number;
  /** Texture weights (the CPU-adapter kernels of dense_texture.ts). */
  weights?: WeightSource;
  /** Texture weights: units per thread, tokens per workgroup (matmul), x and g as uniforms. */
  upt?: number;
  tt?: number;
  xUniform?: boolean;
  /** KV cache layout of the qkv epilogue. */
  kv?: KvSource;
  /** Rows of the store/add cases (default STORE_ROWS). */
  rows?: number;
  /**
   * Several sequences in one step (Step rows): token t belongs to slot t % slots at position
   * pos + ntok − 1 − t, its KV row slot·(pos + ntok + 2) + its position (default: one sequence).
   */
  slots?: number;
}

/** Step rows of a case: token t's position, KV base and token base (see LinearCase.slots). */
function caseRows(c: LinearCase): StepRow[] {
  const slotCtx = c.pos + c.ntok + 2;
  return Array.from(
    { length: c.ntok },
    (_, t) =>
      c.slots
        ? { pos: c.pos + c.ntok - 1 - t, kvBase: (t % c.slots) * slotCtx, tokenBase: 0 }
        : { pos: c.pos + t, kvBase: 0, tokenBase: 0 },
  );
}

function describe(c: LinearCase): string {
  const e = c.epi.kind === "qkv"
    ? `qkv(hd ${c.epi.headDim}${c.epi.bias ? ", bias" : ""}${c.kv === "texture" ? ", kv tex" : ""})`
    : c.epi.kind;
  const tex = c.weights === "texture"
    ? ` texture upt ${c.upt ?? "-"}${c.tt ? ` tt ${c.tt}` : ""}${c.xUniform ? " uniform x" : ""}`
    : "";
  const shape = c.op === "matvec" ? ` tpr ${c.tpr} upw ${c.upw}${c.norm ? " norm" : ""}` : "";
  return `${c.op} ${c.format} ${e} K ${c.K} ntok ${c.ntok} pos ${c.pos}${shape}${tex}${
    c.rows ? ` rows ${c.rows}` : ""
  }`;
}

async function runLinear(h: Harness, c: LinearCase): Promise<void> {
  const r = rng(c.seed);
  const what = describe(c);
  const T = c.ntok, TA = T + 3; // tokens computed, token rows allocated (the rest must stay)
  const { K, epi } = c;
  const hd = epi.kind === "qkv" ? epi.headDim : 0, half = hd / 2;
  const qd = NH * hd, kvd = NKV * hd;
  const storeRows = c.rows ?? STORE_ROWS;
  const split = c.rows ? Math.floor(storeRows * 0.53) : STORE_SPLIT;
  const LD = c.rows ? storeRows + STORE_BASE + 7 : STORE_LD;
  const rows = epi.kind === "store" || epi.kind === "add"
    ? storeRows
    : epi.kind === "gateup"
    ? 2 * HIDDEN
    : qd + 2 * kvd;
  const chunks: [number, number][] = epi.kind === "store"
    ? [[0, split], [split, storeRows - split]]
    : [[0, rows]];

  const w = randArray(r, rows * K);
  const wref = asStored(w, c.format);
  const x = randArray(r, TA * K, 2);
  const g = randArray(r, K, 0.5, 1);
  // reference inputs (normalized when the RMSNorm is fused) and dot products
  const pre: Float64Array[] = [], scale: Float64Array[] = [];
  for (let t = 0; t < T; t++) {
    const xt = Float64Array.from(x.subarray(t * K, (t + 1) * K));
    if (c.norm !== null) {
      const inv = 1 / Math.sqrt(norm2(xt) ** 2 / K + c.norm);
      for (let k = 0; k < K; k++) xt[k] = xt[k] * g[k] * inv;
    }
    const nx = norm2(xt);
    const p = new Float64Array(rows), s = new Float64Array(rows);
    for (let row = 0; row < rows; row++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc += wref[row * K + k] * xt[k];
      p[row] = acc;
      s[row] = norm2(wref, row * K, K) * nx;
    }
    pre.push(p);
    scale.push(s);
  }

  // output buffers: initial contents, expected contents, tolerance scales (0 = unchanged)
  const outs: Record<string, { init: Float32Array; want: Float64Array; scale: Float64Array }> = {};
  const out = (name: string, n: number) => {
    const init = randArray(r, n, 10);
    outs[name] = { init, want: Float64Array.from(init), scale: new Float64Array(n) };
    return outs[name];
  };
  const extra: Record<string, Float32Array> = {};
  let epilogue: Epilogue;
  switch (epi.kind) {
    case "store": {
      epilogue = { kind: "store", offset: STORE_BASE, ld: LD };
      const y = out("y", TA * LD);
      for (let t = 0; t < T; t++) {
        for (let u = 0; u < rows; u++) {
          const i = t * LD + STORE_BASE + u;
          y.want[i] = pre[t][u];
          y.scale[i] = scale[t][u];
        }
      }
      break;
    }
    case "add": {
      epilogue = { kind: "add" };
      const y = out("y", TA * rows);
      for (let t = 0; t < T; t++) {
        for (let u = 0; u < rows; u++) {
          y.want[t * rows + u] += pre[t][u];
          y.scale[t * rows + u] = scale[t][u] + Math.abs(y.init[t * rows + u]) * 1e-2;
        }
      }
      break;
    }
    case "gateup": {
      epilogue = { kind: "gateup", hidden: HIDDEN };
      const y = out("y", TA * HIDDEN);
      for (let t = 0; t < T; t++) {
        for (let u = 0; u < HIDDEN; u++) {
          const gate = pre[t][u], up = pre[t][u + HIDDEN];
          y.want[t * HIDDEN + u] = silu(gate) * up;
          y.scale[t * HIDDEN + u] = 1.1 * scale[t][u] * Math.abs(up) +
            Math.abs(silu(gate)) * scale[t][u + HIDDEN] + 1e-30;
        }
      }
      break;
    }
    case "qkv": {
      epilogue = {
        kind: "qkv",
        nHeads: NH,
        nKvHeads: NKV,
        headDim: hd,
        bias: epi.bias,
        kv: c.kv ?? "buffer",
      };
      const ctx = (c.pos + T + 2) * (c.slots ?? 1);
      const rope = ropeTable(c.pos + T + 2, hd);
      const stepRows = caseRows(c);
      extra.rope = rope;
      const bias = randArray(r, rows);
      if (epi.bias) extra.bias = bias;
      const q = out("q", TA * qd), kc = out("kcache", ctx * kvd), vc = out("vcache", ctx * kvd);
      for (let t = 0; t < T; t++) {
        const p = stepRows[t].pos, kr = stepRows[t].kvBase + p;
        for (let head = 0; head < NH + 2 * NKV; head++) {
          for (let i = 0; i < half; i++) {
            const ra = head * hd + i, rb = ra + half;
            let a = pre[t][ra], b = pre[t][rb];
            if (epi.bias) {
              a += bias[ra];
              b += bias[rb];
            }
            const s = scale[t][ra] + scale[t][rb];
            let dst, o;
            if (head < NH + NKV) {
              const cs = rope[(p * half + i) * 2], sn = rope[(p * half + i) * 2 + 1];
              [a, b] = [a * cs - b * sn, b * cs + a * sn];
            }
            if (head < NH) [dst, o] = [q, t * qd + head * hd + i];
            else if (head < NH + NKV) [dst, o] = [kc, kr * kvd + (head - NH) * hd + i];
            else [dst, o] = [vc, kr * kvd + (head - NH - NKV) * hd + i];
            dst.want[o] = a;
            dst.want[o + half] = b;
            dst.scale[o] = dst.scale[o + half] = s;
          }
        }
      }
      break;
    }
  }

  const tex = c.weights === "texture";
  const kvTex = c.kv === "texture";
  const bufs: Record<string, Bindable> = {
    step: h.step({ pos: c.pos, ntok: T, rows: c.slots ? caseRows(c) : undefined }),
    // a matmul's uniform x holds tt tokens (a batched decode step: ntok ≤ tt)
    x: c.xUniform ? h.uniform(x, (c.op === "matmul" ? c.tt! : 1) * K * 4, "x") : h.buffer(x),
    g: c.xUniform ? h.uniform(g, K * 4, "g") : h.buffer(g),
  };
  for (const [name, a] of Object.entries(extra)) bufs[name] = h.buffer(a);
  for (const [name, o] of Object.entries(outs)) {
    bufs[name] = kvTex && name.endsWith("cache") ? h.kvTexture(o.init, kvd, hd) : h.buffer(o.init);
  }
  const jobs: Job[] = chunks.map(([start, n]) => {
    const e: Epilogue = epilogue.kind === "store"
      ? { ...epilogue, offset: epilogue.offset + start }
      : epilogue;
    const wpart = w.subarray(start * K, (start + n) * K);
    const wbuf = tex ? h.weightTexture(wpart, K, c.format) : h.weights(wpart, c.format);
    if (c.op === "matvec") {
      const v: MatvecVariant = {
        format: c.format,
        rows: n,
        K,
        norm: c.norm === null ? null : { eps: c.norm },
        epilogue: e,
        tpr: c.tpr,
        upw: c.upw,
        ...(tex ? { weights: "texture", upt: c.upt, xUniform: c.xUniform } : {}),
      };
      return {
        pipeline: matvecPipeline(gpu, v),
        names: matvecBindings(v),
        bufs: { ...bufs, w: wbuf },
        grid: matvecGrid(v),
      };
    }
    const v: MatmulVariant = {
      format: c.format,
      rows: n,
      K,
      epilogue: e,
      ...(tex
        ? { weights: "texture", upt: c.upt, upw: c.upw, tt: c.tt, xUniform: c.xUniform }
        : c.tpr > 1
        ? { tpr: c.tpr, upw: c.upw, tt: c.tt } // the lane variant
        : {}),
    };
    return {
      pipeline: matmulPipeline(gpu, v),
      names: matmulBindings(v),
      bufs: { ...bufs, w: wbuf },
      grid: matmulGrid(v, T),
    };
  });
  h.run(...jobs);
  const kind = `${c.op} ${c.format}${tex ? " texture" : ""}`;
  for (const [name, o] of Object.entries(outs)) {
    const got = kvTex && name.endsWith("cache")
      ? await h.readKvTexture(bufs[name] as GPUTexture, kvd, hd)
      : await h.readF32(bufs[name] as GPUBuffer, o.init.length);
    check(kind, `${what}: ${name}`, got, o.want, o.scale, LIN_TOL);
  }
  h.release();
}

const EPIS: EpiCase[] = [
  { kind: "store" },
  { kind: "add" },
  { kind: "gateup" },
  { kind: "qkv", headDim: 8, bias: false },
  { kind: "qkv", headDim: 12, bias: true },
];
/** Thread shapes: one thread per unit (lavapipe), and split K (discrete GPUs). */
const SHAPES = [{ tpr: 1, upw: 64 }, { tpr: 32, upw: 8 }, { tpr: 64, upw: 4 }];

for (const format of FORMATS) {
  Deno.test(`matvec ${format}: every epilogue × fused norm × thread shape`, async () => {
    const h = new Harness(gpu);
    let seed = 100;
    for (const epi of EPIS) {
      for (const [si, shape] of SHAPES.entries()) {
        for (const norm of [null, 1e-5]) {
          // K: 148 = 4·37 and 172 = 4·43 (not multiples of 32), 548 = 4·137 for long K loops
          const K = [148, 172, 548][(si + (norm ? 1 : 0)) % 3];
          await runLinear(h, {
            op: "matvec",
            format,
            epi,
            K,
            ntok: 1,
            pos: 7 + si,
            norm,
            ...shape,
            seed: seed++,
          });
        }
      }
    }
  });

  Deno.test(`matmul ${format}: every epilogue, ntok 1, 3, 8, 13 at pos ≠ 0; the lane variant`, async () => {
    const h = new Harness(gpu);
    let seed = 200;
    // the staged kernel: K 332 = 4·83 takes two rounds of 64 staged vec4s
    const staged = [1, 3, 8, 13].map((ntok) => [ntok, { tpr: 0, upw: 0 }] as const);
    // the lane kernel (batched GPU steps): ntok ≤ tt in one token group, and more (several
    // groups, the last one partial); tt 32 with the runtime's shape and a narrower split of K.
    // Each epilogue takes two of the four.
    const lane = [[5, matmulLaneShape(8)], [8, matmulLaneShape(8)], [29, matmulLaneShape(32)], [
      37,
      { tpr: 8, upw: 3, tt: 32 },
    ]] as const;
    for (const [i, epi] of EPIS.entries()) {
      for (const [ntok, shape] of [...staged, lane[i % 4], lane[(i + 2) % 4]]) {
        await runLinear(h, {
          op: "matmul",
          format,
          epi,
          K: ntok % 2 ? 332 : 148,
          ntok,
          pos: 5 + ntok,
          norm: null,
          ...shape,
          seed: seed++,
        });
      }
    }
  });
}

/**
 * The texture-weight kernels (CPU adapters): every epilogue (the qkv one with the KV cache in
 * buffers and in textures), with and without the fused RMSNorm, x and g from uniform or storage
 * buffers, one and several units per thread; K with an odd number of vec4 (148, 172: the f16
 * texture's last texel is half padding) and an even one (280).
 */
const TEX_EPIS: (EpiCase & { kv?: KvSource })[] = [
  ...EPIS,
  { kind: "qkv", headDim: 8, bias: false, kv: "texture" },
  { kind: "qkv", headDim: 12, bias: true, kv: "texture" },
];

for (const format of FORMATS) {
  Deno.test(`matvec ${format} texture: every epilogue × norm × uniform x × units per thread`, async () => {
    const h = new Harness(gpu);
    let seed = 1100;
    for (const epi of TEX_EPIS) {
      for (const upt of [1, 3]) {
        for (const norm of [null, 1e-5]) {
          for (const xUniform of [false, true]) {
            const K = [148, 172, 280][seed % 3];
            await runLinear(h, {
              op: "matvec",
              format,
              epi,
              K,
              ntok: 1,
              pos: 7 + upt,
              norm,
              tpr: 1,
              upw: 8 * upt,
              upt,
              weights: "texture",
              xUniform,
              kv: epi.kind === "qkv" ? epi.kv : undefined,
              seed: seed++,
            });
          }
        }
      }
    }
  });

  Deno.test(`matvec/matmul ${format} texture: rows wrapping over texture rows`, async () => {
    const h = new Harness(gpu);
    // 250 rows of K 172 are 10750 (f32) or 5500 (f16) texels: each chunk wraps at 4096
    for (const op of ["matvec", "matmul"] as const) {
      await runLinear(h, {
        op,
        format,
        epi: { kind: "store" },
        K: 172,
        ntok: op === "matvec" ? 1 : 6,
        pos: 2,
        norm: op === "matvec" ? 1e-5 : null,
        tpr: 1,
        upw: 32,
        upt: 4,
        tt: 4,
        weights: "texture",
        xUniform: op === "matvec",
        rows: 250,
        seed: 1300,
      });
    }
  });

  Deno.test(`matmul ${format} texture: every epilogue, ntok 1, 3, 8, 13 at pos ≠ 0`, async () => {
    const h = new Harness(gpu);
    let seed = 1200;
    for (const epi of TEX_EPIS) {
      for (const ntok of [1, 3, 8, 13]) {
        // ntok 8 in one token group, x as a uniform buffer: the batched decode step's kernel
        const shape = ntok % 2
          ? { upt: 2, upw: 16, tt: 4 }
          : { upt: 1, upw: 8, tt: 8, xUniform: ntok === 8 };
        await runLinear(h, {
          op: "matmul",
          format,
          epi,
          K: [148, 172, 280][seed % 3],
          ntok,
          pos: 5 + ntok,
          norm: null,
          tpr: 1,
          weights: "texture",
          kv: epi.kind === "qkv" ? epi.kv : undefined,
          ...shape,
          seed: seed++,
        });
      }
    }
  });
}

Deno.test("matmul qkv: several sequences in one step (Step rows), KV in buffers and textures", async () => {
  const h = new Harness(gpu);
  let seed = 1400;
  for (const weights of ["buffer", "texture"] as const) {
    for (const kv of ["buffer", "texture"] as const) {
      for (const [ntok, slots] of [[1, 1], [3, 3], [8, 3], [13, 2]]) {
        const shape = weights === "texture" ? { upt: 1, upw: 8, tt: 8 } : {};
        await runLinear(h, {
          op: "matmul",
          format: "f32",
          epi: { kind: "qkv", headDim: 8, bias: seed % 2 === 0 },
          K: 148,
          ntok,
          pos: 4,
          norm: null,
          tpr: weights === "texture" ? 1 : 0,
          upw: 0,
          weights,
          kv,
          slots,
          ...shape,
          seed: seed++,
        });
      }
    }
  }
});

Deno.test("matvec: fused-norm variants that differ only in eps are distinct pipelines", async () => {
  const h = new Harness(gpu);
  for (const eps of [1e-5, 0.5]) {
    await runLinear(h, {
      op: "matvec",
      format: "f32",
      epi: { kind: "add" },
      K: 148,
      ntok: 1,
      pos: 0,
      norm: eps,
      tpr: 1,
      upw: 64,
      seed: 300,
    });
  }
});

// ---------------------------------------------------------------------------------------------
// rmsnorm
// ---------------------------------------------------------------------------------------------

Deno.test("rmsnorm over ntok rows", async () => {
  const h = new Harness(gpu);
  let seed = 400;
  for (const [dim, eps] of [[148, 1e-5], [1204, 0.05]]) {
    for (const ntok of [1, 3, 13]) {
      const r = rng(seed++);
      const TA = ntok + 2;
      const x = randArray(r, TA * dim, 0.3), g = randArray(r, dim, 0.5, 1);
      const y0 = randArray(r, TA * dim, 10);
      const want = Float64Array.from(y0), scale = new Float64Array(TA * dim);
      for (let t = 0; t < ntok; t++) {
        const inv = 1 / Math.sqrt(norm2(x, t * dim, dim) ** 2 / dim + eps);
        for (let i = 0; i < dim; i++) {
          want[t * dim + i] = x[t * dim + i] * g[i] * inv;
          scale[t * dim + i] = Math.abs(want[t * dim + i]) + 1e-6;
        }
      }
      const bufs = {
        step: h.step({ pos: 3, ntok }),
        x: h.buffer(x),
        g: h.buffer(g),
        y: h.buffer(y0),
      };
      h.run({
        pipeline: rmsnormPipeline(gpu, { dim, eps }),
        names: ["step", "x", "g", "y"],
        bufs,
        grid: rmsnormGrid(ntok),
      });
      const got = await h.readF32(bufs.y, TA * dim);
      check("rmsnorm", `rmsnorm dim ${dim} ntok ${ntok}`, got, want, scale, 1e-5);
      h.release();
    }
  }
});

// ---------------------------------------------------------------------------------------------
// embed
// ---------------------------------------------------------------------------------------------

Deno.test("embed: chunked table, tokens inside and outside each chunk", async () => {
  const h = new Harness(gpu);
  const vocab = 80, split = 50;
  for (const format of FORMATS) {
    for (
      const [dim, weights] of [[148, "buffer"], [280, "buffer"], [148, "texture"], [
        280,
        "texture",
      ]] as const
    ) {
      const r = rng(500 + dim);
      const table = randArray(r, vocab * dim);
      const stored = asStored(table, format);
      const pos = 4;
      const toks = [50, 49, 79, 0, 80, 63, 200]; // 80 and 200 lie outside both chunks
      const ntok = toks.length, TA = ntok + 2;
      const tokens = new Uint32Array(pos + TA).fill(7);
      tokens.set(toks, pos);
      const x0 = randArray(r, TA * dim, 10);
      const bufs = {
        step: h.step({ pos, ntok }),
        tokens: h.buffer(tokens),
        x: h.buffer(x0),
      };
      const want = Float64Array.from(x0), unchanged = new Float64Array(TA * dim);
      for (const [rowStart, rows] of [[split, vocab - split], [0, split]]) {
        const v: EmbedVariant = { format, dim, rowStart, rows, weights };
        const part = table.subarray(rowStart * dim, (rowStart + rows) * dim);
        h.run({
          pipeline: embedPipeline(gpu, v),
          names: ["step", "tokens", "e", "x"],
          bufs: {
            ...bufs,
            e: weights === "texture" ? h.weightTexture(part, dim, format) : h.weights(part, format),
          },
          grid: embedGrid(v, ntok),
        });
        toks.forEach((tok, t) => {
          if (tok < rowStart || tok >= rowStart + rows) return;
          for (let i = 0; i < dim; i++) want[t * dim + i] = stored[tok * dim + i];
        });
        const got = await h.readF32(bufs.x, TA * dim);
        const what = `embed ${format} ${weights} dim ${dim} chunk @${rowStart}`;
        check("embed", what, got, want, unchanged, 0);
      }
      h.release();
    }
  }
});

// ---------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------

function attentionRef(
  v: AttentionVariant,
  q: Float32Array,
  kc: Float32Array,
  vc: Float32Array,
  pos: number,
  ntok: number,
): Float64Array {
  const { nHeads, nKvHeads, headDim: hd } = v;
  const qd = nHeads * hd, kvd = nKvHeads * hd, group = nHeads / nKvHeads;
  const out = new Float64Array(ntok * qd);
  for (let t = 0; t < ntok; t++) {
    const len = pos + t + 1;
    for (let hh = 0; hh < nHeads; hh++) {
      const ko = Math.floor(hh / group) * hd;
      const s = new Float64Array(len);
      let max = -Infinity;
      for (let j = 0; j < len; j++) {
        let a = 0;
        for (let d = 0; d < hd; d++) a += q[t * qd + hh * hd + d] * kc[j * kvd + ko + d];
        s[j] = a / Math.sqrt(hd);
        max = Math.max(max, s[j]);
      }
      let sum = 0;
      for (let j = 0; j < len; j++) sum += s[j] = Math.exp(s[j] - max);
      for (let d = 0; d < hd; d++) {
        let a = 0;
        for (let j = 0; j < len; j++) a += s[j] * vc[j * kvd + ko + d];
        out[t * qd + hh * hd + d] = a / sum;
      }
    }
  }
  return out;
}

Deno.test("attention: causal GQA, online softmax across chunks", async () => {
  const h = new Harness(gpu);
  const heads = [
    { nHeads: 6, nKvHeads: 2, headDim: 12 },
    { nHeads: 4, nKvHeads: 1, headDim: 48 }, // headDim > wg 32
  ];
  let seed = 600;
  for (const hs of heads) {
    for (const wg of [32, 64]) {
      const v: AttentionVariant = { ...hs, wg };
      // pos + ntok = 100 crosses chunks of 32 and 64; (3, 5) stays within one chunk
      for (const [pos, ntok] of [[99, 1], [95, 5], [60, 40], [3, 5]]) {
        const r = rng(seed++);
        const qd = v.nHeads * v.headDim, kvd = v.nKvHeads * v.headDim;
        const ctx = pos + ntok + 3;
        const q = randArray(r, (ntok + 1) * qd, 2.5);
        const kc = randArray(r, ctx * kvd), vc = randArray(r, ctx * kvd);
        // positions past the step's last token hold garbage a causal kernel never reads
        for (let i = (pos + ntok) * kvd; i < ctx * kvd; i++) kc[i] = vc[i] = 1e4;
        const o0 = randArray(r, (ntok + 1) * qd, 10);
        const bufs = {
          step: h.step({ pos, ntok }),
          q: h.buffer(q),
          kcache: h.buffer(kc),
          vcache: h.buffer(vc),
          out: h.buffer(o0),
        };
        h.run({
          pipeline: attentionPipeline(gpu, v),
          names: ["step", "q", "kcache", "vcache", "out"],
          bufs,
          grid: attentionGrid(v, ntok),
        });
        const ref = attentionRef(v, q, kc, vc, pos, ntok);
        const want = Float64Array.from(o0), scale = new Float64Array(o0.length);
        want.set(ref);
        scale.fill(1, 0, ref.length); // values in [-1, 1): absolute error
        const got = await h.readF32(bufs.out, o0.length);
        const what = `attention ${hs.nHeads}/${hs.nKvHeads}×${hs.headDim} wg ${wg} ` +
          `pos ${pos} ntok ${ntok}`;
        check("attention", what, got, want, scale, 1e-5);
        h.release();
      }
    }
  }
});

Deno.test("attention, KV cache in textures: causal GQA, per-thread softmax merge, uniform q", async () => {
  const h = new Harness(gpu);
  const heads = [
    { nHeads: 6, nKvHeads: 2, headDim: 12 },
    { nHeads: 4, nKvHeads: 1, headDim: 48 },
    { nHeads: 8, nKvHeads: 4, headDim: 8 }, // stories260K
  ];
  let seed = 650;
  for (const hs of heads) {
    // query heads per workgroup: 1, and all or some of those sharing a KV head
    const GQ = hs.nHeads / hs.nKvHeads;
    for (const [wg, gq] of [[8, 1], [16, GQ], [8, GQ % 2 ? GQ : 2]]) {
      // fewer keys than threads (pos 2, ntok 1; and tokens 0.. of (0, 5)), and many
      for (const [pos, ntok] of [[99, 1], [2, 1], [95, 5], [60, 40], [0, 5]]) {
        for (const qUniform of ntok === 1 ? [false, true] : [false]) {
          const v: AttentionVariant = { ...hs, wg, kv: "texture", qUniform, gq };
          const r = rng(seed++);
          const qd = v.nHeads * v.headDim, kvd = v.nKvHeads * v.headDim;
          const ctx = pos + ntok + 3;
          const q = randArray(r, (ntok + 1) * qd, 2.5);
          const kc = randArray(r, ctx * kvd), vc = randArray(r, ctx * kvd);
          for (let i = (pos + ntok) * kvd; i < ctx * kvd; i++) kc[i] = vc[i] = 1e4;
          const o0 = randArray(r, (ntok + 1) * qd, 10);
          const bufs = {
            step: h.step({ pos, ntok }),
            q: qUniform ? h.uniform(q, qd * 4, "q") : h.buffer(q),
            kcache: h.kvTexture(kc, kvd, v.headDim),
            vcache: h.kvTexture(vc, kvd, v.headDim),
            out: h.buffer(o0),
          };
          h.run({
            pipeline: attentionPipeline(gpu, v),
            names: ["step", "q", "kcache", "vcache", "out"],
            bufs,
            grid: attentionGrid(v, ntok),
          });
          const ref = attentionRef(v, q, kc, vc, pos, ntok);
          const want = Float64Array.from(o0), scale = new Float64Array(o0.length);
          want.set(ref);
          scale.fill(1, 0, ref.length);
          const got = await h.readF32(bufs.out, o0.length);
          const what = `attention (texture KV${qUniform ? ", uniform q" : ""}) ` +
            `${hs.nHeads}/${hs.nKvHeads}×${hs.headDim} wg ${wg} gq ${gq} pos ${pos} ntok ${ntok}`;
          check("attention texture", what, got, want, scale, 1e-5);
          h.release();
        }
      }
    }
  }
});

Deno.test("attention: several sequences in one step (Step rows), KV in buffers and textures", async () => {
  const h = new Harness(gpu);
  const hs = { nHeads: 8, nKvHeads: 4, headDim: 8 };
  const slotCtx = 70, slots = 3;
  // (position, slot) of each token: different slots, positions, and out of order
  const toks = [[7, 2], [0, 0], [65, 1], [12, 2], [40, 0], [1, 1]];
  const rows = toks.map(([pos, s]) => ({ pos, kvBase: s * slotCtx, tokenBase: 0 }));
  const ntok = rows.length;
  const variants: AttentionVariant[] = [
    { ...hs, wg: 32 },
    { ...hs, wg: 8, kv: "texture", gq: 2 },
    { ...hs, wg: 8, kv: "texture", gq: 1 },
  ];
  let seed = 680;
  for (const v of variants) {
    const r = rng(seed++);
    const qd = v.nHeads * v.headDim, kvd = v.nKvHeads * v.headDim;
    const q = randArray(r, (ntok + 1) * qd, 2.5);
    const kc = randArray(r, slots * slotCtx * kvd), vc = randArray(r, slots * slotCtx * kvd);
    const o0 = randArray(r, (ntok + 1) * qd, 10);
    const tex = v.kv === "texture";
    const bufs = {
      step: h.step({ pos: 0, ntok, rows }),
      q: h.buffer(q),
      kcache: tex ? h.kvTexture(kc, kvd, v.headDim) : h.buffer(kc),
      vcache: tex ? h.kvTexture(vc, kvd, v.headDim) : h.buffer(vc),
      out: h.buffer(o0),
    };
    h.run({
      pipeline: attentionPipeline(gpu, v),
      names: ["step", "q", "kcache", "vcache", "out"],
      bufs,
      grid: attentionGrid(v, ntok),
    });
    const want = Float64Array.from(o0), scale = new Float64Array(o0.length);
    rows.forEach((row, t) => {
      const sl = (a: Float32Array) => a.subarray(row.kvBase * kvd, (row.kvBase + slotCtx) * kvd);
      const ref = attentionRef(v, q.subarray(t * qd, (t + 1) * qd), sl(kc), sl(vc), row.pos, 1);
      want.set(ref, t * qd);
      scale.fill(1, t * qd, (t + 1) * qd);
    });
    const got = await h.readF32(bufs.out, o0.length);
    const what = `attention rows ${tex ? `texture gq ${v.gq}` : "buffer"}`;
    check(tex ? "attention texture" : "attention", what, got, want, scale, 1e-5);
    h.release();
  }
});

/** The sampler's bindings: step, logits, tokens and the per-slot config and history. */
const SAMPLER_NAMES = ["step", "logits", "tokens", "scfg", "hist"];

/** A slot config with nothing on. */
const OFF: SlotSampling = {
  logitBias: [],
  presencePenalty: 0,
  frequencyPenalty: 0,
  repetitionPenalty: 1,
  minP: 0,
};

/** The per-slot sampler config (one slot per entry of `cfgs`) and a zeroed history. */
function samplerState(h: Harness, vocab: number, cfgs: Partial<SlotSampling>[] = [{}]) {
  const words = new Uint32Array(cfgs.length * SAMPLER_CFG_WORDS);
  cfgs.forEach((c, i) => words.set(packSamplerConfig({ ...OFF, ...c }), i * SAMPLER_CFG_WORDS));
  return { scfg: h.buffer(words), hist: h.buffer(new Uint32Array(cfgs.length * vocab)) };
}

Deno.test("embed and sample: token base and position from the Step rows", async () => {
  const h = new Harness(gpu);
  const vocab = 40, dim = 12, base = 30;
  const table = randArray(rng(690), vocab * dim);
  // token t at position pos of the sequence whose tokens start at tokenBase
  const rows = [{ pos: 3, kvBase: 0, tokenBase: base }, { pos: 0, kvBase: 0, tokenBase: 0 }];
  const tokens = new Uint32Array(2 * base).fill(1);
  tokens[base + 3] = 17;
  tokens[0] = 5;
  const x0 = new Float32Array(3 * dim).fill(-7);
  const step = h.step({ pos: 0, ntok: 2, rows });
  const v: EmbedVariant = { format: "f32", dim, rowStart: 0, rows: vocab };
  const bufs = { step, tokens: h.buffer(tokens), x: h.buffer(x0), e: h.weights(table, "f32") };
  h.run({
    pipeline: embedPipeline(gpu, v),
    names: ["step", "tokens", "e", "x"],
    bufs,
    grid: embedGrid(v, 2),
  });
  const got = await h.readF32(bufs.x, 3 * dim);
  assert.deepEqual([...got.subarray(0, dim)], [...table.subarray(17 * dim, 18 * dim)]);
  assert.deepEqual([...got.subarray(dim, 2 * dim)], [...table.subarray(5 * dim, 6 * dim)]);
  assert.deepEqual([...got.subarray(2 * dim)], [...x0.subarray(2 * dim)]);
  // the sampler writes after the last row's position in its own sequence: tokens[0 + 0 + 1]
  const logits = new Float32Array(vocab).fill(0);
  logits[23] = 5;
  for (const opts of [{}, { wg: 8 }] as SampleOptions[]) {
    const out = h.buffer(new Uint32Array(2 * base).fill(99));
    const last = h.step({ pos: 0, ntok: 2, rows: [rows[1], rows[0]] });
    h.run({
      pipeline: samplePipeline(gpu, vocab, opts),
      names: SAMPLER_NAMES,
      bufs: { step: last, logits: h.buffer(logits), tokens: out, ...samplerState(h, vocab) },
      grid: [1],
    });
    const t = await h.readU32(out, 2 * base);
    assert.equal(t[base + 4], 23);
    assert.equal(t.filter((x) => x !== 99).length, 1);
  }
  h.release();
});

// ---------------------------------------------------------------------------------------------
// sample
// ---------------------------------------------------------------------------------------------

/** Sampler variants: the GPU shape, and the CPU one with uniform and storage logits. */
const SAMPLERS: SampleOptions[] = [{}, { wg: 8, logitsUniform: true }, { wg: 8 }];

/** The logits binding of a sampler variant. */
function logitsBinding(h: Harness, l: Float32Array, o: SampleOptions): Bindable {
  return o.logitsUniform ? h.uniform(l, l.length * 4, "logits") : h.buffer(l);
}

for (const opts of SAMPLERS) {
  const tag = opts.wg ? ` (wg ${opts.wg}${opts.logitsUniform ? ", uniform logits" : ""})` : "";
  Deno.test(`sample${tag}: temperature 0 is argmax with ties to the lowest index`, async () => {
    const h = new Harness(gpu);
    for (const vocab of [512, 1000]) {
      const r = rng(700 + vocab);
      // pairs of tied maxima: same thread (i, i + 256), and the higher index on a lower lane
      const ties = [[5, 261], [250, 260], [300, 700], [1, 511]];
      const jobs: Job[] = [];
      const want: number[] = [];
      const tokens = h.buffer(new Uint32Array(64).fill(0xffffffff));
      const state = samplerState(h, vocab);
      const logitBufs = ties.map(([a, b], j) => {
        const l = randArray(r, vocab, 3, -5);
        l[a] = l[b] = 1.5;
        want.push(Math.min(a, b));
        return { buf: logitsBinding(h, l, opts), out: 2 * j + 1 + (j % 2) };
      });
      // all negative, distinct maximum
      const neg = randArray(r, vocab, 1, -50);
      neg[vocab - 3] = -40;
      want.push(vocab - 3);
      logitBufs.push({ buf: logitsBinding(h, neg, opts), out: 20 });
      logitBufs.forEach(({ buf, out }, j) => {
        const ntok = 1 + (j % 2);
        jobs.push({
          pipeline: samplePipeline(gpu, vocab, opts),
          names: SAMPLER_NAMES,
          bufs: {
            step: h.step({ pos: out - ntok, ntok, seed: j, topK: 3 }),
            logits: buf,
            tokens,
            ...state,
          },
          grid: [1],
        });
      });
      h.run(...jobs);
      const got = await h.readU32(tokens, 64);
      logitBufs.forEach(({ out }, j) =>
        assert.equal(got[out], want[j], `vocab ${vocab} case ${j}`)
      );
      for (let i = 0; i < 64; i++) {
        if (!logitBufs.some((b) => b.out === i)) assert.equal(got[i], 0xffffffff, `tokens[${i}]`);
      }
      h.release();
    }
  });
}

/** Logits with distinct values at least 0.05 apart, in random index order. */
function separatedLogits(r: () => number, vocab: number): Float32Array {
  const vals: number[] = [];
  let v = 4;
  for (let i = 0; i < vocab; i++) {
    vals.push(v);
    v -= 0.06 + 0.05 * (r() + 1);
  }
  for (let i = vocab - 1; i > 0; i--) {
    const j = Math.floor(((r() + 1) / 2) * (i + 1));
    [vals[i], vals[j]] = [vals[j], vals[i]];
  }
  return Float32Array.from(vals);
}

/** The probabilities sample() uses, unnormalized. */
function probs(logits: Float32Array, T: number): Float64Array {
  let max = -Infinity;
  for (const l of logits) max = Math.max(max, l);
  return Float64Array.from(logits, (l) => Math.exp((l - max) / T));
}

/**
 * A top-p value that keeps the m largest p: halfway between the cumulative masses of the m and
 * m + 1 largest, or, given `delta`, the m-prefix mass (as a fraction of the total) plus delta
 * (a narrow margin: delta < 0 keeps m tokens, delta > 0 keeps m + 1).
 */
function topPAt(p: Float64Array, m: number, delta?: number): number {
  const sorted = p.slice().sort().reverse();
  const total = sorted.reduce((a, b) => a + b, 0);
  let c = 0;
  for (let j = 0; j < m; j++) c += sorted[j];
  return delta === undefined ? (c + sorted[m] / 2) / total : c / total + delta;
}

/** Whether r = u·kept lies within 1e-4·kept of a cumulative sum of the index-order walk. */
function nearBoundary(p: Float64Array, params: SamplingParams, u: number): boolean {
  const sorted = p.slice().sort().reverse();
  const total = sorted.reduce((a, b) => a + b, 0);
  let t = 0;
  if (params.topK > 0 && params.topK < p.length) t = sorted[params.topK - 1];
  if (params.topP < 1) {
    let acc = 0;
    for (let j = 0; j < p.length; j++) {
      acc += sorted[j];
      assert.ok(Math.abs(acc - params.topP * total) > 1e-4 * total, "top-p cut too close");
      if (acc >= params.topP * total) {
        t = Math.max(t, sorted[j]);
        break;
      }
    }
  }
  let kept = 0;
  for (const x of p) if (x >= t) kept += x;
  const rr = u * kept;
  let cum = 0;
  for (const x of p) {
    if (x < t) continue;
    cum += x;
    if (Math.abs(cum - rr) < 1e-4 * kept) return true;
  }
  return false;
}

for (const opts of SAMPLERS) {
  const tag = opts.wg ? ` (wg ${opts.wg}${opts.logitsUniform ? ", uniform logits" : ""})` : "";
  Deno.test(`sample${tag}: temperature, top-k and top-p match the CPU sampler`, async () => {
    const h = new Harness(gpu);
    const SEEDS = 32;
    for (const vocab of [512, 1000]) {
      const logits = separatedLogits(rng(800 + vocab), vocab);
      const logitsBuf = logitsBinding(h, logits, opts);
      for (const T of [0.6, 1, 1.4]) {
        const p = probs(logits, T);
        const combos = [
          { topK: 0, topP: 1 },
          { topK: 1, topP: 1 },
          { topK: 7, topP: 1 },
          { topK: vocab + 5, topP: 1 }, // off
          { topK: -1, topP: 1 }, // off, as vLLM writes it
          { topK: 0, topP: topPAt(p, 4) },
          { topK: 0, topP: topPAt(p, 11) },
          // narrow margins (1e-3 of the mass) on either side of a cut
          { topK: 0, topP: topPAt(p, 3, -1e-3) },
          { topK: 0, topP: topPAt(p, 2, 1e-3) },
          { topK: 6, topP: topPAt(p, 9) }, // top-k is the tighter
          { topK: 20, topP: topPAt(p, 3) }, // top-p is the tighter
        ];
        for (const { topK, topP } of combos) {
          const params = { temperature: T, topK, topP };
          const tokens = h.buffer(new Uint32Array(4 * SEEDS + 8).fill(0xffffffff));
          const state = samplerState(h, vocab);
          const jobs: Job[] = [], outs: number[] = [], want: number[] = [];
          for (let j = 0; j < SEEDS; j++) {
            const seed = (0x9e3779b9 * (j + 1) + vocab) >>> 0;
            const ntok = 1 + (j % 3), pos = 4 * j + 1;
            const u = uniform(seed, pos + ntok);
            if (nearBoundary(p, params, u)) continue;
            outs.push(pos + ntok);
            want.push(sample(logits, params, u));
            jobs.push({
              pipeline: samplePipeline(gpu, vocab, opts),
              names: SAMPLER_NAMES,
              bufs: {
                step: h.step({ pos, ntok, seed, topK, temperature: T, topP }),
                logits: logitsBuf,
                tokens,
                ...state,
              },
              grid: [1],
            });
          }
          assert.ok(jobs.length >= SEEDS * 0.9, `too many seeds skipped: ${jobs.length}`);
          h.run(...jobs);
          const got = await h.readU32(tokens, 4 * SEEDS + 8);
          const what = `vocab ${vocab} T ${T} topK ${topK} topP ${topP.toFixed(4)}`;
          outs.forEach((o, j) => assert.equal(got[o], want[j], `${what}: seed #${j}`));
          for (let i = 0; i < got.length; i++) {
            if (!outs.includes(i)) assert.equal(got[i], 0xffffffff, `${what}: tokens[${i}]`);
          }
          const distinct = new Set(want).size;
          if (topK !== 1) assert.ok(distinct >= 3, `${what}: only ${distinct} distinct tokens`);
        }
      }
      h.release();
    }
  });
}

for (const wg of [256, 8]) {
  Deno.test(`sample (per row, wg ${wg}): each row with its own parameters matches the CPU sampler`, async () => {
    const h = new Harness(gpu);
    const vocab = 700, R = 12, ctx = 20;
    const r = rng(950 + wg);
    const all = new Float32Array(R * vocab);
    const rows: StepRow[] = [], want: number[] = [], outs: number[] = [];
    for (let t = 0; t < R; t++) {
      const logits = separatedLogits(r, vocab);
      all.set(logits, t * vocab);
      const T = [0, 0.6, 1, 1.4][t % 4];
      const p = probs(logits, Math.max(T, 1e-3));
      const params = { temperature: T, topK: [0, 5, 0, 30][(t >> 2) % 4], topP: 1 };
      if (t % 3 === 1 && T > 0) params.topP = topPAt(p, 6);
      const seed = (0x9e3779b9 * (t + 7)) >>> 0, pos = (t * 5) % (ctx - 1);
      const s = T > 0
        ? [...Array(64).keys()].map((k) => seed + k).find((x) =>
          !nearBoundary(p, params, uniform(x, pos + 1))
        )!
        : seed;
      rows.push({ pos, kvBase: 0, tokenBase: t * (ctx + 1), sampling: { seed: s, ...params } });
      want.push(sample(logits, params, uniform(s, pos + 1)));
      outs.push(t * (ctx + 1) + pos + 1);
    }
    const tokens = h.buffer(new Uint32Array(R * (ctx + 1)).fill(0xffffffff));
    h.run({
      pipeline: samplePipeline(gpu, vocab, { wg, perRow: true }),
      names: SAMPLER_NAMES,
      // the step-wide parameters are not the rows'
      bufs: {
        step: h.step({ ntok: R, rows, seed: 1, temperature: 0.3 }),
        logits: h.buffer(all),
        tokens,
        ...samplerState(h, vocab),
      },
      grid: [R],
    });
    const got = await h.readU32(tokens, R * (ctx + 1));
    outs.forEach((o, t) => assert.equal(got[o], want[t], `row ${t}`));
    for (let i = 0; i < got.length; i++) {
      if (!outs.includes(i)) assert.equal(got[i], 0xffffffff, `tokens[${i}]`);
    }
    assert.ok(new Set(want).size >= 4);
    h.release();
  });
}

// ---------------------------------------------------------------------------------------------
// logit bias, penalties, min-p and the sampler history
// ---------------------------------------------------------------------------------------------

/** The slot config of host sampling parameters. */
function slotConfig(p: SamplingParams): SlotSampling {
  return {
    logitBias: [...(p.logitBias ?? [])],
    presencePenalty: p.presencePenalty ?? 0,
    frequencyPenalty: p.frequencyPenalty ?? 0,
    repetitionPenalty: p.repetitionPenalty ?? 1,
    minP: p.minP ?? 0,
  };
}

/**
 * How far a sampling decision is from flipping, relative (the smallest of: the gap between the
 * two largest adjusted logits when greedy; else the distance of every p to the min-p and top-k
 * thresholds, of the top-p prefix masses to the cut, and of the walk's cumulative sums to u·kept).
 * f32 rounding on the GPU moves each by about 1e-6.
 */
function margin(l: Logits, params: SamplingParams, u: number): number {
  const sorted = Array.from(l).sort((a, b) => b - a);
  if (params.temperature === 0) return (sorted[0] - sorted[1]) / Math.max(1, Math.abs(sorted[0]));
  const p = Float64Array.from(l, (x) => Math.exp((x - sorted[0]) / params.temperature));
  const ps = p.slice().sort().reverse();
  const total = ps.reduce((a, b) => a + b, 0);
  let m = Infinity, t = params.minP ?? 0;
  if (t > 0) { for (const x of p) m = Math.min(m, Math.abs(x - t) / t); }
  const k = params.topK;
  if (k > 0 && k < p.length) {
    m = Math.min(m, (ps[k - 1] - ps[k]) / ps[k - 1]);
    t = Math.max(t, ps[k - 1]);
  }
  if (params.topP < 1) {
    let acc = 0;
    for (let j = 0; j < ps.length; j++) {
      acc += ps[j];
      m = Math.min(m, Math.abs(acc - params.topP * total) / total);
      if (acc >= params.topP * total) {
        t = Math.max(t, ps[j]);
        break;
      }
    }
  }
  let kept = 0;
  for (const x of p) if (x >= t) kept += x;
  let cum = 0;
  for (const x of p) {
    if (x < t) continue;
    cum += x;
    m = Math.min(m, Math.abs(cum - u * kept) / kept);
  }
  return m;
}

/**
 * A sequence of `steps` sampled tokens after `prompt`, planned on the host: every step samples
 * from the same `logits` (so that without penalties the same tokens would come again), each with
 * a seed (from `seed0` on) whose decision is at least 1e-4 from flipping. Returns the seeds, the
 * tokens sample() picks, or null when some step finds no such seed.
 */
function planSequence(
  logits: Float32Array,
  params: SamplingParams,
  prompt: number[],
  pos0: number,
  steps: number,
  seed0: number,
): { seeds: number[]; want: number[] } | null {
  const history: SamplingHistory & { generated: number[] } = { prompt, generated: [] };
  const seeds: number[] = [];
  for (let k = 0; k < steps; k++) {
    const l = adjustLogits(logits, params, history);
    const next = pos0 + k + 1;
    const seed = [...Array(64).keys()].map((j) => (seed0 + 97 * k + j) >>> 0)
      .find((x) => margin(l, params, uniform(x, next)) > 1e-4);
    if (seed === undefined) return null;
    seeds.push(seed);
    history.generated.push(sample(logits, params, uniform(seed, next), history));
  }
  return { seeds, want: history.generated };
}

/** The history words a slot should hold: bit 31 for prompt tokens, the times generated. */
function expectedHistory(vocab: number, prompt: number[], generated: number[]): Uint32Array {
  const w = new Uint32Array(vocab);
  for (const t of prompt) w[t] = 0x80000000;
  for (const t of generated) w[t]++;
  return w;
}

/** Parameter sets on odd vocab sizes: greedy, sampled, every filter and penalty, bias. */
function penaltyCases(vocab: number): SamplingParams[] {
  return [
    {
      temperature: 0,
      topK: 0,
      topP: 1,
      repetitionPenalty: 1.3,
      presencePenalty: 0.5,
      frequencyPenalty: 0.3,
      logitBias: new Map([[3, -100], [vocab - 1, 2.5], [17, 0.25]]),
    },
    {
      temperature: 0.8,
      topK: 0,
      topP: 1,
      minP: 0.05,
      frequencyPenalty: 0.4,
      repetitionPenalty: 0.8,
      logitBias: new Map([[0, 1.5], [5, -100], [vocab - 2, 3]]),
    },
    { temperature: 1.2, topK: 20, topP: 0.9, minP: 0.1, presencePenalty: -0.7 },
    { temperature: 0.7, topK: 0, topP: 1, minP: 0.2 }, // min-p alone: no adjust pass
  ];
}

/** A prompt with repeats, the largest logits' tokens and the last id of the vocabulary. */
function penaltyPrompt(logits: Float32Array): number[] {
  const order = [...logits.keys()].sort((a, b) => logits[b] - logits[a]);
  return [order[0], order[2], order[0], logits.length - 1, order[5], 7];
}

for (const opts of SAMPLERS) {
  const tag = opts.wg ? ` (wg ${opts.wg}${opts.logitsUniform ? ", uniform logits" : ""})` : "";
  Deno.test(`sample${tag}: bias, penalties and min-p over a sequence match the CPU sampler`, async () => {
    for (const vocab of [509, 1001]) {
      for (const [c, params] of penaltyCases(vocab).entries()) {
        const h = new Harness(gpu);
        const r = rng(1200 + vocab + c);
        const STEPS = 14, ctx = 40, slot = 1, base = slot * (ctx + 1);
        let logits = separatedLogits(r, vocab), plan = null, prompt: number[] = [];
        for (let tries = 0; !plan; tries++) {
          assert.ok(tries < 8, "no sequence far enough from the boundaries");
          logits = separatedLogits(r, vocab);
          prompt = penaltyPrompt(logits);
          plan = planSequence(logits, params, prompt, prompt.length - 1, STEPS, 77 * c + vocab);
        }
        const tokens = new Uint32Array(2 * (ctx + 1)).fill(0xffffffff);
        tokens.set(prompt, base);
        const tokensBuf = h.buffer(tokens);
        const state = samplerState(h, vocab, [{ minP: 0.5 }, slotConfig(params)]);
        // garbage in both slots' histories: the history kernel resets slot 1's only
        h.device.queue.writeBuffer(state.hist, 0, new Uint32Array(2 * vocab).fill(5));
        const rowAt = (pos: number) => ({ pos, kvBase: 0, tokenBase: base, slot });
        const filler = { pos: 3, kvBase: 0, tokenBase: 0, slot: 0 };
        const jobs: Job[] = [{
          pipeline: historyPipeline(gpu, vocab, opts.wg ?? 256),
          names: ["step", "tokens", "hist"],
          bufs: {
            step: h.step({ ntok: 2, rows: [filler, rowAt(prompt.length - 1)] }),
            ...state,
            tokens: tokensBuf,
          },
          grid: [1],
        }];
        plan.seeds.forEach((seed, k) => {
          const pos = prompt.length - 1 + k, ntok = 1 + (k % 2);
          const rows = ntok === 1 ? [rowAt(pos)] : [filler, rowAt(pos)];
          const step = h.step({ pos, ntok, rows, seed, ...params });
          const lb = logitsBinding(h, logits, opts);
          const storage = "buffer" in lb ? lb.buffer : lb as GPUBuffer;
          jobs.push({
            pipeline: adjustPipeline(gpu, vocab, { wg: opts.wg }),
            names: ["step", "logits", "scfg", "hist"],
            bufs: { step, logits: storage, ...state },
            grid: [1],
          }, {
            pipeline: samplePipeline(gpu, vocab, opts),
            names: SAMPLER_NAMES,
            bufs: { step, logits: lb, tokens: tokensBuf, ...state },
            grid: [1],
          });
        });
        h.run(...jobs);
        const got = await h.readU32(tokensBuf, 2 * (ctx + 1));
        const what = `vocab ${vocab} case ${c}`;
        assert.deepEqual(
          [...got.subarray(base + prompt.length, base + prompt.length + STEPS)],
          plan.want,
          what,
        );
        const hist = await h.readU32(state.hist, 2 * vocab);
        assert.deepEqual([...hist.subarray(0, vocab)], Array(vocab).fill(5), `${what}: slot 0`);
        assert.deepEqual(
          [...hist.subarray(vocab)],
          [...expectedHistory(vocab, prompt, plan.want)],
          `${what}: slot 1 history`,
        );
        // the penalties and bias matter: without them the sequence differs
        const plain = { temperature: params.temperature, topK: params.topK, topP: params.topP };
        const free = planSequence(logits, plain, prompt, prompt.length - 1, STEPS, 0);
        if (free) assert.notDeepEqual(free.want, plan.want, `${what}: parameters had no effect`);
        h.release();
      }
    }
  });
}

for (const wg of [256, 8]) {
  Deno.test(`sample (per row, wg ${wg}): bias, penalties and min-p per slot match the CPU sampler`, async () => {
    const h = new Harness(gpu);
    const vocab = 701, ctx = 30, STEPS = 10;
    const cases = penaltyCases(vocab);
    const slots = [2, 0, 3, 1]; // row t runs in slot slots[t] with cases[t]
    const r = rng(1300 + wg);
    const seqs = cases.map((params, t) => {
      for (let tries = 0; tries < 8; tries++) {
        const logits = separatedLogits(r, vocab);
        const prompt = penaltyPrompt(logits).slice(0, 3 + t);
        const plan = planSequence(logits, params, prompt, prompt.length - 1, STEPS, 31 * t);
        if (plan) return { logits, prompt, plan, params, slot: slots[t] };
      }
      throw new Error("no sequence far enough from the boundaries");
    });
    const cfgs: Partial<SlotSampling>[] = [];
    for (const q of seqs) cfgs[q.slot] = slotConfig(q.params);
    const state = samplerState(h, vocab, cfgs);
    const tokens = new Uint32Array(cases.length * (ctx + 1)).fill(0xffffffff);
    for (const q of seqs) tokens.set(q.prompt, q.slot * (ctx + 1));
    const tokensBuf = h.buffer(tokens);
    const jobs: Job[] = [];
    // each slot's history from its prompt (one history dispatch per slot, as each prefill does)
    for (const q of seqs) {
      const row = {
        pos: q.prompt.length - 1,
        kvBase: 0,
        tokenBase: q.slot * (ctx + 1),
        slot: q.slot,
      };
      jobs.push({
        pipeline: historyPipeline(gpu, vocab, wg),
        names: ["step", "tokens", "hist"],
        bufs: { step: h.step({ rows: [row] }), tokens: tokensBuf, ...state },
        grid: [1],
      });
    }
    for (let k = 0; k < STEPS; k++) {
      const all = new Float32Array(seqs.length * vocab);
      const rows: StepRow[] = seqs.map((q, t) => {
        all.set(q.logits, t * vocab);
        const pos = q.prompt.length - 1 + k;
        const sampling = { ...q.params, seed: q.plan.seeds[k] };
        return { pos, kvBase: 0, tokenBase: q.slot * (ctx + 1), slot: q.slot, sampling };
      });
      const step = h.step({ ntok: rows.length, rows, seed: 1, temperature: 0.3 });
      const logits = h.buffer(all);
      jobs.push({
        pipeline: adjustPipeline(gpu, vocab, { wg, perRow: true }),
        names: ["step", "logits", "scfg", "hist"],
        bufs: { step, logits, ...state },
        grid: [rows.length],
      }, {
        pipeline: samplePipeline(gpu, vocab, { wg, perRow: true }),
        names: SAMPLER_NAMES,
        bufs: { step, logits, tokens: tokensBuf, ...state },
        grid: [rows.length],
      });
    }
    h.run(...jobs);
    const got = await h.readU32(tokensBuf, tokens.length);
    const hist = await h.readU32(state.hist, cases.length * vocab);
    for (const [t, q] of seqs.entries()) {
      const at = q.slot * (ctx + 1) + q.prompt.length;
      assert.deepEqual([...got.subarray(at, at + STEPS)], q.plan.want, `row ${t}`);
      assert.deepEqual(
        [...hist.subarray(q.slot * vocab, (q.slot + 1) * vocab)],
        [...expectedHistory(vocab, q.prompt, q.plan.want)],
        `row ${t}: history`,
      );
    }
    h.release();
  });
}

Deno.test("kernels: largest errors (relative to the tolerance scale)", () => {
  for (const [k, v] of worst) console.log(`  ${k}: ${v.toExponential(2)}`);
});
