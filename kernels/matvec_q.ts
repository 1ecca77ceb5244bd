/**
 * Decode matrix-vector product over packed low-bit weights (docs/FORMAT.md, runtime/format/pack.ts),
 * y[t] = epilogue(Ŵ · x[t]) for `batch` input vectors, with dequantization fused into the dot
 * product and an optional fused RMSNorm of x. The generator is shared with the prefill kernel
 * (matmul_q.ts).
 *
 * Arithmetic. For a row and a group with scale s and offset z, and codes u = q + h (h = 2^(b−1)):
 *   Σ_{k∈g} (s·q_k + z)·x_k = s·Σ u_k·x_k + (z − s·h)·Σ x_k,
 * so the inner loop only multiplies the unsigned codes by x; the group sum of x is computed once
 * per thread (shared by all of its rows) and s, z are applied once per group. Four codes are read
 * at once from the byte-lane layout: a mask per lane leaves u·2^shift, which converts exactly to
 * f32 and is dotted with x·2^−shift (x pre-scaled once per block for all rows): one and, one
 * conversion and one fma per code.
 *
 * RMSNorm. x ← x·g / rms(x) is linear in x but for the scalar 1/rms, so the kernel multiplies x by
 * g on the fly, accumulates Σ x² from the same loads and scales the finished dot products: no
 * workgroup memory, no barrier, no limit on K · batch.
 *
 * Threads. A workgroup covers `upw` units (output rows, or the row pairs of the gateup/qkv
 * epilogues). `tpr` threads share a unit: they take every tpr-th span of K and reduce through
 * workgroup memory (GPUs: tpr = 32/64). Each thread handles `upt` units. On lavapipe (Mesa 22)
 * every storage-buffer or workgroup-memory load is a scalar loop over the SIMD lanes costing
 * ~20 cycles per 32-bit component, while arithmetic is nearly free: the CPU shape (tpr = 1,
 * 16..32 weight rows per thread) loads each x block once for all of a thread's rows, leaving
 * ≈ b/32 (codes) + batch/rows (x) + 1/G (scales) loaded components per weight.
 *
 * Spans. A span is one quantization group when tpr = 1 (scales loaded once per group) and one
 * vec4 of x when tpr > 1 ({@link laneLoop}: the threads of a unit read consecutive words).
 *
 * Sources (lavapipe fast paths, opt-in; the buffers keep the FORMAT.md layout):
 * - weights "texture" (tpr = 1): qweight and sz are re-laid into rgba32uint textures of width
 *   {@link Q_TEX_WIDTH} ({@link qTexLayout}, {@link createQTextures}) and read 128 bits per
 *   textureLoad, ~8× cheaper per load than storage buffers on lavapipe; the loop
 *   ({@link textureLoop}) takes 1, 2 or 4 blocks (4, 2, 3 bits) per load of codes.
 * - xUniform: x (and g) are bound as uniform buffers (batch·K·4 ≤ 64 KiB), which lavapipe loads
 *   with one broadcast instead of a per-lane loop.
 */
import { grid } from "./common.ts";
import { type Epilogue, epilogueBindings, epilogueKey, isPair, unitCount } from "./epilogue.ts";
import type { Gpu } from "./gpu.ts";
import type { Bits } from "../runtime/format/qtensor.ts";
import { ParameterError, ShapeError } from "./errors.ts";
import { BindingCounter, epilogueDecls, inputDecls } from "./bindings.ts";

export interface MatvecQVariant {
  bits: Bits;
  /** Group size: 32, 64, 128, or 0 (or ≥ K) for one group per row. */
  groupSize: number;
  rows: number; // weight rows (N)
  K: number; // inputs, a multiple of 4
  /** Fuse x ← x · g / rms(x) (RMSNorm with weight g, epsilon eps) before the product. */
  norm: { eps: number } | null;
  epilogue: Epilogue;
  tpr: number; // threads per unit, a power of two
  upw: number; // units per workgroup
  /** Input vectors (1..MAX_Q_BATCH), x is (batch, K); the weights are read once for all. */
  batch: number;
  /** Units per thread (default 1); upw must be a multiple of it. */
  upt?: number;
  /** Where qweight and sz live (default "buffer"; "texture": see createQTextures). */
  weights?: QWeights;
  /** Bind x (and g) as uniform buffers (default false); needs batch·K·4 ≤ 65536. */
  xUniform?: boolean;
}

export type QWeights = "buffer" | "texture";

/** Thread shape of the quantized matrix-vector kernels. */
export interface QShape {
  tpr: number;
  upw: number;
  upt: number;
}

