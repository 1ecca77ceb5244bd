/** Activations, KV cache and step buffers of one sequence on the GPU (llama2.c's RunState). */
import { type ModelConfig, ropeInvFreq } from "../checkpoint/config.ts";
import { type Gpu, STORAGE } from "../../kernels/gpu.ts";
import { STEP_BYTES } from "../../kernels/common.ts";
import type { KvSource, KvType } from "../../kernels/epilogue.ts";
import { SAMPLER_CFG_WORDS } from "../../kernels/penalties.ts";
import { ParameterError } from "../errors.ts";

export interface RunState {
  ctx: number; // positions the KV cache holds per slot
  slots: number; // sequences held at once: slot s has KV rows [s·ctx, (s + 1)·ctx), tokens from s·(ctx + 1)
  maxT: number; // tokens per prefill step
  step: GPUBuffer; // uniform Step
  tokens: GPUBuffer; // slots·(ctx + 1) u32 (per slot: prompt, then each sampled token at its position)
  x: GPUBuffer; // (maxT, dim) residual stream
  xn: GPUBuffer; // (maxT, dim) normalized x (prefill)
  xlast: GPUBuffer; // (dim) the last prefill token's x
  q: GPUBuffer; // (maxT, nHeads·headDim)
  att: GPUBuffer; // (maxT, nHeads·headDim) attention output
  h: GPUBuffer; // (maxT, hidden) FFN activation
  logits: GPUBuffer; // (vocab)
  rope: GPUBuffer; // (ctx, headDim/2) cos, sin
  /** Per slot: the sampler config, SAMPLER_CFG_WORDS u32 (kernels/penalties.ts). */
  scfg: GPUBuffer;
  /** Per slot: the sampler history, vocab u32 (prompt flag, times generated). */
  hist: GPUBuffer;
  /** KV cache layout (kernels/epilogue.ts KvSource): textures on CPU adapters. */
  kv: KvSource;
  /** KV cache element type (kernels/epilogue.ts KvType): f16 halves the cache's memory. */
  kvType: KvType;
  kcache: (GPUBuffer | GPUTexture)[]; // per layer (slots·ctx, nKvHeads·headDim)
  vcache: (GPUBuffer | GPUTexture)[]; // per layer (slots·ctx, nKvHeads·headDim)
  /** GPU memory of the activations, KV cache, RoPE table and sampler state. */
  bytes: number;
}

/**
 * Activations are storage buffers that decode kernels on CPU adapters also bind as uniforms (a
 * broadcast load on lavapipe, where storage loads are per-lane loops).
 */
const ACT_USAGE = STORAGE | GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_SRC |
  GPUBufferUsage.COPY_DST;

/** The KV layout for an adapter and cache shape: textures on CPU adapters where they fit. */
export function kvSource(gpu: Gpu, ctx: number, kvd: number): KvSource {
  const max = gpu.device.limits.maxTextureDimension2D;
  return gpu.isCpu && ctx <= max && kvd / 2 <= max ? "texture" : "buffer";
}

/**
 * The default KV element type: f16 where the device has `shader-f16` (Gpu.shaderF16), f32
 * otherwise. Packing halves needs no extension; the feature marks adapters built for half
 * precision, and `createGpu({ allowShaderF16: false })` turns f16 off for weights and cache alike.
 */
export function defaultKvType(gpu: Gpu): KvType {
  return gpu.shaderF16 ? "f16" : "f32";
}

/** The element types {@link createRunState} accepts (the CLIs' `--kv-cache`). */
export const KV_TYPES: readonly KvType[] = ["f16", "f32"];

/** `t` if it is a KV element type; a ParameterError naming `what` and the value otherwise. */
export function checkKvType(t: unknown, what = "the KV cache type"): KvType {
  if (!KV_TYPES.includes(t as KvType)) {
    throw new ParameterError(`${what} must be ${KV_TYPES.join(" or ")}; got ${JSON.stringify(t)}`);
  }
  return t as KvType;
}

export function createRunState(
  gpu: Gpu,
  c: ModelConfig,
  ctx: number,
  maxT: number,
  slots = 1,
  kvType: KvType = defaultKvType(gpu),
): RunState {
  checkKvType(kvType);
  const qd = c.nHeads * c.headDim, kvd = c.nKvHeads * c.headDim;
  let bytes = 0;
  const f32 = (label: string, n: number) => {
    bytes += n * 4;
    return gpu.buffer(label, n * 4, ACT_USAGE);
  };
  const rows = ctx * slots;
  const kv = kvSource(gpu, rows, kvd);
  // f32: 4 bytes an element; f16: rotate-half pairs of halves in one u32 (see KvType)
  const kvBytes = rows * kvd * (kvType === "f16" ? 2 : 4);
  const cache = (label: string) => {
    bytes += kvBytes;
    if (kv === "buffer") return gpu.buffer(label, kvBytes, ACT_USAGE);
    return gpu.device.createTexture({
      label,
      size: [kvd / 2, rows],
      format: kvType === "f16" ? "r32uint" : "rg32uint",
      usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.STORAGE_BINDING,
    });
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
    slots,
    maxT,
    step: gpu.buffer("step", STEP_BYTES, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST),
    tokens: gpu.buffer("tokens", slots * (ctx + 1) * 4, ACT_USAGE),
    x: f32("x", maxT * c.dim),
    xn: f32("xn", maxT * c.dim),
    xlast: f32("xlast", c.dim),
    q: f32("q", maxT * qd),
    att: f32("att", maxT * qd),
    h: f32("h", maxT * c.hiddenDim),
    logits: f32("logits", c.vocabSize),
    rope: gpu.upload("rope", table),
    scfg: gpu.buffer("scfg", slots * SAMPLER_CFG_WORDS * 4, STORAGE | GPUBufferUsage.COPY_DST),
    hist: gpu.buffer("hist", slots * c.vocabSize * 4, STORAGE),
    kv,
    kvType,
    kcache: Array.from({ length: c.nLayers }, (_, l) => cache(`kcache.${l}`)),
    vcache: Array.from({ length: c.nLayers }, (_, l) => cache(`vcache.${l}`)),
    bytes: bytes + table.byteLength + slots * (SAMPLER_CFG_WORDS + c.vocabSize) * 4,
  };
}
