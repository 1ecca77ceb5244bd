/**
 * The quantized kernels (kernels/matvec_q.ts, kernels/matmul_q.ts) against a float64 reference:
 * dequantize() the packed layer, multiply, apply the epilogue, and require
 * |y − y_ref| ≤ 1e-3 · ||dequantized row|| · ||x|| for every output, on odd shapes, every bit width
 * × group size, every epilogue, with and without the fused RMSNorm, CPU and GPU thread shapes,
 * batches 1/3/8 and prefill token counts 1/5/13.
 */
import assert from "node:assert/strict";
import { stepUniform } from "../kernels/common.ts";
import type { Epilogue } from "../kernels/epilogue.ts";
import type { Gpu } from "../kernels/gpu.ts";
import {
  createQTextures,
  matvecQBindings,
  matvecQGrid,
  matvecQPipeline,
  matvecQShape,
  type MatvecQVariant,
  matvecQWgsl,
  MAX_Q_BATCH,
  qGroup,
} from "../kernels/matvec_q.ts";
import {
  matmulQBindings,
  matmulQGrid,
  matmulQPipeline,
  matmulQShape,
  type MatmulQVariant,
} from "../kernels/matmul_q.ts";
import { packQ } from "../runtime/format/pack.ts";
import {
  type Bits,
  dequantize,
  nGroups,
  qRange,
  type QuantizedLinear,
} from "../runtime/format/qtensor.ts";
import { ParameterError } from "../runtime/errors.ts";
import { rng, testGpu } from "./helpers.ts";

const SENTINEL = -12345;

function randomQl(N: number, K: number, bits: Bits, G: number, seed: number): QuantizedLinear {
  const r = rng(seed);
  const { qmin, qmax } = qRange(bits);
  const nG = nGroups(K, G);
  const q = Int8Array.from(
    { length: N * K },
    () => qmin + Math.min(qmax - qmin, Math.floor((r() + 1) / 2 * (qmax - qmin + 1))),
  );
  const scale = Float32Array.from({ length: N * nG }, () => Math.f16round(0.011 + r() * 0.01));
  const zero = Float32Array.from({ length: N * nG }, () => Math.f16round(r() * 0.05));
  return { N, K, bits, groupSize: G === 0 ? K : G, q, scale, zero };
}

function rand(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => lo + (r() + 1) / 2 * (hi - lo));
}

