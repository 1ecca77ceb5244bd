/**
 * One generation behind an HTTP request: queues the job on the Engine, turns ids into text
 * (incremental detokenization, then stop strings), records metrics, and ends the job on every
 * path (finished, stop string, client gone, error).
 */
import type { Engine, FinishReason, JobStats } from "../model/engine.ts";
import type { SamplingParams } from "../model/model.ts";
import { StreamDecoder } from "../tokenizer/stream_decoder.ts";
import type { Metrics } from "./metrics.ts";
import { serverDraining } from "./errors.ts";
import { StopFilter } from "./stop.ts";

/** "stop", "length", or "abort": the server shut down before the job finished. */
export type { FinishReason };

export interface GenerationRequest {
  prompt: number[];
  maxTokens: number;
  sampling: SamplingParams;
  stop: string[];
  signal: AbortSignal;
  /** performance.now() at the request's arrival, for time to first token. */
  t0: number;
}

export interface Outcome {
  finishReason: FinishReason;
  completionTokens: number;
}

type Step = IteratorResult<number, JobStats>;

/** A queued or running job, already past admission (queue full and bad jobs throw in `start`). */
export class Generation {
  #closed = false;
  #recorded = false;

  private constructor(
    private readonly engine: Engine,
    private readonly metrics: Metrics,
    private readonly req: GenerationRequest,
    private readonly it: AsyncGenerator<number, JobStats>,
    private readonly abort: AbortController,
    private readonly first: Step,
    private readonly tFirst: number,
  ) {}

  /**
   * Submits the job and waits for its first token, so that a full queue or a job the engine
   * rejects surfaces here, before any response (or SSE header) is sent; so does a job the
   * engine aborted (shutdown) before its first token: a 503.
   */
  static async start(
    engine: Engine,
    metrics: Metrics,
    req: GenerationRequest,
  ): Promise<Generation> {
    const abort = new AbortController();
    const it = engine.submit({
      prompt: req.prompt,
      maxTokens: req.maxTokens,
      sampling: req.sampling,
      stopIds: eosIds(engine),
      signal: AbortSignal.any([req.signal, abort.signal]),
    });
    const first = await it.next();
    if (first.done && first.value.finishReason === "abort") {
      throw serverDraining("the server shut down before this request started; retry it");
    }
    metrics.started();
    return new Generation(engine, metrics, req, it, abort, first, performance.now());
  }

  /** The generated text in pieces, stop strings applied; ends the job when done or abandoned. */
  async *pieces(): AsyncGenerator<string, Outcome> {
    const dec = new StreamDecoder(this.engine.tokenizer, this.req.prompt);
    const stop = new StopFilter(this.req.stop);
    let r = this.first, n = 0, tLast = this.tFirst;
    let finishReason: FinishReason = "length";
    let stats: JobStats | null = null;
    try {
      while (!r.done) {
        n++;
        tLast = performance.now();
        const out = stop.push(dec.push(r.value));
        if (out.text) yield out.text;
        if (out.stopped) {
          finishReason = "stop";
          break;
        }
        r = await this.it.next();
      }
      if (r.done) {
        stats = r.value;
        finishReason = stats.finishReason;
        const out = stop.push(dec.flush());
        if (out.stopped) finishReason = "stop";
        const tail = out.text + (out.stopped ? "" : stop.flush());
        if (tail) yield tail;
      }
    } finally {
      this.#record(n, tLast, stats);
      await this.close();
    }
    return { finishReason, completionTokens: n };
  }

  /**
   * Ends the engine job (idempotent), also for paths that never read `pieces`: aborts it and
   * steps it once, so the engine ends it through its own abort path.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#record(0, this.tFirst, null);
    this.abort.abort();
    try {
      await this.it.next();
    } finally {
      await this.it.return(undefined as never);
    }
  }

  #record(n: number, tLast: number, stats: JobStats | null): void {
    if (this.#recorded) return;
    this.#recorded = true;
    this.metrics.finished({
      promptTokens: this.req.prompt.length,
      generatedTokens: n,
      ttftS: n > 0 ? (this.tFirst - this.req.t0) / 1000 : null,
      perTokenS: n > 1 ? (tLast - this.tFirst) / 1000 / (n - 1) : null,
      serviceS: stats ? (stats.ttftMs + stats.decodeMs) / 1000 : (tLast - this.req.t0) / 1000,
    });
  }

  /** All the text at once (non-streaming responses). */
  async collect(): Promise<{ text: string } & Outcome> {
    let text = "";
    const it = this.pieces();
    let r = await it.next();
    while (!r.done) {
      text += r.value;
      r = await it.next();
    }
    return { text, ...r.value };
  }
}

/** The ids that end generation: the model's EOS ids and the tokenizer's. */
function eosIds(engine: Engine): number[] {
  const ids = new Set(engine.model.config.eosIds);
  if (engine.tokenizer.eosId >= 0) ids.add(engine.tokenizer.eosId);
  return [...ids];
}