/** Parameters shared by the decode (matvec) and prefill (matmul) generators. */
export interface QCore {
  bits: Bits;
  groupSize: number;
  rows: number;
  K: number;
  norm: { eps: number } | null;
  epilogue: Epilogue;
  tpr: number;
  upw: number;
  upt: number;
  /** Tokens per workgroup. */
  batch: number;
  /** Prefill: tokens are wid.z·batch + t, those ≥ step.ntok are skipped. */
  dynamicTokens: boolean;
  weights: QWeights;
  xUniform: boolean;
}

/**
 * The most tokens one workgroup of the quantized kernels takes (a batched decode step of up to
 * this many rows reads each weight once).
 */
export const MAX_Q_BATCH = 32;

/** Texels per row of the weight textures. */
export const Q_TEX_WIDTH = 4096;

/**
 * Layout of the "texture" source. Every textureLoad on lavapipe costs about as much as the
 * arithmetic of 32 weights, nearly independent of the texel's width, so both textures are
 * rgba32uint (128 bits per load): qweight in fetch units of `blocksPerUnit` 32-value blocks
 * (4 bits: 1 block = 1 texel; 2 bits: 2 blocks = 1 texel; 3 bits: 4 blocks = 3 texels), and sz
 * with 4 groups per texel; each weight row is padded to whole units and whole sz texels.
 */
export interface QTexLayout {
  blocksPerUnit: number;
  texelsPerUnit: number;
  /** qweight texels per weight row. */
  rowTexels: number;
  /** sz texels per weight row (4 groups each). */
  szRowTexels: number;
}

export function qTexLayout(bits: Bits, K: number, groupSize: number): QTexLayout {
  const G = qGroup(K, groupSize);
  const blocksPerUnit = bits === 4 ? 1 : bits === 2 ? 2 : 4;
  const texelsPerUnit = bits === 3 ? 3 : 1;
  return {
    blocksPerUnit,
    texelsPerUnit,
    rowTexels: Math.ceil(Math.ceil(K / 32) / blocksPerUnit) * texelsPerUnit,
    szRowTexels: Math.ceil(Math.ceil(K / G) / 4),
  };
}

/**
 * Uploads packed weights (FORMAT.md words, rows of K inputs) into the two rgba32uint textures
 * the "texture" source reads, each row padded as {@link qTexLayout} says; texel i of a texture is
 * at (i % Q_TEX_WIDTH, i / Q_TEX_WIDTH).
 */
export function createQTextures(
  gpu: Gpu,
  packed: { qweight: Uint32Array; sz: Uint32Array },
  q: { bits: Bits; K: number; groupSize: number },
  label = "q",
): { qweight: GPUTexture; sz: GPUTexture } {
  const lay = qTexLayout(q.bits, q.K, q.groupSize);
  const make = (words: Uint32Array, rowWords: number, rowTexels: number, name: string) => {
    const rows = words.length / rowWords;
    if (!Number.isInteger(rows)) {
      throw new ShapeError(`${label}.${name}: ${words.length} words are not whole rows`);
    }
    const texels = rows * rowTexels;
    const h = Math.max(1, Math.ceil(texels / Q_TEX_WIDTH));
    const w = h > 1 ? Q_TEX_WIDTH : Math.max(1, texels);
    const max = gpu.device.limits.maxTextureDimension2D;
    if (h > max) {
      throw new ShapeError(
        `${label}.${name}: ${texels} texels need a ${w}×${h} texture, over the ${max} limit; ` +
          "split the layer into row chunks",
      );
    }
    const data = new Uint32Array(w * h * 4);
    for (let r = 0; r < rows; r++) {
      data.set(words.subarray(r * rowWords, (r + 1) * rowWords), r * rowTexels * 4);
    }
    const tex = gpu.device.createTexture({
      label: `${label}.${name}`,
      size: [w, h],
      format: "rgba32uint",
      usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST,
    });
    gpu.device.queue.writeTexture({ texture: tex }, data, { bytesPerRow: w * 16 }, [w, h]);
    return tex;
  };
  const nB = Math.ceil(q.K / 32), nG = Math.ceil(q.K / qGroup(q.K, q.groupSize));
  return {
    qweight: make(packed.qweight, q.bits * nB, lay.rowTexels, "qweight"),
    sz: make(packed.sz, nG, lay.szRowTexels, "sz"),
  };
}

