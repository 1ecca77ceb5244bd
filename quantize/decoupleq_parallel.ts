/**
 * decoupleQ stage 1 over several CPU cores: rows are independent given H and the GPTQ plan, so
 * the plan (O(K³)) is computed once, W, H and the plan are shared with Web Workers through
 * SharedArrayBuffers, and each worker runs {@link decoupleQ} on a contiguous slice of rows.
 * Each slice applies the early stop (fewer than `minImprovedFraction` of its rows improving) on
 * its own; with `minImprovedFraction: 0` the result equals the single-threaded one exactly.
 */
import { ParameterError } from "../runtime/errors.ts";
import {
  decoupleQ,
  type DecoupleQOptions,
  type DecoupleQResult,
  type DecoupleQStep,
} from "./decoupleq.ts";
import { gptqPlan } from "./gptq.ts";
import { effectiveGroupSize, nGroups } from "../runtime/format/qtensor.ts";

/** Below this many multiply-adds (N·K²) one thread is faster than starting workers. */
export const MIN_PARALLEL_WORK = 2 ** 31;

/** What a worker is sent: shared inputs, its rows and the options (the plan's arrays shared). */
export interface SliceTask {
  W: Float64Array;
  H: Float64Array;
  order: Int32Array;
  Hinv: Float64Array;
  K: number;
  r0: number;
  r1: number;
  opts: Omit<DecoupleQOptions, "plan">;
}

/** What a worker sends back. */
export interface SliceResult {
  q: Int8Array;
  scale: Float32Array;
  zero: Float32Array;
  rows: Float64Array;
  history: DecoupleQStep[];
  energy: number;
}

/** decoupleQ on rows r0..r1 of a task (what a worker runs). */
export function runSlice(t: SliceTask): SliceResult {
  const R = t.r1 - t.r0;
  const W = t.W.subarray(t.r0 * t.K, t.r1 * t.K);
  const d = decoupleQ(W, R, t.K, t.H, {
    ...t.opts,
    plan: { K: t.K, order: t.order, Hinv: t.Hinv },
  });
  const { q, scale, zero } = d.ql;
  return { q, scale, zero, rows: d.loss.rows, history: d.history, energy: d.energy };
}

/** A copy of `a` in a SharedArrayBuffer, for workers to read without a copy of their own. */
export function shared<T extends Float64Array | Int32Array>(a: T): T {
  const C = a.constructor as { new (b: SharedArrayBuffer): T };
  const out = new C(new SharedArrayBuffer(a.byteLength));
  out.set(a as never);
  return out;
}

function inWorker(task: SliceTask): Promise<SliceResult> {
  const w = new Worker(new URL("./decoupleq_worker.ts", import.meta.url).href, { type: "module" });
  return new Promise<SliceResult>((resolve, reject) => {
    w.onmessage = (e: MessageEvent<SliceResult | { error: string }>) => {
      if ("error" in e.data) reject(new Error(`decoupleQ worker: ${e.data.error}`));
      else resolve(e.data);
    };
    w.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      reject(new Error(`decoupleQ worker: ${e.message}`));
    };
    w.postMessage(task);
  }).finally(() => w.terminate());
}

/**
 * decoupleQ stage 1 of W (N, K) under H on up to `threads` cores (default: all). Layers with
 * N·K² < `minWork` (default {@link MIN_PARALLEL_WORK}) run on the calling thread.
 */
export async function decoupleQParallel(
  W: Float64Array,
  N: number,
  K: number,
  H: Float64Array,
  opts: Omit<DecoupleQOptions, "plan">,
  { threads = navigator.hardwareConcurrency, minWork = MIN_PARALLEL_WORK } = {},
): Promise<DecoupleQResult> {
  if (!Number.isInteger(threads) || threads < 1) {
    throw new ParameterError(`threads must be a positive integer, got ${threads}`);
  }
  const n = Math.min(threads, Math.floor(N / 16));
  if (n <= 1 || N * K * K < minWork) return decoupleQ(W, N, K, H, opts);
  const plan = gptqPlan(H, K, opts.actorder ?? true);
  const base = { W: shared(W), H: shared(H), order: shared(plan.order), Hinv: shared(plan.Hinv) };
  const cuts = Array.from({ length: n + 1 }, (_, i) => Math.round((i * N) / n));
  const parts = await Promise.all(
    cuts.slice(0, -1).map((r0, i) => inWorker({ ...base, K, r0, r1: cuts[i + 1], opts })),
  );
  // merge the slices
  const nG = nGroups(K, opts.groupSize);
  const q = new Int8Array(N * K), scale = new Float32Array(N * nG), zero = new Float32Array(N * nG);
  const rows = new Float64Array(N);
  parts.forEach((p, i) => {
    const r0 = cuts[i];
    q.set(p.q, r0 * K);
    scale.set(p.scale, r0 * nG);
    zero.set(p.zero, r0 * nG);
    rows.set(p.rows, r0);
  });
  const iters = Math.max(...parts.map((p) => p.history.length));
  const history: DecoupleQStep[] = Array.from({ length: iters }, (_, iter) => {
    const at = (p: SliceResult) => p.history[Math.min(iter, p.history.length - 1)];
    const sum = (f: (s: DecoupleQStep) => number) => parts.reduce((a, p) => a + f(at(p)), 0);
    return {
      iter,
      lossAfterInteger: sum((s) => s.lossAfterInteger),
      loss: sum((s) => s.loss),
      improvedRows: parts.reduce((a, p) => a + (p.history[iter]?.improvedRows ?? 0), 0),
    };
  });
  const energy = parts.reduce((a, p) => a + p.energy, 0);
  const loss = rows.reduce((a, b) => a + b, 0);
  return {
    ql: { N, K, bits: opts.bits, groupSize: effectiveGroupSize(K, opts.groupSize), q, scale, zero },
    loss: { loss, relative: loss / energy, rows },
    history,
    energy,
  };
}
