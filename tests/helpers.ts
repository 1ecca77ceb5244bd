/**
 * Shared test plumbing: paths into ../shared (skipping cleanly without it), one GPU, seeded
 * random numbers and temporary directories.
 */
import { createGpu, Gpu } from "../kernels/gpu.ts";
import { mulberry32 } from "../runtime/model/sampling.ts";

/** Absolute path of `rel` under the shared data folder beside the project. */
export function sharedPath(rel: string): string {
  return new URL(`../../shared/${rel}`, import.meta.url).pathname;
}

/** Whether all these shared paths exist; tests that need them pass `ignore: !have`. */
export async function haveShared(...rels: string[]): Promise<boolean> {
  const ok = await Promise.all(
    rels.map((r) => Deno.stat(sharedPath(r)).then(() => true, () => false)),
  );
  if (!ok.every(Boolean)) {
    console.warn(`SKIPPED: needs ${rels.join(", ")} under ../shared, which is absent`);
    return false;
  }
  return true;
}

let gpu: Promise<Gpu> | null = null;
/** The process-wide test device (lavapipe in CI). */
export function testGpu(): Promise<Gpu> {
  gpu ??= createGpu();
  return gpu;
}

/**
 * The test device as a GPU adapter would run it (isCpu false: weights and KV cache in storage
 * buffers, split-K thread shapes), so that CI on lavapipe also covers the GPU layout end to end.
 */
export async function testGpuLayout(): Promise<Gpu> {
  const g = await testGpu();
  return new Gpu(g.device, `${g.adapterName} (GPU layout)`, g.shaderF16, g.timestamps, false);
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

/** Uniform numbers in [0, 1), for tests that need that range (same generator as `rng`). */
export { mulberry32 };

/** A seeded generator of uniform numbers in [-1, 1) (mulberry32 mapped to [-1, 1)). */
export function rng(seed: number): () => number {
  const u = mulberry32(seed);
  return () => u() * 2 - 1;
}

/** Runs `fn` in a fresh temporary directory, removed afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "lowbit_test_" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The greedy sample printed in stories260K.md (the code block after `-t 0.0`). */
export async function stories260KGreedyText(): Promise<string> {
  const md = await Deno.readTextFile(sharedPath("models/stories260K/stories260K.md"));
  const m = /-t 0\.0\n([\s\S]*?)\n```/.exec(md);
  if (!m) throw new Error("stories260K.md: no greedy sample after '-t 0.0'");
  return m[1];
}

/** Every id an engine job (or generate) yields, in order. */
export async function collect(it: AsyncGenerator<number, unknown>): Promise<number[]> {
  const ids: number[] = [];
  for await (const id of it) ids.push(id);
  return ids;
}