/** Effective group size (K for 0 or ≥ K); throws unless the groups align with 32-value blocks. */
export function qGroup(K: number, groupSize: number): number {
  const G = groupSize === 0 || groupSize >= K ? K : groupSize;
  if (!Number.isInteger(G) || G < 1 || (G < K && G % 32 !== 0)) {
    throw new ParameterError(
      `quantized kernels: group size ${groupSize} for K = ${K} must be 0, ≥ K or a multiple of 32`,
    );
  }
  return G;
}

function checkCore(c: QCore): void {
  if (c.bits !== 2 && c.bits !== 3 && c.bits !== 4) {
    throw new ParameterError(`quantized kernels: bits must be 2, 3 or 4, got ${c.bits}`);
  }
  if (!Number.isInteger(c.K) || c.K < 4 || c.K % 4 !== 0) {
    throw new ShapeError(`quantized kernels: K = ${c.K} must be a positive multiple of 4`);
  }
  if (!Number.isInteger(c.rows) || c.rows < 1) {
    throw new ShapeError(`quantized kernels: bad row count ${c.rows}`);
  }
  if (!Number.isInteger(c.batch) || c.batch < 1 || c.batch > MAX_Q_BATCH) {
    throw new ParameterError(
      `quantized kernels: batch must be 1..${MAX_Q_BATCH}, got ${c.batch}`,
    );
  }
  const pow2 = (n: number) => Number.isInteger(n) && n >= 1 && (n & (n - 1)) === 0;
  if (!pow2(c.tpr) || !Number.isInteger(c.upt) || c.upt < 1 || c.upw % c.upt !== 0) {
    throw new ParameterError(
      `quantized kernels: bad thread shape tpr = ${c.tpr}, upw = ${c.upw}, upt = ${c.upt}`,
    );
  }
  qGroup(c.K, c.groupSize);
  if (c.weights === "texture" && c.tpr !== 1) {
    throw new ParameterError(`quantized kernels: texture weights need tpr = 1, got ${c.tpr}`);
  }
  // (with dynamicTokens the grid must then hold one token group: ntok ≤ batch)
  if (c.xUniform && c.K * c.batch * 4 > 65536) {
    throw new ParameterError(
      `quantized kernels: x as a uniform buffer needs batch·K·4 ≤ 65536 (K = ${c.K}, ` +
        `batch = ${c.batch})`,
    );
  }
}

/**
 * How the codes of x vec4 i (values 4i..4i+3 of a block) are extracted: for each byte lane b a
 * mask (or a right shift, for a field reaching bit 31) of the word `word(i)`, leaving u·2^shift.
 * The kernels convert that to f32 (exact) and multiply it by x·2^−shift (pre-scaled once per block
 * and shared by all rows), so each code costs one and, one conversion and one fma.
 */
interface Lane {
  word: string; // WGSL expression of the u32 holding the four fields (in terms of w_m)
  ops: string[]; // per byte lane: "& 0x..u" or ">> Nu"
  scale: number[]; // per byte lane: the power of two the field is multiplied by
}

function lanes(bits: Bits): Lane[] {
  const out: Lane[] = [];
  for (let i = 0; i < 8; i++) {
    let word: string, width: number, base: number;
    if (bits === 4) [word, width, base] = [`w_${i >> 1}`, 4, 4 * (i & 1)];
    else if (bits === 2) [word, width, base] = [`w_${i >> 2}`, 2, 2 * (i & 3)];
    else {
      const lo = `((w_${i >> 2} >> ${2 * (i & 3)}u) & 0x03030303u)`;
      [word, width, base] = [`(${lo} | (((w_2 >> ${i}u) & 0x01010101u) << 2u))`, 3, 0];
    }
    const ops: string[] = [], scale: number[] = [];
    for (let b = 0; b < 4; b++) {
      const sh = 8 * b + base;
      if (sh + width >= 32) {
        ops.push(`>> ${sh}u`);
        scale.push(0);
      } else {
        ops.push(`& 0x${(((1 << width) - 1) * 2 ** sh).toString(16).toUpperCase()}u`);
        scale.push(sh);
      }
    }
    out.push({ word, ops, scale });
  }
  return out;
}

/** WGSL lines loading the block at word-index `i` of a row and unpacking it into c${j}_0..7. */
function codesLines(bits: Bits, j: number, i: string, ind: string): string[] {
  const L: string[] = [];
  if (bits === 3) {
    for (let m = 0; m < 3; m++) L.push(`${ind}let w${j}_${m} = qw(3u * (${i}) + ${m}u);`);
  } else {
    L.push(`${ind}let w${j} = qw(${i});`);
    for (let m = 0; m < bits; m++) L.push(`${ind}let w${j}_${m} = w${j}[${m}];`);
  }
  lanes(bits).forEach((l, k) => {
    const word = l.word.replaceAll("w_", `w${j}_`);
    L.push(`${ind}let l${j}_${k} = ${word};`);
    const f = l.ops.map((op) => `l${j}_${k} ${op}`).join(", ");
    L.push(`${ind}let c${j}_${k} = vec4<f32>(vec4<i32>(vec4<u32>(${f})));`);
  });
  return L;
}

