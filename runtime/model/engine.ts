/**
 * The serving engine: accepts generation jobs and runs them on one GPU model with continuous
 * batching. Up to `slots` jobs run at once, each in a slot of one model with that many slots
 * (`GpuModel.withSlots`: a KV cache region and token buffer per slot, the weights shared).
 * Between decode steps the scheduler admits waiting jobs into free slots (a prefill, which
 * samples the job's first token), then submits `batch` batched steps (each a single submit: one
 * pass over the weights for every running job, `decodeBatch`, or the one-token decode when one
 * job runs) and one copy of all their new tokens into a mappable buffer. Up to `inflight` such read-backs
 * run ahead of the host; each job's tokens are handed to its consumer as they arrive. A job leaves
 * its slot when it is done (stop id, max tokens, context end), when its consumer stops reading
 * or when its AbortSignal fires; steps already in flight for it are discarded. The GPU queue runs
 * in submission order, so a freed slot is reused at once.
 *
 * The sampled token never leaves the GPU between one job's steps (as in generate.ts), and each
 * row of a batched step depends only on its own sequence, so a job gives the same tokens whatever
 * runs beside it (greedy and sampled: the sampler's random numbers depend on seed and position
 * only).
 *
 * Shutdown: `drain()` refuses new jobs (EngineDrainingError) and resolves once every queued and
 * running job has finished; `abortAll()` ends them all at once with finish reason "abort".
 */
import type { GpuModel, SamplingParams } from "./model.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import type { GenerateStats } from "./generate.ts";
import { ParameterError } from "../errors.ts";
import { validateSamplingParams } from "./sampling.ts";

export interface Job {
  prompt: number[];
  maxTokens: number;
  sampling: SamplingParams;
  stopIds: number[];
  /** Aborting removes the job (queued or running) at the next step. */
  signal?: AbortSignal;
}

/** Why a job ended: a stop id, its length, or `abortAll` ("abort"). */
export type FinishReason = GenerateStats["finishReason"] | "abort";

/** What `submit` returns when a job ends. */
export interface JobStats extends Omit<GenerateStats, "finishReason"> {
  finishReason: FinishReason;
}

/** Thrown by `submit` once `drain()` was called; the server answers 503. */
export class EngineDrainingError extends Error {
  constructor() {
    super("the server is shutting down and accepts no new requests");
    this.name = "EngineDrainingError";
  }
}

/** Thrown by `submit` when the queue is full; the server answers 429. */
export class QueueFullError extends Error {
  constructor(readonly depth: number) {
    super(`the request queue is full (${depth} waiting); retry later`);
    this.name = "QueueFullError";
  }
}

export interface EngineOptions {
  /**
   * Jobs allowed to wait for a slot (default 64), besides those about to take a free slot: a
   * burst of `maxQueue + slots` jobs is admitted whole.
   */
  maxQueue?: number;
  /** Jobs running at once (default 8); each slot holds a KV cache of the model's context. */
  slots?: number;
  /** Batched decode steps per read-back of the new tokens (default 8, as `generate`). */
  batch?: number;
  /**
   * Read-backs in flight (default 3): up to batch × inflight steps run ahead of the host, which
   * is also how long a joining job's prefill may wait behind them.
   */
  inflight?: number;
  /** Called once per batched decode step with the ids of the jobs in it (for logs and tests). */
  onStep?: (jobIds: number[]) => void;
}

/** A submitted job as the scheduler sees it. */
interface Live {
  id: number;
  job: Job;
  maxNew: number;
  stop: Set<number>;
  pos: number; // next decode position
  scheduled: number; // tokens sampled or being sampled
  generated: number;
  /** Finished or abandoned: tokens still in flight for it are dropped. */
  done: boolean;
  finishReason: FinishReason;
  error: unknown;
  out: number[]; // tokens not yet taken by the consumer
  wake: (() => void) | null;
  onAbort: () => void;
  t0: number;
  tFirst: number;
  tEnd: number;
}

