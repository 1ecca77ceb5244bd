/**
 * Matrix products over several CPU cores, for the float64 passes of stage 2 and the end-to-end
 * stage. While a pool runs ({@link startGemmPool}), {@link f64} allocates from one growable
 * SharedArrayBuffer (the arena) that the pool's workers also see, and {@link gemmABt} hands a
 * product whose three arrays all live in the arena to the workers: the rows of C are cut into
 * one slice per thread (multiples of 4 rows), the workers are woken through Atomics, the
 * calling thread computes the first slice and waits for the others. Every element of C is
 * summed over k in the same order as the single-threaded product sums it, so the results are
 * bitwise the same with any number of threads.
 *
 * The calling thread blocks in Atomics.wait (Deno allows it on the main thread); the workers
 * never return to their event loop until the pool stops.
 */
import { ParameterError } from "../runtime/errors.ts";
import { gemmABtSerial } from "./gemm.ts";

/** By default, products smaller than this (M·N·K multiply-adds) stay on the calling thread. */
export const MIN_PARALLEL_MACS = 1 << 16;
const ARENA_MAX_BYTES = 2 ** 36;
const ALIGN = 64;

/**
 * ctl: [0] job generation, [1] workers done, [2] stop, [3] a worker failed. job: M, N, K,
 * accumulate, and the offsets of A, B and C in the arena (in float64 entries).
 */
export interface PoolShared {
  arena: SharedArrayBuffer;
  ctl: Int32Array;
  job: Float64Array;
  threads: number;
  index: number;
}

interface Pool {
  arena: SharedArrayBuffer;
  ctl: Int32Array;
  job: Float64Array;
  threads: number;
  minMacs: number;
  used: number;
  workers: Worker[];
}

let pool: Pool | null = null;

/** Rows [m0, m1) of an M-row product for slice `i` of `n` (multiples of 4 but the last). */
export function sliceRows(M: number, n: number, i: number): [number, number] {
  const quads = Math.ceil(M / 4);
  const at = (j: number) => Math.min(M, 4 * Math.round((j * quads) / n));
  return [at(i), at(i + 1)];
}

/** Runs slice `index` of the job in `s` (what each thread does). */
export function runSlice(s: PoolShared, all: Float64Array): void {
  const [M, N, K, acc, aOff, bOff, cOff] = s.job;
  const [m0, m1] = sliceRows(M, s.threads, s.index);
  if (m1 <= m0) return;
  gemmABtSerial(
    all.subarray(cOff + m0 * N, cOff + m1 * N),
    all.subarray(aOff + m0 * K, aOff + m1 * K),
    all.subarray(bOff, bOff + N * K),
    m1 - m0,
    N,
    K,
    acc === 1,
  );
}

/**
 * C (M, N) = A (M, K)·B (N, K)ᵀ, or C += that when `accumulate` (row-major): on the pool's
 * threads when one runs and all three arrays are in its arena, else on this thread.
 */
export function gemmABt(
  C: Float64Array,
  A: Float64Array,
  B: Float64Array,
  M: number,
  N: number,
  K: number,
  accumulate = false,
): void {
  const p = pool;
  if (
    !p || M < 8 || M * N * K < p.minMacs ||
    C.buffer !== p.arena || A.buffer !== p.arena || B.buffer !== p.arena
  ) {
    return gemmABtSerial(C, A, B, M, N, K, accumulate);
  }
  p.job.set([M, N, K, accumulate ? 1 : 0, A.byteOffset / 8, B.byteOffset / 8, C.byteOffset / 8]);
  Atomics.store(p.ctl, 1, 0);
  Atomics.add(p.ctl, 0, 1);
  Atomics.notify(p.ctl, 0);
  runSlice({ ...p, index: 0 }, new Float64Array(p.arena));
  for (let d = Atomics.load(p.ctl, 1); d < p.threads - 1; d = Atomics.load(p.ctl, 1)) {
    Atomics.wait(p.ctl, 1, d);
  }
  if (Atomics.load(p.ctl, 3)) throw new Error("gemm worker failed (see its error above)");
}

/**
 * A zeroed float64 array of n entries: in the running pool's arena (so {@link gemmABt} can
 * share it), or an ordinary one when no pool runs or the arena is full.
 */
export function f64(n: number): Float64Array {
  const p = pool;
  if (!p) return new Float64Array(n);
  const at = p.used, end = at + Math.ceil((n * 8) / ALIGN) * ALIGN;
  if (end > ARENA_MAX_BYTES) return new Float64Array(n);
  if (end > p.arena.byteLength) p.arena.grow(Math.min(ARENA_MAX_BYTES, Math.max(end, 2 * p.used)));
  p.used = end;
  return new Float64Array(p.arena, at, n).fill(0); // released space is reused
}

/**
 * Runs `fn` and then frees what it allocated from the arena, for work whose arrays do not
 * outlive it (its results must not be {@link f64} arrays).
 */
export function withArena<R>(fn: () => R): R {
  const p = pool, mark = p?.used ?? 0;
  try {
    return fn();
  } finally {
    if (p) p.used = Math.min(p.used, mark);
  }
}

/** The running pool, until {@link GemmPool.stop}. */
export interface GemmPool {
  readonly threads: number;
  stop(): void;
}

/**
 * Starts `threads` − 1 workers (the calling thread is the first) and routes {@link f64} and
 * {@link gemmABt} through them until {@link GemmPool.stop}. One pool at a time; with
 * `threads` 1 nothing starts and the products stay serial. Products of fewer than `minMacs`
 * multiply-adds, or of fewer than 8 rows, stay on the calling thread.
 */
export async function startGemmPool(
  threads: number,
  { minMacs = MIN_PARALLEL_MACS } = {},
): Promise<GemmPool> {
  if (!Number.isInteger(threads) || threads < 1) {
    throw new ParameterError(`threads must be a positive integer, got ${threads}`);
  }
  if (pool) throw new ParameterError("a gemm pool is already running");
  if (threads === 1) return { threads: 1, stop() {} };
  const p: Pool = {
    arena: new SharedArrayBuffer(1 << 20, { maxByteLength: ARENA_MAX_BYTES }),
    ctl: new Int32Array(new SharedArrayBuffer(16)),
    job: new Float64Array(new SharedArrayBuffer(64)),
    threads,
    minMacs,
    used: 0,
    workers: [],
  };
  const url = new URL("./gemm_worker.ts", import.meta.url).href;
  await Promise.all(
    Array.from({ length: threads - 1 }, (_, i) => {
      const w = new Worker(url, { type: "module" });
      p.workers.push(w);
      return new Promise<void>((resolve, reject) => {
        w.onmessage = () => resolve();
        w.onerror = (e: ErrorEvent) => {
          e.preventDefault();
          reject(new Error(`gemm worker: ${e.message}`));
        };
        const s: PoolShared = { arena: p.arena, ctl: p.ctl, job: p.job, threads, index: i + 1 };
        w.postMessage(s);
      });
    }),
  ).catch((e) => {
    p.workers.forEach((w) => w.terminate());
    throw e;
  });
  pool = p;
  return {
    threads,
    stop() {
      if (pool !== p) return;
      pool = null;
      Atomics.store(p.ctl, 2, 1);
      Atomics.add(p.ctl, 0, 1);
      Atomics.notify(p.ctl, 0);
      p.workers.forEach((w) => w.terminate());
    },
  };
}
