/**
 * Prefill matrix-matrix product over dense weights: for each of the step's tokens t,
 * epilogue(t, W · x[t]). Each workgroup computes WG units for TT tokens; the tokens' inputs are
 * staged through workgroup memory KC values at a time, so each weight value loaded is used TT times.
 *
 * Weights in textures (`weights: "texture"`, CPU adapters) use the generator of dense_texture.ts
 * instead: no workgroup memory, each thread `upt` units × `tt` tokens (see matmulShape).
 *
 * The lane variant (buffer weights with `tpr` > 1: a batched decode step on a GPU) is the
 * matrix-vector kernel's layout with `tt` tokens: `tpr` threads share a unit and take every
 * tpr-th vec4 of K (consecutive threads read consecutive weights), each weight loaded once for
 * all tt tokens, and the threads' sums meet in workgroup memory (see matmulLaneShape).
 *
 * The kernel tuner (kernels/tune_dense.ts) tunes the lane variant's tpr and upw per weight shape
 * and row count (kernels/dense_key.ts). The staged prefill variant (64 units × 8 tokens per
 * workgroup) and the texture variant (CPU adapters, matmulShape) stay untuned: they run their
 * built-in shapes.
 */
import {
  denseAccess,
  type DenseFormat,
  enableFor,
  grid,
  STEP_WGSL,
  type WeightSource,
} from "./common.ts";
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

export interface MatmulVariant {
  format: DenseFormat;
  rows: number;
  K: number; // a multiple of 4
  epilogue: Epilogue;
  /** Where the weights live (default "buffer"). */
  weights?: WeightSource;
  /**
   * Texture weights: units per thread, units per workgroup, tokens per workgroup. Buffer weights
   * with `tpr` > 1 (threads per unit): the lane variant, upw units and tt tokens per workgroup.
   */
  upt?: number;
  upw?: number;
  tt?: number;
  tpr?: number;
  /**
   * Texture weights: bind x as a uniform buffer of tt tokens (default false); needs
   * tt·K·4 ≤ 65536 and steps of at most tt tokens, as in a batched decode step.
   */
  xUniform?: boolean;
}

function texCore(v: MatmulVariant): DenseTexCore {
  return {
    format: v.format,
    rows: v.rows,
    K: v.K,
    norm: null,
    epilogue: v.epilogue,
    upw: v.upw ?? 32,
    upt: v.upt ?? 4,
    batch: v.tt ?? 4,
    dynamicTokens: true,
    xUniform: v.xUniform ?? false,
  };
}

/**
 * Thread shape of the texture variant on CPU adapters: 8 units × 4 tokens per thread, or with
 * `tt` = 8 (a batched decode step in one token group) 4 units × 8 tokens.
 */
export function matmulShape(epilogue: Epilogue, tt = 4): { upt: number; upw: number; tt: number } {
  const rows = tt > 4 ? 4 : 8;
  const upt = isPair(epilogue) ? rows / 2 : rows;
  return { upt, upw: 8 * upt, tt };
}

/**
 * Thread shape of the lane variant for a batched decode step of `tt` tokens (≤ 32): 32 threads
 * per unit, 4 units per workgroup, 2 above 8 tokens (the reduction's tt sums per thread stay
 * within 16 KiB of workgroup memory, WebGPU's default limit).
 */
export function matmulLaneShape(tt: number): { tpr: number; upw: number; tt: number } {
  return { tpr: 32, upw: tt > 8 ? 2 : 4, tt };
}

/** The most tokens a workgroup of the lane variant takes. */
export const LANE_MAX_TT = 32;

const WG = 64; // units per workgroup, one per thread
const TT = 8; // tokens per workgroup
const KC = 64; // vec4s of K staged per round

export function matmulBindings(v: MatmulVariant): string[] {
  const e = epilogueBindings(v.epilogue).filter((n) => n !== "step");
  return ["step", "x", "w", ...e];
}

function isLane(v: MatmulVariant): boolean {
  return v.weights !== "texture" && (v.tpr ?? 1) > 1;
}

/** The step uniform and x, the weights, the epilogue: the buffer kernels' declarations. */
function bufferDecls(v: MatmulVariant): string {
  // The qkv epilogue declares `step` itself; the other epilogues need it declared here.
  const ownStep = !epilogueBindings(v.epilogue).includes("step");
  const epi = epilogueWgsl(v.epilogue, ownStep ? 3 : 2, v.rows)
    .replace(/@group\(0\) @binding\(\d+\) var<uniform> step: Step;/, "");
  return `${enableFor(v.format)}
${ownStep ? STEP_WGSL : ""}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
${denseAccess("w", 2, v.format)}
${epi}`;
}