async function readBack(gpu: Gpu, buf: GPUBuffer, n: number): Promise<Float32Array> {
  const read = gpu.device.createBuffer({
    size: n * 4,
    usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
  });
  const enc = gpu.device.createCommandEncoder();
  enc.copyBufferToBuffer(buf, 0, read, 0, n * 4);
  gpu.device.queue.submit([enc.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  const out = new Float32Array(read.getMappedRange().slice(0));
  read.destroy();
  return out;
}

interface Case {
  name: string;
  bits: Bits;
  G: number;
  N: number;
  K: number;
  epilogue: Epilogue;
  /** matvec: the batch; matmul: ntok. */
  tokens: number;
  norm?: boolean;
  pos?: number;
  shape: { tpr: number; upw: number; upt: number; tt?: number };
  kind: "matvec" | "matmul";
  weights?: "buffer" | "texture";
  xUniform?: boolean;
}

const EPS = 1e-5;
const HD = 8, NH = 4, NKV = 2, CTX = 32; // qkv: head dim, heads, kv heads, cache positions

/** Runs one kernel on random data and checks it against the float64 reference. */
async function check(c: Case): Promise<void> {
  const gpu = await testGpu();
  const { N, K, tokens: T, epilogue: e } = c;
  const seed = N * 7919 + K * 31 + c.bits * 7 + c.G + T * 101;
  const ql = randomQl(N, K, c.bits, c.G, seed);
  const packed = packQ(ql);
  const W = dequantize(ql, new Float64Array(N * K));
  const x = rand(T * K, seed + 1);
  const g = rand(K, seed + 2, 0.5, 1.5);
  const pos = c.pos ?? 0;

  // reference: per token, normalized input and the N dot products
  const xin: Float64Array[] = [], dots: Float64Array[] = [], xnorm: number[] = [];
  for (let t = 0; t < T; t++) {
    const v = Float64Array.from(x.subarray(t * K, (t + 1) * K));
    if (c.norm) {
      let ss = 0;
      for (const a of v) ss += a * a;
      const inv = 1 / Math.sqrt(ss / K + EPS);
      for (let k = 0; k < K; k++) v[k] *= inv * g[k];
    }
    xin.push(v);
    xnorm.push(Math.hypot(...v));
    const d = new Float64Array(N);
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += W[n * K + k] * v[k];
      d[n] = s;
    }
    dots.push(d);
  }
  const rowNorm = new Float64Array(N);
  for (let n = 0; n < N; n++) {
    let s = 0;
    for (let k = 0; k < K; k++) s += W[n * K + k] ** 2;
    rowNorm[n] = Math.sqrt(s);
  }
  const tolRow = (t: number, n: number) => 1e-3 * rowNorm[n] * xnorm[t];

  // buffers by binding name
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  const bufs: Record<string, GPUBuffer | GPUTextureView> = {};
  const outs: Record<string, { buf: GPUBuffer; init: Float32Array }> = {};
  const out = (name: string, init: Float32Array) => {
    const buf = gpu.upload(name, init, usage);
    bufs[name] = buf;
    outs[name] = { buf, init };
  };
  bufs.x = c.xUniform ? gpu.upload("x", x, GPUBufferUsage.UNIFORM) : gpu.upload("x", x);
  bufs.g = c.xUniform ? gpu.upload("g", g, GPUBufferUsage.UNIFORM) : gpu.upload("g", g);
  if (c.weights === "texture") {
    const tex = createQTextures(gpu, packed, { bits: c.bits, K, groupSize: c.G });
    bufs.qweight = tex.qweight.createView();
    bufs.sz = tex.sz.createView();
  } else {
    bufs.qweight = gpu.upload("qweight", packed.qweight);
    bufs.sz = gpu.upload("sz", packed.sz);
  }
  bufs.step = stepUniform(gpu, "step", { pos, ntok: T });
  const half = HD / 2, qd = NH * HD, kvd = NKV * HD;
  let bias: Float32Array | null = null;
  if (e.kind === "store") out("y", new Float32Array(T * e.ld).fill(SENTINEL));
  else if (e.kind === "add") out("y", rand(T * N, seed + 3));
  else if (e.kind === "gateup") out("y", new Float32Array(T * e.hidden).fill(SENTINEL));
  else {
    out("q", new Float32Array(T * qd).fill(SENTINEL));
    out("kcache", new Float32Array(CTX * kvd).fill(SENTINEL));
    out("vcache", new Float32Array(CTX * kvd).fill(SENTINEL));
    const rope = new Float32Array(CTX * half * 2);
    for (let p = 0; p < CTX; p++) {
      for (let i = 0; i < half; i++) {
        const a = p * Math.pow(10000, -2 * i / HD);
        rope[(p * half + i) * 2] = Math.cos(a);
        rope[(p * half + i) * 2 + 1] = Math.sin(a);
      }
    }
    bufs.rope = gpu.upload("rope", rope);
    if (e.bias) {
      bias = rand(N, seed + 4);
      bufs.bias = gpu.upload("bias", bias);
    }
  }

  // dispatch
  let pipeline: GPUComputePipeline, names: string[], wg: number[];
  if (c.kind === "matvec") {
    const v: MatvecQVariant = {
      bits: c.bits,
      groupSize: c.G,
      rows: N,
      K,
      norm: c.norm ? { eps: EPS } : null,
      epilogue: e,
      batch: T,
      weights: c.weights,
      xUniform: c.xUniform,
      ...c.shape,
    };
    pipeline = matvecQPipeline(gpu, v);
    names = matvecQBindings(v);
    wg = matvecQGrid(v);
  } else {
    const v: MatmulQVariant = {
      bits: c.bits,
      groupSize: c.G,
      rows: N,
      K,
      norm: c.norm ? { eps: EPS } : null,
      epilogue: e,
      weights: c.weights,
      ...c.shape,
    };
    pipeline = matmulQPipeline(gpu, v);
    names = matmulQBindings(v);
    wg = matmulQGrid(v, T);
  }
  const bindGroup = gpu.device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: names.map((n, binding) => {
      const r = bufs[n];
      assert.ok(r, `no buffer for binding ${n}`);
      return { binding, resource: r instanceof GPUBuffer ? { buffer: r } : r };
    }),
  });
  gpu.device.pushErrorScope("validation");
  const enc = gpu.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(0, bindGroup);
  pass.dispatchWorkgroups(wg[0], wg[1] ?? 1, wg[2] ?? 1);
  pass.end();
  gpu.device.queue.submit([enc.finish()]);
  const err = await gpu.device.popErrorScope();
  assert.equal(err, null, `${c.name}: ${err?.message}`);

  // expected outputs (NaN = must equal the initial value) and tolerances
  const got: Record<string, Float32Array> = {};
  for (const [n, o] of Object.entries(outs)) got[n] = await readBack(gpu, o.buf, o.init.length);
  const exp: Record<string, Float64Array> = {}, tol: Record<string, Float64Array> = {};
  for (const [n, o] of Object.entries(outs)) {
    exp[n] = Float64Array.from(o.init);
    tol[n] = new Float64Array(o.init.length);
  }
  const set = (n: string, i: number, v: number, t: number) => {
    exp[n][i] = v;
    tol[n][i] = t;
  };
  for (let t = 0; t < T; t++) {
    const d = dots[t];
    if (e.kind === "store") {
      for (let n = 0; n < N; n++) set("y", t * e.ld + e.offset + n, d[n], tolRow(t, n));
    } else if (e.kind === "add") {
      for (let n = 0; n < N; n++) {
        const i = t * N + n;
        set("y", i, exp.y[i] + d[n], tolRow(t, n) + 1e-6 * Math.abs(exp.y[i]));
      }
    } else if (e.kind === "gateup") {
      for (let j = 0; j < e.hidden; j++) {
        const a = d[j], b = d[j + e.hidden];
        const sg = 1 / (1 + Math.exp(-a));
        const tl = 1.1 * Math.abs(b) * tolRow(t, j) + Math.abs(a * sg) * tolRow(t, j + e.hidden);
        set("y", t * e.hidden + j, a * sg * b, tl + 1e-6);
      }
    } else {
      const p = pos + t;
      for (let u = 0; u < N / 2; u++) {
        const head = Math.floor(u / half), i = u % half;
        const ra = head * HD + i, rb = ra + half;
        let va = d[ra] + (bias ? bias[ra] : 0), vb = d[rb] + (bias ? bias[rb] : 0);
        if (head < NH + NKV) {
          const a = p * Math.pow(10000, -2 * i / HD);
          const cs = Math.fround(Math.cos(a)), sn = Math.fround(Math.sin(a));
          [va, vb] = [va * cs - vb * sn, vb * cs + va * sn];
        }
        const tl = tolRow(t, ra) + tolRow(t, rb) + 1e-6;
        if (head < NH) {
          const o = t * qd + head * HD + i;
          set("q", o, va, tl);
          set("q", o + half, vb, tl);
        } else {
          const buf = head < NH + NKV ? "kcache" : "vcache";
          const o = p * kvd + (head - (head < NH + NKV ? NH : NH + NKV)) * HD + i;
          set(buf, o, va, tl);
          set(buf, o + half, vb, tl);
        }
      }
    }
  }
  for (const n of Object.keys(outs)) {
    for (let i = 0; i < exp[n].length; i++) {
      const diff = Math.abs(got[n][i] - exp[n][i]);
      if (tol[n][i] === 0) {
        assert.equal(got[n][i], outs[n].init[i], `${c.name}: ${n}[${i}] was overwritten`);
      } else if (!(diff <= tol[n][i])) {
        assert.fail(
          `${c.name}: ${n}[${i}] = ${got[n][i]}, expected ${exp[n][i]} (|diff| ${diff} > ${
            tol[n][i]
          })`,
        );
      }
    }
  }
  for (const b of Object.values(bufs)) if (b instanceof GPUBuffer) b.destroy();
}

