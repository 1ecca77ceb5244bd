/**
 * The per-slot sampler state on the GPU and the kernels that keep and apply it:
 *
 * - the slot config (`SAMPLER_CFG_WORDS` u32 per slot, written by the host when a slot's
 *   sampling parameters change): the logit bias table, the presence, frequency and repetition
 *   penalties and min-p;
 * - the slot history (vocab u32 per slot): bit 31 set for a token of the prompt, bits 0..30 the
 *   times it was generated. The history kernel resets it from the prompt in the token buffer when
 *   a sequence starts; the sampler (kernels/sample.ts) counts each token it samples, so decode
 *   steps never wait on the host;
 * - the adjust kernel, run before the sampler when a row has a bias or a penalty: it rewrites
 *   the row's logits in place, as `adjustLogits` in runtime/model/sampling.ts does (the bias
 *   added, then for tokens seen the repetition penalty, then frequency and presence).
 *
 * Every kernel finds a row's slot in `rows[t].w` of the Step (kernels/common.ts).
 */
import { STEP_WGSL } from "./common.ts";
import type { Gpu } from "./gpu.ts";

/** Most logit bias entries a slot holds. */
export const MAX_BIAS = 300;
/** Words of one slot's config: 8 header words, then MAX_BIAS (id, bias bits) pairs. */
export const SAMPLER_CFG_WORDS = 8 + 2 * MAX_BIAS;

/** A slot's parameters as the kernels read them (see `packSamplerConfig`). */
export interface SlotSampling {
  /** (token id, bias) pairs, ids distinct and in the vocabulary. */
  logitBias: [number, number][];
  presencePenalty: number;
  frequencyPenalty: number;
  repetitionPenalty: number;
  minP: number;
}

/**
 * One slot's config words: [nbias, 0, presence, frequency, repetition, minP, 0, 0], then the
 * bias pairs (id, f32 bits).
 */
export function packSamplerConfig(s: SlotSampling): Uint32Array<ArrayBuffer> {
  if (s.logitBias.length > MAX_BIAS) {
    throw new Error(`a slot holds at most ${MAX_BIAS} logit biases; got ${s.logitBias.length}`);
  }
  const u = new Uint32Array(SAMPLER_CFG_WORDS), f = new Float32Array(u.buffer);
  u[0] = s.logitBias.length;
  f[2] = s.presencePenalty;
  f[3] = s.frequencyPenalty;
  f[4] = s.repetitionPenalty;
  f[5] = s.minP;
  s.logitBias.forEach(([id, b], j) => {
    u[8 + 2 * j] = id;
    f[9 + 2 * j] = b;
  });
  return u;
}

/** WGSL declarations of the slot config binding and its accessors. */
export function samplerCfgWgsl(binding: number): string {
  return `@group(0) @binding(${binding}) var<storage, read> scfg: array<u32>;
fn cfg_f(slot: u32, i: u32) -> f32 { return bitcast<f32>(scfg[slot * ${SAMPLER_CFG_WORDS}u + i]); }`;
}

/** Options of the adjust kernel. */
export interface AdjustOptions {
  /** Threads, a power of two (default 256). */
  wg?: number;
  /**
   * One workgroup per row over (ntok, vocab) logits (grid [ntok]); default false: one workgroup,
   * the step's last row, logits (vocab).
   */
  perRow?: boolean;
}

export function adjustWgsl(vocab: number, opts: AdjustOptions = {}): string {
  const WG = opts.wg ?? 256;
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
${samplerCfgWgsl(2)}
@group(0) @binding(3) var<storage, read> hist: array<u32>;

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let r = ${opts.perRow ? "wid.x" : "step.ntok - 1u"};
  let lbase = ${opts.perRow ? `r * ${vocab}u` : "0u"};
  let slot = step.rows[r].w;
  let nbias = scfg[slot * ${SAMPLER_CFG_WORDS}u];
  for (var j = lid; j < nbias; j += ${WG}u) {
    let e = slot * ${SAMPLER_CFG_WORDS}u + 8u + 2u * j;
    logits[lbase + scfg[e]] += bitcast<f32>(scfg[e + 1u]);
  }
  storageBarrier();
  let presence = cfg_f(slot, 2u);
  let frequency = cfg_f(slot, 3u);
  let repetition = cfg_f(slot, 4u);
  if (presence == 0.0 && frequency == 0.0 && repetition == 1.0) { return; }
  let hbase = slot * ${vocab}u;
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let h = hist[hbase + i];
    if (h == 0u) { continue; }
    let n = h & 0x7fffffffu;
    var l = logits[lbase + i];
    if (repetition != 1.0) { l = select(l * repetition, l / repetition, l > 0.0); }
    l -= f32(n) * frequency + select(0.0, presence, n > 0u);
    logits[lbase + i] = l;
  }
}`;
}

export function adjustPipeline(
  gpu: Gpu,
  vocab: number,
  opts: AdjustOptions = {},
): GPUComputePipeline {
  const key = `adjust_${vocab}_w${opts.wg ?? 256}${opts.perRow ? "R" : ""}`;
  return gpu.pipeline(key, () => adjustWgsl(vocab, opts));
}
/** Bindings: step, logits, scfg, hist. Grid: one workgroup, or [ntok] per row. */

/**
 * Resets the history of the step's last row's slot to its prompt: every token of the slot's
 * token buffer before the row's sampled position (tokens[tokenBase .. tokenBase + pos]) marked
 * as prompt, nothing generated. One workgroup.
 */
export function historyWgsl(vocab: number, wg = 256): string {
  return `${STEP_WGSL}
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read_write> hist: array<u32>;

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32) {
  let last = step.rows[step.ntok - 1u];
  let hbase = last.w * ${vocab}u;
  for (var i = lid; i < ${vocab}u; i += ${wg}u) { hist[hbase + i] = 0u; }
  storageBarrier();
  for (var j = lid; j <= last.x; j += ${wg}u) {
    let t = tokens[last.z + j];
    if (t < ${vocab}u) { hist[hbase + t] = 0x80000000u; }
  }
}`;
}

export function historyPipeline(gpu: Gpu, vocab: number, wg = 256): GPUComputePipeline {
  return gpu.pipeline(`history_${vocab}_w${wg}`, () => historyWgsl(vocab, wg));
}
/** Bindings: step, tokens, hist. Grid: one workgroup. */
