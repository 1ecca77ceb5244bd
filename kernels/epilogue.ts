/**
 * What a matrix-vector or matrix-matrix kernel does with each finished dot product. Shared by the
 * dense and quantized kernels so that every weight format fuses the same operations.
 *
 * A kernel computes "units": one output row, or a pair of rows that its epilogue combines
 * (the two halves of a RoPE rotation, or gate and up of the FFN).
 */
import { STEP_WGSL } from "./common.ts";

export type Epilogue =
  /** Y[t, row] = acc; `offset` shifts the row (a chunk of a large matrix). */
  | { kind: "store"; offset: number; ld: number }
  /** Y[t, row] += acc (residual add). */
  | { kind: "add" }
  /** units j: rows j and j + hidden; H[t, j] = silu(gate) * up. */
  | { kind: "gateup"; hidden: number }
  /**
   * Rows of the concatenated [Wq; Wk; Wv] in rotate-half pairs: (+bias), RoPE on q and k,
   * q to Q[t], k and v into the KV cache at row kvBase + pos of token t's Step row (RoPE at pos;
   * see {@link KvSource}).
   */
  | {
    kind: "qkv";
    nHeads: number;
    nKvHeads: number;
    headDim: number;
    bias: boolean;
    /** Where the KV cache lives (default "buffer"). */
    kv?: KvSource;
    /** The KV cache's element type (default "f32"). */
    kvType?: KvType;
  };

/**
 * Layout of the KV cache. "buffer": storage arrays (ctx, nKvHeads·headDim) of f32. "texture"
 * (CPU adapters): rg32uint textures of width nKvHeads·headDim/2 and height ctx, the texel
 * (kvHead·headDim/2 + i, pos) holding the f32 bits of elements i and i + headDim/2 of that head,
 * the rotate-half pair one qkv unit computes: written with textureStore, read with textureLoad.
 */
export type KvSource = "buffer" | "texture";

/**
 * Element type of the KV cache. "f32" as {@link KvSource} describes. "f16": each rotate-half pair
 * (elements i and i + headDim/2 of a head, the pair one qkv unit computes) is one u32 of two
 * halves (pack2x16float: i in the low half), so one unit writes one whole word: "buffer" an
 * array<u32> (ctx, nKvHeads·headDim/2), word kvHead·headDim/2 + i of a row; "texture" an r32uint
 * texture (nKvHeads·headDim/2, ctx) of those words. Values are rounded after RoPE and clamped to
 * ±65504 (pack2x16float of a value beyond f16's range is indeterminate); attention unpacks and
 * accumulates in f32. No WGSL extension is needed.
 */
export type KvType = "f16" | "f32";

/** f16's largest finite value: the qkv epilogue clamps the f16 cache's values to ±F16_MAX. */
export const F16_MAX = 65504;

/**
 * A (ctx, kvd) array of K or V as the cache's words, in every layout but "buffer" f32 (which is
 * the array itself): per position, pair kvHead·hd/2 + i holds elements i and i + hd/2 of that
 * head, as two f32 bit patterns ("f32": the rg32uint texels) or one word of two halves ("f16",
 * rounded to nearest, ties to even, element i in the low half: the buffer's and the texture's
 * words). Host side: tests and the tuner fill caches with it.
 */
export function kvCacheWords(
  a: ArrayLike<number>,
  kvd: number,
  hd: number,
  kvType: KvType,
): Uint32Array<ArrayBuffer> {
  const pairs = new Float32Array(a.length), half = hd / 2, ctx = a.length / kvd;
  for (let p = 0; p < ctx; p++) {
    for (let h = 0; h < kvd / hd; h++) {
      for (let i = 0; i < half; i++) {
        const o = p * kvd + h * hd + i, t = p * kvd + 2 * (h * half + i);
        pairs[t] = a[o];
        pairs[t + 1] = a[o + half];
      }
    }
  }
  return new Uint32Array(kvType === "f16" ? Float16Array.from(pairs).buffer : pairs.buffer);
}

/** Number of units of an epilogue over a weight with `rows` rows. */
export function unitCount(e: Epilogue, rows: number): number {
  if (e.kind === "gateup") return e.hidden;
  if (e.kind === "qkv") return rows / 2;
  return rows;
}

export function isPair(e: Epilogue): boolean {
  return e.kind === "gateup" || e.kind === "qkv";
}

/** Buffer names the epilogue binds, in binding order after the kernel's own. */
export function epilogueBindings(e: Epilogue): string[] {
  switch (e.kind) {
    case "store":
    case "add":
    case "gateup":
      return ["y"];
    case "qkv":
      return ["step", "q", "kcache", "vcache", "rope", ...(e.bias ? ["bias"] : [])];
  }
}

