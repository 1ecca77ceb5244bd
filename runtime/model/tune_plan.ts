/**
 * Which quantized kernels a model's forward plan runs (as tuner keys, kernels/tune_key.ts), which
 * dense ones (kernels/dense_key.ts), which attention kernels (kernels/attention_key.ts), and the
 * first-run hook: when a model loads on a GPU whose tune cache has no entry for some of its
 * kernels, {@link autoTune} tunes them there (progress on stderr) and writes the cache, so later
 * runs reuse the choices. CPU adapters (lavapipe) only read the cache: their shader compiles
 * take seconds each, so they are tuned on request (`deno task tune`). `LOWBIT_TUNE=0` turns the
 * first-run tuning off; a Gpu made by hand (tests) has no cache and is never tuned.
 */
import type { ModelConfig } from "../checkpoint/config.ts";
import type { Bits } from "../format/qtensor.ts";
import type { DenseFormat, WeightSource } from "../../kernels/common.ts";
import type { Epilogue, KvSource, KvType } from "../../kernels/epilogue.ts";
import { align, type Gpu } from "../../kernels/gpu.ts";
import { bareShape, type TunedShape, type TuneKey, tuneKeyString } from "../../kernels/tune_key.ts";
import type { AttentionShape } from "../../kernels/attention.ts";
import {
  attentionKernelShape,
  type AttentionKey,
  attentionKeyString,
  bareAttentionShape,
  isAttentionKeyString,
} from "../../kernels/attention_key.ts";
import {
  type AnyTuneResult,
  describeResult,
  tunedEntries,
  type TuneJob,
  tuneJobs,
  type TuneOptions,
} from "../../kernels/tuner.ts";
import { denseKernelShape, type DenseKey, denseKeyString } from "../../kernels/dense_key.ts";
import { type DenseJob, type DenseTuneOptions, tuneDenseJobs } from "../../kernels/tune_dense.ts";
import {
  type AttentionJob,
  type AttentionTuneOptions,
  tuneAttentionJobs,
} from "../../kernels/tune_attention.ts";
import { gpuAdapterId, saveTuned } from "../../kernels/tune_cache.ts";
import { chunkEpilogue, decodeRowPlans, qKernelShape, qkvEpilogue } from "./forward.ts";
import { defaultKvType, kvSource } from "./run_state.ts";

/**
 * What the plan needs of a weight matrix: a Matrix (gpu_weights.ts) or its description. `format`:
 * "q" (packed), a DenseFormat ("f32", "f16", "f16p"), anything else is not tuned.
 */
export interface MatrixShape {
  format: string;
  bits?: Bits;
  groupSize?: number;
  K: number;
  weights: WeightSource;
  chunks: { rowStart: number; rows: number }[];
}

/** The matrices of a model as the plan needs them: GpuWeights, or a description of one. */
export interface PlanWeights {
  layers: { wqkv: MatrixShape; wo: MatrixShape; w13: MatrixShape; w2: MatrixShape }[];
  lmHead: MatrixShape;
}

/** One layer's stacked matrices (q/k/v, o, gate/up, down) for `c`, each made by `m` from (rows, K). */
export function layerShapes(
  c: ModelConfig,
  m: (rows: number, K: number) => MatrixShape,
): PlanWeights["layers"][number] {
  return {
    wqkv: m((c.nHeads + 2 * c.nKvHeads) * c.headDim, c.dim),
    wo: m(c.dim, c.nHeads * c.headDim),
    w13: m(2 * c.hiddenDim, c.dim),
    w2: m(c.dim, c.hiddenDim),
  };
}

export interface TunePlanOptions {
  /** Batched decode row counts (default: the adapter's decodeRowPlans, forward.ts). */
  batchRows?: readonly number[];
  /** Include the prefill kernels (default true). */
  prefill?: boolean;
  /** The attention keys' KV element type (default: the run state's default, defaultKvType). */
  kvType?: KvType;
  /** The attention keys' KV layout (default: the run state's at the default context, kvSource). */
  kv?: KvSource;
}

/** A tune job of any kind: a quantized or a dense matrix kernel's, or the attention kernel's. */
export type PlanJob = TuneJob | DenseJob | AttentionJob;

