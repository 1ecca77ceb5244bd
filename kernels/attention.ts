/**
 * Causal attention over the KV cache for the step's tokens: one workgroup per (head, token).
 * Token t, at position pos of its Step row (kvBase, pos), attends to KV rows kvBase .. kvBase + pos
 * (positions 0..pos of its own sequence); keys are taken WG at a time with
 * an online softmax, so any context length fits in fixed workgroup memory. Grouped-query:
 * head h reads kv head h / (nHeads / nKvHeads).
 *
 * With the KV cache in textures (CPU adapters, see KvSource in epilogue.ts) a different kernel
 * runs: each thread takes every wg-th key with its own online softmax (q, m, l and the output
 * accumulator in registers, keys and values by textureLoad, q optionally from a uniform buffer),
 * and the wg partial results are merged once at the end through workgroup memory. No barrier in
 * the key loop and no workgroup-memory loads there: on lavapipe those are per-lane loops. A
 * workgroup serves `gq` query heads of one KV head (grouped-query attention), so each key and
 * value texel is loaded once for all of them; one exp per key and head (the larger of the running
 * maximum and the new score gets weight 1, the other exp(−|difference|)).
 *
 * Both kernels read keys and values as rotate-half pairs (elements i and i + headDim/2), the unit
 * the qkv epilogue writes: two f32, or one u32 of two halves with an f16 cache (KvType in
 * epilogue.ts, unpack2x16float); scores, softmax and the output accumulate in f32 either way.
 */
import { STEP_WGSL } from "./common.ts";
import type { KvSource, KvType } from "./epilogue.ts";
import type { Gpu } from "./gpu.ts";

export interface AttentionVariant {
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  wg: number; // keys per chunk = threads, a power of two
  /** KV cache layout (default "buffer"). */
  kv?: KvSource;
  /** KV cache element type (default "f32"; "f16": packed pairs, see KvType in epilogue.ts). */
  kvType?: KvType;
  /** Texture KV only: q as a uniform buffer of nHeads·headDim values (decode: one token). */
  qUniform?: boolean;
  /**
   * Texture KV only: query heads per workgroup (default 1), a divisor of nHeads / nKvHeads; they
   * share one KV head, so each key and value is loaded once for all of them.
   */
  gq?: number;
}

