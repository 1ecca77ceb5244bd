/**
 * The tune cache: the thread shapes the tuner (kernels/tuner.ts) chose, per adapter and kernel
 * key, in one JSON file that the runtime reads when it creates its device (kernels/gpu.ts):
 *
 *   { "version": 1,
 *     "adapters": { "<adapter id>": { "shapes": {
 *       "matvec_q q4g128 576x1536 b1 gateup+norm buffer": { "tpr": 32, "upw": 8, "upt": 2,
 *                                                           "us": 41.2, "defaultUs": 55.0 },
 *       "matvec f16 32000x2048 store+norm buffer": { "tpr": 64, "upw": 4, "upt": 1, "us": 90.3 },
 *       "attention h32 kv8 d64 f16 buffer decode": { "wg": 128, "gq": 1, "us": 20.1 } } } } }
 *
 * Keys name a quantized matrix kernel (kernels/tune_key.ts: a thread shape), a dense one
 * (kernels/dense_key.ts: a thread shape too) or the attention kernel (kernels/attention_key.ts:
 * wg and gq).
 *
 * Path: `$LOWBIT_TUNE_CACHE`, else `$XDG_CACHE_HOME/lowbit/tune.json`, else
 * `~/.cache/lowbit/tune.json`. A missing file is an empty cache. A corrupt one (bad JSON, another
 * version, wrong types, a shape its key cannot run) is ignored as a whole with one warning on
 * stderr naming the file and the reason; entries made for another adapter (another GPU, another
 * driver version) are never used. Writes are atomic (a temporary file renamed over the old).
 */
import type { Gpu } from "./gpu.ts";
import type { AttentionShape } from "./attention.ts";
import { bareShape, parseTuneKey, type TunedShape, tunedShapeProblem } from "./tune_key.ts";
import { denseShapeProblem, parseDenseKey } from "./dense_key.ts";
import {
  attentionShapeProblem,
  bareAttentionShape,
  isAttentionKeyString,
  type KernelLimits,
  type KernelShape,
  parseAttentionKey,
} from "./attention_key.ts";

/**
 * Bump when the file's layout or the kernels' meaning of a shape changes. (The attention and the
 * dense kernels' entries are new keys beside the quantized kernels' in the same layout: version 1
 * files stay valid.)
 */
export const TUNE_CACHE_VERSION = 1;

/** What a tuned choice records beside its shape. */
export interface TunedTimes {
  /** Median µs per dispatch of the chosen shape when it was tuned. */
  us?: number;
  /** Median µs per dispatch of the heuristic (default) shape. */
  defaultUs?: number;
}

/** One tuned choice: the shape (a matrix kernel's or attention's) and its times. */
export type TunedEntry = KernelShape & TunedTimes;

export interface TuneCacheFile {
  version: number;
  adapters: Record<string, { shapes: Record<string, TunedEntry> }>;
}

/** An empty cache. */
export function emptyTuneCache(): TuneCacheFile {
  return { version: TUNE_CACHE_VERSION, adapters: {} };
}

/** Where the cache lives (see the module doc); `env` is injectable for tests. */
export function tuneCachePath(env: (name: string) => string | undefined = envGet): string {
  const explicit = env("LOWBIT_TUNE_CACHE");
  if (explicit) return explicit;
  const xdg = env("XDG_CACHE_HOME");
  if (xdg) return `${xdg}/lowbit/tune.json`;
  return `${env("HOME") ?? "."}/.cache/lowbit/tune.json`;
}

function envGet(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined; // no --allow-env: the defaults
  }
}

/**
 * The name an adapter's entries are filed under: its name and driver description, so that a
 * driver update (lavapipe's names its LLVM version) or another GPU does not reuse old choices.
 */
export function adapterId(adapterName: string, driver = ""): string {
  return driver ? `${adapterName} [${driver}]` : adapterName;
}

/** Why `data` is not a valid cache (a sentence), or null. Checks every entry. */
export function tuneCacheProblem(data: unknown, limits?: KernelLimits): string | null {
  if (typeof data !== "object" || data === null || Array.isArray(data)) return "not a JSON object";
  const d = data as Record<string, unknown>;
  if (d.version !== TUNE_CACHE_VERSION) {
    return `version ${JSON.stringify(d.version)}, this lowbit reads version ${TUNE_CACHE_VERSION}`;
  }
  const adapters = d.adapters;
  if (typeof adapters !== "object" || adapters === null || Array.isArray(adapters)) {
    return `"adapters" is not an object`;
  }
  for (const [id, a] of Object.entries(adapters)) {
    const shapes = (a as { shapes?: unknown } | null)?.shapes;
    if (typeof shapes !== "object" || shapes === null || Array.isArray(shapes)) {
      return `adapter "${id}": "shapes" is not an object`;
    }
    for (const [k, s] of Object.entries(shapes)) {
      const key = parseTuneKey(k), dkey = key ? null : parseDenseKey(k);
      const akey = key || dkey ? null : parseAttentionKey(k);
      if (!key && !dkey && !akey) return `adapter "${id}": "${k}" is not a kernel key`;
      if (typeof s !== "object" || s === null || Array.isArray(s)) {
        return `adapter "${id}", ${k}: the entry is not an object`;
      }
      const e = s as Record<string, unknown>;
      for (const f of ["us", "defaultUs"]) {
        if (e[f] !== undefined && typeof e[f] !== "number") {
          return `adapter "${id}", ${k}: ${f} is not a number`;
        }
      }
      const problem = key
        ? tunedShapeProblem(key, e as unknown as TunedShape, limits)
        : dkey
        ? denseShapeProblem(dkey, e as unknown as TunedShape, limits)
        : attentionShapeProblem(akey!, e as unknown as AttentionShape, limits);
      if (problem) return `adapter "${id}", ${k}: ${problem}`;
    }
  }
  return null;
}

