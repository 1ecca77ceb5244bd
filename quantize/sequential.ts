/**
 * Sequential quantization through the model, as GPTQ's `llama_sequential`: block by block, and
 * inside a block q/k/v, then o, then gate/up, then down, each calibrated on the inputs produced
 * by the layers before it already quantized (forward passes on the GPU, Hessians on the host).
 * Only one block's weights and activations are held at a time.
 */
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import { tensorNames as T } from "../runtime/checkpoint/config.ts";
import type { Gpu } from "../kernels/gpu.ts";
import { BlockRunner, CAPTURE, type Capture, linearName } from "./block_runner.ts";
import { calibratedLayer, Hessian, layerLoss } from "./hessian.ts";
import { type Bits, dequantize, type QuantizedLinear } from "../runtime/format/qtensor.ts";
import { diagonal, rtnQuantize } from "./rtn.ts";
import { gptqQuantize } from "./gptq.ts";
import { decoupleQParallel } from "./decoupleq_parallel.ts";
import { tuneBlock } from "./stage2.ts";
import type { LinearKey } from "./block_math.ts";

export type Method = "rtn" | "gptq" | "decoupleq";

export interface SequentialOptions {
  method: Method;
  bits: Bits;
  groupSize: number; // 0 = per row
  /** Per-linear formats (mixed precision, quantize/mixed.ts): override bits and groupSize. */
  formats?: Record<string, { bits: Bits; groupSize: number }> | null;
  /** decoupleQ alternations. */
  iters?: number;
  /** Also measure the RTN and GPTQ losses of every layer for the report (default true). */
  compare?: boolean;
  percdamp?: number;
  /** CPU threads for decoupleQ stage 1 (default: all cores). */
  threads?: number;
  /**
   * Also quantize the logits layer (the embedding when tied), calibrated on the final-normed
   * outputs of the quantized model, into `lm_head.weight`.
   */
  quantizeHead?: boolean;
  /** Resume at block `block` of an interrupted run, with that block's inputs and the reports. */
  start?: { block: number; inputs: Float32Array[]; layers: LayerReport[]; blocks: BlockReport[] };
  /**
   * Called after each block has gone to the sink, with the next block's index and inputs and
   * the reports so far (what {@link start} resumes from).
   */
  onBlockDone?: (
    next: number,
    inputs: Float32Array[],
    reports: { layers: LayerReport[]; blocks: BlockReport[] },
  ) => Promise<void>;
  /** decoupleQ stage 2: tune s, z and the norms of each block against its float output. */
  stage2?: { epochs?: number; lr?: number } | null;
  log?: (line: string) => void;
}

export interface LayerReport {
  layer: number;
  name: string; // canonical tensor name
  N: number;
  K: number;
  ms: number;
  /** Relative loss tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of each method measured. */
  loss: Partial<Record<Method, number>>;
}

/** Where each quantized layer and each block's (possibly tuned) norm weights go. */
export interface Sink {
  linear(name: string, ql: QuantizedLinear): Promise<void>;
  norm(name: string, g: Float32Array): Promise<void>;
}

/** Stage-2 result of one block, for the report. */
export interface BlockReport {
  layer: number;
  /** Output MSE against the float block: before and after stage 2. */
  mseBefore: number;
  mseAfter: number;
  ms: number;
}

/**
 * H = Σ XᵀX over `seqs` of the inputs that `capture` gives for the block loaded in `runner`, and
 * their width K.
 */
export async function captureHessian(
  runner: BlockRunner,
  inputs: Float32Array[],
  capture: Capture,
  seqs: number[][],
): Promise<{ K: number; hessian: Hessian }> {
  const X = await runner.run(inputs, capture);
  const K = X[0].length / seqs[0].length;
  const hessian = new Hessian(K);
  X.forEach((x, i) => hessian.addBatch(x, seqs[i].length));
  return { K, hessian };
}

/** The linears of a block by the capture that gives their inputs, in quantization order. */
export const GROUPS: { capture: Capture; keys: string[] }[] = [
  { capture: CAPTURE.qkvInput, keys: ["wq", "wk", "wv"] },
  { capture: CAPTURE.oInput, keys: ["wo"] },
  { capture: CAPTURE.gateUpInput, keys: ["w1", "w3"] },
  { capture: CAPTURE.downInput, keys: ["w2"] },
];

