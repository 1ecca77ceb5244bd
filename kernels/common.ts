/** WGSL pieces shared by several kernels: the per-step uniform and dense weight access. */

/**
 * The per-step uniform every kernel may bind. Field order is the packing order of
 * `packStep` below; written with queue.writeBuffer before each submit.
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
}`;

export const STEP_BYTES = 8 * 4;

export interface StepParams {
  pos: number;
  ntok: number;
  seed: number;
  topK: number;
  temperature: number;
  topP: number;
}

/** Packs a Step in WGSL field order. */
export function packStep(s: StepParams): ArrayBuffer {
  const buf = new ArrayBuffer(STEP_BYTES);
  const u = new Uint32Array(buf), f = new Float32Array(buf);
  u[0] = s.pos;
  u[1] = s.ntok;
  u[2] = s.seed >>> 0;
  u[3] = s.topK;
  f[4] = s.temperature;
  f[5] = s.topP;
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

/** Bytes per element of a dense format. */
export function bytesPer(format: DenseFormat): number {
  return format === "f32" ? 4 : 2;
}

/** Workgroups (x, y) covering `n` groups with x at most 32768. */
export function grid(n: number): [number, number] {
  const x = Math.min(n, 32768);
  return [x, Math.ceil(n / x)];
}