function isAttentionJob(j: PlanJob): j is AttentionJob {
  return j.key.family === "attention";
}

function isDenseJob(j: PlanJob): j is DenseJob {
  return j.key.family === "matvec" || j.key.family === "matmul_lane";
}

function isQJob(j: PlanJob): j is TuneJob {
  return !isAttentionJob(j) && !isDenseJob(j);
}

/**
 * Whether the Builder binds `bytes` of an activation as a uniform buffer (forward.ts
 * Builder.uniform): CPU adapters with texture weights (or, for attention's q, texture KV),
 * within 64 KiB and the device's limit.
 */
function uniformFits(gpu: Gpu, weights: WeightSource, bytes: number): boolean {
  const limit = Math.min(65536, gpu.device.limits.maxUniformBufferBindingSize);
  return gpu.isCpu && weights === "texture" && align(bytes, 16) <= limit;
}

/**
 * Every matrix of `w` with the epilogue the forward plans run it with and whether the decode
 * kernel fuses the norm before it (qkv, gate/up, the logits).
 */
function matrixUses(c: ModelConfig, w: PlanWeights): [MatrixShape, Epilogue, boolean][] {
  const qkv = qkvEpilogue(c);
  const add: Epilogue = { kind: "add" };
  const gateup: Epilogue = { kind: "gateup", hidden: c.hiddenDim };
  const uses: [MatrixShape, Epilogue, boolean][] = [];
  for (const L of w.layers) {
    uses.push([L.wqkv, qkv, true], [L.wo, add, false], [L.w13, gateup, true], [L.w2, add, false]);
  }
  uses.push([w.lmHead, { kind: "store", offset: 0, ld: c.vocabSize }, true]);
  return uses;
}

/** `jobs` grouped by matrix (`mat`), in their order otherwise: each matrix's weights drawn once. */
function byMatrix<J>(jobs: J[], mat: (j: J) => string): J[] {
  const first = new Map<string, number>();
  jobs.forEach((j, i) => first.has(mat(j)) || first.set(mat(j), i));
  return jobs
    .map((j, i) => ({ j, i }))
    .sort((a, b) => first.get(mat(a.j))! - first.get(mat(b.j))! || a.i - b.i)
    .map((x) => x.j);
}

/**
 * Every distinct quantized kernel the forward plans run for `w`, as tune jobs with the
 * heuristic shape as default: the decode matrix-vector products (batch 1), the batched decode
 * steps of each row count and the prefill, the norms fused into qkv, gate/up and the logits;
 * grouped by matrix, so that the tuner draws each matrix's random weights once. The dense
 * matrices' kernels are {@link densePlan}'s.
 */
export function tunePlan(
  gpu: Gpu,
  c: ModelConfig,
  w: PlanWeights,
  opts: TunePlanOptions = {},
): TuneJob[] {
  const rowsList = opts.batchRows ?? decodeRowPlans(gpu);
  const jobs = new Map<string, TuneJob>();
  const push = (key: TuneKey, e: Epilogue) => {
    const name = tuneKeyString(key);
    if (!jobs.has(name)) {
      jobs.set(name, { key, epilogue: e, default: qKernelShape(gpu, key, e, false) });
    }
  };
  for (const [M, epi, norm] of matrixUses(c, w)) {
    if (M.format !== "q" || M.bits === undefined || M.groupSize === undefined) continue;
    for (const chunk of M.chunks) {
      const e = chunkEpilogue(epi, chunk.rowStart);
      const base = {
        bits: M.bits,
        groupSize: M.groupSize,
        rows: chunk.rows,
        K: M.K,
        epilogue: e.kind,
        weights: M.weights,
      };
      const decodeUniform = uniformFits(gpu, M.weights, M.K * 4);
      push({ ...base, family: "matvec_q", tokens: 1, norm, xUniform: decodeUniform }, e);
      for (const rows of rowsList) {
        const xUniform = uniformFits(gpu, M.weights, rows * M.K * 4);
        push({ ...base, family: "matmul_q", tokens: rows, norm, xUniform }, e);
      }
      if (opts.prefill ?? true) {
        push({ ...base, family: "matmul_q", tokens: 0, norm, xUniform: false }, e);
      }
    }
  }
  // by matrix (rows, K, format), then in the order above
  return byMatrix(
    [...jobs.values()],
    (j) => `${j.key.bits}:${j.key.groupSize}:${j.key.rows}x${j.key.K}:${j.key.weights}`,
  );
}

