/**
 * Dense (f32/f16) matrix-vector and matrix-matrix products reading the weights from textures
 * (the CPU-adapter layout of common.ts, {@link DENSE_TEX_WIDTH}): the generator behind the
 * `weights: "texture"` variants of matvec.ts (decode) and matmul.ts (prefill).
 *
 * On lavapipe every storage-buffer or workgroup-memory load is a scalar loop over the SIMD lanes
 * (~20 cycles per 32-bit component), a texel load costs about as much as one component and a
 * uniform load is a broadcast. So: one thread per `upt` units (no barriers, no workgroup memory),
 * each weight texel loaded once for all of the workgroup's tokens, each x vec4 loaded once for all
 * of the thread's rows, x (and the RMSNorm weight g) from uniform buffers in decode (`xUniform`).
 * The fused RMSNorm multiplies x by g on the fly, accumulates Σx² from the same loads and scales
 * the finished dot products by 1/rms, as the quantized kernels do.
 */
import {
  DENSE_TEX_WIDTH,
  type DenseFormat,
  denseRowTexels,
  denseTextureAccess,
  grid,
} from "./common.ts";
import { type Epilogue, epilogueKey, isPair, unitCount } from "./epilogue.ts";
import { ParameterError, ShapeError } from "./errors.ts";
import { BindingCounter, epilogueDecls, inputDecls } from "./bindings.ts";

export interface DenseTexCore {
  format: DenseFormat;
  rows: number;
  K: number; // a multiple of 4
  norm: { eps: number } | null;
  epilogue: Epilogue;
  upw: number; // units per workgroup
  upt: number; // units per thread; upw is a multiple of it
  /** Tokens per workgroup (decode: the batch of x vectors). */
  batch: number;
  /** Prefill: tokens are wid.z·batch + t, those ≥ step.ntok are skipped. */
  dynamicTokens: boolean;
  /** x (and g) as uniform buffers: decode only, batch·K·4 ≤ 65536. */
  xUniform: boolean;
}

export function denseTexKey(c: DenseTexCore): string {
  return `${c.format}T_${c.rows}x${c.K}_b${c.batch}_${c.norm ? `n${c.norm.eps}_` : ""}${
    epilogueKey(c.epilogue)
  }_u${c.upw}p${c.upt}${c.xUniform ? "U" : ""}${c.dynamicTokens ? "D" : ""}`;
}

function check(c: DenseTexCore): void {
  if (!Number.isInteger(c.K) || c.K < 4 || c.K % 4 !== 0) {
    throw new ShapeError(`dense texture kernels: K = ${c.K} must be a positive multiple of 4`);
  }
  if (!Number.isInteger(c.batch) || c.batch < 1 || c.batch > 8) {
    throw new ParameterError(`dense texture kernels: batch must be 1..8, got ${c.batch}`);
  }
  if (!Number.isInteger(c.upt) || c.upt < 1 || c.upw % c.upt !== 0) {
    throw new ParameterError(`dense texture kernels: bad shape upw = ${c.upw}, upt = ${c.upt}`);
  }
  // (with dynamicTokens the grid must then hold one token group: ntok ≤ batch)
  if (c.xUniform && c.K * c.batch * 4 > 65536) {
    throw new ParameterError(
      `dense texture kernels: x as a uniform buffer needs batch·K·4 ≤ 65536 (K = ${c.K}, ` +
        `batch = ${c.batch})`,
    );
  }
}

/**
 * WGSL of a dense texture kernel. Bindings: x, [g], w, then the epilogue's; with `dynamicTokens`
 * (prefill) the step uniform comes first and the epilogue's own step binding is dropped.
 */
