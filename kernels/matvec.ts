/**
 * Decode matrix-vector product over dense (f32/f16) weights, y = epilogue(W · x), with an optional
 * fused RMSNorm of x: one dispatch per linear layer of a decode step.
 *
 * Threads: `tpr` threads share a unit (they split K and reduce through workgroup memory), `upw`
 * units per workgroup. On a CPU adapter tpr = 1 (no barriers, one thread per row) is fastest.
 *
 * Weights in textures (`weights: "texture"`, the CPU-adapter layout of common.ts) use the
 * generator of dense_texture.ts: tpr = 1, `upt` units per thread, x and g optionally from uniform
 * buffers (`xUniform`).
 */
import { denseAccess, type DenseFormat, enableFor, grid, type WeightSource } from "./common.ts";
import { type DenseTexCore, denseTexKey, denseTexWgsl } from "./dense_texture.ts";
import {
  type Epilogue,
  epilogueBindings,
  epilogueKey,
  epilogueWgsl,
  isPair,
  unitCount,
} from "./epilogue.ts";
import type { Gpu } from "./gpu.ts";

export interface MatvecVariant {
  format: DenseFormat;
  rows: number; // weight rows (N)
  K: number; // inputs, a multiple of 4
  /** Fuse x ← x · g / rms(x) (RMSNorm with weight g, epsilon eps) before the product. */
  norm: { eps: number } | null;
  epilogue: Epilogue;
  tpr: number; // threads per unit, a power of two
  upw: number; // units per workgroup
  /** Where the weights live (default "buffer"); "texture" needs tpr = 1. */
  weights?: WeightSource;
  /** Units per thread (texture weights only; default 1): upw must be a multiple of it. */
  upt?: number;
  /** Bind x and g as uniform buffers (texture weights only; K·4 ≤ 65536). */
  xUniform?: boolean;
}

function texCore(v: MatvecVariant): DenseTexCore {
  if (v.tpr !== 1) throw new Error(`matvec: texture weights need tpr = 1, got ${v.tpr}`);
  return {
    format: v.format,
    rows: v.rows,
    K: v.K,
    norm: v.norm,
    epilogue: v.epilogue,
    upw: v.upw,
    upt: v.upt ?? 1,
    batch: 1,
    dynamicTokens: false,
    xUniform: v.xUniform ?? false,
  };
}

export function matvecKey(v: MatvecVariant): string {
  if (v.weights === "texture") return `matvec_${denseTexKey(texCore(v))}`;
  return `matvec_${v.format}_${v.rows}x${v.K}_${v.norm ? `n${v.norm.eps}_` : ""}${
    epilogueKey(v.epilogue)
  }_t${v.tpr}u${v.upw}`;
}

/** Buffer names in binding order. */
export function matvecBindings(v: MatvecVariant): string[] {
  return ["x", ...(v.norm ? ["g"] : []), "w", ...epilogueBindings(v.epilogue)];
}

