/**
 * The kernel tuner: for one quantized matrix kernel as the forward plan runs it (a
 * {@link TuneKey}), enumerate thread shapes ({@link candidates}), run each on random weights and
 * inputs, check its output against the float64 TypeScript reference (dequantize() the packed
 * weights, multiply, apply the epilogue: the tests' reference; a variant that fails is rejected
 * with the reason, never chosen), time the correct ones (several dispatches in one compute pass
 * between timestamp queries, the median of a few passes; wall-clock of the submitted passes
 * where the adapter lacks timestamp-query) and keep the fastest ({@link chooseVariant}: a pure
 * function of the timings). The runtime reads the choices back from the tune cache
 * (kernels/tune_cache.ts) through `gpu.tuned`.
 *
 * Knobs: tpr (threads per unit), upt (units per thread), upw (units per workgroup, upw / upt
 * thread slots of tpr threads) and, for prefill, tt (tokens per workgroup). The kernels have no
 * separate words-per-load or unroll parameter: a thread's loads are its tpr-strided spans and
 * its rows × tokens body is unrolled whole, so upt and tt are the unroll.
 *
 * The dense (f32/f16) matrix kernels (kernels/tune_dense.ts) run on this module's bench
 * ({@link MatrixBench}: inputs, epilogue outputs and the float64 reference over any weights'
 * rows) and the attention kernel (kernels/tune_attention.ts) on its own; both use this module's
 * variant runner ({@link runVariant}), output check, timing and choice, and the same result
 * types.
 */
import type { Epilogue } from "./epilogue.ts";
import { isPair, unitCount } from "./epilogue.ts";
import type { Gpu } from "./gpu.ts";
import { stepUniform } from "./common.ts";
import {
  createQTextures,
  matvecQBindings,
  matvecQGrid,
  matvecQKey,
  matvecQPipeline,
  type MatvecQVariant,
  matvecQWgsl,
} from "./matvec_q.ts";
import {
  matmulQBindings,
  matmulQGrid,
  matmulQKey,
  matmulQPipeline,
  type MatmulQVariant,
  matmulQWgsl,
} from "./matmul_q.ts";
import type { AttentionShape } from "./attention.ts";
import { type AttentionKey, describeKernelShape, type KernelShape } from "./attention_key.ts";
import type { DenseKey } from "./dense_key.ts";
import {
  describeShape,
  normalizeKey,
  type TunedShape,
  tunedShapeProblem,
  type TuneKey,
  tuneKeyString,
} from "./tune_key.ts";
import type { TunedEntry } from "./tune_cache.ts";
import { packQ } from "../runtime/format/pack.ts";
import { dequantize, nGroups, qRange, type QuantizedLinear } from "../runtime/format/qtensor.ts";
import { ParameterError } from "./errors.ts";
import { mulberry32 } from "../runtime/model/sampling.ts";

/** One kernel to tune: its key, its real epilogue and the shape the runtime uses untuned. */
export interface TuneJob {
  key: TuneKey;
  epilogue: Epilogue;
  /** The heuristic shape (matvecQShape / matmulQShape as the forward plan applies them). */
  default: TunedShape;
}

/** The values each knob takes; {@link candidates} crosses them and drops invalid shapes. */
export interface TuneSpace {
  tpr: number[];
  /** Units per thread (a unit is a row, or a row pair of the gateup/qkv epilogues). */
  upt: number[];
  /** Thread slots per workgroup (upw = upt · slots). */
  slots: number[];
  /** Tokens per workgroup of prefill keys (batched steps use their row count). */
  tt: number[];
}

/**
 * The default search space. CPU adapters (lavapipe): tpr = 1, 4..32 weight rows per thread (from
 * 2 above 8 tokens), 8 threads per workgroup (one SIMD group); GPUs: tpr 8..128 × upt 1, 2, 4 ×
 * 1..8 slots. Prefill keys also try tt 4, 8 (CPU) or 8, 16 (GPU).
 */
export function defaultSpace(gpu: Gpu, key: TuneKey): TuneSpace {
  const P = pairKind(key) ? 2 : 1;
  if (gpu.isCpu) {
    // 2 rows per thread only for the steps of many tokens, whose body is tokens × rows
    const rows = key.tokens > 8 ? [2, 4, 8, 16, 32] : [4, 8, 16, 32];
    return {
      tpr: [1],
      upt: rows.map((r) => r / P).filter((u) => u >= 1),
      slots: [8],
      tt: key.tokens === 0 ? [4, 8] : [key.tokens],
    };
  }
  return {
    tpr: [8, 16, 32, 64, 128],
    upt: [1, 2, 4],
    slots: [1, 2, 4, 8],
    tt: key.tokens === 0 ? [8, 16] : [key.tokens],
  };
}

