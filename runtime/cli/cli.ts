/**
 * Shared command-line plumbing: known errors print one line and exit 1, never a stack trace;
 * option values are checked with errors that name the option.
 */
import { ParameterError } from "../errors.ts";
import type { WeightDType } from "../model/gpu_weights.ts";

const KNOWN = new Set([
  "ModelFormatError",
  "UnsupportedModelError",
  "ShapeError",
  "ParameterError",
  "GpuError",
  "TokenizerError",
  "TypeError", // parseArgs: unknown option, missing value
]);

export function runMain(main: () => Promise<void>): void {
  main().then(
    () => Deno.exit(0),
    (e) => {
      if (e instanceof Error && KNOWN.has(e.name)) console.error(`error: ${e.message}`);
      else console.error(e);
      Deno.exit(1);
    },
  );
}

/** A progress line on stderr, rewritten in place on a terminal. */
export function progress(label: string): (done: number, total: number) => void {
  const tty = Deno.stderr.isTerminal();
  let last = 0;
  return (done, total) => {
    const now = performance.now();
    if (done < total && now - last < 250) return;
    last = now;
    const pct = total > 0 ? ((100 * done) / total).toFixed(0) : "?";
    const line = `${label}: ${(done / 1e6).toFixed(1)} / ${(total / 1e6).toFixed(1)} MB (${pct}%)`;
    if (tty) {
      Deno.stderr.writeSync(new TextEncoder().encode(`\r${line}${done >= total ? "\n" : ""}`));
    } else if (done >= total) console.error(line);
  };
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