/** WGSL of vec4 of the x scales of vec4 i (2^−shift per lane). */
function scaleWgsl(bits: Bits, i: number): string {
  const sc = lanes(bits)[i].scale.map((s) => (s === 0 ? "1.0" : `0x1p-${s}f`));
  return `vec4<f32>(${sc.join(", ")})`;
}

/**
 * The accumulation loop of the "texture" source (tpr = 1): fetch units of
 * {@link qTexLayout}'s blocksPerUnit blocks, one rgba32uint load per 128 bits of codes and one per
 * 4 groups' (s, z). Grouped weights run in chunks of 4 groups (one sz texel per row); a group's
 * dot products are scaled when it ends: inside a unit when a group is shorter than the unit, or
 * after every (group / unit)-th unit. x past K is zero, so padded codes add nothing.
 */
function textureLoop(c: QCore, nr: number): string[] {
  const { bits, K, norm } = c;
  const G = qGroup(K, c.groupSize);
  const { blocksPerUnit: BU, texelsPerUnit: TU, rowTexels, szRowTexels } = qTexLayout(
    bits,
    K,
    G,
  );
  const K4 = K / 4, nB = Math.ceil(K / 32), nG = Math.ceil(K / G), half = 1 << (bits - 1);
  const grouped = G < K;
  const Sb = G / 32; // blocks per group when grouped
  if (grouped && (Sb & (Sb - 1)) !== 0) {
    throw new ParameterError(
      `quantized kernels: texture weights need a group size of 32·2^k or per-row, got ${G}`,
    );
  }
  const toks = Array.from({ length: c.batch }, (_, t) => t);
  const rows = Array.from({ length: nr }, (_, j) => j);
  const eight = [0, 1, 2, 3, 4, 5, 6, 7];
  const L: string[] = [];
  const p = (s: string) => L.push(s);
  // scale the current group's dot products into the accumulators and restart them
  const apply = (ind: string, szOf: (j: number) => string) => {
    for (const j of rows) {
      p(`${ind}let s${j} = unpack2x16float(${szOf(j)});`);
      p(`${ind}let z${j} = s${j}.y - s${j}.x * ${half}.0;`);
      for (const t of toks) {
        p(`${ind}a${j}_${t} += s${j}.x * d${j}_${t} + z${j} * xs${t};`);
        p(`${ind}d${j}_${t} = 0.0;`);
      }
    }
    for (const t of toks) p(`${ind}xs${t} = 0.0;`);
  };
  const unit = (ind: string, uu: string, u: string) => {
    p(`${ind}let ub = (${uu}) * ${BU}u;`);
    for (let b = 0; b < BU; b++) {
      // x (and g) of block ub + b, zero past K
      p(`${ind}let xb${b} = (ub + ${b}u) * 8u;`);
      const ld = (arr: string, o: string, i: number) =>
        `select(vec4<f32>(0.0), ${arr}[${o}xb${b} + ${i}u], xb${b} + ${i}u < ${K4}u)`;
      if (norm) { for (const i of eight) p(`${ind}let g${b}_${i} = ${ld("g", "", i)};`); }
      for (const t of toks) {
        const x = (i: number) => `x${t}_${b}_${i}`;
        for (const i of eight) {
          if (norm) {
            p(`${ind}let r${x(i)} = ${ld("x", `xo${t} + `, i)};`);
            p(`${ind}let ${x(i)} = r${x(i)} * g${b}_${i};`);
          } else p(`${ind}let ${x(i)} = ${ld("x", `xo${t} + `, i)};`);
        }
        if (norm) {
          p(`${ind}ss${t} += ${eight.map((i) => `dot(r${x(i)}, r${x(i)})`).join(" + ")};`);
        }
        p(`${ind}let xsb${t}_${b} = dot(${eight.map(x).join(" + ")}, vec4<f32>(1.0));`);
        for (const i of eight) p(`${ind}let y${t}_${b}_${i} = ${x(i)} * ${scaleWgsl(bits, i)};`);
      }
    }
    for (const j of rows) {
      for (let m = 0; m < TU; m++) {
        p(`${ind}let tx${j}_${m} = qw4(n${j} * ${rowTexels}u + (${uu}) * ${TU}u + ${m}u);`);
      }
      for (let b = 0; b < BU; b++) {
        for (let m = 0; m < bits; m++) {
          const w = b * bits + m; // word of the unit
          p(`${ind}let w${j}_${b}_${m} = tx${j}_${w >> 2}[${w & 3}];`);
        }
        lanes(bits).forEach((l, k) => {
          const word = l.word.replaceAll("w_", `w${j}_${b}_`);
          const f = l.ops.map((op) => `l${j}_${b}_${k} ${op}`).join(", ");
          p(`${ind}let l${j}_${b}_${k} = ${word};`);
          p(`${ind}let c${j}_${b}_${k} = vec4<f32>(vec4<i32>(vec4<u32>(${f})));`);
        });
      }
    }
    for (let b = 0; b < BU; b++) {
      for (const j of rows) {
        for (const t of toks) {
          const terms = eight.map((i) => `dot(c${j}_${b}_${i}, y${t}_${b}_${i})`);
          p(`${ind}d${j}_${t} += ${terms.join(" + ")};`);
        }
      }
      for (const t of toks) p(`${ind}xs${t} += xsb${t}_${b};`);
      // a group ends inside the unit
      if (grouped && Sb <= BU && (b + 1) % Sb === 0) {
        const gq = `${u} * ${BU / Sb}u + ${(b + 1) / Sb - 1}u`;
        p(`${ind}{`);
        apply(`${ind}  `, (j) => `szv${j}[${gq}]`);
        p(`${ind}}`);
      }
    }
    if (grouped && Sb > BU) {
      // a group ends after every (Sb / BU)-th unit
      p(`${ind}if ((${u} + 1u) % ${Sb / BU}u == 0u) {`);
      apply(`${ind}  `, (j) => `szv${j}[${u} / ${Sb / BU}u]`);
      p(`${ind}}`);
    }
  };

  for (const j of rows) for (const t of toks) p(`  var d${j}_${t} = 0.0;`);
  for (const t of toks) p(`  var xs${t} = 0.0;`);
  if (grouped) {
    const CU = (4 * Sb) / BU; // units per chunk of 4 groups
    const nUg = Math.ceil((nG * Sb) / BU); // units up to the end of the last group
    p(`  for (var ch = 0u; ch < ${Math.ceil(nG / 4)}u; ch++) {`);
    for (const j of rows) p(`    let szv${j} = sz4(n${j} * ${szRowTexels}u + ch);`);
    p(`    let ue = min(${CU}u, ${nUg}u - ch * ${CU}u);`);
    p(`    for (var u = 0u; u < ue; u++) {`);
    unit("      ", `ch * ${CU}u + u`, "u");
    p(`    }`);
    p(`  }`);
  } else {
    p(`  for (var uu = 0u; uu < ${Math.ceil(nB / BU)}u; uu++) {`);
    unit("    ", "uu", "uu");
    p(`  }`);
    p(`  {`);
    apply("    ", (j) => `sz4(n${j} * ${szRowTexels}u).x`);
    p(`  }`);
  }
  return L;
}

