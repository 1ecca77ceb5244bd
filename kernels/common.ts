/** WGSL pieces shared by several kernels: the per-step uniform and dense weight access. */
import type { Gpu } from "./gpu.ts";

/** Rows (tokens) a step may hold: the size of the Step uniform's per-row table. */
export const MAX_ROWS = 256;

/**
 * The per-step uniform every kernel may bind. Field order is the packing order of
 * `packStep` below; written with queue.writeBuffer before each submit.
 *
 * `rows[t]` says where the step's token t belongs (the kernels that touch positions, the token
 * buffer or the KV cache read it; none uses `pos` directly): x = its position, y = kvBase (the
 * first KV cache row of its sequence), z = tokenBase (the first token-buffer entry of its
 * sequence), w = its slot (whose sampler state the sampler uses: kernels/penalties.ts). Token t
 * is tokens[z + x], its k and v go to KV row y + x and it attends to KV rows y .. y + x. One
 * sequence from `pos` is rows[t] = (pos + t, 0, 0, 0), what `packStep` writes when no rows are
 * given; several sequences sharing one KV cache (slot s at kvBase s·ctx) can share a step.
 */
export const STEP_WGSL = /* wgsl */ `
struct Step {
  pos: u32,          // position of the first token of this step
  ntok: u32,         // tokens in this step (1 for decode)
  seed: u32,         // sampling seed
  topk: u32,         // 0 = off
  temperature: f32,  // 0 = greedy
  topp: f32,         // >= 1 = off
  pad0: u32,
  pad1: u32,
  rows: array<vec4<u32>, ${MAX_ROWS}>, // per token: pos, kvBase, tokenBase, slot
  samp: array<vec4<u32>, ${MAX_ROWS}>, // per token: seed, temperature bits, topk, topp bits
}`;

export const STEP_BYTES = 8 * 4 + MAX_ROWS * 32;

/** Where one token of a step belongs (see STEP_WGSL). */
export interface StepRow {
  pos: number;
  kvBase: number;
  tokenBase: number;
  /** The sequence's slot: its sampler state (kernels/penalties.ts; default 0). */
  slot?: number;
  /**
   * The row's own sampling parameters (the per-row sampler's `samp[t]`; default: the step's).
   */
  sampling?: RowSampling;
}

/** Sampling parameters of one row (see `samp` in STEP_WGSL). */
export interface RowSampling {
  seed: number;
  topK: number;
  temperature: number;
  topP: number;
}

export interface StepParams {
  pos: number;
  ntok: number;
  seed: number;
  topK: number;
  temperature: number;
  topP: number;
  /** Per-token rows (default: (pos + t, 0, 0) for t < ntok, one sequence). */
  rows?: StepRow[];
}

/** Packs a Step in WGSL field order; a step holds at most MAX_ROWS tokens. */
export function packStep(s: StepParams): ArrayBuffer {
  // the kernels read rows[t] for every token t < ntok: more would read past the table
  if (s.ntok > MAX_ROWS) throw new Error(`a step holds at most ${MAX_ROWS} tokens; got ${s.ntok}`);
  const buf = new ArrayBuffer(STEP_BYTES);
  const u = new Uint32Array(buf), f = new Float32Array(buf);
  u[0] = s.pos;
  u[1] = s.ntok;
  u[2] = s.seed >>> 0;
  u[3] = Math.max(0, s.topK); // −1 (vLLM's off) as 0
  f[4] = s.temperature;
  f[5] = s.topP;
  if (s.rows) {
    if (s.rows.length > MAX_ROWS) {
      throw new Error(`a step holds at most ${MAX_ROWS} rows; got ${s.rows.length}`);
    }
    s.rows.forEach((r, t) => {
      u[8 + 4 * t] = r.pos;
      u[9 + 4 * t] = r.kvBase;
      u[10 + 4 * t] = r.tokenBase;
      u[11 + 4 * t] = r.slot ?? 0;
    });
  } else {
    for (let t = 0; t < Math.min(s.ntok, MAX_ROWS); t++) u[8 + 4 * t] = s.pos + t;
  }
  // per-row sampling parameters: the row's own, else the step's
  const S = 8 + 4 * MAX_ROWS, n = Math.min(s.rows?.length ?? s.ntok, MAX_ROWS);
  for (let t = 0; t < n; t++) {
    const p = s.rows?.[t]?.sampling ?? s;
    u[S + 4 * t] = p.seed >>> 0;
    f[S + 4 * t + 1] = p.temperature;
    u[S + 4 * t + 2] = Math.max(0, p.topK);
    f[S + 4 * t + 3] = p.topP;
  }
  return buf;
}

/**
 * A step uniform holding `s` (greedy sampling fields), for kernels run outside a model's run
 * state (tuner, benchmarks, tests).
 */
export function stepUniform(
  gpu: Gpu,
  label: string,
  s: Pick<StepParams, "pos" | "ntok" | "rows">,
): GPUBuffer {
  const buf = gpu.buffer(label, STEP_BYTES, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST);
  gpu.device.queue.writeBuffer(
    buf,
    0,
    packStep({ seed: 0, topK: 0, temperature: 0, topP: 1, ...s }),
  );
  return buf;
}

