/**
 * Embedding gather: x[t] = E[tokens[tokenBase + pos]] for each token t of the step (its Step row). The token ids are read on
 * the GPU (the sampler writes them there), so decode never round-trips through the host. A large
 * table is split into row chunks (each within the binding limit); each chunk's dispatch copies
 * only the tokens that fall in it. The table may be a dense texture (CPU adapters, `weights:
 * "texture"`, layout in common.ts): then each thread copies one texel (4 or 8 values).
 */
import {
  denseAccess,
  type DenseFormat,
  denseRowTexels,
  denseTextureAccess,
  enableFor,
  STEP_WGSL,
  type WeightSource,
} from "./common.ts";
import type { Gpu } from "./gpu.ts";

export interface EmbedVariant {
  format: DenseFormat;
  dim: number; // a multiple of 4
  rowStart: number; // first table row held by this chunk
  rows: number; // rows in this chunk
  /** Where the table lives (default "buffer"). */
  weights?: WeightSource;
}

const WG = 64;

function embedTexWgsl(v: EmbedVariant): string {
  const D4 = v.dim / 4, RT = denseRowTexels(v.dim, v.format);
  const copy = v.format === "f32" ? `x[t * ${D4}u + d] = e_t(r + d);` : `let w = e_t(r + d);
  x[t * ${D4}u + 2u * d] = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
  if (2u * d + 1u < ${D4}u) {
    x[t * ${D4}u + 2u * d + 1u] = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
  }`;
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
${denseTextureAccess("e", 2, v.format)}
@group(0) @binding(3) var<storage, read_write> x: array<vec4<f32>>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let d = gid.x;
  let t = gid.y;
  if (d >= ${RT}u || t >= step.ntok) { return; }
  let row = step.rows[t];
  let tok = tokens[row.z + row.x];
  if (tok < ${v.rowStart}u || tok >= ${v.rowStart + v.rows}u) { return; }
  let r = (tok - ${v.rowStart}u) * ${RT}u;
  ${copy}
}`;
}

export function embedWgsl(v: EmbedVariant): string {
  if (v.weights === "texture") return embedTexWgsl(v);
  const D4 = v.dim / 4;
  return `${enableFor(v.format)}
${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
${denseAccess("e", 2, v.format)}
@group(0) @binding(3) var<storage, read_write> x: array<vec4<f32>>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let d = gid.x;
  let t = gid.y;
  if (d >= ${D4}u || t >= step.ntok) { return; }
  let row = step.rows[t];
  let tok = tokens[row.z + row.x];
  if (tok < ${v.rowStart}u || tok >= ${v.rowStart + v.rows}u) { return; }
  x[t * ${D4}u + d] = e_4((tok - ${v.rowStart}u) * ${D4}u + d);
}`;
}

export function embedPipeline(gpu: Gpu, v: EmbedVariant): GPUComputePipeline {
  const tex = v.weights === "texture";
  const key = `embed_${
    tex && v.format !== "f32" ? "f16" : v.format
  }_${v.dim}_${v.rowStart}_${v.rows}${tex ? "T" : ""}`;
  return gpu.pipeline(key, () => embedWgsl(v));
}

/** Bindings: step, tokens, table chunk, x. Grid for `ntok` tokens. */
export function embedGrid(v: EmbedVariant, ntok: number): [number, number] {
  const n = v.weights === "texture" ? denseRowTexels(v.dim, v.format) : v.dim / 4;
  return [Math.ceil(n / WG), ntok];
}