interface Slot {
  index: number;
  live: Live | null;
}

/** Tokens [from, from + count) of a job's token buffer, read back at `offset` in a staging buffer. */
interface Part {
  live: Live;
  slot: Slot;
  from: number;
  count: number;
  offset: number;
}

/** Steps (or a prefill) submitted with one read-back of their new tokens. */
interface Flight {
  parts: Part[];
  staging: GPUBuffer;
  done: Promise<void>;
}

export class Engine {
  private nextId = 1;
  private readonly queue: Live[] = [];
  private readonly slots: Slot[] = [];
  private readonly flights: Flight[] = [];
  private readonly pool: GPUBuffer[] = [];
  private looping = false;
  private closed = false;
  /** Resolved when the scheduler stops (nothing queued, running or in flight). */
  private idleWaiters: (() => void)[] = [];
  /** The model the jobs run in: `model`, or a copy of it with `slots` slots. */
  private readonly batched: GpuModel;

  constructor(
    readonly model: GpuModel,
    readonly tokenizer: Tokenizer,
    readonly modelId: string,
    readonly options: EngineOptions = {},
  ) {
    const n = options.slots ?? 8;
    if (!Number.isInteger(n) || n < 1) throw new ParameterError(`slots must be >= 1; got ${n}`);
    this.batched = model.slots >= n ? model : model.withSlots(n);
    for (let index = 0; index < n; index++) this.slots.push({ index, live: null });
  }

  get contextLength(): number {
    return this.model.ctx;
  }

  /** Jobs waiting for a slot. */
  get queueDepth(): number {
    return this.queue.filter((l) => !l.done).length;
  }

  /** Jobs holding a slot. */
  get running(): number {
    return this.slots.filter((s) => s.live).length;
  }

  /** Whether `drain()` was called: new jobs are refused. */
  get draining(): boolean {
    return this.closed;
  }