const CPU_SHAPE = { tpr: 1, upt: 4, upw: 8 }; // small upt: quick to compile, N % upw ≠ 0
const GPU_SHAPE = { tpr: 32, upt: 1, upw: 4 };
const store = (N: number): Epilogue => ({ kind: "store", offset: 0, ld: N });
const qkvRows = (NH + 2 * NKV) * HD;

Deno.test("matvec_q: every bit width × group size, CPU and GPU thread shapes", async () => {
  let i = 0;
  for (const bits of [2, 3, 4] as Bits[]) {
    for (const G of [32, 64, 128, 0]) {
      // K = 172: a short last group (and block); K = 192 = 3·64
      const [Ka, Kb] = i++ % 2 ? [172, 192] : [192, 172];
      for (const [K, shape] of [[Ka, CPU_SHAPE], [Kb, GPU_SHAPE]] as const) {
        await check({
          name: `b${bits} G${G} K${K} tpr${shape.tpr}`,
          kind: "matvec",
          bits,
          G,
          N: 37,
          K,
          epilogue: store(37),
          tokens: 1,
          shape,
        });
      }
    }
  }
});

Deno.test("matvec_q: epilogues, fused RMSNorm and batches", async () => {
  const cases: Omit<Case, "kind">[] = [
    {
      name: "store offset/ld, norm, batch 3",
      bits: 3,
      G: 64,
      N: 50,
      K: 172,
      epilogue: { kind: "store", offset: 7, ld: 70 },
      tokens: 3,
      norm: true,
      shape: { tpr: 1, upt: 2, upw: 4 },
    },
    {
      name: "add, batch 8, GPU shape",
      bits: 4,
      G: 32,
      N: 45,
      K: 96,
      epilogue: { kind: "add" },
      tokens: 8,
      shape: { tpr: 64, upt: 1, upw: 2 },
    },
    {
      name: "gateup, norm, batch 3",
      bits: 2,
      G: 128,
      N: 58,
      K: 300,
      epilogue: { kind: "gateup", hidden: 29 },
      tokens: 3,
      norm: true,
      shape: { tpr: 1, upt: 3, upw: 6 },
    },
    {
      name: "gateup, G = 0, GPU shape",
      bits: 4,
      G: 0,
      N: 40,
      K: 172,
      epilogue: { kind: "gateup", hidden: 20 },
      tokens: 1,
      shape: { tpr: 32, upt: 1, upw: 8 },
    },
    {
      name: "gateup, norm, batch 3, GPU shape with 2 units per thread",
      bits: 3,
      G: 32,
      N: 58,
      K: 172,
      epilogue: { kind: "gateup", hidden: 29 },
      tokens: 3,
      norm: true,
      shape: { tpr: 16, upt: 2, upw: 4 },
    },
    {
      name: "qkv GQA + bias, norm, pos 5, batch 3",
      bits: 4,
      G: 32,
      N: qkvRows,
      K: 96,
      epilogue: { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: true },
      tokens: 3,
      norm: true,
      pos: 5,
      shape: CPU_SHAPE,
    },
    {
      name: "qkv GQA, pos 3, GPU shape + norm",
      bits: 3,
      G: 64,
      N: qkvRows,
      K: 128,
      epilogue: { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: false },
      tokens: 1,
      norm: true,
      pos: 3,
      shape: { tpr: 32, upt: 1, upw: 8 },
    },
  ];
  for (const c of cases) await check({ ...c, kind: "matvec" });
});