/**
 * The accumulation loop of the buffer source when threads share a unit (GPUs, tpr > 1). A span is
 * one vec4 of x: the unit's threads take every tpr-th vec4, so they read consecutive x vec4 and
 * consecutive code words, coalesced as in the dense kernel (a thread per 32-value block made each
 * warp-wide load of x touch 32 cache lines: 2.6× slower on an H100). Each span extracts its four
 * codes from one word (two for 3 bits) at a shift that depends on the vec4's place in its block,
 * and applies its group's (s, z); x past K is never read.
 */
function laneLoop(c: QCore, nr: number): string[] {
  const { bits, K, norm, tpr } = c;
  const G = qGroup(K, c.groupSize);
  const K4 = K / 4, nB = Math.ceil(K / 32), nG = Math.ceil(K / G), half = 1 << (bits - 1);
  const toks = Array.from({ length: c.batch }, (_, t) => t);
  const rows = Array.from({ length: nr }, (_, j) => j);
  const L: string[] = [];
  const p = (s: string) => L.push(s);
  // word of vec4 i of block kb and the shift of its lowest field (FORMAT.md)
  const [word, shift, mask] = bits === 4
    ? ["kb * 4u + i / 2u", "(i & 1u) * 4u", "0x0F0F0F0Fu"]
    : [`kb * ${bits}u + i / 4u`, "(i & 3u) * 2u", "0x03030303u"];
  for (const j of rows) p(`  let rw${j} = n${j} * ${nB * bits}u;`);
  p(`  for (var v = t; v < ${K4}u; v += ${tpr}u) {`);
  p(`    let kb = v / 8u;`);
  p(`    let i = v % 8u;`);
  p(`    let gi = ${G >= K ? "0u" : `v / ${G / 4}u`};`);
  if (norm) p(`    let gv = g[v];`);
  for (const t of toks) {
    if (norm) {
      p(`    let xr${t} = x[xo${t} + v];`);
      p(`    ss${t} += dot(xr${t}, xr${t});`);
      p(`    let x${t} = xr${t} * gv;`);
    } else p(`    let x${t} = x[xo${t} + v];`);
    p(`    let xs${t} = dot(x${t}, vec4<f32>(1.0));`);
    p(`    let y${t} = x${t} * vec4<f32>(1.0, 0x1p-8f, 0x1p-16f, 0x1p-24f);`);
  }
  for (const j of rows) {
    let code = `(qw(rw${j} + ${word}) >> ${shift}) & ${mask}`;
    if (bits === 3) code = `(${code}) | (((qw(rw${j} + kb * 3u + 2u) >> i) & 0x01010101u) << 2u)`;
    p(`    let l${j} = ${code};`);
    p(
      `    let c${j} = vec4<f32>(vec4<u32>(l${j} & 0xFFu, l${j} & 0xFF00u, l${j} & 0xFF0000u, ` +
        `l${j} & 0xFF000000u));`,
    );
    p(`    let sz${j} = unpack2x16float(szl(n${j} * ${nG}u + gi));`);
    p(`    let zz${j} = sz${j}.y - sz${j}.x * ${half}.0;`);
    for (const t of toks) {
      p(`    a${j}_${t} += sz${j}.x * dot(c${j}, y${t}) + zz${j} * xs${t};`);
    }
  }
  p(`  }`);
  return L;
}