export function denseTexWgsl(c: DenseTexCore): string {
  check(c);
  const { K, upw, upt, batch: B, norm } = c;
  const K4 = K / 4, f32 = c.format === "f32";
  const RT = denseRowTexels(K, c.format);
  const units = unitCount(c.epilogue, c.rows);
  const P = isPair(c.epilogue) ? 2 : 1;
  const nr = P * upt;
  const WG = upw / upt;
  const [nx] = grid(Math.ceil(units / upw));

  const bind = new BindingCounter();
  const inputs = inputDecls(c, bind);
  const wDecl = denseTextureAccess("w", bind.next++, c.format);
  const epi = epilogueDecls(c, bind, c.rows);

  const toks = Array.from({ length: B }, (_, t) => t);
  const rowsIdx = Array.from({ length: nr }, (_, j) => j);
  const L: string[] = [];
  const p = (s: string) => L.push(s);
  p(`  let base = (wid.x + wid.y * ${nx}u) * ${upw}u + lid;`);
  for (let m = 0; m < upt; m++) {
    p(`  let un${m} = base + ${m * WG}u;`);
    p(`  let rr${m} = unit_rows(min(un${m}, ${units - 1}u));`);
    for (let h = 0; h < P; h++) p(`  let o${m * P + h} = rr${m}.${"xy"[h]} * ${RT}u;`);
  }
  if (c.dynamicTokens) {
    p(`  let t0 = wid.z * ${B}u;`);
    for (const t of toks) p(`  let xo${t} = min(t0 + ${t}u, step.ntok - 1u) * ${K4}u;`);
  } else {
    for (const t of toks) p(`  const xo${t} = ${t * K4}u;`);
  }
  for (const j of rowsIdx) for (const t of toks) p(`  var a${j}_${t} = vec4<f32>(0.0);`);
  if (norm) { for (const t of toks) p(`  var ss${t} = vec4<f32>(0.0);`); }

  /** Lines loading x vec4 `k` (an expression) of every token into x${t}_${s}. */
  const loadX = (k: string, s: number, ind: string) => {
    if (norm) p(`${ind}let g_${s} = g[${k}];`);
    for (const t of toks) {
      if (norm) {
        p(`${ind}let xr${t}_${s} = x[xo${t} + ${k}];`);
        p(`${ind}ss${t} += xr${t}_${s} * xr${t}_${s};`);
        p(`${ind}let x${t}_${s} = xr${t}_${s} * g_${s};`);
      } else p(`${ind}let x${t}_${s} = x[xo${t} + ${k}];`);
    }
  };
  const ind = "    ";
  if (f32) {
    p(`  for (var k = 0u; k < ${K4}u; k++) {`);
    loadX("k", 0, ind);
    for (const j of rowsIdx) {
      p(`${ind}let w${j} = w_t(o${j} + k);`);
      for (const t of toks) p(`${ind}a${j}_${t} += w${j} * x${t}_0;`);
    }
    p(`  }`);
  } else {
    // f16: texel k holds x vec4s 2k and 2k + 1; with K4 odd the last texel's upper half is padding
    const full = Math.floor(K4 / 2);
    const body = (k: string, both: boolean, ind: string) => {
      loadX(`2u * ${k}`, 0, ind);
      if (both) loadX(`2u * ${k} + 1u`, 1, ind);
      for (const j of rowsIdx) {
        p(`${ind}let w${j} = w_t(o${j} + ${k});`);
        p(`${ind}let lo${j} = vec4<f32>(unpack2x16float(w${j}.x), unpack2x16float(w${j}.y));`);
        if (both) {
          p(`${ind}let hi${j} = vec4<f32>(unpack2x16float(w${j}.z), unpack2x16float(w${j}.w));`);
        }
        for (const t of toks) {
          p(`${ind}a${j}_${t} += lo${j} * x${t}_0${both ? ` + hi${j} * x${t}_1` : ""};`);
        }
      }
    };
    if (full > 0) {
      p(`  for (var k = 0u; k < ${full}u; k++) {`);
      body("k", true, ind);
      p(`  }`);
    }
    if (K4 % 2 === 1) {
      p(`  {`);
      body(`${full}u`, false, ind);
      p(`  }`);
    }
  }

  if (norm) {
    for (const t of toks) {
      p(`  let inv${t} = inverseSqrt(dot(ss${t}, vec4<f32>(1.0)) / ${K}.0 + ${norm.eps});`);
    }
  }
  for (let m = 0; m < upt; m++) {
    p(`  if (un${m} < ${units}u) {`);
    for (const t of toks) {
      const one = "vec4<f32>(1.0)";
      const ya = `dot(a${m * P}_${t}, ${one})`;
      const yb = P === 2 ? `dot(a${m * P + 1}_${t}, ${one})` : "0.0";
      let acc = `vec2<f32>(${ya}, ${yb})`;
      if (norm) acc = `${acc} * inv${t}`;
      const tok = c.dynamicTokens ? `t0 + ${t}u` : `${t}u`;
      const call = `epilogue(${tok}, un${m}, ${acc});`;
      p(
        c.dynamicTokens && t > 0 ? `    if (t0 + ${t}u < step.ntok) { ${call} }` : `    ${call}`,
      );
    }
    p(`  }`);
  }
  return `${inputs}
${wDecl}
${epi}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
${L.join("\n")}
}`;
}

/** Rows of a dense texture of `K`-wide rows: one texture holds at most this many. */
export function denseTexMaxRows(K: number, format: DenseFormat, maxDim: number): number {
  return Math.floor((DENSE_TEX_WIDTH * maxDim) / denseRowTexels(K, format));
}