Deno.test("matvec_q: the adapter's shapes (batch 1 and 8) and the texture/uniform sources", async () => {
  const gpu = await testGpu();
  await check({
    name: "matvecQShape batch 1, norm",
    kind: "matvec",
    bits: 4,
    G: 64,
    N: 70,
    K: 256,
    epilogue: store(70),
    tokens: 1,
    norm: true,
    shape: matvecQShape(gpu, 256, 1, store(70)),
  });
  await check({
    name: "matvecQShape batch 8, qkv pos 2",
    kind: "matvec",
    bits: 2,
    G: 32,
    N: qkvRows,
    K: 64,
    epilogue: { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: false },
    tokens: 8,
    pos: 2,
    shape: matvecQShape(gpu, 64, 8, {
      kind: "qkv",
      nHeads: NH,
      nKvHeads: NKV,
      headDim: HD,
      bias: false,
    }),
  });
  await check({
    name: "texture weights over several texture rows",
    kind: "matvec",
    bits: 4,
    G: 32,
    N: 200,
    K: 1024,
    epilogue: store(200),
    tokens: 1,
    shape: CPU_SHAPE,
    weights: "texture",
  });
  for (const bits of [2, 3, 4] as Bits[]) {
    await check({
      name: `texture weights + uniform x, b${bits}`,
      kind: "matvec",
      bits,
      G: bits === 3 ? 32 : 64,
      N: 37,
      K: 172,
      epilogue: bits === 2 ? { kind: "add" } : store(37),
      tokens: bits === 4 ? 1 : 2,
      norm: bits !== 2,
      shape: CPU_SHAPE,
      weights: "texture",
      xUniform: bits !== 2,
    });
  }
});

Deno.test("matvec_q texture source: every bit width × group size, odd K, batch 1/3/8", async () => {
  // K = 172: short last block and group; 448 = 7·64 (a partial chunk of 4 groups, half a W3
  // unit); 688 = 5·128 + 48 (a last group shorter than the W4 unit run)
  let i = 0;
  for (const bits of [2, 3, 4] as Bits[]) {
    for (const G of [32, 64, 128, 0]) {
      const K = [172, 448, 688][i % 3], tokens = [1, 3, 8][i % 3];
      await check({
        name: `texture b${bits} G${G} K${K} batch ${tokens}`,
        kind: "matvec",
        bits,
        G,
        N: 37,
        K,
        epilogue: i % 2 ? { kind: "add" } : store(37),
        tokens,
        norm: i % 4 < 2,
        shape: CPU_SHAPE,
        weights: "texture",
        xUniform: i % 2 === 0 && tokens * K * 4 <= 65536,
      });
      i++;
    }
  }
});