/** A short key naming the variant, for pipeline caches. */
export function epilogueKey(e: Epilogue): string {
  switch (e.kind) {
    case "store":
      return `store${e.offset}_${e.ld}`;
    case "add":
      return "add";
    case "gateup":
      return `gateup${e.hidden}`;
    case "qkv":
      return `qkv${e.nHeads}_${e.nKvHeads}_${e.headDim}${e.bias ? "b" : ""}${
        e.kv === "texture" ? "T" : ""
      }${e.kvType === "f16" ? "h" : ""}`;
  }
}

/**
 * WGSL declaring the epilogue's bindings (from `first` on), `fn unit_rows(u) -> vec2<u32>` (the
 * weight rows of unit u) and `fn epilogue(t: u32, u: u32, acc: vec2<f32>)`. `n` is the number of
 * output elements per token of "store"/"add" (the weight's rows) or the hidden size for "gateup".
 */
export function epilogueWgsl(e: Epilogue, first: number, n: number): string {
  const b = (i: number) => `@group(0) @binding(${first + i})`;
  switch (e.kind) {
    case "store":
      return `${b(0)} var<storage, read_write> y: array<f32>;
fn unit_rows(u: u32) -> vec2<u32> { return vec2<u32>(u, u); }
fn epilogue(t: u32, u: u32, acc: vec2<f32>) { y[t * ${e.ld}u + ${e.offset}u + u] = acc.x; }`;
    case "add":
      return `${b(0)} var<storage, read_write> y: array<f32>;
fn unit_rows(u: u32) -> vec2<u32> { return vec2<u32>(u, u); }
fn epilogue(t: u32, u: u32, acc: vec2<f32>) { y[t * ${n}u + u] += acc.x; }`;
    case "gateup":
      return `${b(0)} var<storage, read_write> y: array<f32>;
fn unit_rows(u: u32) -> vec2<u32> { return vec2<u32>(u, u + ${e.hidden}u); }
fn epilogue(t: u32, u: u32, acc: vec2<f32>) {
  let g = acc.x;
  y[t * ${e.hidden}u + u] = g / (1.0 + exp(-g)) * acc.y;
}`;
    case "qkv": {
      const half = e.headDim / 2;
      const qd = e.nHeads * e.headDim, kvd = e.nKvHeads * e.headDim;
      const tex = e.kv === "texture", f16 = e.kvType === "f16";
      const cache = (name: string) =>
        tex
          ? `var ${name}: texture_storage_2d<${f16 ? "r32uint" : "rg32uint"}, write>;`
          : `var<storage, read_write> ${name}: array<${f16 ? "u32" : "f32"}>;`;
      const packed = `pack2x16float(clamp(v, vec2<f32>(-${F16_MAX}.0), vec2<f32>(${F16_MAX}.0)))`;
      const put = (name: string, h: string) =>
        tex
          ? `textureStore(${name}, vec2<u32>((${h}) * ${half}u + i, kvrow), ` +
            (f16
              ? `vec4<u32>(${packed}, 0u, 0u, 0u));`
              : `vec4<u32>(bitcast<u32>(v.x), bitcast<u32>(v.y), 0u, 0u));`)
          : f16
          ? `${name}[kvrow * ${kvd / 2}u + (${h}) * ${half}u + i] = ${packed};`
          : `let o = kvrow * ${kvd}u + (${h}) * ${e.headDim}u + i;
    ${name}[o] = v.x;
    ${name}[o + ${half}u] = v.y;`;
      return `${STEP_WGSL}
${b(0)} var<uniform> step: Step;
${b(1)} var<storage, read_write> q: array<f32>;
${b(2)} ${cache("kcache")}
${b(3)} ${cache("vcache")}
${b(4)} var<storage, read> rope: array<vec2<f32>>; // (pos, headDim/2): cos, sin
${e.bias ? `${b(5)} var<storage, read> bias: array<f32>;` : ""}
fn unit_rows(u: u32) -> vec2<u32> {
  let r = (u / ${half}u) * ${e.headDim}u + u % ${half}u;
  return vec2<u32>(r, r + ${half}u);
}
fn epilogue(t: u32, u: u32, acc: vec2<f32>) {
  let head = u / ${half}u;
  let i = u % ${half}u;
  let row = step.rows[t];
  let pos = row.x;
  let kvrow = row.y + pos;
  var v = acc;
  ${e.bias ? "let rows = unit_rows(u); v += vec2<f32>(bias[rows.x], bias[rows.y]);" : ""}
  if (head < ${e.nHeads + e.nKvHeads}u) {
    let cs = rope[pos * ${half}u + i];
    v = vec2<f32>(v.x * cs.x - v.y * cs.y, v.y * cs.x + v.x * cs.y);
  }
  if (head < ${e.nHeads}u) {
    let o = t * ${qd}u + head * ${e.headDim}u + i;
    q[o] = v.x;
    q[o + ${half}u] = v.y;
  } else if (head < ${e.nHeads + e.nKvHeads}u) {
    ${put("kcache", `head - ${e.nHeads}u`)}
  } else {
    ${put("vcache", `head - ${e.nHeads + e.nKvHeads}u`)}
  }
}`;
    }
  }
}
