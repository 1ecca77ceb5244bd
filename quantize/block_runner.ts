/**
 * Runs one decoder block on the GPU for the quantizer: float32 weights that can be replaced one
 * linear layer at a time (by their dequantized values), and prefixes of the block's prefill
 * stages, so each linear layer's calibration inputs are captured after the layers before it
 * were quantized. Sequences are submitted back to back and read back together, each in steps of
 * at most MAX_ROWS tokens (the Step uniform's per-token rows), as the runtime's prefill runs them.
 */
import { type ModelConfig, tensorNames as T } from "../runtime/checkpoint/config.ts";
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import { createRunState, type RunState } from "../runtime/model/run_state.ts";
import {
  allocDense,
  type DenseMatrix,
  type LayerWeights,
  writeDenseRows,
} from "../runtime/model/gpu_weights.ts";
import { Builder, type Dispatch, encodeDispatches, layerStages } from "../runtime/model/forward.ts";
import { type Gpu, STORAGE } from "../kernels/gpu.ts";
import { MAX_ROWS, packStep } from "../kernels/common.ts";

/** How many stages to run to capture each buffer (see `layerStages`). */
export const CAPTURE = {
  qkvInput: { stages: 1, buffer: "xn" }, // rmsnorm(x): input of q, k, v
  oInput: { stages: 3, buffer: "att" }, // attention output: input of o
  gateUpInput: { stages: 5, buffer: "xn" }, // rmsnorm(x + o): input of gate, up
  downInput: { stages: 6, buffer: "h" }, // silu(gate)·up: input of down
  output: { stages: 7, buffer: "x" }, // the block's output
} as const;

export type Capture = (typeof CAPTURE)[keyof typeof CAPTURE];

export class BlockRunner {
  private readonly stages: Dispatch[][];
  private readonly linears: Map<string, { M: DenseMatrix; row0: number }>;

  private constructor(
    readonly gpu: Gpu,
    readonly config: ModelConfig, // the whole model's
    readonly state: RunState,
    readonly layer: LayerWeights,
  ) {
    const one = { ...config, nLayers: 1 };
    this.stages = layerStages(new Builder(gpu, state), one, layer, 0);
    const qd = config.nHeads * config.headDim, kvd = config.nKvHeads * config.headDim;
    const L = layer as { wqkv: DenseMatrix; wo: DenseMatrix; w13: DenseMatrix; w2: DenseMatrix };
    this.linears = new Map([
      ["wq", { M: L.wqkv, row0: 0 }],
      ["wk", { M: L.wqkv, row0: qd }],
      ["wv", { M: L.wqkv, row0: qd + kvd }],
      ["wo", { M: L.wo, row0: 0 }],
      ["w1", { M: L.w13, row0: 0 }],
      ["w3", { M: L.w13, row0: config.hiddenDim }],
      ["w2", { M: L.w2, row0: 0 }],
    ]);
  }

  /** Buffers for one block of `config` and sequences of up to `seqLen` tokens. */
  static create(gpu: Gpu, config: ModelConfig, seqLen: number): BlockRunner {
    const c = config, qd = c.nHeads * c.headDim, kvd = c.nKvHeads * c.headDim;
    const maxT = Math.min(seqLen, MAX_ROWS);
    // float32 throughout: the calibration inputs are captured with an f32 KV cache
    const state = createRunState(gpu, { ...c, nLayers: 1 }, seqLen, maxT, 1, "f32");
    const vec = (label: string, n: number) =>
      gpu.buffer(label, n * 4, STORAGE | GPUBufferUsage.COPY_DST);
    const layer: LayerWeights = {
      attnNorm: vec("attn_norm", c.dim),
      wqkv: allocDense(gpu, "wqkv", qd + 2 * kvd, c.dim, "f32"),
      bqkv: c.qkvBias ? vec("bqkv", qd + 2 * kvd) : null,
      wo: allocDense(gpu, "wo", c.dim, qd, "f32"),
      ffnNorm: vec("ffn_norm", c.dim),
      w13: allocDense(gpu, "w13", 2 * c.hiddenDim, c.dim, "f32"),
      w2: allocDense(gpu, "w2", c.dim, c.hiddenDim, "f32"),
    };
    return new BlockRunner(gpu, config, state, layer);
  }