Deno.test("matmul_q: prefill for 1, 5 and 13 tokens", async () => {
  const gpu = await testGpu();
  const cpu = matmulQShape(gpu, { kind: "add" });
  const cases: Omit<Case, "kind">[] = [
    {
      name: "store offset/ld, 13 tokens, default shape",
      bits: 4,
      G: 64,
      N: 37,
      K: 172,
      epilogue: { kind: "store", offset: 3, ld: 41 },
      tokens: 13,
      shape: { tpr: 1, upt: 1, upw: 64, tt: 8 },
    },
    {
      name: "add, 5 tokens, CPU shape",
      bits: 2,
      G: 32,
      N: 37,
      K: 192,
      epilogue: { kind: "add" },
      tokens: 5,
      shape: cpu,
    },
    {
      name: "gateup, G = 0, 13 tokens",
      bits: 3,
      G: 0,
      N: 42,
      K: 172,
      epilogue: { kind: "gateup", hidden: 21 },
      tokens: 13,
      shape: { tpr: 1, upt: 3, upw: 6, tt: 4 },
    },
    {
      name: "qkv GQA + bias, pos 4, 5 tokens",
      bits: 4,
      G: 128,
      N: qkvRows,
      K: 300,
      epilogue: { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: true },
      tokens: 5,
      pos: 4,
      shape: { tpr: 1, upt: 4, upw: 8, tt: 8 },
    },
    {
      name: "qkv, 13 tokens, threads sharing units",
      bits: 2,
      G: 64,
      N: qkvRows,
      K: 192,
      epilogue: { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: false },
      tokens: 13,
      pos: 9,
      shape: { tpr: 8, upt: 1, upw: 4, tt: 4 },
    },
    {
      name: "qkv, 13 tokens, threads sharing units, fused norm",
      bits: 3,
      G: 64,
      N: qkvRows,
      K: 192,
      epilogue: { kind: "qkv", nHeads: NH, nKvHeads: NKV, headDim: HD, bias: true },
      tokens: 13,
      pos: 2,
      norm: true,
      shape: { tpr: 8, upt: 1, upw: 4, tt: 4 },
    },
    {
      name: "gateup, 11 tokens (a last token group of 3), fused norm",
      bits: 4,
      G: 32,
      N: 58,
      K: 300,
      epilogue: { kind: "gateup", hidden: 29 },
      tokens: 11,
      norm: true,
      shape: { tpr: 1, upt: 2, upw: 8, tt: 8 },
    },
    {
      name: "store, 7 tokens, texture weights, fused norm",
      bits: 2,
      G: 128,
      N: 37,
      K: 172,
      epilogue: store(37),
      tokens: 7,
      norm: true,
      shape: { tpr: 1, upt: 4, upw: 8, tt: 8 },
      weights: "texture",
    },
    {
      name: "store, 1 token, texture weights",
      bits: 3,
      G: 32,
      N: 37,
      K: 172,
      epilogue: store(37),
      tokens: 1,
      shape: { tpr: 1, upt: 4, upw: 8, tt: 4 },
      weights: "texture",
    },
    {
      name: "gateup, 6 tokens, texture weights",
      bits: 2,
      G: 64,
      N: 58,
      K: 448,
      epilogue: { kind: "gateup", hidden: 29 },
      tokens: 6,
      shape: { tpr: 1, upt: 3, upw: 6, tt: 4 },
      weights: "texture",
    },
  ];
  for (const c of cases) await check({ ...c, kind: "matmul" });
});

Deno.test("quantized kernels reject unsupported group sizes, batches and uniform x", () => {
  assert.equal(qGroup(172, 0), 172);
  assert.equal(qGroup(96, 128), 96);
  assert.throws(() => qGroup(256, 48), ParameterError);
  const v: MatvecQVariant = {
    bits: 4,
    groupSize: 64,
    rows: 8,
    K: 8192,
    norm: null,
    epilogue: store(8),
    tpr: 1,
    upw: 8,
    upt: 1,
    batch: MAX_Q_BATCH + 1,
  };
  assert.throws(() => matvecQWgsl(v), ParameterError);
  assert.throws(() => matvecQWgsl({ ...v, batch: 4, xUniform: true }), ParameterError);
  assert.ok(matvecQWgsl({ ...v, batch: 2, xUniform: true }).includes("var<uniform> x"));
  assert.throws(() => matvecQWgsl({ ...v, batch: 1, weights: "texture", tpr: 4 }), ParameterError);
  assert.throws(
    () => matvecQWgsl({ ...v, batch: 1, weights: "texture", groupSize: 96 }),
    /group size of 32·2\^k/,
  );
});
