/**
 * Downloads a Hugging Face model repository's serving files (config, tokenizer, safetensors)
 * into a local cache with `@huggingface/hub`, skipping files already complete there.
 *
 * Cache layout: `{cacheDir}/models/{owner}--{name}/{revision}/` holds the files under their repo
 * names, plus `.lowbit-download.json` recording each file's size and git/LFS hash. Files are
 * written to `*.incomplete`, checked against the hub's hash, then renamed, so a file under its
 * own name is always whole.
 */
import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { downloadFile, HubApiError, type ListFileEntry, listFiles } from "@huggingface/hub";
import { progress } from "../cli/cli.ts";

/** The model `deno task serve` uses when given no --model: a small Llama with a chat template. */
export const DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct";

export const HUB_URL = "https://huggingface.co";

const REQUIRED = ["config.json", "tokenizer.json", "tokenizer_config.json"];
const OPTIONAL = ["generation_config.json", "chat_template.jinja"];
const SINGLE = "model.safetensors";
const INDEX = "model.safetensors.index.json";
const MANIFEST = ".lowbit-download.json";

/** A repository, revision or file that cannot be fetched, or a download that went wrong. */
export class DownloadError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "DownloadError";
  }
}

export interface DownloadOptions {
  /** Branch, tag or commit (default "main"). */
  revision?: string;
  /** Default: {@link defaultCacheDir}. */
  cacheDir?: string;
  /** Default https://huggingface.co. */
  hubUrl?: string;
  fetch?: typeof fetch;
  /** For gated or private repos (default: $HF_TOKEN). */
  accessToken?: string;
  /** No progress lines on stderr. */
  quiet?: boolean;
}

/** `$LOWBIT_CACHE`, else `~/.cache/lowbit`. */
export function defaultCacheDir(): string {
  const env = Deno.env.get("LOWBIT_CACHE");
  if (env) return env;
  return join(Deno.env.get("HOME") ?? Deno.cwd(), ".cache", "lowbit");
}

/** Where `repoId` at `revision` lives in `cacheDir`. */
export function modelCachePath(repoId: string, revision: string, cacheDir: string): string {
  return join(cacheDir, "models", repoId.replaceAll("/", "--"), revision.replaceAll("/", "--"));
}

type Manifest = {
  repo: string;
  revision: string;
  files: Record<string, { size: number; oid: string }>;
};

async function readManifest(dir: string): Promise<Manifest | null> {
  try {
    return JSON.parse(await Deno.readTextFile(join(dir, MANIFEST)));
  } catch {
    return null;
  }
}

async function fileSize(path: string): Promise<number | null> {
  try {
    return (await Deno.stat(path)).size;
  } catch {
    return null;
  }
}

/**
 * Downloads `repoId`'s config.json, tokenizer.json, tokenizer_config.json,
 * generation_config.json and chat_template.jinja (when present) and its weights
 * (model.safetensors, or the index and every shard it names) into the cache; returns the local
 * directory. Files already complete there are not fetched again. When the hub cannot be reached
 * and an earlier download is complete, that one is used.
 */
export async function downloadModel(
  repoId: string,
  options: DownloadOptions = {},
): Promise<string> {
  const revision = options.revision ?? "main";
  const hubUrl = (options.hubUrl ?? HUB_URL).replace(/\/+$/, "");
  const dir = modelCachePath(repoId, revision, options.cacheDir ?? defaultCacheDir());
  const hub = {
    repo: repoId,
    revision,
    hubUrl,
    fetch: options.fetch,
    accessToken: options.accessToken ?? Deno.env.get("HF_TOKEN") ?? undefined,
  };
  const where = `${repoId} (revision ${revision}) on ${hubUrl}`;

  // 1. The repository's files.
  const entries = new Map<string, ListFileEntry>();
  try {
    for await (const e of listFiles(hub)) if (e.type === "file") entries.set(e.path, e);
  } catch (e) {
    if (e instanceof HubApiError) {
      const why = e.statusCode === 404
        ? "was not found (check the repository id and revision)"
        : e.statusCode === 401 || e.statusCode === 403
        ? "is private or gated: set HF_TOKEN to a token with access"
        : `could not be listed (HTTP ${e.statusCode})`;
      throw new DownloadError(`${where} ${why}`, { cause: e });
    }
    const cached = await completeCache(dir);
    if (cached) {
      console.error(`cannot reach ${hubUrl} (${(e as Error).message}); using the cached ${dir}`);
      return dir;
    }
    throw new DownloadError(`cannot list ${where}: ${(e as Error).message}`, { cause: e });
  }

  // 2. The files to fetch: config, tokenizer, then the weights.
  const missing = REQUIRED.filter((p) => !entries.has(p));
  if (!entries.has(SINGLE) && !entries.has(INDEX)) missing.push(`${SINGLE} (or ${INDEX})`);
  if (missing.length > 0) {
    throw new DownloadError(
      `${where} has no ${missing.join(", ")}, so lowbit cannot serve it; it holds: ` +
        `${[...entries.keys()].slice(0, 20).join(", ")}`,
    );
  }
  const wanted = [...REQUIRED, ...OPTIONAL.filter((p) => entries.has(p))];
  await Deno.mkdir(dir, { recursive: true });
  const manifest: Manifest = (await readManifest(dir)) ?? { repo: repoId, revision, files: {} };
  const fetchOne = (path: string) => fetchFile(hub, entries, dir, path, manifest, options.quiet);
  for (const p of wanted) await fetchOne(p);
  if (entries.has(SINGLE)) {
    await fetchOne(SINGLE);
  } else {
    await fetchOne(INDEX);
    for (const shard of await shardNames(join(dir, INDEX), entries, where)) await fetchOne(shard);
  }
  return dir;
}