  /**
   * Refuses new jobs from now on (`submit` throws EngineDrainingError) and resolves when every
   * queued and running job has ended (at once when none is left).
   */
  drain(): Promise<void> {
    this.closed = true;
    if (!this.looping) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /**
   * Ends every queued and running job now with finish reason "abort": each consumer gets the
   * tokens already delivered to it, then the end. Returns how many jobs it ended.
   */
  abortAll(): number {
    const live = [...this.queue, ...this.slots.map((s) => s.live)].filter((l) => l && !l.done);
    for (const l of live) this.finish(l!, "abort");
    return live.length;
  }

  /**
   * Queues a job; yields its generated ids as they are produced and returns its stats. Throws
   * QueueFullError at once when the queue is full, ParameterError for a job that cannot run.
   * Stop ids are not yielded.
   */
  async *submit(job: Job): AsyncGenerator<number, JobStats> {
    const live = this.admit(job);
    try {
      while (true) {
        if (live.out.length) {
          yield live.out.shift()!;
          continue;
        }
        if (live.error !== null) throw live.error;
        if (live.done) break;
        await new Promise<void>((r) => (live.wake = r));
        live.wake = null;
      }
    } finally {
      // a consumer that stops reading abandons the job: its slot is freed at the next step
      this.finish(live, live.finishReason);
      job.signal?.removeEventListener("abort", live.onAbort);
    }
    return {
      promptTokens: job.prompt.length,
      generatedTokens: live.generated,
      ttftMs: live.tFirst ? live.tFirst - live.t0 : 0,
      decodeMs: live.tFirst ? live.tEnd - live.tFirst : 0,
      finishReason: live.finishReason,
    };
  }

  /**
   * Validates and queues a job (synchronously, so that errors reach the caller's first next).
   * The queue bound counts only jobs that will wait: those beyond the free slots.
   */
  private admit(job: Job): Live {
    const n = job.prompt.length, ctx = this.model.ctx, V = this.model.config.vocabSize;
    if (n === 0) throw new ParameterError("the prompt must hold at least one token");
    if (n >= ctx) {
      throw new ParameterError(`the prompt has ${n} tokens; the context length is ${ctx}`);
    }
    if (!Number.isInteger(job.maxTokens) || job.maxTokens < 1) {
      throw new ParameterError(`max tokens must be a positive integer; got ${job.maxTokens}`);
    }
    const bad = job.prompt.find((t) => !Number.isInteger(t) || t < 0 || t >= V);
    if (bad !== undefined) {
      throw new ParameterError(`token id ${bad} is outside the vocabulary [0, ${V})`);
    }
    validateSamplingParams(job.sampling, V); // here, not in a step that other jobs share
    if (this.closed) throw new EngineDrainingError();
    const free = this.slots.filter((s) => !s.live || s.live.done).length;
    const waiting = Math.max(0, this.queueDepth - free);
    if (waiting >= (this.options.maxQueue ?? 64)) throw new QueueFullError(waiting);
    const live: Live = {
      id: this.nextId++,
      job,
      maxNew: Math.min(job.maxTokens, ctx - n),
      stop: new Set(job.stopIds),
      pos: n,
      scheduled: 0,
      generated: 0,
      done: false,
      finishReason: "length",
      error: null,
      out: [],
      wake: null,
      onAbort: () => {
        live.out.length = 0;
        this.finish(live, "stop");
      },
      t0: 0,
      tFirst: 0,
      tEnd: 0,
    };
    // an abort ends the job's stream at once; the scheduler frees its slot at the next step
    job.signal?.addEventListener("abort", live.onAbort, { once: true });
    if (job.signal?.aborted) this.finish(live, "stop");
    this.queue.push(live);
    if (!this.looping) {
      this.looping = true;
      void this.run();
    }
    return live;
  }

  private finish(live: Live, reason: FinishReason, error: unknown = null) {
    if (live.done) return;
    live.done = true;
    live.finishReason = reason;
    live.error = error;
    live.tEnd = performance.now();
    live.wake?.();
  }

  /** Hands token `id` to its job; finishes the job on a stop id or at its last token. */
  private deliver(live: Live, id: number) {
    if (live.done) return;
    const now = performance.now();
    if (live.generated === 0 && !live.tFirst) live.tFirst = now;
    if (live.stop.has(id)) return this.finish(live, "stop");
    live.generated++;
    live.out.push(id);
    if (live.generated === live.maxNew) this.finish(live, "length");
    else live.wake?.();
  }

  private staging(bytes: number): GPUBuffer {
    const i = this.pool.findIndex((b) => b.size >= bytes);
    if (i >= 0) return this.pool.splice(i, 1)[0];
    const size = Math.max(bytes, (this.options.slots ?? 8) * (this.options.batch ?? 8) * 4);
    return this.model.gpu.device.createBuffer({
      size,
      usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
    });
  }

  /** A free slot. */
  private freeSlot(): Slot | null {
    return this.slots.find((s) => !s.live) ?? null;
  }

  /** Where token `pos` of `slot` is in the token buffer, in bytes. */
  private tokenOffset(slot: Slot, pos: number): number {
    return (slot.index * (this.batched.ctx + 1) + pos) * 4;
  }

  /** Prefills a job in `slot`; its first token comes back as a flight of its own. */
  private start(slot: Slot, live: Live) {
    const model = this.batched;
    slot.live = live;
    live.t0 = performance.now();
    model.writeTokens(0, live.job.prompt, slot.index);
    const staging = this.staging(4);
    const n = live.job.prompt.length;
    model.prefill(0, n, live.job.sampling, (enc) => {
      enc.copyBufferToBuffer(model.state.tokens, this.tokenOffset(slot, n), staging, 0, 4);
    }, slot.index);
    live.scheduled = 1;
    const part = { live, slot, from: n, count: 1, offset: 0 };
    this.flights.push({ parts: [part], staging, done: staging.mapAsync(GPUMapMode.READ) });
  }

  /**
   * Up to `k` batched decode steps over the jobs in `batch` (a job drops out at its last token),
   * each step a submit of its own (the step uniform is written between them), then one copy of
   * every job's new tokens into a staging buffer.
   */
  private decodeSteps(batch: Slot[], k: number) {
    const model = this.batched, device = model.gpu.device, maxT = model.state.maxT;
    const parts: Part[] = batch.map((slot) => {
      const live = slot.live!;
      return { live, slot, from: live.pos + 1, count: 0, offset: 0 };
    });
    for (let j = 0; j < k; j++) {
      const active = parts.filter((p) => p.live.scheduled < p.live.maxNew);
      if (!active.length) break;
      this.options.onStep?.(active.map((p) => p.live.id));
      if (active.length === 1) {
        const p = active[0];
        model.decode(p.live.pos, p.live.job.sampling, undefined, p.slot.index);
      } else {
        for (let i = 0; i < active.length; i += maxT) {
          model.decodeBatch(
            active.slice(i, i + maxT).map((p) => ({
              slot: p.slot.index,
              pos: p.live.pos,
              sampling: p.live.job.sampling,
            })),
          );
        }
      }
      for (const p of active) {
        p.live.pos++;
        p.live.scheduled++;
        p.count++;
      }
    }
    let offset = 0;
    for (const p of parts) {
      p.offset = offset;
      offset += p.count * 4;
    }
    const staging = this.staging(offset);
    const enc = device.createCommandEncoder();
    for (const p of parts) {
      const from = this.tokenOffset(p.slot, p.from);
      enc.copyBufferToBuffer(model.state.tokens, from, staging, p.offset, p.count * 4);
    }
    device.queue.submit([enc.finish()]);
    this.flights.push({ parts, staging, done: staging.mapAsync(GPUMapMode.READ) });
  }

  /**
   * The scheduler: runs while there are jobs queued, running or in flight (`looping`, cleared in
   * the same turn as the check that finds nothing left).
   */
  private async run(): Promise<void> {
    const inflight = this.options.inflight ?? 3, batch = this.options.batch ?? 8;
    try {
      while (true) {
        // leave: finished and abandoned jobs free their slots; aborted waiting jobs leave the queue
        for (const s of this.slots) if (s.live?.done) s.live = null;
        for (let i = this.queue.length - 1; i >= 0; i--) {
          if (this.queue[i].done) this.queue.splice(i, 1);
        }
        // join: waiting jobs take free slots
        while (this.queue.length) {
          const slot = this.freeSlot();
          if (!slot) break;
          this.start(slot, this.queue.shift()!);
        }
        const ready = this.slots.filter((s) => s.live && s.live.scheduled < s.live.maxNew);
        if (ready.length && this.flights.length < inflight) {
          this.decodeSteps(ready, batch);
          continue;
        }
        const f = this.flights.shift();
        if (!f) {
          if (this.queue.length === 0 && this.slots.every((s) => !s.live)) {
            this.looping = false; // in the same turn as the check: a later submit restarts it
            this.idle();
            return;
          }
          // running jobs with nothing scheduled and nothing in flight cannot happen; be safe
          throw new Error("engine: running jobs but nothing in flight");
        }
        await f.done;
        const ids = new Uint32Array(f.staging.getMappedRange().slice(0));
        f.staging.unmap();
        this.pool.push(f.staging);
        for (const p of f.parts) {
          for (let i = 0; i < p.count; i++) this.deliver(p.live, ids[p.offset / 4 + i]);
        }
      }
    } catch (e) {
      // a failed step fails every job it could have touched
      for (const s of this.slots) {
        if (s.live) this.finish(s.live, "stop", e);
        s.live = null;
      }
      for (const l of this.queue) this.finish(l, "stop", e);
      this.queue.length = 0;
      for (const f of this.flights) f.done.then(() => f.staging.destroy(), () => {});
      this.flights.length = 0;
      this.looping = false;
      this.idle();
    }
  }

  /** Wakes the callers of `drain()`. */
  private idle() {
    for (const r of this.idleWaiters.splice(0)) r();
  }
}
