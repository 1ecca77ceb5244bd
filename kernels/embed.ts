/**
 * Embedding gather: x[t] = E[tokens[pos + t]] for the step's tokens. The token ids are read on
 * the GPU (the sampler writes them there), so decode never round-trips through the host. A large
 * table is split into row chunks (each within the binding limit); each chunk's dispatch copies
 * only the tokens that fall in it.
 */
import { denseAccess, type DenseFormat, enableFor, STEP_WGSL } from "./common.ts";
import type { Gpu } from "./gpu.ts";

export interface EmbedVariant {
  format: DenseFormat;
  dim: number; // a multiple of 4
  rowStart: number; // first table row held by this chunk
  rows: number; // rows in this chunk
}

const WG = 64;

export function embedWgsl(v: EmbedVariant): string {
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
  let tok = tokens[step.pos + t];
  if (tok < ${v.rowStart}u || tok >= ${v.rowStart + v.rows}u) { return; }
  x[t * ${D4}u + d] = e_4((tok - ${v.rowStart}u) * ${D4}u + d);
}`;
}

export function embedPipeline(gpu: Gpu, v: EmbedVariant): GPUComputePipeline {
  const key = `embed_${v.format}_${v.dim}_${v.rowStart}_${v.rows}`;
  return gpu.pipeline(key, () => embedWgsl(v));
}

/** Bindings: step, tokens, table chunk, x. Grid for `ntok` tokens. */
export function embedGrid(v: EmbedVariant, ntok: number): [number, number] {
  return [Math.ceil(v.dim / 4 / WG), ntok];
}