const DENSE_FORMATS: readonly string[] = ["f32", "f16", "f16p"] satisfies DenseFormat[];

/**
 * Every distinct dense (f32/f16) kernel the forward plans run for `w` that the tuner tunes, as
 * tune jobs with the heuristic shape as default (denseKernelShape untuned): the decode
 * matrix-vector product of every dense matrix (the norms fused into qkv, gate/up and the logits;
 * x uniform where the Builder binds it so), and, for buffer weights (GPU adapters), the lane
 * kernel of the batched decode steps of each row count (no fused norm: the step normalizes x in
 * a dispatch of its own); grouped by matrix. The prefill kernels and the texture kernel of the
 * batched steps are not tuned (kernels/dense_key.ts).
 */
export function densePlan(
  gpu: Gpu,
  c: ModelConfig,
  w: PlanWeights,
  opts: TunePlanOptions = {},
): DenseJob[] {
  const rowsList = opts.batchRows ?? decodeRowPlans(gpu);
  const jobs = new Map<string, DenseJob>();
  const push = (key: DenseKey, e: Epilogue) => {
    const name = denseKeyString(key);
    if (!jobs.has(name)) {
      jobs.set(name, { key, epilogue: e, default: denseKernelShape(gpu, key, false) });
    }
  };
  for (const [M, epi, norm] of matrixUses(c, w)) {
    if (!DENSE_FORMATS.includes(M.format)) continue;
    const format = M.format as DenseFormat;
    for (const chunk of M.chunks) {
      const e = chunkEpilogue(epi, chunk.rowStart);
      const base = { format, rows: chunk.rows, K: M.K, epilogue: e.kind };
      const xUniform = uniformFits(gpu, M.weights, M.K * 4);
      push({ ...base, family: "matvec", tokens: 1, norm, weights: M.weights, xUniform }, e);
      if (M.weights !== "buffer") continue;
      for (const rows of rowsList) {
        const lane = { family: "matmul_lane" as const, tokens: rows, norm: false, xUniform: false };
        push({ ...base, ...lane, weights: "buffer" }, e);
      }
    }
  }
  return byMatrix(
    [...jobs.values()],
    (j) => `${j.key.format}:${j.key.rows}x${j.key.K}:${j.key.weights}`,
  );
}

/**
 * The attention kernels the forward plans run for `c`, as tune jobs with the heuristic shape as
 * default (the Builder.attention keys): decode (one token; q bound as a uniform buffer where the
 * Builder binds it so) and, where prefill or batched decode plans are tuned, the kernel of the
 * steps of many tokens; for the run state's KV layout and element type (`opts.kv`, `opts.kvType`).
 */
export function attentionPlan(
  gpu: Gpu,
  c: ModelConfig,
  opts: TunePlanOptions = {},
): AttentionJob[] {
  const qd = c.nHeads * c.headDim;
  // the run state's layout at the default context (GpuModel.load: the model's, at most 2048)
  const kv = opts.kv ?? kvSource(gpu, Math.min(c.seqLen, 2048), c.nKvHeads * c.headDim);
  const base = {
    family: "attention" as const,
    nHeads: c.nHeads,
    nKvHeads: c.nKvHeads,
    headDim: c.headDim,
    kvType: opts.kvType ?? defaultKvType(gpu),
    kv,
  };
  const qUniform = kv === "texture" && qd % 4 === 0 && uniformFits(gpu, kv, qd * 4);
  const keys: AttentionKey[] = [{ ...base, decode: true, qUniform }];
  if ((opts.prefill ?? true) || (opts.batchRows ?? decodeRowPlans(gpu)).length > 0) {
    keys.push({ ...base, decode: false, qUniform: false });
  }
  return keys.map((key) => ({ key, default: attentionKernelShape(gpu, key, false) }));
}

/**
 * What {@link tuneAndSave} takes: the quantized kernels' options, the dense kernels' (`dense`)
 * and the attention kernel's (`attention`: their spaces and test hooks; repeats, dispatches and
 * prefillTokens apply to all), the cache to write, the progress sink.
 */
