/** Activations, KV cache and step buffers of one sequence on the GPU (llama2.c's RunState). */
import { type ModelConfig, ropeInvFreq } from "./config.ts";
import { type Gpu, STORAGE } from "../kernels/gpu.ts";
import { STEP_BYTES } from "../kernels/common.ts";

export interface RunState {
  ctx: number; // positions the KV cache holds
  maxT: number; // tokens per prefill step
  step: GPUBuffer; // uniform Step
  tokens: GPUBuffer; // (ctx + 1) u32: prompt, then each sampled token at its position
  x: GPUBuffer; // (maxT, dim) residual stream
  xn: GPUBuffer; // (maxT, dim) normalized x (prefill)
  xlast: GPUBuffer; // (dim) the last prefill token's x
  q: GPUBuffer; // (maxT, nHeads·headDim)
  att: GPUBuffer; // (maxT, nHeads·headDim) attention output
  h: GPUBuffer; // (maxT, hidden) FFN activation
  logits: GPUBuffer; // (vocab)
  rope: GPUBuffer; // (ctx, headDim/2) cos, sin
  kcache: GPUBuffer[]; // per layer (ctx, nKvHeads·headDim)
  vcache: GPUBuffer[]; // per layer (ctx, nKvHeads·headDim)
  bytes: number;
}

export function createRunState(gpu: Gpu, c: ModelConfig, ctx: number, maxT: number): RunState {
  const qd = c.nHeads * c.headDim, kvd = c.nKvHeads * c.headDim;
  const rw = STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  let bytes = 0;
  const f32 = (label: string, n: number) => {
    bytes += n * 4;
    return gpu.buffer(label, n * 4, rw);
  };
  // RoPE table in float64, stored as f32 (WGSL sin/cos are inexact far from zero)
  const inv = ropeInvFreq(c), half = c.headDim / 2;
  const table = new Float32Array(ctx * half * 2);
  for (let p = 0; p < ctx; p++) {
    for (let i = 0; i < half; i++) {
      table[(p * half + i) * 2] = Math.cos(p * inv[i]);
      table[(p * half + i) * 2 + 1] = Math.sin(p * inv[i]);
    }
  }
  return {
    ctx,
    maxT,
    step: gpu.buffer("step", STEP_BYTES, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST),
    tokens: gpu.buffer("tokens", (ctx + 1) * 4, rw),
    x: f32("x", maxT * c.dim),
    xn: f32("xn", maxT * c.dim),
    xlast: f32("xlast", c.dim),
    q: f32("q", maxT * qd),
    att: f32("att", maxT * qd),
    h: f32("h", maxT * c.hiddenDim),
    logits: f32("logits", c.vocabSize),
    rope: gpu.upload("rope", table),
    kcache: Array.from({ length: c.nLayers }, (_, l) => f32(`kcache.${l}`, ctx * kvd)),
    vcache: Array.from({ length: c.nLayers }, (_, l) => f32(`vcache.${l}`, ctx * kvd)),
    bytes: bytes + table.byteLength,
  };
}