function pairKind(key: TuneKey): boolean {
  return key.epilogue === "gateup" || key.epilogue === "qkv";
}

/**
 * The most accumulators (weight rows × tokens) one thread may hold: the unrolled body grows
 * with it (lavapipe takes seconds to compile 128) and GPUs spill registers past ~64.
 */
function maxAccumulators(gpu: Gpu): number {
  return gpu.isCpu ? 128 : 64;
}

/**
 * The shapes to try for `key`, in a fixed order: `def` (the heuristic) first, then the space's
 * product (tt, tpr, upt, slots, each ascending as given), without duplicates and without shapes
 * the kernel or the device rejects ({@link tunedShapeProblem}), with more than
 * {@link maxAccumulators}, more threads per unit than K has vec4 (threads with nothing to do),
 * or, on GPUs, fewer than 32 threads per workgroup.
 */
export function candidates(
  gpu: Gpu,
  key: TuneKey,
  def: TunedShape | null,
  space: Partial<TuneSpace> = {},
): TunedShape[] {
  const k = normalizeKey(key);
  const sp = { ...defaultSpace(gpu, k), ...space };
  const P = pairKind(k) ? 2 : 1;
  const limits = gpu.device.limits;
  const out: TunedShape[] = [], seen = new Set<string>();
  const add = (s: TunedShape, filtered: boolean) => {
    const name = describeShape(s);
    if (seen.has(name) || tunedShapeProblem(k, s, limits) !== null) return;
    if (filtered) {
      const tokens = k.family === "matvec_q" ? k.tokens : s.tt!;
      if (P * s.upt * tokens > maxAccumulators(gpu)) return;
      if (s.tpr > 1 && (s.tpr > k.K / 4 || (!gpu.isCpu && s.tpr * (s.upw / s.upt) < 32))) return;
    }
    seen.add(name);
    out.push(s);
  };
  if (def) add(def, false);
  const tts = k.family === "matvec_q" ? [undefined] : sp.tt;
  for (const tt of tts) {
    for (const tpr of sp.tpr) {
      for (const upt of sp.upt) {
        for (const slots of sp.slots) {
          const s: TunedShape = { tpr, upt, upw: upt * slots };
          if (tt !== undefined) s.tt = tt;
          add(s, true);
        }
      }
    }
  }
  return out;
}

/** A variant's outcome: its median time, or why it was rejected. */
export interface VariantResult<S = TunedShape> {
  shape: S;
  /** Median µs per dispatch (NaN when rejected). */
  us: number;
  /** Why the variant was rejected (compile/validation error, wrong output), or null. */
  error: string | null;
}

/**
 * The index of the fastest correct variant: the lowest finite median among those without an
 * error, ties to the earliest (enumeration order, the heuristic first); -1 when none is correct.
 * A pure function of its input, so the choice is deterministic given the timings.
 */
export function chooseVariant(results: readonly { us: number; error: string | null }[]): number {
  let best = -1;
  results.forEach((r, i) => {
    if (r.error !== null || !Number.isFinite(r.us)) return;
    if (best < 0 || r.us < results[best].us) best = i;
  });
  return best;
}

/** A tuned kernel: every variant's outcome and the choice (a quantized kernel by default). */
export interface TuneResult<K = TuneKey, S = TunedShape> {
  key: K;
  /** The key's string (tuneKeyString, attentionKeyString). */
  name: string;
  variants: VariantResult<S>[];
  /** Index of the chosen variant in `variants` (-1: none was correct). */
  best: number;
  /** The chosen shape, or null. */
  shape: S | null;
  us: number;
  /** The heuristic shape's time (NaN if it was rejected). */
  defaultUs: number;
  /** Wall-clock ms the job took (compiles, checks, timing). */
  ms: number;
}

/** The result of the attention kernel's tuning (kernels/tune_attention.ts). */
export type AttentionTuneResult = TuneResult<AttentionKey, AttentionShape>;

/** The result of a dense matrix kernel's tuning (kernels/tune_dense.ts). */
export type DenseTuneResult = TuneResult<DenseKey, TunedShape>;

/** A result of any kind, as tuneAndSave and the tune command's report take them. */
export type AnyTuneResult = TuneResult | DenseTuneResult | AttentionTuneResult;

/** What every kind of tune job takes: timing, and the test hooks over its shapes `S`. */
export interface VariantOptions<S> {
  /** Timed passes per variant, the median is kept (default 3 on CPU adapters, 5 on GPUs). */
  repeats?: number;
  /** Dispatches per timed pass (default 2 on CPU adapters, 20 on GPUs). */
  dispatches?: number;
  /** Tokens of a prefill key's timed step (default 16 on CPU adapters, 128 on GPUs). */
  prefillTokens?: number;
  /**
   * Test hook: rewrites variant i's WGSL (that pipeline is then compiled outside the pipeline
   * cache), e.g. to inject a wrong kernel that the check must reject.
   */
  transformWgsl?: (wgsl: string, shape: S, index: number) => string;
  /** Test hook: variant i's time in µs instead of measuring it (after its check). */
  time?: (shape: S, index: number) => number;
}