function qweightType(bits: Bits): string {
  return bits === 4 ? "vec4<u32>" : bits === 2 ? "vec2<u32>" : "u32";
}

/**
 * WGSL of a quantized kernel. Bindings: x, [g], qweight, sz, then the epilogue's; with
 * `dynamicTokens` (prefill) the step uniform comes first, at binding 0, and the epilogue's own
 * step binding is dropped.
 */
export function qCoreWgsl(c: QCore): string {
  checkCore(c);
  const { bits, K, tpr, upw, upt, batch: B } = c;
  const G = qGroup(K, c.groupSize);
  const K4 = K / 4, nB = Math.ceil(K / 32), nG = Math.ceil(K / G), half = 1 << (bits - 1);
  const rem = K4 - (nB - 1) * 8; // valid vec4 of x in the last block
  // blocks per span of the tpr = 1 loop: a group
  const S = G >= K ? nB : G / 32;
  const nSpans = Math.ceil(nB / S);
  const units = unitCount(c.epilogue, c.rows);
  const pair = isPair(c.epilogue);
  const P = pair ? 2 : 1;
  const nr = P * upt; // rows per thread
  const slots = upw / upt;
  const WG = tpr * slots;
  const [nx] = grid(Math.ceil(units / upw));
  const norm = c.norm;

  const bind = new BindingCounter();
  const inputs = inputDecls(c, bind);
  const TEX = c.weights === "texture";
  const TW = Q_TEX_WIDTH;
  const qt = tpr > 1 ? "u32" : qweightType(bits);
  const texFn = (name: string, tex: string) =>
    `fn ${name}(i: u32) -> vec4<u32> { return textureLoad(${tex}, vec2<u32>(i % ${TW}u, i / ${TW}u), 0); }`;
  const qDecl = TEX
    ? `${bind.decl("var qweight: texture_2d<u32>")}\n${texFn("qw4", "qweight")}`
    : `${bind.decl(`var<storage, read> qweight: array<${qt}>`)}
fn qw(i: u32) -> ${qt} { return qweight[i]; }`;
  const szDecl = TEX
    ? `${bind.decl("var sz: texture_2d<u32>")}\n${texFn("sz4", "sz")}`
    : `${bind.decl("var<storage, read> sz: array<u32>")}
fn szl(i: u32) -> u32 { return sz[i]; }`;
  const epi = epilogueDecls(c, bind, c.rows);

  const toks = Array.from({ length: B }, (_, t) => t);
  const rowsIdx = Array.from({ length: nr }, (_, j) => j);
  const L: string[] = [];
  const p = (s: string) => L.push(s);

  // thread → units and rows
  p(`  let base = (wid.x + wid.y * ${nx}u) * ${upw}u + lid / ${tpr}u;`);
  p(`  let t = lid % ${tpr}u;`);
  for (let m = 0; m < upt; m++) {
    p(`  let un${m} = base + ${m * slots}u;`);
    p(`  let rr${m} = unit_rows(min(un${m}, ${units - 1}u));`);
    for (let h = 0; h < P; h++) {
      const j = m * P + h;
      p(`  let n${j} = rr${m}.${"xy"[h]};`);
      p(`  let r${j} = n${j} * ${nB}u;`);
    }
  }
  // token offsets into x
  if (c.dynamicTokens) {
    p(`  let t0 = wid.z * ${B}u;`);
    for (const t of toks) p(`  let xo${t} = min(t0 + ${t}u, step.ntok - 1u) * ${K4}u;`);
  } else {
    for (const t of toks) p(`  const xo${t} = ${t * K4}u;`);
  }
  for (const j of rowsIdx) for (const t of toks) p(`  var a${j}_${t} = 0.0;`);
  if (norm) { for (const t of toks) p(`  var ss${t} = 0.0;`); }

  if (TEX) L.push(...textureLoop(c, nr));
  else if (tpr > 1) L.push(...laneLoop(c, nr));
  else {
    p(`  for (var sp = t; sp < ${nSpans}u; sp += ${tpr}u) {`);
    for (const j of rowsIdx) for (const t of toks) p(`    var d${j}_${t} = 0.0;`);
    for (const t of toks) p(`    var xs${t} = vec4<f32>(0.0);`);
    p(`    let kb1 = min(sp * ${S}u + ${S}u, ${nB}u);`);
    p(`    for (var kb = sp * ${S}u; kb < kb1; kb++) {`);
    const ind = "      ";
    const eight = [0, 1, 2, 3, 4, 5, 6, 7];
    // x (and g) of the block, zero past K in the last block
    const ld = (arr: string, o: string, i: number) =>
      i < rem
        ? `${arr}[${o} + ${i}u]`
        : `select(vec4<f32>(0.0), ${arr}[${o} + ${i}u], kb != ${nB - 1}u)`;
    p(`${ind}let xb = kb * 8u;`);
    if (norm) { for (const i of eight) p(`${ind}let g_${i} = ${ld("g", "xb", i)};`); }
    for (const t of toks) {
      for (const i of eight) {
        if (norm) {
          p(`${ind}let xr${t}_${i} = ${ld("x", `xo${t} + xb`, i)};`);
          p(`${ind}let x${t}_${i} = xr${t}_${i} * g_${i};`);
        } else p(`${ind}let x${t}_${i} = ${ld("x", `xo${t} + xb`, i)};`);
      }
      if (norm) {
        p(`${ind}ss${t} += ${eight.map((i) => `dot(xr${t}_${i}, xr${t}_${i})`).join(" + ")};`);
      }
      p(`${ind}xs${t} += ${eight.map((i) => `x${t}_${i}`).join(" + ")};`);
      for (const i of eight) p(`${ind}let y${t}_${i} = x${t}_${i} * ${scaleWgsl(bits, i)};`);
    }
    for (const j of rowsIdx) {
      L.push(...codesLines(bits, j, `r${j} + kb`, ind));
      for (const t of toks) {
        p(`${ind}d${j}_${t} += ${eight.map((i) => `dot(c${j}_${i}, y${t}_${i})`).join(" + ")};`);
      }
    }
    p(`    }`);
    for (const t of toks) p(`    let xt${t} = dot(xs${t}, vec4<f32>(1.0));`);
    p(`    let gi = sp;`);
    for (const j of rowsIdx) {
      p(`    let sz${j} = unpack2x16float(szl(n${j} * ${nG}u + gi));`);
      p(`    let zz${j} = sz${j}.y - sz${j}.x * ${half}.0;`);
      for (const t of toks) p(`    a${j}_${t} += sz${j}.x * d${j}_${t} + zz${j} * xt${t};`);
    }
    p(`  }`);
  }

  // values each thread holds: acc rows × tokens, then Σx² per token
  const vals: string[] = [];
  for (const j of rowsIdx) for (const t of toks) vals.push(`a${j}_${t}`);
  if (norm) { for (const t of toks) vals.push(`ss${t}`); }
  const nv = vals.length;
  let red = "";
  if (tpr > 1) {
    if (WG * nv * 4 > 32768) {
      throw new ParameterError(
        `quantized kernels: reduction needs ${WG * nv * 4} bytes of workgroup memory`,
      );
    }
    red = `var<workgroup> red: array<f32, ${WG * nv}>;`;
    vals.forEach((v, i) => p(`  red[lid * ${nv}u + ${i}u] = ${v};`));
    p(`  workgroupBarrier();`);
    p(`  for (var s = ${tpr / 2}u; s > 0u; s >>= 1u) {`);
    p(`    if (t < s) {`);
    p(`      for (var i = 0u; i < ${nv}u; i++) {`);
    p(`        red[lid * ${nv}u + i] += red[(lid + s) * ${nv}u + i];`);
    p(`      }`);
    p(`    }`);
    p(`    workgroupBarrier();`);
    p(`  }`);
    vals.forEach((v, i) => p(`  ${v} = red[lid * ${nv}u + ${i}u];`));
  }
  if (norm) {
    for (const t of toks) p(`  let inv${t} = inverseSqrt(ss${t} / ${K}.0 + ${norm.eps});`);
  }
  p(`  if (t == 0u) {`);
  for (let m = 0; m < upt; m++) {
    p(`    if (un${m} < ${units}u) {`);
    for (const t of toks) {
      const ya = `a${m * P}_${t}`, yb = pair ? `a${m * P + 1}_${t}` : "0.0";
      let acc = `vec2<f32>(${ya}, ${yb})`;
      if (norm) acc = `${acc} * inv${t}`;
      const tok = c.dynamicTokens ? `t0 + ${t}u` : `${t}u`;
      const call = `epilogue(${tok}, un${m}, ${acc});`;
      p(
        c.dynamicTokens && t > 0
          ? `      if (t0 + ${t}u < step.ntok) { ${call} }`
          : `      ${call}`,
      );
    }
    p(`    }`);
  }
  p(`  }`);

  return `${inputs}
${qDecl}
${szDecl}
${epi}
${red}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
${L.join("\n")}
}`;
}

