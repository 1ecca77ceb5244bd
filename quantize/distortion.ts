/**
 * What the allocators (quantize/allocate.ts) measure of each linear layer, in one pass over the
 * float model before the sequential quantization:
 * - D_l(f) = tr(ΔW·H·ΔWᵀ): the output error of linear l quantized with format f by the chosen
 *   method (a trial quantization per format), under the Hessian H of the float model's inputs
 *   of that layer. H, its damping and the GPTQ plan (its factorisation) are computed once per
 *   layer and shared by every format; only the quantizer's grid changes.
 * - E_l(f) = ‖W_l − RTN_f(W_l)‖² (MixQuant's data-free round-off error).
 * - G²_l: the mean squared gradient of the float model's next-token loss (cross-entropy) with
 *   respect to the layer's output, over calibration tokens and output features, from the
 *   end-to-end stage's backward pass ({@link BlockMath.backward}): with δ_t that gradient, the
 *   loss change of a weight error ΔW is Σ_t δ_tᵀ·ΔW·x_t, whose mean square is about
 *   G²_l·tr(ΔW·H·ΔWᵀ) (δ and x taken independent), so G²_l·D_l(f) is in units of loss².
 *   The proxy ("relative", for models too large for a CPU backward pass): G²_l = N_l/tr(W·H·Wᵀ),
 *   i.e. every layer's output error counted relative to its output energy.
 *
 * Measuring on the float model's inputs (not the sequential pass's) decides the allocation
 * once, independent of the order layers are quantized in, at the cost of one float forward.
 * A layer's trials run on a pool of worker threads (quantize/trial_parallel.ts), one format
 * per task, with the same D as on one thread.
 */
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import { tensorNames as T } from "../runtime/checkpoint/config.ts";
import type { Gpu } from "../kernels/gpu.ts";
import { dequantize } from "../runtime/format/qtensor.ts";
import { BlockRunner, CAPTURE, linearName } from "./block_runner.ts";
import { calibratedLayer, layerLoss } from "./hessian.ts";
import { rtnQuantize } from "./rtn.ts";
import { gptqPlan } from "./gptq.ts";
import { TrialPool } from "./trial_parallel.ts";
import { captureHessian, embedInputs, GROUPS, type Method } from "./sequential.ts";
import {
  BlockMath,
  createGrads,
  gemmABt,
  LINEAR_KEYS,
  type LinearKey,
  rmsnormBackward,
  rmsnormForward,
  transpose,
} from "./block_math.ts";
import type { Format } from "./allocate.ts";

/** What was measured of one linear layer. */
export interface LayerMeasure {
  name: string;
  N: number;
  K: number;
  /** tr(W·H·Wᵀ) and tr(H) under the float model's (damped) H. */
  energy: number;
  traceH: number;
  /** D_l(f) per candidate (null where not measured: the analytic and data-free allocators). */
  D: number[] | null;
  /** E_l(f) = ‖W − RTN_f(W)‖² per candidate. */
  E: number[];
  /** Trial quantization time of all formats (ms). */
  ms: number;
}

export interface MeasureOptions {
  formats: readonly Format[];
  /** The quantizer of the trial quantizations (null: no trials, only H's statistics). */
  method: Method | null;
  iters?: number;
  percdamp?: number;
  /** Worker threads of the trial quantizations (default: all cores; 1: this thread only). */
  threads?: number;
  /** Multiply-adds per trial (N·K²) below which a layer's trials stay on this thread. */
  minParallelWork?: number;
  log?: (line: string) => void;
}

/** ‖W − RTN_f(W)‖² for each format (plain min/max RTN, as MixQuant). */
export function roundoffErrors(
  W: Float32Array | Float64Array,
  N: number,
  K: number,
  formats: readonly Format[],
): number[] {
  return formats.map((f) => {
    const Wq = dequantize(rtnQuantize(W, N, K, f), new Float64Array(N * K));
    let e = 0;
    for (let i = 0; i < N * K; i++) e += (Wq[i] - W[i]) ** 2;
    return e;
  });
}

