/**
 * The attention kernel in the tuner (kernels/tuner.ts): for one attention kernel as the forward
 * plan runs it (an {@link AttentionKey}), enumerate shapes ({@link attentionCandidates}: keys per
 * chunk wg × query heads per workgroup gq), run each on random q and a random KV cache in the
 * key's layout and element type (the f16 cache holds packed halves, kvCacheWords), check every
 * checked output against a float64 reference attention over the values the cache holds (a
 * variant that fails is rejected with the reason, never chosen), time the correct ones with the
 * tuner's timestamp queries and keep the fastest (chooseVariant). The runtime reads the choices
 * back through `gpu.tunedAttention` (Builder.attention, runtime/model/forward.ts).
 *
 * The step: one token (decode) or `prefillTokens` consecutive tokens (prefill), the last at
 * `position` (default 333 on CPU adapters, 1001 on GPUs: several key chunks of every wg, and no
 * length a multiple of one), of a sequence whose KV rows start at cache row {@link KV_BASE}.
 */
import {
  attentionGrid,
  attentionPipeline,
  attentionPipelineKey,
  type AttentionShape,
  type AttentionVariant,
  attentionWgsl,
} from "./attention.ts";
import {
  type AttentionKey,
  attentionKeyProblem,
  attentionKeyString,
  attentionShapeProblem,
  describeAttentionShape,
} from "./attention_key.ts";
import { MAX_ROWS, type StepRow, stepUniform } from "./common.ts";
import { kvCacheWords } from "./epilogue.ts";
import { ParameterError } from "./errors.ts";
import type { Bindable, Gpu } from "./gpu.ts";
import {
  type AttentionTuneResult,
  type Built,
  type Expect,
  FULL_CHECK_MACS,
  randArray,
  readF32,
  runVariant,
  transformedPipeline,
  tuneResult,
  type VariantOptions,
  type VariantResult,
  wrongOutput,
} from "./tuner.ts";

/** One attention kernel to tune: its key and the shape the runtime uses untuned. */
export interface AttentionJob {
  key: AttentionKey;
  /** The heuristic shape (attentionShape, kernels/attention.ts). */
  default: AttentionShape;
}

/** The values each knob takes; {@link attentionCandidates} crosses them. */
export interface AttentionSpace {
  /** Threads per workgroup = keys per chunk (powers of two). */
  wg: number[];
  /** Query heads per workgroup (texture KV; the buffer kernel takes 1). */
  gq: number[];
}

export interface AttentionTuneOptions extends VariantOptions<AttentionShape> {
  /** Narrows or replaces the search space (tests use small ones on lavapipe). */
  space?: Partial<AttentionSpace>;
  /** Position of the step's last token (default 333 on CPU adapters, 1001 on GPUs). */
  position?: number;
}

/** The first KV cache row of the tuned step's sequence (not 0, as for any slot but the first). */
export const KV_BASE = 3;

/**
 * The default search space: wg 4..32 on CPU adapters (one workgroup runs on one thread there),
 * 16..256 on GPUs; gq (texture KV) every divisor of nHeads / nKvHeads up to 64 query values per
 * workgroup as attentionGroup takes them, 1 for buffer KV.
 */
export function attentionSpace(gpu: Gpu, key: AttentionKey): AttentionSpace {
  const GQ = key.nHeads / key.nKvHeads;
  const divisors = Array.from({ length: GQ }, (_, i) => i + 1).filter((d) => GQ % d === 0);
  return {
    wg: gpu.isCpu ? [4, 8, 16, 32] : [16, 32, 64, 128, 256],
    gq: key.kv === "texture" ? divisors.filter((d) => d === 1 || d * key.headDim <= 64) : [1],
  };
}

/**
 * The shapes to try for `key`, in a fixed order: `def` (the heuristic) first, then the space's
 * product (gq, wg, each ascending as given), without duplicates and without shapes the kernel or
 * the device rejects ({@link attentionShapeProblem}).
 */
export function attentionCandidates(
  gpu: Gpu,
  key: AttentionKey,
  def: AttentionShape | null,
  space: Partial<AttentionSpace> = {},
): AttentionShape[] {
  const sp = { ...attentionSpace(gpu, key), ...space };
  const out: AttentionShape[] = [], seen = new Set<string>();
  const add = (s: AttentionShape) => {
    const name = describeAttentionShape(s);
    if (seen.has(name) || attentionShapeProblem(key, s, gpu.device.limits) !== null) return;
    seen.add(name);
    out.push(s);
  };
  if (def) add(def);
  for (const gq of sp.gq) for (const wg of sp.wg) add({ wg, gq });
  return out;
}

