/**
 * Sampling on the GPU, one workgroup: reads the logits of the step's last token and writes the
 * chosen id to tokens[tokenBase + pos + 1] (pos and tokenBase from the last token's Step row:
 * tokens[pos + ntok] for one sequence), where the next step's embedding gather reads it.
 *
 * Mirrors `sample()` in runtime/model/sampling.ts: temperature 0 is argmax (lowest index on ties);
 * otherwise p_i = exp((l_i − max) / T), a threshold t = max(k-th largest p, top-p cut, min-p)
 * (the top-k and top-p cuts found by bisection over the bit patterns of positive floats, exact,
 * 31 rounds), and the token is the first, in index order, whose cumulative kept mass exceeds
 * u · (kept mass), with u = uniform(seed, position of the sampled token) from the PCG hash.
 * Logit bias and penalties are applied to the logits before it (kernels/penalties.ts): min-p
 * comes from the row's slot config (slot: the Step row's w), and the sampled token is counted in
 * the slot's history.
 *
 * On CPU adapters (lavapipe) the workgroup is one 8-lane SIMD group (the reductions' barriers and
 * workgroup-memory loads are what costs there) and, when vocab·4 fits a uniform binding, the
 * logits are read as a uniform buffer (a broadcast load instead of a per-lane loop).
 */
import { STEP_WGSL } from "./common.ts";
import type { Gpu } from "./gpu.ts";
import { samplerCfgWgsl } from "./penalties.ts";

export interface SampleOptions {
  /** Threads, a power of two (default 256). */
  wg?: number;
  /** Bind the logits as a uniform buffer of ⌈vocab/4⌉ vec4 (default false). */
  logitsUniform?: boolean;
  /**
   * One workgroup per row of the step (grid [ntok]) over (ntok, vocab) storage logits: row t
   * samples with its own parameters (Step `samp[t]`) and writes tokens[tokenBase + pos + 1] of
   * its Step row (default false: one workgroup, the last row, the step's parameters).
   */
  perRow?: boolean;
}

/** Options for an adapter: one SIMD group and uniform logits on CPU adapters. */
export function sampleOptions(
  gpu: Gpu,
  vocab: number,
): Required<Omit<SampleOptions, "perRow">> {
  if (!gpu.isCpu) return { wg: 256, logitsUniform: false };
  const limit = Math.min(65536, gpu.device.limits.maxUniformBufferBindingSize);
  const fits = Math.ceil(vocab / 4) * 16 <= limit;
  return { wg: 8, logitsUniform: fits };
}