export function attentionWgsl(v: AttentionVariant): string {
  if (v.kv === "texture") return attentionTexWgsl(v);
  const { nHeads, nKvHeads, headDim: HD, wg: WG } = v;
  const QD = nHeads * HD, KVD = nKvHeads * HD, GQ = nHeads / nKvHeads, H = HD / 2;
  const f16 = v.kvType === "f16";
  // a cache row is KVD f32 or KVD/2 packed words; pair i of the row's head at `b` (see KvType)
  const rowLen = f16 ? KVD / 2 : KVD, headLen = f16 ? H : HD;
  const pair = (name: string) =>
    f16
      ? `fn ${name}_pair(b: u32, i: u32) -> vec2<f32> { return unpack2x16float(${name}[b + i]); }`
      : `fn ${name}_pair(b: u32, i: u32) -> vec2<f32> {
  return vec2<f32>(${name}[b + i], ${name}[b + i + ${H}u]);
}`;
  const reduce = (op: string) => `
    for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
      if (lid < s) { red[lid] = ${op}(red[lid], red[lid + s]); }
      workgroupBarrier();
    }`;
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kcache: array<${f16 ? "u32" : "f32"}>;
@group(0) @binding(3) var<storage, read> vcache: array<${f16 ? "u32" : "f32"}>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// rotate-half pairs (elements i and i + ${H} of the head)
var<workgroup> qs: array<vec2<f32>, ${H}>;
var<workgroup> acc: array<vec2<f32>, ${H}>;
var<workgroup> p: array<f32, ${WG}>;
var<workgroup> red: array<f32, ${WG}>;

fn add(a: f32, b: f32) -> f32 { return a + b; }
${pair("kcache")}
${pair("vcache")}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wid.x;
  let t = wid.y;
  let row = step.rows[t];
  let len = row.x + 1u;
  let kv0 = row.y;
  let kv = (h / ${GQ}u) * ${headLen}u;
  let qo = t * ${QD}u + h * ${HD}u;
  for (var i = lid; i < ${H}u; i += ${WG}u) {
    qs[i] = vec2<f32>(q[qo + i], q[qo + i + ${H}u]) * ${1 / Math.sqrt(HD)};
    acc[i] = vec2<f32>(0.0);
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
      let kb = (kv0 + j) * ${rowLen}u + kv;
      for (var i = 0u; i < ${H}u; i++) { s += dot(qs[i], kcache_pair(kb, i)); }
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
    for (var i = lid; i < ${H}u; i += ${WG}u) {
      var a = acc[i] * scale;
      for (var jj = 0u; jj < n; jj++) {
        a += p[jj] * vcache_pair((kv0 + c + jj) * ${rowLen}u + kv, i);
      }
      acc[i] = a;
    }
    workgroupBarrier();
  }
  for (var i = lid; i < ${H}u; i += ${WG}u) {
    out[qo + i] = acc[i].x / l;
    out[qo + i + ${H}u] = acc[i].y / l;
  }
}`;
}

/**
 * The knobs of an attention kernel, what the tuner chooses (kernels/tune_attention.ts): `wg`,
 * threads per workgroup = keys per chunk (a power of two), and `gq`, query heads per workgroup
 * (texture layout; 1 for the buffer kernel, which takes one head per workgroup).
 */
export interface AttentionShape {
  wg: number;
  gq: number;
}

/**
 * The built-in shape for an attention kernel (the tuner's default, the runtime's where nothing
 * is tuned): texture KV (CPU adapters) 8 threads, one SIMD group, and {@link attentionGroup}'s
 * heads; buffer KV 32 threads on CPU adapters (the GPU layout on lavapipe), 64 on GPUs.
 */
export function attentionShape(
  gpu: Gpu,
  v: Pick<AttentionVariant, "nHeads" | "nKvHeads" | "headDim" | "kv">,
): AttentionShape {
  if (v.kv === "texture") return { wg: 8, gq: attentionGroup(v.nHeads, v.nKvHeads, v.headDim) };
  return { wg: gpu.isCpu ? 32 : 64, gq: 1 };
}

/** The bytes of workgroup memory a variant declares (qs, acc, p, red; or the texture's part). */
export function attentionWorkgroupBytes(v: AttentionVariant): number {
  if (v.kv === "texture") return 4 * v.wg * (v.gq ?? 1) * (v.headDim + 2);
  return 8 * v.headDim + 8 * v.wg;
}

/** Query heads per workgroup of the texture kernel: those sharing a KV head, up to 64 values. */
export function attentionGroup(nHeads: number, nKvHeads: number, headDim: number): number {
  const GQ = nHeads / nKvHeads;
  let g = 1;
  for (let d = 1; d <= GQ; d++) if (GQ % d === 0 && d * headDim <= 64) g = d;
  return g;
}

function attentionTexWgsl(v: AttentionVariant): string {
  const { nHeads, nKvHeads, headDim: HD, wg: WG } = v;
  const QD = nHeads * HD, GQ = nHeads / nKvHeads, H = HD / 2;
  const gq = v.gq ?? 1, S = gq * (HD + 2);
  if (v.qUniform && QD % 4 !== 0) {
    throw new Error("attention: a uniform q needs nHeads·headDim % 4 = 0");
  }
  if (!Number.isInteger(GQ / gq)) {
    throw new Error(`attention: gq = ${gq} must divide nHeads / nKvHeads = ${GQ}`);
  }
  const idx = Array.from({ length: H }, (_, i) => i);
  const heads = Array.from({ length: gq }, (_, g) => g);
  const lanes = Array.from({ length: WG }, (_, w) => w);
  // a texel's rotate-half pair: two f32 bit patterns (rg32uint) or two packed halves (r32uint)
  const texel = (load: string) =>
    v.kvType === "f16" ? `unpack2x16float(${load}.x)` : `bitcast<vec2<f32>>(${load}.xy)`;
  const qDecl = v.qUniform
    ? `@group(0) @binding(1) var<uniform> q: array<vec4<f32>, ${QD / 4}>;
fn qv(i: u32) -> f32 { return q[i / 4u][i % 4u]; }`
    : `@group(0) @binding(1) var<storage, read> q: array<f32>;