/** Tunes each job in turn, `onResult` after each (progress). */
export async function tuneAttentionJobs(
  gpu: Gpu,
  jobs: AttentionJob[],
  opts: AttentionTuneOptions & {
    onResult?: (r: AttentionTuneResult, i: number, n: number) => void;
  } = {},
): Promise<AttentionTuneResult[]> {
  const out: AttentionTuneResult[] = [];
  for (const [i, job] of jobs.entries()) {
    const r = await tuneAttentionJob(gpu, job, opts);
    out.push(r);
    opts.onResult?.(r, i + 1, jobs.length);
  }
  return out;
}

/** Tunes one job: every candidate checked, the correct ones timed, the fastest chosen. */
export async function tuneAttentionJob(
  gpu: Gpu,
  job: AttentionJob,
  opts: AttentionTuneOptions = {},
): Promise<AttentionTuneResult> {
  const t0 = performance.now();
  const problem = attentionKeyProblem(job.key);
  if (problem) throw new ParameterError(`tuner: ${attentionKeyString(job.key)}: ${problem}`);
  const shapes = attentionCandidates(gpu, job.key, job.default, opts.space);
  const variants: VariantResult<AttentionShape>[] = [];
  const bench = new AttentionBench(gpu, job.key, opts);
  try {
    for (const [i, shape] of shapes.entries()) variants.push(await bench.run(shape, i, opts));
  } finally {
    bench.release();
  }
  return tuneResult(job.key, attentionKeyString(job.key), variants, job.default, t0);
}

/**
 * The float64 attention of the step's token t (one row of `rows`) over K and V in their
 * (cache rows, nKvHeads·headDim) values: every head's softmax(q·kᵀ/√d)·V over KV rows
 * kvBase .. kvBase + pos, grouped-query (head h reads KV head h / (nHeads / nKvHeads)).
 */
export function referenceAttention(
  key: Pick<AttentionKey, "nHeads" | "nKvHeads" | "headDim">,
  q: ArrayLike<number>,
  kc: ArrayLike<number>,
  vc: ArrayLike<number>,
  row: StepRow,
  t: number,
): Float64Array {
  const { nHeads, nKvHeads, headDim: hd } = key;
  const qd = nHeads * hd, kvd = nKvHeads * hd, group = nHeads / nKvHeads, len = row.pos + 1;
  const out = new Float64Array(qd), s = new Float64Array(len), scale = 1 / Math.sqrt(hd);
  for (let h = 0; h < nHeads; h++) {
    const ko = Math.floor(h / group) * hd, qo = t * qd + h * hd;
    let max = -Infinity;
    for (let j = 0; j < len; j++) {
      const kb = (row.kvBase + j) * kvd + ko;
      let a = 0;
      for (let d = 0; d < hd; d++) a += q[qo + d] * kc[kb + d];
      s[j] = a * scale;
      if (s[j] > max) max = s[j];
    }
    let sum = 0;
    for (let j = 0; j < len; j++) sum += s[j] = Math.exp(s[j] - max);
    for (let d = 0; d < hd; d++) {
      let a = 0;
      for (let j = 0; j < len; j++) a += s[j] * vc[(row.kvBase + j) * kvd + ko + d];
      out[h * hd + d] = a / sum;
    }
  }
  return out;
}

/**
 * Absolute tolerance of an output (|values| ≤ 1): f32 scores, exps and sums stay within 1e-7 of
 * float64 on lavapipe up to 2048 keys of head dim 128; one key dropped or counted twice moves
 * outputs by ~1/len, 1e-4 and more at these lengths.
 */
const TOL = 2e-5;

/**
 * A key's inputs, output and reference, shared by its variants: the step's rows, q (tokens,
 * nHeads·headDim) in [−2.5, 2.5) (scores spread enough that each key's weight matters), K and V
 * in [−1, 1) (rounded to f16 for an f16 cache), and the expected value of every output of the
 * checked tokens (all of them, or the first, middle and last where that is too much to check).
 */
class AttentionBench {
  readonly T: number;
  readonly rows: StepRow[];
  readonly bufs: Record<string, Bindable> = {};
  readonly out: GPUBuffer;
  readonly init: Float32Array;
  readonly expect: Expect[] = [];
  #owned: (GPUBuffer | GPUTexture)[] = [];

