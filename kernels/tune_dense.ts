/**
 * The dense (f32/f16) matrix kernels in the tuner (kernels/tuner.ts): for one dense kernel as the
 * forward plan runs it (a {@link DenseKey}: the decode matrix-vector product of kernels/matvec.ts,
 * or the lane variant of kernels/matmul.ts for a batched decode step), enumerate thread shapes
 * ({@link denseCandidates}), run each on random weights in the key's format and layout, check
 * every checked output against the float64 reference of the tuner's bench (MatrixBench: the
 * product, the fused norm, the epilogue; a variant that fails is rejected with the reason, never
 * chosen), time the correct ones with the tuner's timestamp queries and keep the fastest
 * (chooseVariant). The runtime reads the choices back through `gpu.tuned` (denseKernelShape:
 * Builder.matvec and Builder.matmul, runtime/model/forward.ts).
 *
 * f16 weights are drawn as f16 values, so the reference multiplies exactly what the kernels read:
 * storage buffers of halves (f16, f16p), or the texture layout's packed pairs with every row
 * padded to whole texels (kernels/common.ts).
 */
import {
  DENSE_TEX_WIDTH,
  denseRowTexels,
  denseTexels,
  denseTextureFormat,
  texSize,
  writeTexels,
} from "./common.ts";
import { type DenseKey, denseKeyProblem, denseKeyString, denseShapeProblem } from "./dense_key.ts";
import type { Epilogue } from "./epilogue.ts";
import { ParameterError } from "./errors.ts";
import type { Gpu } from "./gpu.ts";
import {
  matmulBindings,
  matmulGrid,
  matmulKey,
  matmulPipeline,
  type MatmulVariant,
  matmulWgsl,
} from "./matmul.ts";
import {
  matvecBindings,
  matvecGrid,
  matvecKey,
  matvecPipeline,
  type MatvecVariant,
  matvecWgsl,
} from "./matvec.ts";
import { describeShape, type TunedShape } from "./tune_key.ts";
import {
  benchEpilogue,
  type BenchWeights,
  type Built,
  type DenseTuneResult,
  MatrixBench,
  tuneEach,
  tuneResult,
  type TuneSpace,
  type VariantOptions,
  variantPipeline,
  type VariantResult,
  WeightsMemo,
} from "./tuner.ts";
import { mulberry32 } from "../runtime/model/sampling.ts";

/** One dense kernel to tune: its key, its real epilogue and the shape the runtime uses untuned. */
export interface DenseJob {
  key: DenseKey;
  epilogue: Epilogue;
  /** The heuristic shape (denseKernelShape untuned, kernels/dense_key.ts). */
  default: TunedShape;
}

/**
 * The values each knob takes, as the quantized kernels' (TuneSpace): threads per unit, units per
 * thread and thread slots per workgroup (upw = upt · slots).
 */
export type DenseSpace = Pick<TuneSpace, "tpr" | "upt" | "slots">;

export interface DenseTuneOptions extends VariantOptions<TunedShape> {
  /** Narrows or replaces the search space (tests use small ones on lavapipe). */
  space?: Partial<DenseSpace>;
}

/**
 * The default search space. Texture weights (CPU adapters): tpr 1, 2..16 units per thread, 8
 * threads per workgroup (one SIMD group, as the heuristic); buffer weights (GPUs): tpr 8..128 ×
 * upw 1..8 (upt 1), of which {@link denseCandidates} keeps 32..1024 threads per workgroup.
 */
export function denseSpace(key: DenseKey): DenseSpace {
  if (key.weights === "texture") return { tpr: [1], upt: [2, 4, 8, 16], slots: [8] };
  return { tpr: [8, 16, 32, 64, 128], upt: [1], slots: [1, 2, 4, 8] };
}

/**
 * The shapes to try for `key`, in a fixed order: `def` (the heuristic) first, then the space's
 * product (tpr, upt, slots, each ascending as given; tt the step's rows for the lane kernel),
 * without duplicates and without shapes the kernel or the device rejects
 * ({@link denseShapeProblem}), and on buffer weights without more threads per unit than K has
 * vec4 (threads with nothing to do) or, on GPUs, fewer than 32 threads per workgroup.
 */
export function denseCandidates(
  gpu: Gpu,
  key: DenseKey,
  def: TunedShape | null,
  space: Partial<DenseSpace> = {},
): TunedShape[] {
  const sp = { ...denseSpace(key), ...space };
  const limits = gpu.device.limits;
  const out: TunedShape[] = [], seen = new Set<string>();
  const add = (s: TunedShape, filtered: boolean) => {
    const name = describeShape(s);
    if (seen.has(name) || denseShapeProblem(key, s, limits) !== null) return;
    if (filtered && key.weights === "buffer") {
      if (s.tpr > key.K / 4 || (!gpu.isCpu && s.tpr * s.upw < 32)) return;
    }
    seen.add(name);
    out.push(s);
  };
  if (def) add(def, false);
  for (const tpr of sp.tpr) {
    for (const upt of sp.upt) {
      for (const slots of sp.slots) {
        const s: TunedShape = { tpr, upt, upw: upt * slots };
        if (key.family === "matmul_lane") s.tt = key.tokens;
        add(s, true);
      }
    }
  }
  return out;
}