fn qv(i: u32) -> f32 { return q[i]; }`;
  const L: string[] = [];
  const p = (s: string) => L.push(s);
  p(`  let h0 = wid.x * ${gq}u;`);
  p(`  let t = wid.y;`);
  p(`  let row = step.rows[t];
  let len = row.x + 1u;
  let kv0 = row.y;`);
  p(`  let kx = (h0 / ${GQ}u) * ${H}u;`);
  for (const g of heads) {
    p(`  let qo${g} = t * ${QD}u + (h0 + ${g}u) * ${HD}u;`);
    for (const i of idx) {
      p(
        `  let q${g}_${i} = vec2<f32>(qv(qo${g} + ${i}u), qv(qo${g} + ${i + H}u)) * ` +
          `${1 / Math.sqrt(HD)};`,
      );
    }
    p(`  var m${g} = -3.0e38;`);
    p(`  var l${g} = 0.0;`);
    for (const i of idx) p(`  var a${g}_${i} = vec2<f32>(0.0);`);
  }
  p(`  for (var j = lid; j < len; j += ${WG}u) {`);
  for (const i of idx) {
    p(`    let k${i} = ${texel(`textureLoad(kcache, vec2<u32>(kx + ${i}u, kv0 + j), 0)`)};`);
  }
  for (const i of idx) {
    p(`    let v${i} = ${texel(`textureLoad(vcache, vec2<u32>(kx + ${i}u, kv0 + j), 0)`)};`);
  }
  for (const g of heads) {
    p(`    let s${g} = ${idx.map((i) => `dot(q${g}_${i}, k${i})`).join(" + ")};`);
    // online softmax with one exp: the larger of (m, s) gets weight 1, the other exp(−|s − m|)
    p(`    let up${g} = s${g} > m${g};`);
    p(`    let x${g} = exp(-abs(s${g} - m${g}));`);
    p(`    let sc${g} = select(1.0, x${g}, up${g});`);
    p(`    let e${g} = select(x${g}, 1.0, up${g});`);
    p(`    l${g} = l${g} * sc${g} + e${g};`);
    p(`    m${g} = max(m${g}, s${g});`);
    for (const i of idx) p(`    a${g}_${i} = a${g}_${i} * sc${g} + e${g} * v${i};`);
  }
  p(`  }`);
  // merge the threads' partial softmaxes
  for (const g of heads) {
    const o = g * (HD + 2);
    p(`  part[lid * ${S}u + ${o}u] = m${g};`);
    p(`  part[lid * ${S}u + ${o + 1}u] = l${g};`);
    for (const i of idx) {
      p(`  part[lid * ${S}u + ${o + 2 + 2 * i}u] = a${g}_${i}.x;`);
      p(`  part[lid * ${S}u + ${o + 3 + 2 * i}u] = a${g}_${i}.y;`);
    }
  }
  p(`  workgroupBarrier();`);
  for (const g of heads) {
    const o = g * (HD + 2);
    p(`  {`);
    for (const w of lanes) p(`    let m${w} = part[${w * S + o}u];`);
    p(`    let mx = ${lanes.map((w) => `m${w}`).reduce((a, b) => `max(${a}, ${b})`)};`);
    for (const w of lanes) p(`    let e${w} = exp(m${w} - mx);`);
    p(`    let den = ${lanes.map((w) => `e${w} * part[${w * S + o + 1}u]`).join(" + ")};`);
    p(`    for (var i = lid; i < ${H}u; i += ${WG}u) {`);
    p(`      var o = vec2<f32>(0.0);`);
    for (const w of lanes) {
      const b = w * S + o + 2;
      p(`      o += e${w} * vec2<f32>(part[${b}u + 2u * i], part[${b + 1}u + 2u * i]);`);
    }
    p(`      out[qo${g} + i] = o.x / den;`);
    p(`      out[qo${g} + i + ${H}u] = o.y / den;`);
    p(`    }`);
    p(`  }`);
  }
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
${qDecl}
@group(0) @binding(2) var kcache: texture_2d<u32>;
@group(0) @binding(3) var vcache: texture_2d<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
var<workgroup> part: array<f32, ${WG * S}>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
${L.join("\n")}
}`;
}

/** The pipeline cache's name of a variant. */
export function attentionPipelineKey(v: AttentionVariant): string {
  return `attention_${v.nHeads}_${v.nKvHeads}_${v.headDim}_w${v.wg}${
    v.kv === "texture" ? `T${v.gq ?? 1}` : ""
  }${v.qUniform ? "U" : ""}${v.kvType === "f16" ? "h" : ""}`;
}

export function attentionPipeline(gpu: Gpu, v: AttentionVariant): GPUComputePipeline {
  return gpu.pipeline(attentionPipelineKey(v), () => attentionWgsl(v));
}

/** Bindings: step, q, kcache, vcache, out. Grid: (heads / gq, tokens). */
export function attentionGrid(v: AttentionVariant, ntok: number): [number, number] {
  return [v.kv === "texture" ? v.nHeads / (v.gq ?? 1) : v.nHeads, ntok];
}
