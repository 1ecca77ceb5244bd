/**
 * Writes benchmark tables into bench/RESULTS.md: each (benchmark, adapter) pair owns one section,
 * replaced on every run, so the file always holds the latest figures for each device.
 */
const FILE = new URL("./RESULTS.md", import.meta.url);

const HEADER = `# lowbit benchmark results

Written by \`deno task bench ...\`; each section is replaced when its benchmark runs again on the
same adapter. Figures are measurements, not test assertions.
`;

/** Replaces (or appends) the section for `bench` on `adapter` with `body` (markdown). */
export async function recordResults(bench: string, adapter: string, body: string): Promise<void> {
  const key = `<!-- ${bench} @ ${adapter} -->`;
  let text = HEADER;
  try {
    text = await Deno.readTextFile(FILE);
  } catch {
    // first run: start from the header
  }
  const section = `${key}\n## ${bench} — ${adapter}\n\n${body.trim()}\n<!-- end -->\n`;
  const start = text.indexOf(key);
  if (start >= 0) {
    const end = text.indexOf("<!-- end -->\n", start) + "<!-- end -->\n".length;
    text = text.slice(0, start) + section + text.slice(end);
  } else {
    text = `${text.trimEnd()}\n\n${section}`;
  }
  await Deno.writeTextFile(FILE, text);
}

/** A markdown table from a header row and data rows. */
export function table(head: string[], rows: (string | number)[][]): string {
  const line = (r: (string | number)[]) => `| ${r.join(" | ")} |`;
  return [line(head), line(head.map(() => "---")), ...rows.map(line)].join("\n");
}

/** Today's date as YYYY-MM-DD. */
export function today(): string {
  return new Date().toISOString().slice(0, 10);
}

/** This process's peak resident set size (VmHWM), in bytes. */
export function peakRss(): number {
  const status = Deno.readTextFileSync("/proc/self/status");
  const kb = Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? NaN);
  return kb * 1024;
}