function core(v: MatvecQVariant): QCore {
  return {
    ...v,
    upt: v.upt ?? 1,
    dynamicTokens: false,
    weights: v.weights ?? "buffer",
    xUniform: v.xUniform ?? false,
  };
}

/** A key naming a kernel variant, for pipeline caches. */
export function qCoreKey(c: QCore): string {
  return `q${c.bits}g${qGroup(c.K, c.groupSize)}_${c.rows}x${c.K}_b${c.batch}_${
    c.norm ? `n${c.norm.eps}` : ""
  }${epilogueKey(c.epilogue)}_t${c.tpr}u${c.upw}p${c.upt}${c.weights === "texture" ? "T" : ""}${
    c.xUniform ? "U" : ""
  }${c.dynamicTokens ? "D" : ""}`;
}

export function matvecQKey(v: MatvecQVariant): string {
  return `matvec${qCoreKey(core(v))}`;
}

/** Buffer names in binding order. */
export function matvecQBindings(v: MatvecQVariant): string[] {
  return ["x", ...(v.norm ? ["g"] : []), "qweight", "sz", ...epilogueBindings(v.epilogue)];
}

export function matvecQWgsl(v: MatvecQVariant): string {
  return qCoreWgsl(core(v));
}

/** Compiles (or fetches) the pipeline for a variant. */
export function matvecQPipeline(gpu: Gpu, v: MatvecQVariant): GPUComputePipeline {
  return gpu.pipeline(matvecQKey(v), () => matvecQWgsl(v));
}