/** Whether `dir` holds every file its manifest lists, at the recorded sizes. */
async function completeCache(dir: string): Promise<boolean> {
  const m = await readManifest(dir);
  if (!m || !REQUIRED.every((p) => p in m.files)) return false;
  for (const [path, { size }] of Object.entries(m.files)) {
    if ((await fileSize(join(dir, path))) !== size) return false;
  }
  return SINGLE in m.files || INDEX in m.files;
}

/** The shard files an index's `weight_map` names, checked against the repo listing. */
async function shardNames(indexPath: string, entries: Map<string, ListFileEntry>, where: string) {
  let map: unknown;
  try {
    map = JSON.parse(await Deno.readTextFile(indexPath)).weight_map;
  } catch (e) {
    throw new DownloadError(`${where}: ${INDEX} is not valid JSON`, { cause: e });
  }
  if (typeof map !== "object" || map === null) {
    throw new DownloadError(`${where}: ${INDEX} has no "weight_map"`);
  }
  const shards = [...new Set(Object.values(map as Record<string, unknown>).map(String))].sort();
  const absent = shards.filter((s) => !entries.has(s));
  if (absent.length > 0) {
    throw new DownloadError(`${where}: ${INDEX} names shards the repo lacks: ${absent.join(", ")}`);
  }
  return shards;
}

type Hub = {
  repo: string;
  revision: string;
  hubUrl: string;
  fetch?: typeof fetch;
  accessToken?: string;
};

/**
 * Fetches one file unless the cache has it whole (recorded with the same hash and size), checks
 * its hash (sha256 for LFS files, the git blob sha1 otherwise) and records it in the manifest.
 */
async function fetchFile(
  hub: Hub,
  entries: Map<string, ListFileEntry>,
  dir: string,
  path: string,
  manifest: Manifest,
  quiet = false,
): Promise<void> {
  const entry = entries.get(path)!;
  const size = entry.lfs?.size ?? entry.size;
  const oid = entry.lfs?.oid ?? entry.oid ?? "";
  const local = join(dir, path);
  const known = manifest.files[path];
  if (known && known.oid === oid && known.size === size && (await fileSize(local)) === size) return;

  const blob = await downloadFile({ ...hub, path, xet: false }).catch((e) => {
    throw new DownloadError(`cannot download ${path} of ${hub.repo}: ${(e as Error).message}`, {
      cause: e,
    });
  });
  if (blob === null) throw new DownloadError(`${hub.repo} has no file ${path} at ${hub.revision}`);
  await Deno.mkdir(dirname(local), { recursive: true });
  const tmp = `${local}.incomplete`;
  const hash = entry.lfs ? createHash("sha256") : createHash("sha1").update(`blob ${size}\0`);
  const report = quiet ? () => {} : progress(`downloading ${hub.repo}/${path}`);
  const file = await Deno.open(tmp, { write: true, create: true, truncate: true });
  const writer = file.writable.getWriter();
  let done = 0;
  try {
    for await (const chunk of blob.stream()) {
      hash.update(chunk);
      await writer.write(chunk);
      done += chunk.length;
      report(done, size);
    }
    await writer.close();
  } catch (e) {
    await writer.abort().catch(() => {});
    throw new DownloadError(`downloading ${path} of ${hub.repo} failed: ${(e as Error).message}`, {
      cause: e,
    });
  }
  const digest = hash.digest("hex");
  if (done !== size || (oid !== "" && digest !== oid)) {
    await Deno.remove(tmp).catch(() => {});
    throw new DownloadError(
      `${path} of ${hub.repo} arrived damaged (${done} of ${size} bytes, hash ${digest}, ` +
        `expected ${oid}); run again to retry`,
    );
  }
  await Deno.rename(tmp, local);
  manifest.files[path] = { size, oid };
  await Deno.writeTextFile(join(dir, MANIFEST), JSON.stringify(manifest, null, 1));
}

/**
 * The model `deno task serve` serves when given no --model: {@link DEFAULT_MODEL}, downloaded
 * into the cache on first use (later runs use the cached copy). Returns its local directory,
 * which `loadModel` opens.
 */
export function ensureDefaultModel(options: DownloadOptions = {}): Promise<string> {
  return downloadModel(DEFAULT_MODEL, options);
}