/** Embedding rows of each calibration sequence: the first block's inputs. */
export async function embedInputs(ckpt: Checkpoint, seqs: number[][]): Promise<Float32Array[]> {
  const dim = ckpt.config.dim;
  const rows = new Map<number, Float32Array>();
  for (const id of new Set(seqs.flat()).values()) {
    rows.set(id, await ckpt.read(T.embed, id, id + 1));
  }
  return seqs.map((s) => {
    const x = new Float32Array(s.length * dim);
    s.forEach((id, t) => x.set(rows.get(id)!, t * dim));
    return x;
  });
}

/** Quantizes one linear layer under H with the chosen method (and the others, to compare). */
async function quantizeLinear(
  name: string,
  W: Float32Array,
  N: number,
  K: number,
  hessian: Hessian,
  opts: SequentialOptions,
): Promise<{ ql: QuantizedLinear; loss: LayerReport["loss"] }> {
  const { W: W64, H } = calibratedLayer(W, N, K, hessian, opts.percdamp);
  const { bits, groupSize } = opts.formats?.[name] ?? opts;
  const rel = (ql: QuantizedLinear) =>
    layerLoss(W64, dequantize(ql, new Float64Array(N * K)), H, N, K).relative;
  const loss: LayerReport["loss"] = {};
  let ql: QuantizedLinear | null = null;
  const compare = opts.compare ?? true;
  if (opts.method === "rtn" || compare) {
    const r = rtnQuantize(W64, N, K, { bits, groupSize, clip: "hdiag", Hdiag: diagonal(H, K) });
    loss.rtn = rel(r);
    if (opts.method === "rtn") ql = r;
  }
  if (opts.method === "gptq" || compare) {
    // the same H-weighted clipping search of the static groups as RTN's
    const g = gptqQuantize(W64, N, K, H, { bits, groupSize, layer: name, clip: "hdiag" });
    loss.gptq = rel(g);
    if (opts.method === "gptq") ql = g;
  }
  if (opts.method === "decoupleq") {
    const d = await decoupleQParallel(W64, N, K, H, { bits, groupSize, iters: opts.iters }, {
      threads: opts.threads,
    });
    loss.decoupleq = d.loss.relative;
    ql = d.ql;
  }
  return { ql: ql!, loss };
}

/**
 * Quantizes every linear layer of `ckpt` in order, calibrated on `seqs` (token ids, BOS first),
 * handing each result to `sink`. Returns one report row per layer.
 */