/**
 * Tunes each job in turn, `onResult` after each (progress); the weights of consecutive jobs over
 * the same matrix (decode and the batched steps) are drawn once.
 */
export function tuneDenseJobs(
  gpu: Gpu,
  jobs: DenseJob[],
  opts: DenseTuneOptions & {
    onResult?: (r: DenseTuneResult, i: number, n: number) => void;
  } = {},
): Promise<DenseTuneResult[]> {
  return tuneEach(jobs, (job, memo) => tuneDenseJob(gpu, job, opts, memo), opts.onResult);
}

/** Tunes one job: every candidate checked, the correct ones timed, the fastest chosen. */
export async function tuneDenseJob(
  gpu: Gpu,
  job: DenseJob,
  opts: DenseTuneOptions = {},
  memo?: WeightsMemo,
): Promise<DenseTuneResult> {
  const t0 = performance.now();
  const { key } = job;
  const problem = denseKeyProblem(key);
  if (problem) throw new ParameterError(`tuner: ${denseKeyString(key)}: ${problem}`);
  const e = benchEpilogue(key, job.epilogue);
  const shapes = denseCandidates(gpu, key, job.default, opts.space);
  const own = memo ?? new WeightsMemo();
  const variants: VariantResult[] = [];
  try {
    const name = `dense:${key.format}:${key.rows}x${key.K}:${key.weights}`;
    const w = own.get(name, () => denseWeights(gpu, key));
    const bench = new MatrixBench(gpu, key, e, w);
    try {
      for (const [i, shape] of shapes.entries()) {
        variants.push(
          await bench.run(shape, i, opts, () => buildDense(bench, key, shape, i, opts)),
        );
      }
    } finally {
      bench.release();
    }
  } finally {
    if (!memo) own.release();
  }
  return tuneResult(key, denseKeyString(key), variants, job.default, t0);
}

/**
 * Random weights in [−1, 1) (f16 values for the f16 formats) in the key's layout: a storage
 * buffer of f32 or halves, or a dense texture (kernels/common.ts).
 */
function denseWeights(gpu: Gpu, key: DenseKey): BenchWeights {
  const { rows, K, format } = key;
  const r = mulberry32(rows * 7919 + K);
  const W = format === "f32" ? new Float32Array(rows * K) : new Float16Array(rows * K);
  for (let i = 0; i < W.length; i++) W[i] = r() * 2 - 1;
  let w: GPUBuffer | GPUTexture;
  if (key.weights === "texture") {
    const texels = rows * denseRowTexels(K, format);
    w = gpu.device.createTexture({
      label: "tune.w",
      size: texSize(texels, DENSE_TEX_WIDTH),
      format: denseTextureFormat(format),
      usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST,
    });
    const data = W instanceof Float32Array ? W : Float32Array.from(W);
    writeTexels(gpu.device, w, DENSE_TEX_WIDTH, 0, denseTexels(data, K, format));
  } else {
    w = gpu.upload("tune.w", W);
  }
  const row = (n: number) => Float64Array.from(W.subarray(n * K, (n + 1) * K));
  return { bufs: { w }, row, relTol: DENSE_REL_TOL };
}

/**
 * How far a dense kernel's dot product may stray from the float64 one, relative to |row|·|x|:
 * the kernels' f32 sums stray by at most 4e-8 of that (lavapipe, buffers and textures, K 100 and
 * 4096, fused norm, gateup, lane kernel); a reference that missed the weights' f16 rounding
 * would be off by up to 4e-5 at K = 100, which the quantized kernels' 1e-3 lets pass.
 */
const DENSE_REL_TOL = 1e-5;

/** A dense kernel's variant of a shape: its pipeline, bindings and grid. */
function buildDense(
  bench: MatrixBench,
  key: DenseKey,
  shape: TunedShape,
  i: number,
  opts: DenseTuneOptions,
): Built {
  const { gpu, e, norm } = bench;
  const { format, rows, K } = key;
  if (key.family === "matvec") {
    const v: MatvecVariant = {
      format,
      rows,
      K,
      norm,
      epilogue: e,
      weights: key.weights,
      xUniform: key.xUniform,
      tpr: shape.tpr,
      upw: shape.upw,
      upt: shape.upt,
    };
    const compile = () => matvecPipeline(gpu, v);
    const pipeline = variantPipeline(
      gpu,
      matvecKey(v),
      () => matvecWgsl(v),
      compile,
      shape,
      i,
      opts,
    );
    return {
      pipeline,
      bindGroup: bench.bindGroup(pipeline, matvecBindings(v)),
      grid: matvecGrid(v),
    };
  }
  const v: MatmulVariant = {
    format,
    rows,
    K,
    epilogue: e,
    weights: "buffer",
    tpr: shape.tpr,
    upw: shape.upw,
    tt: key.tokens,
  };
  const compile = () => matmulPipeline(gpu, v);
  const pipeline = variantPipeline(gpu, matmulKey(v), () => matmulWgsl(v), compile, shape, i, opts);
  return {
    pipeline,
    bindGroup: bench.bindGroup(pipeline, matmulBindings(v)),
    grid: matmulGrid(v, bench.T),
  };
}