/**
 * Reads the cache at `path`: a missing file is an empty cache; a corrupt one is an empty cache
 * and one `warn` naming the file and the reason (default: console.warn, i.e. stderr).
 */
export function readTuneCache(
  path: string,
  opts: { limits?: KernelLimits; warn?: (msg: string) => void } = {},
): TuneCacheFile {
  const warn = opts.warn ?? ((m: string) => console.warn(m));
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    // no such file, or no --allow-read for it: no cache
    if (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.NotCapable) {
      return emptyTuneCache();
    }
    warn(`warning: tune cache ${path} cannot be read (${(e as Error).message}); ignoring it`);
    return emptyTuneCache();
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    warn(`warning: tune cache ${path} is not valid JSON (${(e as Error).message}); ignoring it`);
    return emptyTuneCache();
  }
  const problem = tuneCacheProblem(data, opts.limits);
  if (problem) {
    warn(
      `warning: tune cache ${path} is ignored: ${problem}; the built-in shapes are used ` +
        "(deno task tune rewrites it)",
    );
    return emptyTuneCache();
  }
  return data as TuneCacheFile;
}

/**
 * The matrix kernels' tuned shapes (quantized and dense) of one adapter, by key string (entries
 * of other adapters are not used).
 */
export function tunedFor(file: TuneCacheFile, id: string): Map<string, TunedShape> {
  const out = new Map<string, TunedShape>();
  for (const [k, e] of Object.entries(file.adapters[id]?.shapes ?? {})) {
    if (!isAttentionKeyString(k)) out.set(k, bareShape(e as TunedShape));
  }
  return out;
}

/** The attention kernel's tuned shapes of one adapter, by attention key string. */
export function tunedAttentionFor(file: TuneCacheFile, id: string): Map<string, AttentionShape> {
  const out = new Map<string, AttentionShape>();
  for (const [k, e] of Object.entries(file.adapters[id]?.shapes ?? {})) {
    if (isAttentionKeyString(k)) out.set(k, bareAttentionShape(e as AttentionShape));
  }
  return out;
}

/** `file` with `entries` added to (or replacing those of) adapter `id`; `file` is unchanged. */
export function withTuned(
  file: TuneCacheFile,
  id: string,
  entries: Iterable<[string, TunedEntry]>,
): TuneCacheFile {
  const shapes = { ...(file.adapters[id]?.shapes ?? {}) };
  for (const [k, e] of entries) shapes[k] = e;
  return { version: TUNE_CACHE_VERSION, adapters: { ...file.adapters, [id]: { shapes } } };
}

/** Writes the cache atomically (creating its directory): a temporary file, then a rename. */
export function writeTuneCache(path: string, file: TuneCacheFile): void {
  const slash = path.lastIndexOf("/");
  if (slash > 0) Deno.mkdirSync(path.slice(0, slash), { recursive: true });
  const tmp = `${path}.tmp-${Deno.pid}-${Date.now()}`;
  try {
    Deno.writeTextFileSync(tmp, JSON.stringify(file, null, 1) + "\n");
    Deno.renameSync(tmp, path);
  } catch (e) {
    try {
      Deno.removeSync(tmp);
    } catch { /* never written */ }
    throw e;
  }
}

/**
 * Files `entries` under adapter `id` in the cache at `path`: the file as it is now (an empty
 * cache where it is missing or corrupt, with the usual warning) plus the entries, written
 * atomically.
 */
export function saveTuned(path: string, id: string, entries: Iterable<[string, TunedEntry]>): void {
  writeTuneCache(path, withTuned(readTuneCache(path), id, entries));
}

/** The tune cache id of a Gpu ({@link adapterId} of its name and driver ids). */
export function gpuAdapterId(gpu: Gpu): string {
  return adapterId(gpu.adapterName, gpu.driver);
}

/**
 * Fills `gpu.tuned` and `gpu.tunedAttention` with this adapter's entries of the cache at `path`
 * and records the path (createGpu calls it). A cache that holds entries for other adapters only
 * is stale for this one: one warning says so (the built-in shapes are used).
 */
export function loadTunedShapes(
  gpu: Gpu,
  path = tuneCachePath(),
  warn: (msg: string) => void = (m) => console.warn(m),
): void {
  let file: TuneCacheFile;
  try {
    file = readTuneCache(path, { limits: gpu.device.limits, warn });
  } catch (e) {
    warn(`warning: tune cache ${path} is ignored: ${(e as Error).message}`);
    file = emptyTuneCache();
  }
  const id = gpuAdapterId(gpu);
  gpu.tuned = tunedFor(file, id);
  gpu.tunedAttention = tunedAttentionFor(file, id);
  gpu.tuneCache = path;
  const others = Object.keys(file.adapters).filter((a) => a !== id);
  if (!file.adapters[id] && others.length > 0) {
    warn(
      `warning: tune cache ${path} has no entries for adapter "${id}" (only for ` +
        `${others.map((o) => `"${o}"`).join(", ")}); the built-in shapes are used until it is ` +
        "tuned (deno task tune, or the first model load on a GPU)",
    );
  }
}