export interface TuneOptions extends VariantOptions<TunedShape> {
  /** Narrows or replaces the search space (tests use small ones on lavapipe). */
  space?: Partial<TuneSpace>;
}

/** The progress line of a result: "tune 3/14 KEY: 7 variants, best … (41 µs), default 55 µs". */
export function describeResult(r: AnyTuneResult, i: number, n: number): string {
  const rejected = r.variants.filter((v) => v.error !== null).length;
  const us = (t: number) => (Number.isFinite(t) ? `${t.toFixed(t < 100 ? 1 : 0)} µs` : "rejected");
  const best = r.shape
    ? `best ${describeKernelShape(r.shape)} (${us(r.us)})`
    : "no correct variant";
  return `tune ${i}/${n} ${r.name}: ${r.variants.length} variants, ${best}, default ${
    us(r.defaultUs)
  }${rejected ? `, ${rejected} rejected` : ""} [${(r.ms / 1000).toFixed(1)} s]`;
}

/**
 * Tunes each job in turn, `onResult` after each (progress); the weights of consecutive jobs
 * over the same matrix shape are generated once.
 */
export function tuneJobs(
  gpu: Gpu,
  jobs: TuneJob[],
  opts: TuneOptions & { onResult?: (r: TuneResult, i: number, n: number) => void } = {},
): Promise<TuneResult[]> {
  return tuneEach(jobs, (job, memo) => tuneJob(gpu, job, opts, memo), opts.onResult);
}

/**
 * Runs `tune` on each job in turn with one {@link WeightsMemo} (released at the end), calling
 * `onResult` after each (progress).
 */
export async function tuneEach<J, R>(
  jobs: J[],
  tune: (job: J, memo: WeightsMemo) => Promise<R>,
  onResult?: (r: R, i: number, n: number) => void,
): Promise<R[]> {
  const out: R[] = [];
  const memo = new WeightsMemo();
  try {
    for (const [i, job] of jobs.entries()) {
      const r = await tune(job, memo);
      out.push(r);
      onResult?.(r, i + 1, jobs.length);
    }
  } finally {
    memo.release();
  }
  return out;
}

/** Tunes one job: every candidate checked, the correct ones timed, the fastest chosen. */
export async function tuneJob(
  gpu: Gpu,
  job: TuneJob,
  opts: TuneOptions = {},
  memo?: WeightsMemo,
): Promise<TuneResult> {
  const t0 = performance.now();
  const key = normalizeKey(job.key);
  const e = benchEpilogue(key, job.epilogue);
  const shapes = candidates(gpu, key, job.default, opts.space);
  const own = memo ?? new WeightsMemo();
  const variants: VariantResult[] = [];
  try {
    const tokens = key.family === "matvec_q" || key.tokens > 0
      ? key.tokens
      : opts.prefillTokens ?? (gpu.isCpu ? 16 : 128);
    const w = own.get(qWeightsName(key), () => qWeights(gpu, key));
    const bench = new MatrixBench(gpu, { rows: key.rows, K: key.K, tokens, norm: key.norm }, e, w);
    try {
      for (const [i, shape] of shapes.entries()) {
        variants.push(await bench.run(shape, i, opts, () => buildQ(bench, key, shape, i, opts)));
      }
    } finally {
      bench.release();
    }
  } finally {
    if (!memo) own.release();
  }
  return tuneResult(key, tuneKeyString(key), variants, job.default, t0);
}

/**
 * The result of a tuned kernel from its variants' outcomes: the {@link chooseVariant} choice,
 * the default shape's time, the wall-clock ms since `t0`.
 */
export function tuneResult<K, S extends KernelShape>(
  key: K,
  name: string,
  variants: VariantResult<S>[],
  def: S,
  t0: number,
): TuneResult<K, S> {
  const best = chooseVariant(variants);
  const d = variants.find((v) => describeKernelShape(v.shape) === describeKernelShape(def));
  return {
    key,
    name,
    variants,
    best,
    shape: best >= 0 ? variants[best].shape : null,
    us: best >= 0 ? variants[best].us : NaN,
    defaultUs: d && d.error === null ? d.us : NaN,
    ms: performance.now() - t0,
  };
}

/**
 * The epilogue the tuner runs for a key (a quantized or a dense kernel's): the job's, with
 * "store" at offset 0 over the key's own rows and qkv's KV cache in f32 storage buffers (the
 * shape's cost is the weights' reads).
 */