export type TuneAndSaveOptions = TuneOptions & {
  dense?: DenseTuneOptions;
  attention?: AttentionTuneOptions;
  path?: string;
  log?: (line: string) => void;
};

/**
 * Tunes `jobs` (the quantized kernels first, then the dense ones, then attention), a progress
 * line per job on stderr, and files each choice as soon as it is made (so an interrupted run
 * keeps those) in the Gpu's tune cache (or `path`) and in `gpu.tuned` (matrix kernels) /
 * `gpu.tunedAttention`. Returns the results, in that order.
 */
export async function tuneAndSave(
  gpu: Gpu,
  jobs: PlanJob[],
  opts: TuneAndSaveOptions = {},
): Promise<AnyTuneResult[]> {
  const log = opts.log ?? ((l: string) => console.error(l));
  const matrix = jobs.filter(isQJob), dense = jobs.filter(isDenseJob);
  const n = jobs.length;
  const path = opts.path ?? gpu.tuneCache;
  let unwritable = false;
  const file = (r: AnyTuneResult, i: number) => {
    const entries = tunedEntries([r]);
    for (const [k, e] of entries) {
      if (isAttentionKeyString(k)) {
        gpu.tunedAttention.set(k, bareAttentionShape(e as AttentionShape));
      } else gpu.tuned.set(k, bareShape(e as TunedShape));
    }
    if (path && !unwritable && entries.length > 0) {
      try {
        saveTuned(path, gpuAdapterId(gpu), entries);
      } catch (e) {
        unwritable = true;
        console.warn(`warning: cannot write the tune cache ${path}: ${(e as Error).message}`);
      }
    }
    log(describeResult(r, i, n));
  };
  const results: AnyTuneResult[] = await tuneJobs(gpu, matrix, { ...opts, onResult: file });
  const { repeats, dispatches, prefillTokens } = opts;
  const shared = { repeats, dispatches, prefillTokens };
  results.push(
    ...await tuneDenseJobs(gpu, dense, {
      ...shared,
      ...opts.dense,
      onResult: (r, i) => file(r, matrix.length + i),
    }),
  );
  results.push(
    ...await tuneAttentionJobs(gpu, jobs.filter(isAttentionJob), {
      ...shared,
      ...opts.attention,
      onResult: (r, i) => file(r, matrix.length + dense.length + i),
    }),
  );
  return results;
}

/**
 * The first-run hook (GpuModel.load, before the forward plan is built): on a GPU adapter whose
 * cache lacks some of the model's kernels, tune those now. Nothing on CPU adapters, on a Gpu
 * made by hand (no cache) or with `LOWBIT_TUNE=0`. Returns the results (none when nothing ran);
 * `opts` narrows the plan and the search (tests).
 */
export async function autoTune(
  gpu: Gpu,
  c: ModelConfig,
  w: PlanWeights,
  opts: TunePlanOptions & TuneAndSaveOptions = {},
): Promise<AnyTuneResult[]> {
  if (gpu.isCpu || gpu.tuneCache === null || envTune() === "0") return [];
  const jobs: PlanJob[] = [
    ...tunePlan(gpu, c, w, opts).filter((j) => !gpu.tuned.has(tuneKeyString(j.key))),
    ...densePlan(gpu, c, w, opts).filter((j) => !gpu.tuned.has(denseKeyString(j.key))),
    ...attentionPlan(gpu, c, opts).filter((j) =>
      !gpu.tunedAttention.has(attentionKeyString(j.key))
    ),
  ];
  if (jobs.length === 0) return [];
  const log = opts.log ?? ((l: string) => console.error(l));
  log(
    `tuning ${jobs.length} kernel shapes for "${gpuAdapterId(gpu)}" (first run of these shapes ` +
      `on this GPU; saved to ${gpu.tuneCache}; LOWBIT_TUNE=0 skips)`,
  );
  return await tuneAndSave(gpu, jobs, { ...opts, log });
}

function envTune(): string | undefined {
  try {
    return Deno.env.get("LOWBIT_TUNE");
  } catch {
    return undefined;
  }
}