  /** Loads block `l`'s float weights from the checkpoint. */
  async loadLayer(ckpt: Checkpoint, l: number): Promise<void> {
    const vec = async (buf: GPUBuffer, names: string[]) => {
      let off = 0;
      for (const n of names) {
        const v = await ckpt.read(n);
        this.gpu.write(buf, off, v);
        off += v.byteLength;
      }
    };
    await vec(this.layer.attnNorm, [T.attnNorm(l)]);
    await vec(this.layer.ffnNorm, [T.ffnNorm(l)]);
    if (this.layer.bqkv) await vec(this.layer.bqkv, [T.bq(l), T.bk(l), T.bv(l)]);
    for (const key of this.linears.keys()) this.setLinear(key, await ckpt.read(linearName(key, l)));
  }

  /** Replaces linear `key` (wq, wk, wv, wo, w1, w3, w2) by `W` (rows, K) float32. */
  setLinear(key: string, W: Float32Array): void {
    const { M, row0 } = this.linears.get(key)!;
    writeDenseRows(this.gpu, M, row0, W);
  }

  /** Replaces the attention or FFN RMSNorm weight. */
  setNorm(which: "attn" | "ffn", g: Float32Array): void {
    this.gpu.write(which === "attn" ? this.layer.attnNorm : this.layer.ffnNorm, 0, g);
  }

  /**
   * Runs each sequence (its block input x, (T, dim)) through the first `capture.stages` stages
   * and returns the captured buffer, (T, width), per sequence. A sequence runs in steps of at
   * most `state.maxT` (≤ MAX_ROWS) tokens, each step's tokens attending to the KV rows the
   * earlier steps wrote.
   */
  async run(inputs: Float32Array[], capture: Capture): Promise<Float32Array[]> {
    const { device } = this.gpu;
    const src = this.state[capture.buffer];
    const list = this.stages.slice(0, capture.stages).flat();
    const dim = this.config.dim, maxT = this.state.maxT;
    const width = capture.buffer === "h"
      ? this.config.hiddenDim
      : capture.buffer === "att"
      ? this.config.nHeads * this.config.headDim
      : dim;
    const reads = inputs.map((x) => {
      const T = x.length / dim;
      const staging = device.createBuffer({
        size: T * width * 4,
        usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
      });
      for (let p = 0; p < T; p += maxT) {
        const n = Math.min(maxT, T - p);
        this.gpu.write(this.state.x, 0, x.subarray(p * dim, (p + n) * dim));
        device.queue.writeBuffer(
          this.state.step,
          0,
          packStep({ pos: p, ntok: n, seed: 0, topK: 0, temperature: 0, topP: 1 }),
        );
        const enc = device.createCommandEncoder();
        const pass = enc.beginComputePass();
        encodeDispatches(pass, list, n);
        pass.end();
        enc.copyBufferToBuffer(src, 0, staging, p * width * 4, n * width * 4);
        device.queue.submit([enc.finish()]);
      }
      return staging;
    });
    const out: Float32Array[] = [];
    for (const staging of reads) {
      await staging.mapAsync(GPUMapMode.READ);
      out.push(new Float32Array(staging.getMappedRange().slice(0)));
      staging.destroy();
    }
    return out;
  }
}

/** The canonical tensor name of linear `key` in layer `l`. */
export function linearName(key: string, l: number): string {
  const f = { wq: T.wq, wk: T.wk, wv: T.wv, wo: T.wo, w1: T.w1, w3: T.w3, w2: T.w2 }[key];
  if (!f) throw new Error(`unknown linear ${key}`);
  return f(l);
}