export function benchEpilogue(
  key: { epilogue: Epilogue["kind"]; rows: number },
  e: Epilogue,
): Epilogue {
  if (e.kind !== key.epilogue) {
    throw new ParameterError(`tuner: epilogue ${e.kind} does not match the key's ${key.epilogue}`);
  }
  if (e.kind === "store") return { kind: "store", offset: 0, ld: key.rows };
  if (e.kind === "qkv") {
    // the cache in f32 storage buffers (the defaults), whatever the runtime's layout
    const { nHeads, nKvHeads, headDim, bias } = e;
    return { kind: "qkv", nHeads, nKvHeads, headDim, bias };
  }
  return e;
}

/** `n` uniform numbers in [lo, hi) from mulberry32(seed). */
export function randArray(n: number, seed: number, lo: number, hi: number): Float32Array {
  const r = mulberry32(seed);
  return Float32Array.from({ length: n }, () => lo + r() * (hi - lo));
}

/** Random codes and fp16 scales/offsets, as the tests draw them. */
function randomQl(N: number, K: number, bits: 2 | 3 | 4, G: number, seed: number): QuantizedLinear {
  const r = mulberry32(seed);
  const { qmin } = qRange(bits), levels = 1 << bits;
  const q = new Int8Array(N * K);
  for (let i = 0; i < q.length; i++) q[i] = qmin + Math.floor(r() * levels);
  const nG = nGroups(K, G);
  const scale = Float32Array.from({ length: N * nG }, () => Math.f16round(0.011 + r() * 0.01));
  const zero = Float32Array.from({ length: N * nG }, () => Math.f16round((r() * 2 - 1) * 0.05));
  return { N, K, bits, groupSize: G, q, scale, zero };
}

/**
 * What a {@link MatrixBench} needs of its weights: their GPU resources by binding name (qweight
 * and sz; w), row n in float64 as the kernels read it (the reference multiplies by it), and how
 * far a dot product may stray, relative to |row|·|x|.
 */
export interface BenchWeights {
  bufs: Record<string, GPUBuffer | GPUTexture>;
  row: (n: number) => Float64Array;
  /** Default 1e-3 (the quantized kernels dequantize in f32). */
  relTol?: number;
}

/** The memo name of a quantized key's weights: consecutive keys over it share them. */
function qWeightsName(key: TuneKey): string {
  return `${key.bits}:${key.groupSize}:${key.rows}x${key.K}:${key.weights}`;
}

/** Random packed weights on the GPU in the key's layout; rows dequantized in float64. */
function qWeights(gpu: Gpu, key: TuneKey): BenchWeights {
  const ql = randomQl(key.rows, key.K, key.bits, key.groupSize, key.rows * 7919 + key.K);
  const packed = packQ(ql);
  const q = { bits: key.bits, K: key.K, groupSize: key.groupSize };
  const tex = key.weights === "texture" ? createQTextures(gpu, packed, q, "tune") : null;
  return {
    bufs: {
      qweight: tex ? tex.qweight : gpu.upload("tune.qweight", packed.qweight),
      sz: tex ? tex.sz : gpu.upload("tune.sz", packed.sz),
    },
    row: (n) => dequantRow(ql, n),
  };
}

/**
 * The weights last asked for, by name, kept while consecutive jobs ask for the same matrix (they
 * are drawn and uploaded once); {@link release} destroys their GPU resources.
 */
export class WeightsMemo {
  #name = "";
  #last: BenchWeights | null = null;

