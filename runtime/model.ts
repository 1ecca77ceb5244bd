/**
 * A model on the GPU: weights, run state and the forward plan, with the primitives generation,
 * evaluation and tests build on. Everything is submitted without waiting; only the explicit
 * read-back helpers wait on the GPU.
 */
import type { Checkpoint } from "./checkpoint.ts";
import type { ModelConfig } from "./config.ts";
import { ParameterError } from "./errors.ts";
import type { SamplingParams as HostSamplingParams } from "./sampling.ts";
import { type GpuWeights, uploadWeights, type WeightDType } from "./gpu_weights.ts";
import { createRunState, type RunState } from "./run_state.ts";
import {
  buildAllLogits,
  buildForward,
  type Dispatch,
  encodeDispatches,
  type ForwardPlan,
} from "./forward.ts";
import { type Gpu } from "../kernels/gpu.ts";
import { MAX_ROWS, packStep, type StepParams } from "../kernels/common.ts";

/** Host sampling parameters plus the seed of the GPU sampler's random numbers. */
export type SamplingParams = HostSamplingParams & { seed: number };

export const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, seed: 0 };

export interface LoadOptions {
  dtype?: WeightDType | "auto";
  /** KV cache length (default: the model's context, at most 2048). */
  ctx?: number;
  /** Tokens per prefill step (default 128, at most MAX_ROWS). */
  maxT?: number;
  onProgress?: (bytes: number, total: number) => void;
}

export class GpuModel {
  readonly plan: ForwardPlan;
  private allLogits: { buffer: GPUBuffer; plan: Dispatch[] } | null = null;

  private constructor(
    readonly gpu: Gpu,
    readonly config: ModelConfig,
    readonly weights: GpuWeights,
    readonly state: RunState,
  ) {
    this.plan = buildForward(gpu, config, weights, state);
  }

  static async load(gpu: Gpu, ckpt: Checkpoint, opts: LoadOptions = {}): Promise<GpuModel> {
    const c = ckpt.config;
    const ctx = opts.ctx ?? Math.min(c.seqLen, 2048);
    if (!Number.isInteger(ctx) || ctx < 2 || ctx > c.seqLen) {
      throw new ParameterError(`ctx must be an integer in [2, ${c.seqLen}]; got ${ctx}`);
    }
    const maxT = opts.maxT ?? 128;
    if (!Number.isInteger(maxT) || maxT < 1 || maxT > MAX_ROWS) {
      throw new ParameterError(`maxT must be an integer in [1, ${MAX_ROWS}]; got ${maxT}`);
    }
    let dtype = opts.dtype ?? "auto";
    if (dtype === "auto") {
      const t = ckpt.tensors.values().next().value;
      dtype = t?.dtype === "F32" ? "f32" : "f16";
    }
    const weights = await uploadWeights(gpu, ckpt, dtype, opts.onProgress);
    const state = createRunState(gpu, c, ctx, maxT);
    return new GpuModel(gpu, c, weights, state);
  }

  get ctx(): number {
    return this.state.ctx;
  }

  /** Writes token ids into the GPU token buffer from position `pos`. */
  writeTokens(pos: number, ids: number[]): void {
    const bad = ids.find((t) => !Number.isInteger(t) || t < 0 || t >= this.config.vocabSize);
    if (bad !== undefined) {
      throw new ParameterError(
        `token id ${bad} is outside the vocabulary [0, ${this.config.vocabSize})`,
      );
    }
    this.gpu.device.queue.writeBuffer(this.state.tokens, pos * 4, new Uint32Array(ids));
  }

  private writeStep(pos: number, ntok: number, s: SamplingParams): void {
    const step: StepParams = { pos, ntok, ...s };
    this.gpu.device.queue.writeBuffer(this.state.step, 0, packStep(step));
  }

