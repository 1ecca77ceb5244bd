/**
 * Causal attention over the KV cache for the step's tokens: one workgroup per (head, token).
 * Token t (at position pos + t) attends to positions 0..pos+t; keys are taken WG at a time with
 * an online softmax, so any context length fits in fixed workgroup memory. Grouped-query:
 * head h reads kv head h / (nHeads / nKvHeads).
 */
import { STEP_WGSL } from "./common.ts";
import type { Gpu } from "./gpu.ts";

export interface AttentionVariant {
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  wg: number; // keys per chunk = threads, a power of two
}

export function attentionWgsl(v: AttentionVariant): string {
  const { nHeads, nKvHeads, headDim: HD, wg: WG } = v;
  const QD = nHeads * HD, KVD = nKvHeads * HD, GQ = nHeads / nKvHeads;
  const reduce = (op: string) => `
    for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
      if (lid < s) { red[lid] = ${op}(red[lid], red[lid + s]); }
      workgroupBarrier();
    }`;
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kcache: array<f32>;
@group(0) @binding(3) var<storage, read> vcache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
var<workgroup> qs: array<f32, ${HD}>;
var<workgroup> acc: array<f32, ${HD}>;
var<workgroup> p: array<f32, ${WG}>;
var<workgroup> red: array<f32, ${WG}>;

fn add(a: f32, b: f32) -> f32 { return a + b; }

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wid.x;
  let t = wid.y;
  let len = step.pos + t + 1u;
  let kv = (h / ${GQ}u) * ${HD}u;
  for (var d = lid; d < ${HD}u; d += ${WG}u) {
    qs[d] = q[t * ${QD}u + h * ${HD}u + d] * ${1 / Math.sqrt(HD)};
    acc[d] = 0.0;
  }
  workgroupBarrier();
  var m = -3.0e38;
  var l = 0.0;
  for (var c = 0u; c < len; c += ${WG}u) {
    // scores of keys c .. c+WG
    let j = c + lid;
    var s = -3.0e38;
    if (j < len) {
      s = 0.0;
      let kb = j * ${KVD}u + kv;
      for (var d = 0u; d < ${HD}u; d++) { s += qs[d] * kcache[kb + d]; }
    }
    red[lid] = s;
    workgroupBarrier();
    ${reduce("max")}
    let mn = max(m, red[0]);
    workgroupBarrier();
    let e = select(0.0, exp(s - mn), j < len);
    p[lid] = e;
    red[lid] = e;
    workgroupBarrier();
    ${reduce("add")}
    let scale = exp(m - mn);
    l = l * scale + red[0];
    m = mn;
    // acc = acc·scale + Σ_j p_j v_j
    let n = min(${WG}u, len - c);
    for (var d = lid; d < ${HD}u; d += ${WG}u) {
      var a = acc[d] * scale;
      for (var jj = 0u; jj < n; jj++) { a += p[jj] * vcache[(c + jj) * ${KVD}u + kv + d]; }
      acc[d] = a;
    }
    workgroupBarrier();
  }
  for (var d = lid; d < ${HD}u; d += ${WG}u) { out[t * ${QD}u + h * ${HD}u + d] = acc[d] / l; }
}`;
}

export function attentionPipeline(gpu: Gpu, v: AttentionVariant): GPUComputePipeline {
  const key = `attention_${v.nHeads}_${v.nKvHeads}_${v.headDim}_w${v.wg}`;
  return gpu.pipeline(key, () => attentionWgsl(v));
}

/** Bindings: step, q, kcache, vcache, out. Grid: (heads, tokens). */
export function attentionGrid(v: AttentionVariant, ntok: number): [number, number] {
  return [v.nHeads, ntok];
}
