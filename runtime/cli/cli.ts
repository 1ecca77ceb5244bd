/**
 * Shared command-line plumbing: known errors print one line and exit 1, never a stack trace;
 * options are parsed by {@link parseCli} (negative numbers allowed) and checked with errors that
 * name the option; input and output paths are checked before any work; stdout writes end
 * quietly when the reader goes away; load and download progress on stderr.
 */
import { parseArgs as nodeParseArgs, type ParseArgsConfig } from "node:util";
import { dirname } from "node:path";
import { ParameterError } from "../errors.ts";
import { describeDrivers, pickDrivers, vulkanDrivers } from "../../kernels/adapter.ts";
import type { WeightDType } from "../model/gpu_weights.ts";
import { checkKvType } from "../model/run_state.ts";
import type { KvType } from "../../kernels/epilogue.ts";

/** Errors the project throws on purpose: runMain prints their message as one line. */
const KNOWN = new Set([
  "ModelFormatError",
  "UnsupportedModelError",
  "ShapeError",
  "ParameterError",
  "GpuError",
  "TokenizerError",
  "NumericalError",
  "DownloadError",
]);

/** File-system errors: the path and the OS's reason are the whole story, no trace needed. */
const IO_ERRORS = [
  Deno.errors.NotFound,
  Deno.errors.PermissionDenied,
  Deno.errors.AlreadyExists,
  Deno.errors.IsADirectory,
  Deno.errors.NotADirectory,
];

/**
 * Thrown by {@link writeStdout} when the reader of stdout went away (`generate … | head`):
 * {@link runMain} then exits 0 quietly, as `head`'s users expect.
 */
export class OutputClosed extends Error {
  constructor(options?: ErrorOptions) {
    super("stdout was closed", options);
    this.name = "OutputClosed";
  }
}

/**
 * Runs a CLI's main: exit 0 when it resolves; a known error (above) or a file-system error is
 * one line `error: MESSAGE` on stderr and exit 1; a closed stdout exits 0 quietly; anything
 * else (a bug) keeps its stack trace, exit 1.
 */
export function runMain(main: () => Promise<void>): void {
  main().then(
    () => Deno.exit(0),
    (e) => {
      if (e instanceof OutputClosed) Deno.exit(0);
      const known = e instanceof Error &&
        (KNOWN.has(e.name) || IO_ERRORS.some((c) => e instanceof c) || isParseArgsError(e));
      console.error(known ? `error: ${e.message}` : e);
      Deno.exit(1);
    },
  );
}

/** Writes all of `text` to stdout; a closed pipe (EPIPE) becomes {@link OutputClosed}. */
export async function writeStdout(text: string): Promise<void> {
  const bytes = new TextEncoder().encode(text);
  try {
    for (let done = 0; done < bytes.length;) {
      done += await Deno.stdout.write(bytes.subarray(done));
    }
  } catch (e) {
    if (e instanceof Deno.errors.BrokenPipe) throw new OutputClosed({ cause: e });
    throw e;
  }
}

/** parseArgs' own errors carry a code ERR_PARSE_ARGS_*. */
function isParseArgsError(e: Error): boolean {
  return String((e as { code?: unknown }).code).startsWith("ERR_PARSE_ARGS_");
}

/** A negative number (`-1`, `-0.5`, `-1e-3`), which parseArgs alone takes for an option. */
const isNegativeNumber = (s: string) => /^-\.?\d/.test(s) && !Number.isNaN(Number(s));

/**
 * `--opt -1` as `--opt=-1` where `--opt` (or its short alias) takes a value and -1 is a number,
 * so that the option's own range check gives the real reason; anything after `--` is left
 * alone.
 */
function joinNegativeValues(args: string[], config: ParseArgsConfig): string[] {
  const options = config.options ?? {};
  const takesValue = new Set<string>();
  for (const [name, o] of Object.entries(options)) {
    if (o.type !== "string") continue;
    takesValue.add(`--${name}`);
    if (o.short) takesValue.add(`-${o.short}`);
  }
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === "--") return out.concat(args.slice(i));
    if (takesValue.has(a) && i + 1 < args.length && isNegativeNumber(args[i + 1])) {
      out.push(a.startsWith("--") ? `${a}=${args[++i]}` : `${a}${args[++i]}`); // -s-1
    } else out.push(a);
  }
  return out;
}