  get(name: string, make: () => BenchWeights): BenchWeights {
    if (this.#last && this.#name === name) return this.#last;
    this.release();
    this.#last = make();
    this.#name = name;
    return this.#last;
  }

  release(): void {
    if (!this.#last) return;
    for (const b of Object.values(this.#last.bufs)) b.destroy();
    this.#last = null;
  }
}

const SENTINEL = -12345;
/** The fused norm's epsilon in the bench's kernels and reference. */
const EPS = 1e-5;
/** Keys with more multiply-adds than this check a part of their outputs, not all of them. */
export const FULL_CHECK_MACS = 1 << 26;
/** Units per checked window: covers every residue of a unit modulo any workgroup's units. */
const CHECK_WINDOW = 256;

/** A variant ready to dispatch. */
export interface Built {
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
  grid: number[];
}

/** One output value the reference expects, with its tolerance. */
export interface Expect {
  out: string;
  index: number;
  value: number;
  tol: number;
}

/** The matrix a {@link MatrixBench} multiplies: its rows, K, the step's tokens, a fused norm. */
export interface BenchShape {
  rows: number;
  K: number;
  tokens: number;
  norm: boolean;
}

/**
 * A key's inputs, outputs and reference, shared by its variants, for any weights
 * ({@link BenchWeights}: the quantized kernels' packed ones, the dense kernels' f32/f16): x
 * (tokens, K), g, the step uniform, the epilogue's buffers, and the expected value of every
 * checked output (all units, or windows of units at the start, middle and end of large
 * matrices). Each family builds its variants over {@link bufs} ({@link bindGroup}).
 */
export class MatrixBench {
  readonly T: number;
  /** The fused norm the variants must apply (the reference's), or null. */
  readonly norm: { eps: number } | null;
  readonly bufs: Record<string, GPUBuffer | GPUTexture> = {};
  readonly outs: { name: string; buf: GPUBuffer; init: Float32Array }[] = [];
  readonly expect: Expect[] = [];
  #owned: GPUBuffer[] = [];

  constructor(
    readonly gpu: Gpu,
    shape: BenchShape,
    readonly e: Epilogue,
    w: BenchWeights,
  ) {
    const { rows: N, K, tokens: T } = shape;
    this.T = T;
    this.norm = shape.norm ? { eps: EPS } : null;
    const seed = N * 31 + K * 7 + T;
    const x = randArray(T * K, seed + 1, -1, 1);
    const g = randArray(K, seed + 2, 0.5, 1.5);
    const uni = GPUBufferUsage.UNIFORM;
    this.bufs.x = this.#own(gpu.upload("tune.x", x, uni));
    this.bufs.g = this.#own(gpu.upload("tune.g", g, uni));
    Object.assign(this.bufs, w.bufs);
    this.bufs.step = this.#own(stepUniform(gpu, "tune.step", { pos: 0, ntok: T }));

    // reference inputs per token (normalized when the kernel fuses the norm)
    const xin: Float64Array[] = [], xnorm: number[] = [];
    for (let t = 0; t < T; t++) {
      const v = Float64Array.from(x.subarray(t * K, (t + 1) * K));
      if (shape.norm) {
        let ss = 0;
        for (const a of v) ss += a * a;
        const inv = 1 / Math.sqrt(ss / K + EPS);
        for (let k = 0; k < K; k++) v[k] *= inv * g[k];
      }
      xin.push(v);
      xnorm.push(Math.hypot(...v));
    }
    const units = unitCount(e, N), P = isPair(e) ? 2 : 1;
    const checked = this.#checkedUnits(units, P * K * T);
    const rowsOf = unitRows(e);
    // dot products and row norms of the checked rows, from the dequantized weights
    const rowSet = [...new Set(checked.flatMap((u) => rowsOf(u)))].sort((a, b) => a - b);
    const dots = new Map<number, { d: Float64Array; norm: number }>();
    for (const n of rowSet) {
      const row = w.row(n);
      let ss = 0;
      for (const a of row) ss += a * a;
      const d = new Float64Array(T);
      for (let t = 0; t < T; t++) {
        let s = 0;
        const v = xin[t];
        for (let k = 0; k < K; k++) s += row[k] * v[k];
        d[t] = s;
      }
      dots.set(n, { d, norm: Math.sqrt(ss) });
    }
    const relTol = w.relTol ?? 1e-3;
    const tol = (n: number, t: number) => relTol * dots.get(n)!.norm * xnorm[t];
    const dot = (n: number, t: number) => dots.get(n)!.d[t];
    const out = (name: string, init: Float32Array) => {
      const buf = this.#own(
        gpu.upload(`tune.${name}`, init, GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST),
      );
      this.bufs[name] = buf;
      this.outs.push({ name, buf, init });
    };
    const ex = (o: string, index: number, value: number, t: number) =>
      this.expect.push({ out: o, index, value, tol: t });

    if (e.kind === "store" || e.kind === "add") {
      const y0 = e.kind === "add"
        ? randArray(T * N, seed + 3, -1, 1)
        : new Float32Array(T * N).fill(SENTINEL);
      out("y", y0);
      for (let t = 0; t < T; t++) {
        for (const u of checked) {
          const i = t * N + u;
          if (e.kind === "store") ex("y", i, dot(u, t), tol(u, t));
          else ex("y", i, y0[i] + dot(u, t), tol(u, t) + 1e-6 * Math.abs(y0[i]));
        }
      }
    } else if (e.kind === "gateup") {
      out("y", new Float32Array(T * e.hidden).fill(SENTINEL));
      for (let t = 0; t < T; t++) {
        for (const u of checked) {
          const a = dot(u, t), b = dot(u + e.hidden, t);
          const sg = 1 / (1 + Math.exp(-a));
          const tl = 1.1 * Math.abs(b) * tol(u, t) + Math.abs(a * sg) * tol(u + e.hidden, t);
          ex("y", t * e.hidden + u, a * sg * b, tl + 1e-6);
        }
      }
    } else {
      const { nHeads: NH, nKvHeads: NKV, headDim: HD } = e;
      const half = HD / 2, qd = NH * HD, kvd = NKV * HD;
      out("q", new Float32Array(T * qd).fill(SENTINEL));
      out("kcache", new Float32Array(T * kvd).fill(SENTINEL));
      out("vcache", new Float32Array(T * kvd).fill(SENTINEL));
      const rope = new Float32Array(T * half * 2);
      for (let p = 0; p < T; p++) {
        for (let i = 0; i < half; i++) {
          const a = p * Math.pow(10000, (-2 * i) / HD);
          rope[(p * half + i) * 2] = Math.cos(a);
          rope[(p * half + i) * 2 + 1] = Math.sin(a);
        }
      }
      this.bufs.rope = this.#own(gpu.upload("tune.rope", rope));
      const bias = randArray(N, seed + 4, -1, 1);
      if (e.bias) this.bufs.bias = this.#own(gpu.upload("tune.bias", bias));
      for (let t = 0; t < T; t++) {
        for (const u of checked) {
          const [ra, rb] = rowsOf(u);
          const head = Math.floor(u / half), i = u % half;
          let va = dot(ra, t) + (e.bias ? bias[ra] : 0), vb = dot(rb, t) + (e.bias ? bias[rb] : 0);
          if (head < NH + NKV) {
            const cs = rope[(t * half + i) * 2], sn = rope[(t * half + i) * 2 + 1];
            [va, vb] = [va * cs - vb * sn, vb * cs + va * sn];
          }
          const tl = tol(ra, t) + tol(rb, t) + 1e-6;
          if (head < NH) {
            const o = t * qd + head * HD + i;
            ex("q", o, va, tl);
            ex("q", o + half, vb, tl);
          } else {
            const cache = head < NH + NKV ? "kcache" : "vcache";
            const o = t * kvd + (head - (head < NH + NKV ? NH : NH + NKV)) * HD + i;
            ex(cache, o, va, tl);
            ex(cache, o + half, vb, tl);
          }
        }
      }
    }
  }

  #own(b: GPUBuffer): GPUBuffer {
    this.#owned.push(b);
    return b;
  }

  /** Every unit, or windows at the start, middle and end where that is too much to check. */
  #checkedUnits(units: number, macsPerUnit: number): number[] {
    if (units * macsPerUnit <= FULL_CHECK_MACS || units <= 3 * CHECK_WINDOW) {
      return Array.from({ length: units }, (_, u) => u);
    }
    const mid = Math.floor(units / 2 / CHECK_WINDOW) * CHECK_WINDOW + 7;
    const set = new Set<number>();
    for (const start of [0, mid, units - CHECK_WINDOW]) {
      for (let u = start; u < start + CHECK_WINDOW; u++) set.add(u);
    }
    return [...set].sort((a, b) => a - b);
  }

  /** A bind group of the bench's buffers and textures named `names`, in binding order. */
  bindGroup(pipeline: GPUComputePipeline, names: string[]): GPUBindGroup {
    return this.gpu.bindGroup(
      pipeline,
      names.map((n) => {
        const r = this.bufs[n];
        if (!r) throw new ParameterError(`tuner: no buffer for binding ${n}`);
        return r;
      }),
      "tune",
    );
  }

  /** Checks one variant (`build` makes it) against the reference and, if correct, times it. */
  async run(
    shape: TunedShape,
    i: number,
    opts: VariantOptions<TunedShape>,
    build: () => Built,
  ): Promise<VariantResult> {
    for (const o of this.outs) this.gpu.write(o.buf, 0, o.init);
    return await runVariant(this.gpu, shape, i, opts, build, () => this.#compare());
  }

  /** The first output that differs from the reference beyond its tolerance, or null. */
  async #compare(): Promise<string | null> {
    const got: Record<string, Float32Array> = {};
    for (const o of this.outs) got[o.name] = await readF32(this.gpu, o.buf, o.init.length);
    return wrongOutput(got, this.expect);
  }

  release(): void {
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}

/**
 * The pipeline of a variant: `compile()` (the pipeline cache), or with the test hook
 * (`opts.transformWgsl`) the rewritten `wgsl()` compiled under `${cacheKey}~tuner${i}`.
 */
export function variantPipeline<S>(
  gpu: Gpu,
  cacheKey: string,
  wgsl: () => string,
  compile: () => GPUComputePipeline,
  shape: S,
  i: number,
  opts: VariantOptions<S>,
): GPUComputePipeline {
  const t = opts.transformWgsl;
  return t ? transformedPipeline(gpu, `${cacheKey}~tuner${i}`, t(wgsl(), shape, i)) : compile();
}

/** A quantized kernel's variant of a shape: its pipeline, bindings and grid. */
function buildQ(
  bench: MatrixBench,
  key: TuneKey,
  shape: TunedShape,
  i: number,
  opts: TuneOptions,
): Built {
  const { e, gpu, norm } = bench;
  const common = {
    bits: key.bits,
    groupSize: key.groupSize,
    rows: key.rows,
    K: key.K,
    epilogue: e,
    weights: key.weights,
    xUniform: key.xUniform,
  };
  let names: string[], grid: number[], cacheKey: string, wgsl: () => string;
  let compile: () => GPUComputePipeline;
  if (key.family === "matvec_q") {
    const v: MatvecQVariant = {
      ...common,
      norm,
      batch: key.tokens,
      tpr: shape.tpr,
      upw: shape.upw,
      upt: shape.upt,
    };
    names = matvecQBindings(v);
    grid = matvecQGrid(v);
    cacheKey = matvecQKey(v);
    wgsl = () => matvecQWgsl(v);
    compile = () => matvecQPipeline(gpu, v);
  } else {
    const v: MatmulQVariant = { ...common, norm, ...shape };
    names = matmulQBindings(v);
    grid = matmulQGrid(v, bench.T);
    cacheKey = matmulQKey(v);
    wgsl = () => matmulQWgsl(v);
    compile = () => matmulQPipeline(gpu, v);
  }
  const pipeline = variantPipeline(gpu, cacheKey, wgsl, compile, shape, i, opts);
  return { pipeline, bindGroup: bench.bindGroup(pipeline, names), grid };
}

/**
 * One variant's outcome: `build` it and dispatch it once inside validation and out-of-memory
 * error scopes (a throw or a GPU error: "does not run: …"), `check` its output (a sentence where
 * it is wrong: rejected), and time the correct ones (`opts.time`, else {@link timeDispatches}:
 * `opts.dispatches` per pass, default 2 on CPU adapters and 20 on GPUs, the median of
 * `opts.repeats` passes, default 3 and 5).
 */
export async function runVariant<S>(
  gpu: Gpu,
  shape: S,
  i: number,
  opts: VariantOptions<S>,
  build: () => Built,
  check: () => Promise<string | null>,
): Promise<VariantResult<S>> {
  const { device } = gpu;
  device.pushErrorScope("out-of-memory");
  device.pushErrorScope("validation");
  let built: Built | null = null, thrown: string | null = null;
  try {
    built = build();
    const enc = device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(built.pipeline);
    pass.setBindGroup(0, built.bindGroup);
    pass.dispatchWorkgroups(built.grid[0], built.grid[1] ?? 1, built.grid[2] ?? 1);
    pass.end();
    device.queue.submit([enc.finish()]);
  } catch (e) {
    thrown = (e as Error).message;
  }
  const invalid = await device.popErrorScope(), oom = await device.popErrorScope();
  const gpuError = invalid ?? oom;
  if (gpuError || thrown !== null || !built) {
    const msg = gpuError ? gpuError.message.split("\n").find((l) => l.trim()) : thrown;
    return { shape, us: NaN, error: `does not run: ${msg?.trim()}` };
  }
  const wrong = await check();
  if (wrong) return { shape, us: NaN, error: wrong };
  const us = opts.time ? opts.time(shape, i) : await timeDispatches(
    gpu,
    built,
    opts.dispatches ?? (gpu.isCpu ? 2 : 20),
    opts.repeats ?? (gpu.isCpu ? 3 : 5),
  );
  return { shape, us, error: null };
}

/**
 * A pipeline of WGSL a test hook rewrote (transformWgsl), compiled outside the pipeline cache
 * under `label`.
 */
export function transformedPipeline(gpu: Gpu, label: string, code: string): GPUComputePipeline {
  return gpu.device.createComputePipeline({
    label,
    layout: "auto",
    compute: { module: gpu.device.createShaderModule({ code }), entryPoint: "main" },
  });
}

/**
 * The first of `expect` that the outputs `got` (by name) miss beyond its tolerance, as the
 * rejection ("wrong output: y[3] = …, expected … (n of m checked values)"), or null.
 */
export function wrongOutput(
  got: Record<string, ArrayLike<number>>,
  expect: readonly Expect[],
): string | null {
  let bad = 0, first = "";
  for (const x of expect) {
    const v = got[x.out][x.index], diff = Math.abs(v - x.value);
    if (!(diff <= x.tol)) {
      if (bad++ === 0) {
        first = `${x.out}[${x.index}] = ${v}, expected ${x.value.toPrecision(6)} ` +
          `(|diff| ${diff.toPrecision(3)} > ${x.tol.toPrecision(3)})`;
      }
    }
  }
  return bad ? `wrong output: ${first} (${bad} of ${expect.length} checked values)` : null;
}

/** The weight rows of unit u (the kernels' unit_rows, epilogue.ts). */
function unitRows(e: Epilogue): (u: number) => number[] {
  if (e.kind === "gateup") return (u) => [u, u + e.hidden];
  if (e.kind === "qkv") {
    const half = e.headDim / 2;
    return (u) => {
      const r = Math.floor(u / half) * e.headDim + (u % half);
      return [r, r + half];
    };
  }
  return (u) => [u];
}

/** Row n of the dequantized weights in float64 (dequantize() of that row alone). */
function dequantRow(ql: QuantizedLinear, n: number): Float64Array {
  const { K } = ql, nG = nGroups(K, ql.groupSize);
  const one: QuantizedLinear = {
    ...ql,
    N: 1,
    q: ql.q.subarray(n * K, (n + 1) * K),
    scale: ql.scale.subarray(n * nG, (n + 1) * nG),
    zero: ql.zero.subarray(n * nG, (n + 1) * nG),
  };
  return dequantize(one, new Float64Array(K));
}

/** The first `n` f32 of a GPU buffer (COPY_SRC), read back. */
export async function readF32(gpu: Gpu, buf: GPUBuffer, n: number): Promise<Float32Array> {
  const read = gpu.device.createBuffer({
    size: Math.max(4, n * 4),
    usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
  });
  const enc = gpu.device.createCommandEncoder();
  enc.copyBufferToBuffer(buf, 0, read, 0, n * 4);
  gpu.device.queue.submit([enc.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  const out = new Float32Array(read.getMappedRange().slice(0));
  read.destroy();
  return out;
}

function median(a: number[]): number {
  const s = [...a].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * Median µs per dispatch over `repeats` compute passes of `n` dispatches each (after one
 * untimed warm-up pass): GPU time between timestamp queries at the pass's start and end, or,
 * without timestamp-query (or where the adapter reports none), the wall-clock time from submit
 * to onSubmittedWorkDone.
 */
export async function timeDispatches(
  gpu: Gpu,
  d: Built,
  n: number,
  repeats: number,
): Promise<number> {
  const { device } = gpu;
  const [x, y = 1, z = 1] = d.grid;
  const encodePass = (pass: GPUComputePassEncoder, count: number) => {
    pass.setPipeline(d.pipeline);
    pass.setBindGroup(0, d.bindGroup);
    for (let i = 0; i < count; i++) pass.dispatchWorkgroups(x, y, z);
    pass.end();
  };
  {
    const enc = device.createCommandEncoder();
    encodePass(enc.beginComputePass(), 1);
    device.queue.submit([enc.finish()]);
    await device.queue.onSubmittedWorkDone();
  }
  const times: number[] = [];
  if (gpu.timestamps) {
    const querySet = device.createQuerySet({ type: "timestamp", count: 2 });
    const resolve = device.createBuffer({
      size: 16,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    try {
      for (let r = 0; r < repeats; r++) {
        const read = device.createBuffer({
          size: 16,
          usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
        });
        const enc = device.createCommandEncoder();
        encodePass(
          enc.beginComputePass({
            timestampWrites: { querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 },
          }),
          n,
        );
        enc.resolveQuerySet(querySet, 0, 2, resolve, 0);
        enc.copyBufferToBuffer(resolve, 0, read, 0, 16);
        device.queue.submit([enc.finish()]);
        await read.mapAsync(GPUMapMode.READ);
        const t = new BigUint64Array(read.getMappedRange().slice(0));
        read.destroy();
        times.push(Number(t[1] - t[0]) / 1000 / n);
      }
    } finally {
      querySet.destroy();
      resolve.destroy();
    }
    const m = median(times);
    if (Number.isFinite(m) && m > 0) return m;
    times.length = 0; // no usable timestamps: time the submits instead
  }
  for (let r = 0; r < repeats; r++) {
    const enc = device.createCommandEncoder();
    encodePass(enc.beginComputePass(), n);
    const t0 = performance.now();
    device.queue.submit([enc.finish()]);
    await device.queue.onSubmittedWorkDone();
    times.push(((performance.now() - t0) * 1000) / n);
  }
  return median(times);
}

/**
 * The tune cache entries of `results` that found a correct variant: the chosen shape with its
 * median time and the heuristic shape's (where that ran).
 */
export function tunedEntries(results: AnyTuneResult[]): [string, TunedEntry][] {
  const out: [string, TunedEntry][] = [];
  for (const r of results) {
    if (!r.shape) continue;
    const e: TunedEntry = { ...r.shape, us: round2(r.us) };
    if (Number.isFinite(r.defaultUs)) e.defaultUs = round2(r.defaultUs);
    out.push([r.name, e]);
  }
  return out;
}

function round2(x: number): number {
  return Math.round(x * 100) / 100;
}