/** D_l(f) (with `method`), E_l(f) and H's statistics of every block linear, in one float pass. */
export async function measureDistortions(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
  o: MeasureOptions,
): Promise<LayerMeasure[]> {
  const log = o.log ?? ((l: string) => console.error(l));
  const pool = new TrialPool({ threads: o.threads, minWork: o.minParallelWork });
  try {
    return await measureWith(gpu, ckpt, seqs, o, pool, log);
  } finally {
    pool.close();
  }
}

/** The float pass of {@link measureDistortions}, each layer's trials on `pool`. */
async function measureWith(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
  o: MeasureOptions,
  pool: TrialPool,
  log: (line: string) => void,
): Promise<LayerMeasure[]> {
  const c = ckpt.config;
  const runner = BlockRunner.create(gpu, c, Math.max(...seqs.map((s) => s.length)));
  let inputs = await embedInputs(ckpt, seqs);
  const out: LayerMeasure[] = [];
  const total = c.nLayers * 7;
  for (let l = 0; l < c.nLayers; l++) {
    await runner.loadLayer(ckpt, l);
    for (const { capture, keys } of GROUPS) {
      const { K, hessian } = await captureHessian(runner, inputs, capture, seqs);
      for (const key of keys) {
        const name = linearName(key, l), t0 = performance.now();
        const [N] = ckpt.tensors.get(name)!.shape;
        const { W, H } = calibratedLayer(await ckpt.read(name), N, K, hessian, o.percdamp);
        const plan = o.method && o.method !== "rtn" ? gptqPlan(H, K) : null;
        const D = o.method
          ? await pool.distortions(
            name,
            { method: o.method, W, N, K, H, plan, iters: o.iters },
            o.formats,
          )
          : null;
        const energy = layerLoss(W, new Float64Array(N * K), H, N, K).loss;
        let traceH = 0;
        for (let k = 0; k < K; k++) traceH += H[k * K + k];
        const ms = performance.now() - t0;
        out.push({ name, N, K, energy, traceH, D, E: roundoffErrors(W, N, K, o.formats), ms });
        log(
          `allocation: measured ${name} (${N}×${K}) at ${o.formats.length} formats ` +
            `[${out.length}/${total}] (${ms.toFixed(0)} ms)`,
        );
      }
      hessian.free();
    }
    inputs = await runner.run(inputs, CAPTURE.output);
  }
  if (o.method) {
    const ms = out.reduce((a, m) => a + m.ms, 0);
    log(
      `allocation: measured ${out.length} linears at ${o.formats.length} formats in ` +
        `${(ms / 1000).toFixed(2)} s (${o.method} trials, ${pool.threads} thread${
          pool.threads === 1 ? "" : "s"
        })`,
    );
  }
  return out;
}

/**
 * G²_l of every block linear: the mean over calibration tokens and output features of
 * (dL/dY_l)², L the float model's mean next-token cross-entropy, from a float64 CPU forward and
 * backward pass of the whole model over each of `seqs` (BOS first; the last token predicts
 * nothing). Returns name → G².
 */