/** parseArgs' error as one line that names the option and points to --help. */
function parseArgsProblem(e: Error): string {
  const code = String((e as { code?: unknown }).code);
  const quoted = e.message.match(/'([^']+)'/)?.[1] ?? "";
  const option = quoted.replace(/ <value>$/, "");
  if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") return `unknown option ${option}`;
  if (code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL") return `unexpected argument "${quoted}"`;
  if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
    if (/argument missing/.test(e.message)) return `${option} needs a value`;
    if (/ambiguous/.test(e.message)) {
      return `${option} needs a value (one that starts with "-" is written ${option}=VALUE)`;
    }
    if (/does not take an argument/.test(e.message)) return `${option} takes no value`;
  }
  return e.message.split("\n")[0];
}

/**
 * node:util's parseArgs for the CLIs: `--temperature -1` reaches the option's range check (plain
 * parseArgs calls it ambiguous), and parseArgs' own errors (unknown option, missing value)
 * become one-line ParameterErrors that point to --help. Every command also takes
 * `--adapter NAME|INDEX` (the Vulkan driver to use, kernels/adapter.ts): it is checked here and
 * handed to createGpu through LOWBIT_ADAPTER; `--adapter list` prints the drivers and exits.
 */
export function parseCli<T extends ParseArgsConfig & { args: string[] }>(
  config: T,
): ReturnType<typeof nodeParseArgs<T>> {
  let parsed;
  try {
    const options = { ...config.options, adapter: { type: "string" as const } };
    parsed = nodeParseArgs({ ...config, options, args: joinNegativeValues(config.args, config) });
  } catch (e) {
    if (!(e instanceof Error) || !isParseArgsError(e)) throw e;
    throw new ParameterError(`${parseArgsProblem(e)}; see --help`, { cause: e });
  }
  const values = parsed.values as Record<string, unknown>;
  const adapter = values.adapter;
  delete values.adapter;
  if (typeof adapter === "string") {
    const drivers = vulkanDrivers();
    if (adapter === "list") {
      console.log(describeDrivers(drivers));
      Deno.exit(0);
    }
    pickDrivers(adapter, drivers); // an unknown one fails here, before any work
    Deno.env.set("LOWBIT_ADAPTER", adapter);
  }
  return parsed as ReturnType<typeof nodeParseArgs<T>>;
}

/** Why a file-system call failed, in a few words ("no such file", "permission denied"). */
function ioReason(e: unknown): string {
  if (e instanceof Deno.errors.NotFound) return "no such file";
  if (e instanceof Deno.errors.PermissionDenied) return "permission denied";
  return (e as Error).message;
}

/**
 * Checks that `path`, given as `label` ("--calib", "inspect"), is a file that exists, so that a
 * command fails before any work; a ParameterError naming it otherwise.
 */
export async function checkInputFile(label: string, path: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (e) {
    throw new ParameterError(`${label} ${path}: ${ioReason(e)}`, { cause: e });
  }
  if (!info.isFile) throw new ParameterError(`${label} ${path}: is a directory, not a file`);
}

/** The text of the file `path`, given as `label`; a ParameterError naming it when unreadable. */
export async function readTextInput(label: string, path: string): Promise<string> {
  await checkInputFile(label, path);
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    throw new ParameterError(`${label} ${path}: ${ioReason(e)}`, { cause: e });
  }
}

/**
 * Checks that a file can be written at `path`, given as `label` ("--out"): its directory exists
 * and `path` is not itself a directory; a ParameterError naming the problem otherwise. Creates
 * nothing.
 */