export async function quantizeSequential(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
  opts: SequentialOptions,
  sink: Sink,
): Promise<{ layers: LayerReport[]; blocks: BlockReport[] }> {
  const c = ckpt.config;
  const log = opts.log ?? ((l: string) => console.error(l));
  const seqLen = Math.max(...seqs.map((s) => s.length));
  const runner = BlockRunner.create(gpu, c, seqLen);
  const layers: LayerReport[] = [...opts.start?.layers ?? []];
  const blocks: BlockReport[] = [...opts.start?.blocks ?? []];
  let inputs = opts.start?.inputs ?? await embedInputs(ckpt, seqs);
  for (let l = opts.start?.block ?? 0; l < c.nLayers; l++) {
    await runner.loadLayer(ckpt, l);
    // the float block's output on the same inputs: stage 2's target
    const targets = opts.stage2 ? await runner.run(inputs, CAPTURE.output) : [];
    const qls = {} as Record<LinearKey, QuantizedLinear>;
    for (const { capture, keys } of GROUPS) {
      const { K, hessian } = await captureHessian(runner, inputs, capture, seqs);
      for (const key of keys) {
        const name = linearName(key, l);
        const [N] = ckpt.tensors.get(name)!.shape;
        const t0 = performance.now();
        const { ql, loss } = await quantizeLinear(name, await ckpt.read(name), N, K, hessian, opts);
        const ms = performance.now() - t0;
        runner.setLinear(key, Float32Array.from(dequantize(ql, new Float64Array(N * K))));
        qls[key as LinearKey] = ql;
        layers.push({ layer: l, name, N, K, ms, loss });
        const fmt = opts.formats ? `, W${ql.bits} g${ql.groupSize}` : "";
        log(
          `layer ${l} ${key} (${N}×${K}${fmt}): relative loss ${lossText(loss)} (${
            ms.toFixed(0)
          } ms)`,
        );
      }
      hessian.free();
    }
    let attnNorm = await ckpt.read(T.attnNorm(l)), ffnNorm = await ckpt.read(T.ffnNorm(l));
    if (opts.stage2) {
      const bias = c.qkvBias
        ? {
          bq: await ckpt.read(T.bq(l)),
          bk: await ckpt.read(T.bk(l)),
          bv: await ckpt.read(T.bv(l)),
        }
        : null;
      const r = tuneBlock(
        c,
        { linears: qls, attnNorm, ffnNorm, bias },
        inputs,
        targets,
        { ...opts.stage2, log: (line) => log(`block ${l} ${line}`) },
      );
      Object.assign(qls, r.block.linears);
      ({ attnNorm, ffnNorm } = r.block);
      for (const [key, ql] of Object.entries(qls)) {
        runner.setLinear(key, Float32Array.from(dequantize(ql, new Float64Array(ql.N * ql.K))));
      }
      runner.setNorm("attn", attnNorm);
      runner.setNorm("ffn", ffnNorm);
      const h = r.history;
      blocks.push({ layer: l, mseBefore: h.before, mseAfter: h.after, ms: r.ms });
      log(
        `block ${l} stage 2: output MSE ${h.before.toExponential(3)} → ${
          h.after.toExponential(3)
        } (${r.ms.toFixed(0)} ms)`,
      );
    }
    for (const [key, ql] of Object.entries(qls)) await sink.linear(linearName(key, l), ql);
    await sink.norm(T.attnNorm(l), attnNorm);
    await sink.norm(T.ffnNorm(l), ffnNorm);
    inputs = await runner.run(inputs, CAPTURE.output);
    await opts.onBlockDone?.(l + 1, inputs, { layers, blocks });
  }
  if (opts.quantizeHead) {
    const name = T.lmHead, [N, K] = [c.vocabSize, c.dim];
    const g = await ckpt.read(T.norm), hessian = new Hessian(K);
    inputs.forEach((x, i) => hessian.addBatch(finalNorm(x, g, c.normEps), seqs[i].length));
    const t0 = performance.now();
    const W = await ckpt.read(c.tiedEmbeddings ? T.embed : T.lmHead);
    const { ql, loss } = await quantizeLinear(name, W, N, K, hessian, opts);
    const ms = performance.now() - t0;
    hessian.free();
    await sink.linear(name, ql);
    layers.push({ layer: c.nLayers, name, N, K, ms, loss });
    log(`lm_head (${N}×${K}): relative loss ${lossText(loss)} (${ms.toFixed(0)} ms)`);
  }
  return { layers, blocks };
}

/**
 * The float model's final-normed hidden states (T, dim) on each sequence: the logits layer's
 * inputs, from the checkpoint's weights, one block at a time on the GPU.
 */
export async function floatFinalHidden(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
): Promise<Float32Array[]> {
  const c = ckpt.config;
  const runner = BlockRunner.create(gpu, c, Math.max(...seqs.map((s) => s.length)));
  let x = await embedInputs(ckpt, seqs);
  for (let l = 0; l < c.nLayers; l++) {
    await runner.loadLayer(ckpt, l);
    x = await runner.run(x, CAPTURE.output);
  }
  const g = await ckpt.read(T.norm);
  return x.map((h) => finalNorm(h, g, c.normEps));
}

/** "rtn 1.234e-2, gptq ..." for a layer report's losses. */
function lossText(loss: LayerReport["loss"]): string {
  return Object.entries(loss).map(([m, v]) => `${m} ${v!.toExponential(3)}`).join(", ");
}

/** RMSNorm of each row of x (T, K) with weight g: the logits layer's input. */
function finalNorm(x: Float32Array, g: Float32Array, eps: number): Float32Array {
  const K = g.length, out = new Float32Array(x.length);
  for (let o = 0; o < x.length; o += K) {
    let ss = 0;
    for (let i = 0; i < K; i++) ss += x[o + i] * x[o + i];
    const r = 1 / Math.sqrt(ss / K + eps);
    for (let i = 0; i < K; i++) out[o + i] = x[o + i] * r * g[i];
  }
  return out;
}