/** Storage formats of dense (non-quantized) weights. */
export type DenseFormat =
  | "f32" // array<vec4<f32>>
  | "f16" // array<vec4<f16>>, needs shader-f16
  | "f16p"; // f16 pairs packed in u32, read with unpack2x16float

/** `enable f16;` when the format needs it. */
export function enableFor(format: DenseFormat): string {
  return format === "f16" ? "enable f16;\n" : "";
}

/**
 * Declares a read-only weight array `name` and a function `${name}_4(i) -> vec4<f32>` returning
 * its i-th group of 4 consecutive values as f32.
 */
export function denseAccess(name: string, binding: number, format: DenseFormat): string {
  switch (format) {
    case "f32":
      return `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4<f32>>;
fn ${name}_4(i: u32) -> vec4<f32> { return ${name}[i]; }`;
    case "f16":
      return `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4<f16>>;
fn ${name}_4(i: u32) -> vec4<f32> { return vec4<f32>(${name}[i]); }`;
    case "f16p":
      return `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec2<u32>>;
fn ${name}_4(i: u32) -> vec4<f32> {
  let w = ${name}[i];
  return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}`;
  }
}

/**
 * Where weights live: storage buffers (GPUs), or 2D textures (CPU adapters, where lavapipe loads
 * a texel ~8× cheaper than a storage vec4; see {@link DENSE_TEX_WIDTH}).
 */
export type WeightSource = "buffer" | "texture";

/**
 * Texels per row of the dense weight textures. A (rows, K) matrix is a row-major run of texels,
 * texel i at (i % DENSE_TEX_WIDTH, i / DENSE_TEX_WIDTH) (a texture narrower than that when the
 * run fits one row): f32 as rgba32float (4 values per texel, K/4 texels per weight row), f16
 * (either f16 format) as rgba32uint of f16 pairs (8 values per texel, read with
 * unpack2x16float), each weight row padded with zeros to ⌈K/8⌉ texels.
 */
export const DENSE_TEX_WIDTH = 4096;

/** Texels per weight row in a dense texture. */
export function denseRowTexels(K: number, format: DenseFormat): number {
  return format === "f32" ? K / 4 : Math.ceil(K / 8);
}

/** Texture format of a dense weight texture. */
export function denseTextureFormat(format: DenseFormat): GPUTextureFormat {
  return format === "f32" ? "rgba32float" : "rgba32uint";
}

/** Texture size [width, height] holding `texels` texels of a row-wrapped run. */
export function texSize(texels: number, width: number): [number, number] {
  const h = Math.max(1, Math.ceil(texels / width));
  return [h > 1 ? width : Math.max(1, texels), h];
}

/**
 * Declares a dense weight texture `name` and `${name}_t(i)`, its i-th texel in row-major order:
 * vec4<f32> (f32) or vec4<u32> (four f16 pairs).
 */
export function denseTextureAccess(name: string, binding: number, format: DenseFormat): string {
  const W = DENSE_TEX_WIDTH, ty = format === "f32" ? "f32" : "u32";
  return `@group(0) @binding(${binding}) var ${name}: texture_2d<${ty}>;
fn ${name}_t(i: u32) -> vec4<${ty}> {
  return textureLoad(${name}, vec2<u32>(i % ${W}u, i / ${W}u), 0);
}`;
}

/**
 * Texel data of rows of a dense texture from float32 values (rows·K): f32 as is, f16 as packed
 * pairs with each row padded to whole texels. Returns 4 words per texel.
 */
export function denseTexels(data: Float32Array, K: number, format: DenseFormat): Uint32Array {
  if (format === "f32") return new Uint32Array(data.buffer, data.byteOffset, data.length);
  const n = data.length / K, RT = denseRowTexels(K, format);
  const half = new Float16Array(n * RT * 8);
  for (let r = 0; r < n; r++) half.set(data.subarray(r * K, (r + 1) * K), r * RT * 8);
  return new Uint32Array(half.buffer);
}

/**
 * Writes texels [start, start + words/4) of a row-wrapped texture of width `width` (4 words per
 * texel): a partial first row, the whole rows, a partial last row.
 */
export function writeTexels(
  device: GPUDevice,
  texture: GPUTexture,
  width: number,
  start: number,
  words: Uint32Array,
): void {
  const n = words.length / 4;
  let i = 0;
  const put = (x: number, y: number, w: number, h: number) => {
    const sub = words.subarray(i * 4, (i + w * h) * 4);
    device.queue.writeTexture(
      { texture, origin: [x, y] },
      sub.buffer as ArrayBuffer,
      { offset: sub.byteOffset, bytesPerRow: w * 16, rowsPerImage: h },
      [w, h],
    );
    i += w * h;
  };
  while (i < n) {
    const t = start + i, x = t % width, y = Math.floor(t / width);
    if (x !== 0 || n - i < width) put(x, y, Math.min(width - x, n - i), 1);
    else put(0, y, width, Math.floor((n - i) / width));
  }
}

/** Bytes per element of a dense format. */
export function bytesPer(format: DenseFormat): number {
  return format === "f32" ? 4 : 2;
}

/** Workgroups (x, y) covering `n` groups with x at most 32768. */
export function grid(n: number): [number, number] {
  const x = Math.min(n, 32768);
  return [x, Math.ceil(n / x)];
}