export async function outputSensitivity(
  ckpt: Checkpoint,
  seqs: number[][],
  log: (line: string) => void = (l) => console.error(l),
): Promise<Map<string, number>> {
  const c = ckpt.config, D = c.dim, V = c.vocabSize;
  const maxT = Math.max(...seqs.map((s) => s.length));
  const bms: BlockMath[] = [];
  for (let l = 0; l < c.nLayers; l++) {
    const bm = new BlockMath(c, maxT);
    const linears = {} as Record<LinearKey, Float32Array>;
    for (const key of LINEAR_KEYS) linears[key] = await ckpt.read(linearName(key, l));
    const bias = c.qkvBias
      ? { bq: await ckpt.read(T.bq(l)), bk: await ckpt.read(T.bk(l)), bv: await ckpt.read(T.bv(l)) }
      : null;
    bm.setParams({
      linears,
      attnNorm: await ckpt.read(T.attnNorm(l)),
      ffnNorm: await ckpt.read(T.ffnNorm(l)),
      bias,
    });
    bms.push(bm);
  }
  const head = Float64Array.from(await ckpt.read(c.tiedEmbeddings ? T.embed : T.lmHead));
  const headT = new Float64Array(V * D);
  transpose(headT, head, V, D);
  const gF = Float64Array.from(await ckpt.read(T.norm));
  const embed = await embedInputs(ckpt, seqs);
  const sq = new Map<string, number>(), count = new Map<string, number>();
  const grads = Array.from({ length: c.nLayers }, () => createGrads(c));
  const xn = new Float64Array(maxT * D), inv = new Float64Array(maxT);
  const logits = new Float64Array(maxT * V), dxn = new Float64Array(maxT * D);
  const X = new Float64Array(maxT * D);
  let tokens = 0;
  const t0 = performance.now();
  for (let s = 0; s < seqs.length; s++) {
    const ids = seqs[s], Tn = ids.length;
    if (Tn < 2) continue;
    let x: Float64Array | Float32Array = embed[s];
    for (const bm of bms) x = bm.forward(x, Tn);
    X.set(x);
    rmsnormForward(xn, inv, X, gF, Tn, D, c.normEps);
    gemmABt(logits, xn, head, Tn, V, D);
    // d CE_t/d logits_t = softmax − onehot(next), each token's own loss (the last position
    // predicts nothing); the mean over tokens is taken in the squares
    for (let t = 0; t < Tn; t++) {
      const o = t * V;
      if (t === Tn - 1) {
        logits.fill(0, o, o + V);
        continue;
      }
      let m = -Infinity;
      for (let v = 0; v < V; v++) m = Math.max(m, logits[o + v]);
      let z = 0;
      for (let v = 0; v < V; v++) z += Math.exp(logits[o + v] - m);
      for (let v = 0; v < V; v++) logits[o + v] = Math.exp(logits[o + v] - m) / z;
      logits[o + ids[t + 1]] -= 1;
    }
    gemmABt(dxn, logits, headT, Tn, D, V);
    let dOut = new Float64Array(Tn * D), dIn = new Float64Array(Tn * D);
    rmsnormBackward(dxn, X, inv, gF, Tn, D, dOut, new Float64Array(D));
    for (let b = bms.length - 1; b >= 0; b--) {
      bms[b].backward(dOut, grads[b], dIn, (key, dY) => {
        const name = linearName(key, b);
        let a = 0;
        for (let i = 0; i < dY.length; i++) a += dY[i] * dY[i];
        sq.set(name, (sq.get(name) ?? 0) + a);
        count.set(name, (count.get(name) ?? 0) + dY.length);
      });
      [dOut, dIn] = [dIn, dOut];
    }
    tokens += Tn - 1;
    if ((s + 1) % 8 === 0 || s === seqs.length - 1) {
      log(
        `allocation: G² backward pass ${s + 1}/${seqs.length} sequences ` +
          `(${((performance.now() - t0) / 1000).toFixed(1)} s)`,
      );
    }
  }
  const g2 = new Map<string, number>();
  for (const [name, a] of sq) g2.set(name, a / count.get(name)!);
  if (tokens === 0) throw new Error("outputSensitivity: no sequence has two tokens");
  return g2;
}

/** The proxy sensitivity N/tr(W·H·Wᵀ) (relative output error), for each measured layer. */
export function relativeSensitivity(m: LayerMeasure[]): Map<string, number> {
  return new Map(m.map((l) => [l.name, l.N / Math.max(l.energy, 1e-300)]));
}