function laneWgsl(v: MatmulVariant): string {
  const TPR = v.tpr!, UPW = v.upw ?? 4, TT = v.tt ?? 8, WGL = TPR * UPW;
  if ((TPR & (TPR - 1)) !== 0 || !Number.isInteger(UPW) || UPW < 1) {
    throw new Error(`matmul: tpr must be a power of two, upw ≥ 1; got ${TPR}, ${UPW}`);
  }
  if (!Number.isInteger(TT) || TT < 1 || TT > LANE_MAX_TT) {
    throw new Error(`matmul: tt must be 1..${LANE_MAX_TT}; got ${TT}`);
  }
  const K4 = v.K / 4;
  const units = unitCount(v.epilogue, v.rows);
  const [nx] = grid(Math.ceil(units / UPW));
  const pair = isPair(v.epilogue);
  return `${bufferDecls(v)}
var<workgroup> red: array<vec2<f32>, ${WGL * TT}>;

@compute @workgroup_size(${WGL})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let u = (wid.x + wid.y * ${nx}u) * ${UPW}u + lid / ${TPR}u;
  let t = lid % ${TPR}u;
  let t0 = wid.z * ${TT}u;
  let rows = unit_rows(min(u, ${units - 1}u));
  var acc: array<vec2<f32>, ${TT}>;
  for (var k = t; k < ${K4}u; k += ${TPR}u) {
    let wa = w_4(rows.x * ${K4}u + k);
    ${pair ? `let wb = w_4(rows.y * ${K4}u + k);` : ""}
    for (var j = 0u; j < ${TT}u; j++) {
      let xv = x[min(t0 + j, step.ntok - 1u) * ${K4}u + k];
      acc[j].x += dot(wa, xv);
      ${pair ? "acc[j].y += dot(wb, xv);" : ""}
    }
  }
  for (var j = 0u; j < ${TT}u; j++) { red[j * ${WGL}u + lid] = acc[j]; }
  workgroupBarrier();
  for (var s = ${TPR / 2}u; s > 0u; s >>= 1u) {
    if (t < s) {
      for (var j = 0u; j < ${TT}u; j++) { red[j * ${WGL}u + lid] += red[j * ${WGL}u + lid + s]; }
    }
    workgroupBarrier();
  }
  if (t == 0u && u < ${units}u) {
    for (var j = 0u; j < ${TT}u; j++) {
      if (t0 + j < step.ntok) { epilogue(t0 + j, u, red[j * ${WGL}u + lid]); }
    }
  }
}`;
}

export function matmulWgsl(v: MatmulVariant): string {
  if (v.weights === "texture") return denseTexWgsl(texCore(v));
  if (isLane(v)) return laneWgsl(v);
  const K4 = v.K / 4;
  const units = unitCount(v.epilogue, v.rows);
  const [nx] = grid(Math.ceil(units / WG));
  const pair = isPair(v.epilogue);
  return `${bufferDecls(v)}
var<workgroup> xs: array<array<vec4<f32>, ${KC}>, ${TT}>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let u = (wid.x + wid.y * ${nx}u) * ${WG}u + lid;
  let t0 = wid.z * ${TT}u;
  let rows = unit_rows(min(u, ${units - 1}u));
  var acc: array<vec2<f32>, ${TT}>;
  for (var k0 = 0u; k0 < ${K4}u; k0 += ${KC}u) {
    for (var i = lid; i < ${TT * KC}u; i += ${WG}u) {
      let tt = i / ${KC}u;
      let kk = k0 + i % ${KC}u;
      var val = vec4<f32>(0.0);
      if (t0 + tt < step.ntok && kk < ${K4}u) { val = x[(t0 + tt) * ${K4}u + kk]; }
      xs[tt][i % ${KC}u] = val;
    }
    workgroupBarrier();
    let kn = min(${KC}u, ${K4}u - k0);
    for (var kk = 0u; kk < kn; kk++) {
      let wa = w_4(rows.x * ${K4}u + k0 + kk);
      ${pair ? `let wb = w_4(rows.y * ${K4}u + k0 + kk);` : ""}
      for (var tt = 0u; tt < ${TT}u; tt++) {
        let xv = xs[tt][kk];
        acc[tt].x += dot(wa, xv);
        ${pair ? "acc[tt].y += dot(wb, xv);" : ""}
      }
    }
    workgroupBarrier();
  }
  if (u < ${units}u) {
    for (var tt = 0u; tt < ${TT}u; tt++) {
      if (t0 + tt < step.ntok) { epilogue(t0 + tt, u, acc[tt]); }
    }
  }
}`;
}

/** The pipeline cache key of a variant. */
export function matmulKey(v: MatmulVariant): string {
  return v.weights === "texture"
    ? `matmul_${denseTexKey(texCore(v))}`
    : `matmul_${v.format}_${v.rows}x${v.K}_${epilogueKey(v.epilogue)}${
      isLane(v) ? `_t${v.tpr}u${v.upw ?? 4}b${v.tt ?? 8}` : ""
    }`;
}

export function matmulPipeline(gpu: Gpu, v: MatmulVariant): GPUComputePipeline {
  return gpu.pipeline(matmulKey(v), () => matmulWgsl(v));
}

/**
 * The bytes of workgroup memory the lane variant declares: a vec2 sum per thread and token,
 * 8 · tpr · upw · tt.
 */
export function laneWorkgroupBytes(v: { tpr: number; upw: number; tt: number }): number {
  return 8 * v.tpr * v.upw * v.tt;
}

/** Grid: (unit groups, 1 or more, token groups). */
export function matmulGrid(v: MatmulVariant, ntok: number): [number, number, number] {
  if (v.weights === "texture") {
    const c = texCore(v);
    const [x, y] = grid(Math.ceil(unitCount(v.epilogue, v.rows) / c.upw));
    return [x, y, Math.ceil(ntok / c.batch)];
  }
  if (isLane(v)) {
    const [x, y] = grid(Math.ceil(unitCount(v.epilogue, v.rows) / (v.upw ?? 4)));
    return [x, y, Math.ceil(ntok / (v.tt ?? 8))];
  }
  const [x, y] = grid(Math.ceil(unitCount(v.epilogue, v.rows) / WG));
  return [x, y, Math.ceil(ntok / TT)];
}