export function sampleWgsl(vocab: number, opts: SampleOptions = {}): string {
  const WG = opts.wg ?? 256;
  const chunk = Math.ceil(vocab / WG);
  const perRow = opts.perRow ?? false;
  if (perRow && opts.logitsUniform) throw new Error("the per-row sampler reads storage logits");
  const logitsDecl = opts.logitsUniform
    ? `@group(0) @binding(1) var<uniform> logits: array<vec4<f32>, ${Math.ceil(vocab / 4)}>;
fn lg(i: u32) -> f32 { return logits[i / 4u][i % 4u]; }`
    : `@group(0) @binding(1) var<storage, read> logits: array<f32>;
var<private> lbase: u32;
fn lg(i: u32) -> f32 { return logits[lbase + i]; }`;
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
${logitsDecl}
@group(0) @binding(2) var<storage, read_write> tokens: array<u32>;
${samplerCfgWgsl(3)}
@group(0) @binding(4) var<storage, read_write> hist: array<u32>;
var<workgroup> rv: array<f32, ${WG}>;
var<workgroup> ri: array<u32, ${WG}>;

fn pcg(x: u32) -> u32 {
  let state = x * 747796405u + 2891336453u;
  let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
  return (word >> 22u) ^ word;
}

fn sum_all(lid: u32, v: f32) -> f32 {
  workgroupBarrier();
  rv[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { rv[lid] += rv[lid + s]; }
    workgroupBarrier();
  }
  return workgroupUniformLoad(&rv[0]);
}

fn prob(i: u32, m: f32, invt: f32) -> f32 { return exp((lg(i) - m) * invt); }

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
${
    perRow
      ? `  let r = wid.x;
  lbase = r * ${vocab}u;
  let sp = step.samp[r];
  let seed = sp.x;
  let temperature = bitcast<f32>(sp.y);
  let topk = sp.z;
  let topp = bitcast<f32>(sp.w);`
      : `  let r = step.ntok - 1u;
  let seed = step.seed;
  let temperature = step.temperature;
  let topk = step.topk;
  let topp = step.topp;`
  }
  // argmax, lowest index on ties
  var best = -3.4e38;
  var bi = 0u;
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let v = lg(i);
    if (v > best) { best = v; bi = i; }
  }
  rv[lid] = best;
  ri[lid] = bi;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) {
      let o = lid + s;
      if (rv[o] > rv[lid] || (rv[o] == rv[lid] && ri[o] < ri[lid])) { rv[lid] = rv[o]; ri[lid] = ri[o]; }
    }
    workgroupBarrier();
  }
  let m = rv[0];
  let arg = ri[0];
  let last = step.rows[r];
  let next = last.x + 1u; // the sampled token's position
  let out = last.z + next;
  let hbase = last.w * ${vocab}u;
  if (temperature <= 0.0) {
    if (lid == 0u) {
      tokens[out] = arg;
      hist[hbase + arg] += 1u;
    }
    return;
  }
  let invt = 1.0 / temperature;
  var z = 0.0;
  for (var i = lid; i < ${vocab}u; i += ${WG}u) { z += prob(i, m, invt); }
  z = sum_all(lid, z);
  var thr = 0.0;
  if (topk > 0u && topk < ${vocab}u) {
    // largest t with count(p >= t) >= k
    var lo = 0u;
    var hi = bitcast<u32>(1.0);
    for (var it = 0u; it < 31u; it++) {
      let mid = lo + (hi - lo + 1u) / 2u;
      let tm = bitcast<f32>(mid);
      var c = 0.0;
      for (var i = lid; i < ${vocab}u; i += ${WG}u) { c += select(0.0, 1.0, prob(i, m, invt) >= tm); }
      if (sum_all(lid, c) >= f32(topk)) { lo = mid; } else { hi = mid - 1u; }
      if (lo >= hi) { break; }
    }
    thr = bitcast<f32>(lo);
  }
  if (topp < 1.0) {
    // largest t with mass(p >= t) >= topp · z
    var lo = 0u;
    var hi = bitcast<u32>(1.0);
    let need = topp * z;
    for (var it = 0u; it < 31u; it++) {
      let mid = lo + (hi - lo + 1u) / 2u;
      let tm = bitcast<f32>(mid);
      var c = 0.0;
      for (var i = lid; i < ${vocab}u; i += ${WG}u) {
        let pi = prob(i, m, invt);
        c += select(0.0, pi, pi >= tm);
      }
      if (sum_all(lid, c) >= need) { lo = mid; } else { hi = mid - 1u; }
      if (lo >= hi) { break; }
    }
    thr = max(thr, bitcast<f32>(lo));
  }
  thr = max(thr, cfg_f(last.w, 5u)); // min-p: the largest p is 1
  // kept mass per contiguous chunk, then thread 0 walks to the sampled token
  let c0 = lid * ${chunk}u;
  let c1 = min(c0 + ${chunk}u, ${vocab}u);
  var part = 0.0;
  for (var i = c0; i < c1; i++) { let pi = prob(i, m, invt); part += select(0.0, pi, pi >= thr); }
  workgroupBarrier();
  rv[lid] = part;
  workgroupBarrier();
  if (lid == 0u) {
    var kept = 0.0;
    for (var i = 0u; i < ${WG}u; i++) { kept += rv[i]; }
    let u = f32(pcg(pcg(seed) ^ next) >> 8u) / 16777216.0;
    let r = u * kept;
    var cum = 0.0;
    var pick = arg;
    var done = false;
    for (var w = 0u; w < ${WG}u && !done; w++) {
      if (cum + rv[w] <= r && w + 1u < ${WG}u) { cum += rv[w]; continue; }
      let e1 = min(w * ${chunk}u + ${chunk}u, ${vocab}u);
      for (var i = w * ${chunk}u; i < e1; i++) {
        let pi = prob(i, m, invt);
        if (pi >= thr) {
          pick = i;
          cum += pi;
          if (cum > r) { done = true; break; }
        }
      }
      if (!done) { continue; }
    }
    tokens[out] = pick;
    hist[hbase + pick] += 1u;
  }
}`;
}

export function samplePipeline(
  gpu: Gpu,
  vocab: number,
  opts: SampleOptions = {},
): GPUComputePipeline {
  const key = `sample_${vocab}_w${opts.wg ?? 256}${opts.logitsUniform ? "U" : ""}${
    opts.perRow ? "R" : ""
  }`;
  return gpu.pipeline(key, () => sampleWgsl(vocab, opts));
}
/**
 * Bindings: step, logits, tokens, scfg, hist (kernels/penalties.ts). Grid: one workgroup, or
 * [ntok] per row.
 */
