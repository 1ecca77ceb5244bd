/** Shared command-line plumbing: known errors print one line and exit 1, never a stack trace. */
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