export function matvecWgsl(v: MatvecVariant): string {
  if (v.weights === "texture") return denseTexWgsl(texCore(v));
  if (v.xUniform || (v.upt ?? 1) !== 1) {
    throw new Error("matvec: xUniform and upt > 1 need texture weights");
  }
  const K4 = v.K / 4, WG = v.tpr * v.upw;
  const units = unitCount(v.epilogue, v.rows);
  const [nx] = grid(Math.ceil(units / v.upw));
  const pair = isPair(v.epilogue);
  let b = 0;
  const xDecl = `@group(0) @binding(${b++}) var<storage, read> x: array<vec4<f32>>;`;
  const gDecl = v.norm ? `@group(0) @binding(${b++}) var<storage, read> g: array<vec4<f32>>;` : "";
  const wDecl = denseAccess("w", b++, v.format);
  const norm = v.norm
    ? `
  var ss = 0.0;
  for (var k = lid; k < ${K4}u; k += ${WG}u) { let a = x[k]; ss += dot(a, a); }
  red[lid] = vec2<f32>(ss, 0.0);
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let inv = inverseSqrt(red[0].x / ${v.K}.0 + ${v.norm.eps});
  for (var k = lid; k < ${K4}u; k += ${WG}u) { xs[k] = x[k] * g[k] * inv; }
  workgroupBarrier();`
    : "";
  const xv = v.norm ? "xs[k]" : "x[k]";
  const needRed = v.norm || v.tpr > 1;
  return `${enableFor(v.format)}
${xDecl}
${gDecl}
${wDecl}
${epilogueWgsl(v.epilogue, b, v.rows)}
${needRed ? `var<workgroup> red: array<vec2<f32>, ${WG}>;` : ""}
${v.norm ? `var<workgroup> xs: array<vec4<f32>, ${K4}>;` : ""}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${norm}
  let u = (wid.x + wid.y * ${nx}u) * ${v.upw}u + lid / ${v.tpr}u;
  let t = lid % ${v.tpr}u;
  var acc = vec2<f32>(0.0);
  if (u < ${units}u) {
    let rows = unit_rows(u);
    let wa = rows.x * ${K4}u;
    ${pair ? `let wb = rows.y * ${K4}u;` : ""}
    for (var k = t; k < ${K4}u; k += ${v.tpr}u) {
      let xk = ${xv};
      acc.x += dot(w_4(wa + k), xk);
      ${pair ? "acc.y += dot(w_4(wb + k), xk);" : ""}
    }
  }
  ${
    v.tpr > 1
      ? `red[lid] = acc;
  workgroupBarrier();
  for (var s = ${v.tpr / 2}u; s > 0u; s >>= 1u) {
    if (t < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  acc = red[lid];`
      : ""
  }
  if (u < ${units}u && t == 0u) { epilogue(0u, u, acc); }
}`;
}

/**
 * The bytes of workgroup memory a buffer-weights variant declares: the reduction array (8 per
 * thread, with a fused norm or tpr > 1) and, with a fused norm, the normalized x (4 per input).
 * Texture variants declare none.
 */
export function matvecWorkgroupBytes(
  v: Pick<MatvecVariant, "K" | "norm" | "tpr" | "upw" | "weights">,
): number {
  if (v.weights === "texture") return 0;
  return (v.norm || v.tpr > 1 ? 8 * v.tpr * v.upw : 0) + (v.norm ? 4 * v.K : 0);
}

/** Weight rows per thread of the texture kernels' CPU shape. */
export const MATVEC_TEX_ROWS = 8;

/** Compiles (or fetches) the pipeline for a variant. */
export function matvecPipeline(gpu: Gpu, v: MatvecVariant): GPUComputePipeline {
  return gpu.pipeline(matvecKey(v), () => matvecWgsl(v));
}

/** Workgroup grid of a variant. */
export function matvecGrid(v: MatvecVariant): [number, number] {
  return grid(Math.ceil(unitCount(v.epilogue, v.rows) / v.upw));
}

/**
 * Thread shape for a given adapter, K and weight source: one thread per unit on CPUs (with
 * texture weights, `upt` units per thread and one 8-lane SIMD group per workgroup), a wide split
 * on GPUs.
 */
export function matvecShape(
  gpu: Gpu,
  K: number,
  weights: WeightSource = "buffer",
  epilogue?: Epilogue,
): { tpr: number; upw: number; upt?: number } {
  if (weights === "texture") {
    const upt = epilogue && isPair(epilogue) ? MATVEC_TEX_ROWS / 2 : MATVEC_TEX_ROWS;
    return { tpr: 1, upt, upw: 8 * upt };
  }
  if (gpu.isCpu) return { tpr: 1, upw: 64 };
  const tpr = K >= 1024 ? 64 : K >= 256 ? 32 : 8;
  return { tpr, upw: Math.max(1, 256 / tpr) };
}

/**
 * A CPU shape with `upt` units per thread and 8 threads per workgroup, its units per thread halved
 * while it would leave fewer than 4 workgroups, so that small matrices still spread over the
 * cores (on lavapipe a workgroup runs on one thread). Other shapes are returned as they are. (The
 * heuristic shapes of the dense and the quantized matrix-vector kernels both go through it.)
 */
export function spreadShape<S extends { tpr: number; upw: number; upt?: number }>(
  shape: S,
  units: number,
  gpu: Gpu,
): S {
  if (!gpu.isCpu || shape.tpr !== 1 || !shape.upt || shape.upw !== 8 * shape.upt) return shape;
  let upt = shape.upt;
  while (upt > 1 && Math.ceil(units / (8 * upt)) < 4) upt = Math.ceil(upt / 2);
  return { ...shape, upt, upw: 8 * upt };
}
