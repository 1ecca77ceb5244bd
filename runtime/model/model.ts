/**
 * A model on the GPU: weights, run state and the forward plan, with the primitives generation,
 * evaluation and tests build on. Everything is submitted without waiting; only the explicit
 * read-back helpers wait on the GPU.
 */
import type { Checkpoint } from "../checkpoint/checkpoint.ts";
import type { ModelConfig } from "../checkpoint/config.ts";
import { ParameterError } from "../errors.ts";
import {
  adjustsLogits,
  type SamplingParams as HostSamplingParams,
  validateSamplingParams,
} from "./sampling.ts";
import { autoDType, type GpuWeights, uploadWeights, type WeightDType } from "./gpu_weights.ts";
import { checkKvType, createRunState, type RunState } from "./run_state.ts";
import {
  buildAllLogits,
  buildDecodeRows,
  buildForward,
  buildRowSampler,
  decodeRowPlans,
  type Dispatch,
  encodeDispatches,
  type ForwardPlan,
} from "./forward.ts";
import { type Gpu } from "../../kernels/gpu.ts";
import { autoTune } from "./tune_plan.ts";
import type { KvType } from "../../kernels/epilogue.ts";
import { MAX_ROWS, packStep, type StepParams, type StepRow } from "../../kernels/common.ts";
import { packSamplerConfig } from "../../kernels/penalties.ts";

/** Host sampling parameters plus the seed of the GPU sampler's random numbers. */
export type SamplingParams = HostSamplingParams & { seed: number };

export const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, seed: 0 };

export interface LoadOptions {
  dtype?: WeightDType | "auto";
  /** KV cache length (default: the model's context, at most 2048). */
  ctx?: number;
  /** Tokens per prefill step (default 128, at most MAX_ROWS). */
  maxT?: number;
  /**
   * Sequences held at once (default 1): each slot has a KV cache of `ctx` rows and a token
   * buffer of its own; `decodeBatch` steps several of them in one pass over the weights.
   */
  slots?: number;
  /**
   * KV cache element type (kernels/epilogue.ts KvType; default: f16 where the adapter has
   * shader-f16, else f32 — run_state.ts defaultKvType). Forks and withSlots keep it.
   */
  kvType?: KvType;
  onProgress?: (bytes: number, total: number) => void;
}

/** One sequence of a batched decode step: embeds its tokens[pos], samples tokens[pos + 1]. */
export interface BatchRow {
  slot: number;
  pos: number;
  sampling: SamplingParams;
}