export async function checkOutputFile(label: string, path: string): Promise<void> {
  const dir = dirname(path);
  const info = await Deno.stat(dir).catch((e) => {
    throw new ParameterError(
      `${label} ${path}: directory ${dir} ${
        e instanceof Deno.errors.NotFound ? "does not exist" : `cannot be read (${ioReason(e)})`
      }`,
      { cause: e },
    );
  });
  if (!info.isDirectory) throw new ParameterError(`${label} ${path}: ${dir} is not a directory`);
  const target = await Deno.stat(path).catch(() => null);
  if (target?.isDirectory) throw new ParameterError(`${label} ${path}: is a directory`);
}

/** A progress reporter: call it as work advances; `end()` once the work is complete. */
export interface Progress {
  (done: number, total: number): void;
  /** The work is complete: prints the final line, unless a call already did. */
  end(): void;
}

/** Where {@link progress} writes, and whether it is a terminal (injectable for tests). */
export interface ProgressSink {
  tty: boolean;
  write(text: string): void;
  now(): number;
}

/** Options of {@link progress}. */
export interface ProgressOptions {
  /**
   * Complete only at `end()`, not when done reaches total: for totals that are estimates.
   * Default false (complete at the first call with done ≥ total, or at `end()`).
   */
  untilEnd?: boolean;
  /** Default: stderr, a terminal or not, and performance.now(). */
  sink?: ProgressSink;
}

const stderrSink = (): ProgressSink => ({
  tty: Deno.stderr.isTerminal(),
  write: (text) => Deno.stderr.writeSync(new TextEncoder().encode(text)),
  now: () => performance.now(),
});

/**
 * A progress line on stderr in MB: rewritten in place on a terminal (at most every 250 ms);
 * otherwise printed once, when the work is complete. Never above 100% (a total that turns out
 * low grows to what was done), and completed once (see {@link ProgressOptions.untilEnd}).
 */
export function progress(label: string, opts: ProgressOptions = {}): Progress {
  const sink = opts.sink ?? stderrSink();
  let last = -Infinity, finished = false, seen: { done: number; total: number } | null = null;
  const show = (done: number, total: number, complete: boolean) => {
    const t = Math.max(total, done);
    const pct = t > 0 ? Math.floor((100 * done) / t).toFixed(0) : "?";
    const line = `${label}: ${(done / 1e6).toFixed(1)} / ${(t / 1e6).toFixed(1)} MB (${pct}%)`;
    if (sink.tty) sink.write(`\r${line}${complete ? "\n" : ""}`);
    else if (complete) sink.write(`${line}\n`);
  };
  const report = (done: number, total: number) => {
    if (finished) return;
    seen = { done, total };
    const complete = !opts.untilEnd && total > 0 && done >= total, now = sink.now();
    if (!complete && now - last < 250) return;
    last = now;
    finished = complete;
    show(done, total, complete);
  };
  return Object.assign(report, {
    end() {
      if (finished || seen === null) return;
      finished = true;
      show(seen.done, seen.done, true);
    },
  });
}

/**
 * The value `v` of option `--name` as a number that passes `ok`; otherwise a ParameterError
 * saying it must be `what` ("--ctx must be a positive integer; got "x"").
 */
export function numberOption(
  name: string,
  v: string,
  what: string,
  ok: (n: number) => boolean,
): number {
  const n = Number(v);
  if (v.trim() === "" || !ok(n)) throw new ParameterError(`--${name} must be ${what}; got "${v}"`);
  return n;
}

/** An integer option ≥ `min`, or undefined where it was not given. */
export function intOption(name: string, v: string | undefined, min: number): number | undefined {
  if (v === undefined) return undefined;
  return numberOption(name, v, `an integer ≥ ${min}`, (n) => Number.isInteger(n) && n >= min);
}

/** The --dtype option: weight storage on the GPU. */
export function dtypeOption(v: string): WeightDType | "auto" {
  if (v !== "auto" && v !== "f32" && v !== "f16") {
    throw new ParameterError(`--dtype must be auto, f32 or f16; got "${v}"`);
  }
  return v;
}

/** The --kv-cache option (the KV cache's element type); undefined, the default, when absent. */
export function kvCacheOption(v: string | undefined): KvType | undefined {
  return v === undefined ? undefined : checkKvType(v, "--kv-cache");
}
