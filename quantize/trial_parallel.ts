/**
 * CVXQ's trial quantizations over several CPU cores: a pool of `threads` Web Workers, kept for
 * the whole measurement (quantize/distortion.ts), runs the trials of one layer at once, one
 * format per task. W, H and the GPTQ plan's arrays go to the workers in SharedArrayBuffers (one
 * copy per layer, whatever the number of formats); each worker runs {@link trialDistortion}, the
 * code the main thread runs, and sends back D_l(f) alone, so the result equals the sequential
 * one bit for bit. A failed trial is an error naming the layer and the format.
 */
import { ParameterError } from "../runtime/errors.ts";
import type { Format } from "./allocate.ts";
import { shared } from "./decoupleq_parallel.ts";
import { trialDistortion, trialError, type TrialLayer } from "./trial_distortion.ts";

/**
 * Below this many multiply-adds (N·K², the cost of one D) a layer's trials run on the calling
 * thread. A trial on a warm pool costs a message each way, about 0.2 ms (W and H are shared,
 * not copied), which is what an rtn trial of a 16×64 layer (65,536) takes; stories260K's
 * smallest linears (32×64) are above it. The pool itself starts in about 70 ms, once.
 */
export const MIN_TRIAL_WORK = 2 ** 16;

/** What a worker is sent: one layer's shared arrays and one format. */
export interface TrialTask extends Omit<TrialLayer, "plan"> {
  id: number;
  order: Int32Array | null;
  Hinv: Float64Array | null;
  f: Format;
}

/** What a worker sends back: D_l(f), or the trial's error. */
export type TrialReply = { id: number; D: number } | {
  id: number;
  error: { name: string; message: string };
};

/** D_l(f) of a task (what a worker runs). */
export function runTrial(t: TrialTask): number {
  const plan = t.order && t.Hinv ? { K: t.K, order: t.order, Hinv: t.Hinv } : null;
  return trialDistortion({ ...t, plan }, t.f);
}

interface Job {
  task: TrialTask;
  resolve: (D: number) => void;
  reject: (e: Error) => void;
}

/** A pool of trial workers; {@link close} it when the measurement ends, failed or not. */
export class TrialPool {
  readonly threads: number;
  readonly minWork: number;
  /** Workers started so far (0 while every layer stayed on the calling thread). */
  started = 0;
  private workers: Worker[] = [];
  private idle: Worker[] = [];
  private queue: Job[] = [];
  private running = new Map<Worker, Job>();
  private nextId = 0;
  private broken: Error | null = null;

  /** Up to `threads` workers (default: all cores), started on the first layer that needs them. */
  constructor({ threads = navigator.hardwareConcurrency, minWork = MIN_TRIAL_WORK } = {}) {
    if (!Number.isInteger(threads) || threads < 1) {
      throw new ParameterError(`threads must be a positive integer, got ${threads}`);
    }
    this.threads = threads;
    this.minWork = minWork;
  }

  /**
   * D_l(f) of the calibrated layer `name` at each format: on the workers, or on this thread
   * with one thread, one format or a layer of fewer than `minWork` multiply-adds per trial.
   */
  async distortions(name: string, l: TrialLayer, formats: readonly Format[]): Promise<number[]> {
    if (this.threads === 1 || formats.length < 2 || l.N * l.K * l.K < this.minWork) {
      return formats.map((f) => {
        try {
          return trialDistortion(l, f);
        } catch (e) {
          throw trialError(name, l, f, e);
        }
      });
    }
    const { plan, ...rest } = l;
    const base = {
      ...rest,
      W: shared(l.W),
      H: shared(l.H),
      order: plan ? shared(plan.order) : null,
      Hinv: plan ? shared(plan.Hinv) : null,
    };
    return await Promise.all(formats.map((f) =>
      new Promise<number>((resolve, reject) => {
        this.queue.push({ task: { ...base, id: this.nextId++, f }, resolve, reject });
        this.dispatch();
      }).catch((e) => {
        throw trialError(name, l, f, e);
      })
    ));
  }

  /** Terminates the workers; trials still queued or running fail. */
  close(): void {
    this.fail(new Error("the trial pool was closed"));
  }

  private dispatch(): void {
    if (this.broken) return this.fail(this.broken);
    while (this.queue.length > 0) {
      if (this.idle.length === 0 && this.workers.length < this.threads) this.spawn();
      const w = this.idle.pop();
      if (!w) return;
      const job = this.queue.shift()!;
      this.running.set(w, job);
      w.postMessage(job.task);
    }
  }

  private spawn(): void {
    const w = new Worker(new URL("./trial_worker.ts", import.meta.url).href, { type: "module" });
    w.onmessage = (e: MessageEvent<TrialReply>) => {
      const job = this.running.get(w);
      this.running.delete(w);
      this.idle.push(w);
      if (job && job.task.id === e.data.id) {
        if ("error" in e.data) {
          const err = new Error(e.data.error.message);
          err.name = e.data.error.name;
          job.reject(err);
        } else job.resolve(e.data.D);
      }
      this.dispatch();
    };
    w.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      this.fail(new Error(`trial worker: ${e.message}`));
    };
    this.workers.push(w);
    this.idle.push(w);
    this.started++;
  }

  /** Rejects every queued and running trial with `e` and terminates the workers. */
  private fail(e: Error): void {
    this.broken ??= e;
    for (const job of [...this.running.values(), ...this.queue]) job.reject(e);
    this.running.clear();
    this.queue = [];
    for (const w of this.workers) w.terminate();
    this.workers = [];
    this.idle = [];
  }
}