export class GpuModel {
  readonly plan: ForwardPlan;
  private allLogits: {
    buffer: GPUBuffer;
    plan: Dispatch[];
    sampleRows: Dispatch;
    adjustRows: Dispatch;
  } | null = null;
  /** The sampling parameters each slot's sampler config was last written from. */
  private readonly slotSampling: (SamplingParams | undefined)[] = [];
  /** decodeBatch's layers and logits by decodeRowPlans row count (built on first use). */
  private readonly rowsPlans = new Map<number, Dispatch[]>();

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
    if (dtype === "auto") dtype = autoDType(ckpt);
    const slots = opts.slots ?? 1;
    if (!Number.isInteger(slots) || slots < 1) {
      throw new ParameterError(`slots must be a positive integer; got ${slots}`);
    }
    if (opts.kvType !== undefined) checkKvType(opts.kvType, "kvType");
    return await gpu.validated("loading the model", async () => {
      const weights = await uploadWeights(gpu, ckpt, dtype, opts.onProgress);
      // first run on a GPU: tune its kernels (tune_plan.ts)
      await autoTune(gpu, c, weights, { kvType: opts.kvType });
      const state = createRunState(gpu, c, ctx, maxT, slots, opts.kvType);
      return new GpuModel(gpu, c, weights, state);
    });
  }

  get ctx(): number {
    return this.state.ctx;
  }

  get slots(): number {
    return this.state.slots;
  }

  /** The first token-buffer entry of `slot`. */
  private tokenBase(slot: number): number {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.slots) {
      throw new ParameterError(`slot must be an integer in [0, ${this.slots}); got ${slot}`);
    }
    return slot * (this.ctx + 1);
  }

  /** Writes token ids into the GPU token buffer of `slot` from position `pos`. */
  writeTokens(pos: number, ids: number[], slot = 0): void {
    const bad = ids.find((t) => !Number.isInteger(t) || t < 0 || t >= this.config.vocabSize);
    if (bad !== undefined) {
      throw new ParameterError(
        `token id ${bad} is outside the vocabulary [0, ${this.config.vocabSize})`,
      );
    }
    const at = (this.tokenBase(slot) + pos) * 4;
    this.gpu.device.queue.writeBuffer(this.state.tokens, at, new Uint32Array(ids));
  }

  private writeStep(
    pos: number,
    ntok: number,
    s: SamplingParams,
    slot = 0,
    rows?: StepRow[],
  ): void {
    if (!rows && slot !== 0) {
      const kvBase = slot * this.ctx, tokenBase = this.tokenBase(slot);
      rows = Array.from({ length: ntok }, (_, t) => ({ pos: pos + t, kvBase, tokenBase, slot }));
    }
    const step: StepParams = { pos, ntok, ...s, rows };
    this.gpu.device.queue.writeBuffer(this.state.step, 0, packStep(step));
  }

  /**
   * Writes `slot`'s sampler config (logit bias, penalties, min-p) from `s` unless it was last
   * written from this very object (queued before the next submit, like the step uniform).
   */
  private useSampling(slot: number, s: SamplingParams): void {
    if (this.slotSampling[slot] === s) return;
    validateSamplingParams(s, this.config.vocabSize);
    const cfg = packSamplerConfig({
      logitBias: [...(s.logitBias ?? [])],
      presencePenalty: s.presencePenalty ?? 0,
      frequencyPenalty: s.frequencyPenalty ?? 0,
      repetitionPenalty: s.repetitionPenalty ?? 1,
      minP: s.minP ?? 0,
    });
    this.gpu.device.queue.writeBuffer(this.state.scfg, slot * cfg.byteLength, cfg);
    this.slotSampling[slot] = s;
  }

  /**
   * Runs the tokens already written at [pos, pos + n) through the model in steps of maxT; when
   * `sampling` is given, samples the next token into tokens[pos + n], and the sequence's
   * sampling history (what its penalties see) restarts: tokens [0, pos + n) are its prompt.
   * Returns the command buffers' submission (no wait). `extra` is encoded after the last step
   * (e.g. a read-back copy). `slot` picks the sequence (KV cache and token buffer) it runs in.
   */
  prefill(
    pos: number,
    n: number,
    sampling: SamplingParams | null,
    extra?: (e: GPUCommandEncoder) => void,
    slot = 0,
  ) {
    if (pos + n > this.ctx) {
      throw new ParameterError(
        `prompt of ${n} tokens at position ${pos} exceeds the context of ${this.ctx}`,
      );
    }
    const { device } = this.gpu;
    this.tokenBase(slot);
    if (sampling) this.useSampling(slot, sampling);
    for (let p = pos; p < pos + n; p += this.state.maxT) {
      const t = Math.min(this.state.maxT, pos + n - p);
      const last = p + t === pos + n;
      this.writeStep(p, t, sampling ?? GREEDY, slot);
      const enc = device.createCommandEncoder();
      let pass = enc.beginComputePass();
      encodeDispatches(pass, this.plan.prefill, t);
      pass.end();
      if (last && sampling) {
        const dim = this.config.dim;
        enc.copyBufferToBuffer(this.state.x, (t - 1) * dim * 4, this.state.xlast, 0, dim * 4);
        pass = enc.beginComputePass();
        encodeDispatches(pass, [this.plan.history], 1);
        const head = adjustsLogits(sampling)
          ? this.plan.prefillHeadAdjusted
          : this.plan.prefillHead;
        encodeDispatches(pass, head, 1);
        pass.end();
      }
      if (last && extra) extra(enc);
      device.queue.submit([enc.finish()]);
    }
  }

  /** One decode step at `pos`: embeds tokens[pos], samples tokens[pos + 1]. No wait. */
  decode(
    pos: number,
    sampling: SamplingParams,
    extra?: (e: GPUCommandEncoder) => void,
    slot = 0,
  ): void {
    const enc = this.gpu.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    this.encodeDecode(pass, pos, sampling, slot);
    pass.end();
    extra?.(enc);
    this.gpu.device.queue.submit([enc.finish()]);
  }

  /**
   * Writes the step uniform (queued before the next submit) and encodes one decode step at `pos`
   * into `pass`: the building block of a batched step over several sequences (see `fork`).
   */
  encodeDecode(
    pass: GPUComputePassEncoder,
    pos: number,
    sampling: SamplingParams,
    slot = 0,
  ): void {
    if (pos >= this.ctx) {
      throw new ParameterError(`position ${pos} is past the context of ${this.ctx}`);
    }
    this.useSampling(slot, sampling);
    this.writeStep(pos, 1, sampling, slot);
    encodeDispatches(
      pass,
      adjustsLogits(sampling) ? this.plan.decodeAdjusted : this.plan.decode,
      1,
    );
  }

  /**
   * One decode step of several sequences in one pass over the weights (one submit, no wait):
   * row t embeds tokens[rows[t].pos] of its slot and samples the slot's tokens[pos + 1] with its
   * own sampling parameters: the layers (up to MAX_Q_BATCH rows: buildDecodeRows, each weight
   * read once; more: the prefill kernels), the logits of every row, then the per-row sampler. `extra` is
   * encoded after it (e.g. a read-back copy).
   */
  decodeBatch(rows: BatchRow[], extra?: (e: GPUCommandEncoder) => void): void {
    const B = rows.length;
    if (B < 1 || B > this.state.maxT) {
      throw new ParameterError(`a batch holds 1 to ${this.state.maxT} rows; got ${B}`);
    }
    const seen = new Set<number>();
    const stepRows: StepRow[] = rows.map((r) => {
      const tokenBase = this.tokenBase(r.slot);
      if (seen.has(r.slot)) throw new ParameterError(`slot ${r.slot} is twice in the batch`);
      seen.add(r.slot);
      if (!Number.isInteger(r.pos) || r.pos < 0 || r.pos >= this.ctx) {
        throw new ParameterError(`position ${r.pos} is past the context of ${this.ctx}`);
      }
      this.useSampling(r.slot, r.sampling);
      const kvBase = r.slot * this.ctx;
      return { pos: r.pos, kvBase, tokenBase, slot: r.slot, sampling: r.sampling };
    });
    const head = this.batchHead();
    this.writeStep(rows[0].pos, B, rows[B - 1].sampling, 0, stepRows);
    const enc = this.gpu.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    encodeDispatches(pass, this.batchPlan(B), B);
    if (rows.some((r) => adjustsLogits(r.sampling))) encodeDispatches(pass, [head.adjustRows], B);
    encodeDispatches(pass, [head.sampleRows], B);
    pass.end();
    extra?.(enc);
    this.gpu.device.queue.submit([enc.finish()]);
  }

  /**
   * The dispatches of a batched decode step of B rows up to the logits of every row: the
   * smallest batched decode plan of at least B rows (built on first use), else the prefill's and
   * the all-row logits.
   */
  batchPlan(B: number): Dispatch[] {
    const head = this.batchHead();
    const size = decodeRowPlans(this.gpu).find((n) => B <= n);
    if (size === undefined) return [...this.plan.prefill, ...head.plan];
    let plan = this.rowsPlans.get(size);
    if (!plan) {
      plan = buildDecodeRows(this.gpu, this.config, this.weights, this.state, size, head.buffer);
      this.rowsPlans.set(size, plan);
    }
    return plan;
  }

  /** The all-row logits buffer and plan, and the per-row sampler over it (built on first use). */
  private batchHead() {
    if (!this.allLogits) {
      const V = this.config.vocabSize;
      const buffer = this.gpu.buffer(
        "logits_all",
        this.state.maxT * V * 4,
        GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC,
      );
      const plan = buildAllLogits(this.gpu, this.config, this.weights, this.state, buffer);
      const rows = buildRowSampler(this.gpu, this.config, this.state, buffer);
      this.allLogits = { buffer, plan, sampleRows: rows.sample, adjustRows: rows.adjust };
    }
    return this.allLogits;
  }

  /**
   * A model sharing these weights (and pipelines) with its own run state: KV cache, activations,
   * token buffer and step uniform. The engine runs one sequence per fork.
   */
  fork(): GpuModel {
    const { maxT, kvType } = this.state;
    const state = createRunState(this.gpu, this.config, this.ctx, maxT, this.slots, kvType);
    return new GpuModel(this.gpu, this.config, this.weights, state);
  }

  /**
   * A model sharing these weights (and pipelines) with a run state of its own holding `slots`
   * sequences (the engine's batched decode).
   */
  withSlots(slots: number): GpuModel {
    if (!Number.isInteger(slots) || slots < 1) {
      throw new ParameterError(`slots must be a positive integer; got ${slots}`);
    }
    const { maxT, kvType } = this.state;
    const state = createRunState(this.gpu, this.config, this.ctx, maxT, slots, kvType);
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
    this.gpu.check("a forward pass");
    const out = staging.getMappedRange().slice(0);
    staging.destroy();
    return out;
  }

  /** The logits of the last decode or sampled prefill step. */
  async readLogits(): Promise<Float32Array> {
    return new Float32Array(await this.read(this.state.logits, 0, this.config.vocabSize * 4));
  }

  /** Token ids [from, to) of the token buffer of `slot`. */
  async readTokens(from: number, to: number, slot = 0): Promise<number[]> {
    const at = (this.tokenBase(slot) + from) * 4;
    return [...new Uint32Array(await this.read(this.state.tokens, at, (to - from) * 4))];
  }

  /**
   * Runs `ids` from position `pos` and returns the logits at every one of them,
   * (ids.length, vocab). Used by tests and perplexity evaluation.
   */
  async logitsAt(pos: number, ids: number[]): Promise<Float32Array> {
    const V = this.config.vocabSize, maxT = this.state.maxT;
    const head = this.batchHead();
    this.writeTokens(pos, ids);
    const out = new Float32Array(ids.length * V);
    for (let i = 0; i < ids.length; i += maxT) {
      const t = Math.min(maxT, ids.length - i);
      this.prefill(pos + i, t, null);
      this.writeStep(pos + i, t, GREEDY);
      const enc = this.gpu.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      encodeDispatches(pass, head.plan, t);
      pass.end();
      this.gpu.device.queue.submit([enc.finish()]);
      out.set(new Float32Array(await this.read(head.buffer, 0, t * V * 4)), i * V);
    }
    return out;
  }
}