  constructor(readonly gpu: Gpu, readonly key: AttentionKey, opts: AttentionTuneOptions) {
    const { nHeads, nKvHeads, headDim: hd } = key;
    const qd = nHeads * hd, kvd = nKvHeads * hd;
    const T = key.decode ? 1 : opts.prefillTokens ?? (gpu.isCpu ? 16 : 128);
    const P = opts.position ?? (gpu.isCpu ? 333 : 1001);
    if (!Number.isInteger(T) || T < 1 || T > MAX_ROWS || !Number.isInteger(P) || P < T - 1) {
      throw new ParameterError(`tuner: ${T} tokens ending at position ${P} make no step`);
    }
    this.T = T;
    this.rows = Array.from({ length: T }, (_, t) => ({
      pos: P - (T - 1) + t,
      kvBase: KV_BASE,
      tokenBase: 0,
    }));
    const seed = nHeads * 131 + nKvHeads * 17 + hd + P;
    const q = randArray(T * qd, seed + 1, -2.5, 2.5);
    const cacheRows = KV_BASE + P + 1;
    const f16 = key.kvType === "f16";
    const values = (s: number) => {
      const a = randArray(cacheRows * kvd, s, -1, 1);
      return f16 ? a.map((x) => Math.f16round(x)) : a;
    };
    const kc = values(seed + 2), vc = values(seed + 3);

    this.bufs.step = this.#own(
      stepUniform(gpu, "tune.step", { pos: this.rows[0].pos, ntok: T, rows: this.rows }),
    );
    const qbuf = this.#own(gpu.upload("tune.q", q, GPUBufferUsage.UNIFORM));
    this.bufs.q = key.qUniform ? { buffer: qbuf, size: qd * 4 } : qbuf;
    this.bufs.kcache = this.#cache("tune.kcache", kc);
    this.bufs.vcache = this.#cache("tune.vcache", vc);
    this.init = new Float32Array(T * qd).fill(NaN);
    this.out = this.#own(gpu.upload("tune.out", this.init, GPUBufferUsage.COPY_SRC));
    this.bufs.out = this.out;

    const macs = 2 * nHeads * hd * (P + 1);
    const checked = T * macs <= FULL_CHECK_MACS
      ? this.rows.map((_, t) => t)
      : [...new Set([0, T >> 1, T - 1])];
    for (const t of checked) {
      const want = referenceAttention(key, q, kc, vc, this.rows[t], t);
      want.forEach((value, i) =>
        this.expect.push({ out: "out", index: t * qd + i, value, tol: TOL })
      );
    }
  }

  #own<B extends GPUBuffer | GPUTexture>(b: B): B {
    this.#owned.push(b);
    return b;
  }

  /** K or V in the key's layout: a storage buffer, or a texture of rotate-half pairs. */
  #cache(label: string, a: Float32Array): GPUBuffer | GPUTexture {
    const { kv, kvType, nKvHeads, headDim: hd } = this.key;
    const kvd = nKvHeads * hd;
    if (kvType === "f32" && kv === "buffer") return this.#own(this.gpu.upload(label, a));
    const words = kvCacheWords(a, kvd, hd, kvType);
    if (kv === "buffer") return this.#own(this.gpu.upload(label, words));
    const rows = a.length / kvd, f16 = kvType === "f16";
    const tex = this.#own(this.gpu.device.createTexture({
      label,
      size: [kvd / 2, rows],
      format: f16 ? "r32uint" : "rg32uint",
      usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST,
    }));
    this.gpu.device.queue.writeTexture(
      { texture: tex },
      words,
      { bytesPerRow: (kvd / 2) * (f16 ? 4 : 8) },
      [kvd / 2, rows],
    );
    return tex;
  }

  /** The variant of a shape: its pipeline (or the test hook's WGSL), bindings and grid. */
  #build(shape: AttentionShape, i: number, opts: AttentionTuneOptions): Built {
    const { key, gpu } = this;
    const v: AttentionVariant = {
      nHeads: key.nHeads,
      nKvHeads: key.nKvHeads,
      headDim: key.headDim,
      kv: key.kv,
      kvType: key.kvType,
      qUniform: key.qUniform,
      ...shape,
    };
    const t = opts.transformWgsl;
    const pipeline = t
      ? transformedPipeline(
        gpu,
        `${attentionPipelineKey(v)}~tuner${i}`,
        t(attentionWgsl(v), shape, i),
      )
      : attentionPipeline(gpu, v);
    const names = ["step", "q", "kcache", "vcache", "out"];
    const bindGroup = gpu.bindGroup(pipeline, names.map((n) => this.bufs[n]), "tune.attention");
    return { pipeline, bindGroup, grid: attentionGrid(v, this.T) };
  }

  /** Checks one variant against the reference and, if it is correct, times it. */
  async run(
    shape: AttentionShape,
    i: number,
    opts: AttentionTuneOptions,
  ): Promise<VariantResult<AttentionShape>> {
    this.gpu.write(this.out, 0, this.init);
    return await runVariant(
      this.gpu,
      shape,
      i,
      opts,
      () => this.#build(shape, i, opts),
      async () => {
        const got = await readF32(this.gpu, this.out, this.init.length);
        return wrongOutput({ out: got }, this.expect);
      },
    );
  }

  release(): void {
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
