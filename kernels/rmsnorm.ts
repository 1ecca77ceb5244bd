/** RMSNorm of each of the step's token rows: y[t] = x[t] · g / sqrt(mean(x[t]²) + eps). */
import { STEP_WGSL } from "./common.ts";
import type { Gpu } from "./gpu.ts";

export interface RmsnormVariant {
  dim: number; // a multiple of 4
  eps: number;
}

const WG = 64;

export function rmsnormWgsl(v: RmsnormVariant): string {
  const D4 = v.dim / 4;
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;
var<workgroup> red: array<f32, ${WG}>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let t = wid.x;
  if (t >= step.ntok) { return; } // uniform per workgroup
  let base = t * ${D4}u;
  var ss = 0.0;
  for (var k = lid; k < ${D4}u; k += ${WG}u) { let a = x[base + k]; ss += dot(a, a); }
  red[lid] = ss;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let inv = inverseSqrt(red[0] / ${v.dim}.0 + ${v.eps});
  for (var k = lid; k < ${D4}u; k += ${WG}u) { y[base + k] = x[base + k] * g[k] * inv; }
}`;
}

export function rmsnormPipeline(gpu: Gpu, v: RmsnormVariant): GPUComputePipeline {
  return gpu.pipeline(`rmsnorm_${v.dim}_${v.eps}`, () => rmsnormWgsl(v));
}

/** Bindings: step, x, g, y. One workgroup per token. */
export function rmsnormGrid(ntok: number): [number, number] {
  return [ntok, 1];
}
