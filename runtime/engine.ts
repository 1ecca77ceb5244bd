/**
 * The serving engine: accepts generation jobs and runs them on one GPU model. This version runs
 * jobs one at a time in arrival order (a bounded queue in front); continuous batching replaces
 * the inside later without changing this interface.
 */
import type { GpuModel, SamplingParams } from "./model.ts";
import type { Tokenizer } from "./tokenizer.ts";
import { generate, type GenerateStats } from "./generate.ts";
import { ParameterError } from "./errors.ts";

export interface Job {
  prompt: number[];
  maxTokens: number;
  sampling: SamplingParams;
  stopIds: number[];
  /** Aborting removes the job (queued or running) at the next step. */
  signal?: AbortSignal;
}

/** Thrown by `submit` when the queue is full; the server answers 429. */
export class QueueFullError extends Error {
  constructor(readonly depth: number) {
    super(`the request queue is full (${depth} waiting); retry later`);
    this.name = "QueueFullError";
  }
}

export interface EngineOptions {
  /** Jobs allowed to wait (default 64). */
  maxQueue?: number;
  /** Called once per decode step with the ids of the jobs in it (for logs and tests). */
  onStep?: (jobIds: number[]) => void;
}

export class Engine {
  private running: Promise<void> = Promise.resolve();
  private waiting = 0;
  private nextId = 1;

  constructor(
    readonly model: GpuModel,
    readonly tokenizer: Tokenizer,
    readonly modelId: string,
    readonly options: EngineOptions = {},
  ) {}

  get contextLength(): number {
    return this.model.ctx;
  }

  /** Jobs waiting to start. */
  get queueDepth(): number {
    return this.waiting;
  }

  /**
   * Queues a job; yields its generated ids as they are produced and returns its stats. Throws
   * QueueFullError at once when the queue is full, ParameterError for a job that cannot run.
   */
  async *submit(job: Job): AsyncGenerator<number, GenerateStats> {
    if (job.prompt.length >= this.model.ctx) {
      throw new ParameterError(
        `the prompt has ${job.prompt.length} tokens; the context length is ${this.model.ctx}`,
      );
    }
    const max = this.options.maxQueue ?? 64;
    if (this.waiting >= max) throw new QueueFullError(this.waiting);
    const id = this.nextId++;
    this.waiting++;
    let release!: () => void;
    const prev = this.running;
    this.running = new Promise((r) => (release = r));
    try {
      await prev;
    } finally {
      this.waiting--;
    }
    try {
      const it = generate(this.model, job);
      while (true) {
        if (job.signal?.aborted) {
          await it.return(undefined as never);
          return {
            promptTokens: job.prompt.length,
            generatedTokens: 0,
            ttftMs: 0,
            decodeMs: 0,
            finishReason: "stop",
          };
        }
        this.options.onStep?.([id]);
        const r = await it.next();
        if (r.done) return r.value;
        yield r.value;
      }
    } finally {
      release();
    }
  }
}