/** Workgroup grid of a variant. */
export function matvecQGrid(v: MatvecQVariant): [number, number] {
  return grid(Math.ceil(unitCount(v.epilogue, v.rows) / v.upw));
}

/**
 * Thread shape for an adapter, K, batch and epilogue. CPU adapters: tpr = 1 and one 8-lane SIMD
 * group per workgroup, each thread computing 32 weight rows up to batch 2 and 16 above (16 or 8
 * units of the pair epilogues): every x block loaded serves that many rows, while the unrolled
 * rows × tokens body keeps lavapipe's shader compile (at the first dispatch) within ~1-4 s.
 * GPUs: tpr threads split K and reduce through workgroup memory.
 */
export function matvecQShape(gpu: Gpu, K: number, batch = 1, epilogue?: Epilogue): QShape {
  if (gpu.isCpu) {
    const rows = batch <= 2 ? 32 : 16;
    const upt = epilogue && isPair(epilogue) ? rows / 2 : rows;
    return { tpr: 1, upt, upw: upt * 8 };
  }
  // from a sweep on an H100: two units per thread, 8 per workgroup; 32 threads per unit above
  // batch 1
  const tpr = K >= 2048 && batch === 1 ? 64 : K >= 512 ? 32 : 8;
  return { tpr, upw: 8, upt: 2 };
}