  /**
   * Runs the tokens already written at [pos, pos + n) through the model in steps of maxT; when
   * `sampling` is given, samples the next token into tokens[pos + n]. Returns the command
   * buffers' submission (no wait). `extra` is encoded after the last step (e.g. a read-back copy).
   */
  prefill(
    pos: number,
    n: number,
    sampling: SamplingParams | null,
    extra?: (e: GPUCommandEncoder) => void,
  ) {
    if (pos + n > this.ctx) {
      throw new ParameterError(
        `prompt of ${n} tokens at position ${pos} exceeds the context of ${this.ctx}`,
      );
    }
    const { device } = this.gpu;
    for (let p = pos; p < pos + n; p += this.state.maxT) {
      const t = Math.min(this.state.maxT, pos + n - p);
      const last = p + t === pos + n;
      this.writeStep(p, t, sampling ?? GREEDY);
      const enc = device.createCommandEncoder();
      let pass = enc.beginComputePass();
      encodeDispatches(pass, this.plan.prefill, t);
      pass.end();
      if (last && sampling) {
        const dim = this.config.dim;
        enc.copyBufferToBuffer(this.state.x, (t - 1) * dim * 4, this.state.xlast, 0, dim * 4);
        pass = enc.beginComputePass();
        encodeDispatches(pass, this.plan.prefillHead, 1);
        pass.end();
      }
      if (last && extra) extra(enc);
      device.queue.submit([enc.finish()]);
    }
  }

  /** One decode step at `pos`: embeds tokens[pos], samples tokens[pos + 1]. No wait. */
  decode(pos: number, sampling: SamplingParams, extra?: (e: GPUCommandEncoder) => void): void {
    const enc = this.gpu.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    this.encodeDecode(pass, pos, sampling);
    pass.end();
    extra?.(enc);
    this.gpu.device.queue.submit([enc.finish()]);
  }

  /**
   * Writes the step uniform (queued before the next submit) and encodes one decode step at `pos`
   * into `pass`: the building block of a batched step over several sequences (see `fork`).
   */
  encodeDecode(pass: GPUComputePassEncoder, pos: number, sampling: SamplingParams): void {
    if (pos >= this.ctx) {
      throw new ParameterError(`position ${pos} is past the context of ${this.ctx}`);
    }
    this.writeStep(pos, 1, sampling);
    encodeDispatches(pass, this.plan.decode, 1);
  }

  /**
   * A model sharing these weights (and pipelines) with its own run state: KV cache, activations,
   * token buffer and step uniform. The engine runs one sequence per fork.
   */
  fork(): GpuModel {
    const state = createRunState(this.gpu, this.config, this.ctx, this.state.maxT);
    return new GpuModel(this.gpu, this.config, this.weights, state);
  }

  /** Copies `bytes` from `src` and waits for them (tests, evaluation: not for hot loops). */
  async read(src: GPUBuffer, offset: number, bytes: number): Promise<ArrayBuffer> {
    const { device } = this.gpu;
    const staging = device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
    });
    const enc = device.createCommandEncoder();
    enc.copyBufferToBuffer(src, offset, staging, 0, bytes);
    device.queue.submit([enc.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const out = staging.getMappedRange().slice(0);
    staging.destroy();
    return out;
  }

  /** The logits of the last decode or sampled prefill step. */
  async readLogits(): Promise<Float32Array> {
    return new Float32Array(await this.read(this.state.logits, 0, this.config.vocabSize * 4));
  }

  /** Token ids [from, to) of the token buffer. */
  async readTokens(from: number, to: number): Promise<number[]> {
    return [...new Uint32Array(await this.read(this.state.tokens, from * 4, (to - from) * 4))];
  }

  /**
   * Runs `ids` from position `pos` and returns the logits at every one of them,
   * (ids.length, vocab). Used by tests and perplexity evaluation.
   */
  async logitsAt(pos: number, ids: number[]): Promise<Float32Array> {
    const V = this.config.vocabSize, maxT = this.state.maxT;
    if (!this.allLogits) {
      const buffer = this.gpu.buffer(
        "logits_all",
        maxT * V * 4,
        GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC,
      );
      this.allLogits = {
        buffer,
        plan: buildAllLogits(this.gpu, this.config, this.weights, this.state, buffer),
      };
    }
    this.writeTokens(pos, ids);
    const out = new Float32Array(ids.length * V);
    for (let i = 0; i < ids.length; i += maxT) {
      const t = Math.min(maxT, ids.length - i);
      this.prefill(pos + i, t, null);
      this.writeStep(pos + i, t, GREEDY);
      const enc = this.gpu.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      encodeDispatches(pass, this.allLogits.plan, t);
      pass.end();
      this.gpu.device.queue.submit([enc.finish()]);
      out.set(new Float32Array(await this.read(this.allLogits.buffer, 0, t * V * 4)), i * V);
    }
    return out;
  }
}
