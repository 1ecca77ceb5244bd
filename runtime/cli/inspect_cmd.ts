/**
 * `deno task inspect FILE`: prints a `.lowbit` file's header as tables (model config, tokenizer,
 * quantization settings, one row per tensor) and totals (file size, average bits per weight of
 * the linear layers). Reads only the header.
 *
 * @example
 *   deno task inspect model.lowbit
 */
import { type ModelConfig, tensorNames as T } from "../checkpoint/config.ts";
import { ParameterError } from "../errors.ts";
import { elementCount, type LowbitTensorEntry } from "../format/lowbit_file.ts";
import { type LowbitCheckpoint, openLowbit } from "../format/lowbit_reader.ts";
import { tokenizerFromData } from "../tokenizer/load_tokenizer.ts";
import { checkInputFile, runMain, writeStdout } from "./cli.ts";

/** Rows as a text table: columns padded, numbers (`right`) right-aligned. */
export function table(head: string[], rows: string[][], right: boolean[] = []): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) =>
    r.map((c, i) => (right[i] ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join("  ")
      .trimEnd();
  return [line(head), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

/** Names of the linear (projection) weights of the transformer blocks. */
function linearNames(c: ModelConfig): Set<string> {
  const s = new Set<string>();
  for (let l = 0; l < c.nLayers; l++) {
    for (const f of [T.wq, T.wk, T.wv, T.wo, T.w1, T.w2, T.w3]) s.add(f(l));
  }
  return s;
}

/** Stored bytes of a tensor (Q: codes and scales). */
function storedBytes(e: LowbitTensorEntry): number {
  return e.bytes + (e.szBytes ?? 0);
}

function show(v: unknown): string {
  return typeof v === "string" ? v : JSON.stringify(v);
}

const mb = (n: number) => `${(n / 1e6).toFixed(2)} MB`;

/** The inspect report of an opened `.lowbit` file. */
export async function inspectText(f: LowbitCheckpoint): Promise<string> {
  const h = f.header, out: string[] = [];
  out.push(
    `${f.path}: .lowbit format version ${f.version}, ${f.fileSize} bytes (${mb(f.fileSize)})`,
  );

  out.push("", "model config");
  out.push(table(["field", "value"], Object.entries(h.config).map(([k, v]) => [k, show(v)])));

  out.push("", "tokenizer");
  const t = h.tokenizer;
  if (t === null) out.push("none embedded (give one with --tokenizer)");
  else {
    let vocab: string;
    try {
      vocab = String((await tokenizerFromData(t)).vocabSize);
    } catch (e) {
      vocab = `unreadable (${(e as Error).message})`;
    }
    const size = t.kind === "llama2c"
      ? t.bytes.length
      : t.kind === "hf"
      ? t.tokenizerJson.length + (t.tokenizerConfigJson?.length ?? 0)
      : 0;
    const rows = [["kind", t.kind], ["vocab", vocab], ["embedded bytes", String(size)]];
    if (t.kind === "llama2c") rows.push(["chat template", t.chatTemplate ? "yes" : "no"]);
    if (t.kind === "hf") rows.push(["tokenizer_config.json", t.tokenizerConfigJson ? "yes" : "no"]);
    out.push(table(["field", "value"], rows));
  }

  out.push("", "quantization");
  const teq = h.quantization.teq;
  const isTeq = typeof teq === "object" && teq !== null;
  const alloc = h.quantization.allocation;
  const isAlloc = typeof alloc === "object" && alloc !== null;
  out.push(
    table(
      ["setting", "value"],
      Object.entries(h.quantization).map(([k, v]) => [
        k,
        (isTeq && k === "teq") || (isAlloc && k === "allocation") ? "below" : show(v),
      ]),
    ),
  );
  if (isAlloc) {
    out.push("", "allocation (mixed precision: each linear's format chosen to the budget)");
    out.push(table(["setting", "value"], Object.entries(alloc).map(([k, v]) => [k, show(v)])));
  }
  if (isTeq) {
    out.push("", "teq (scales folded into the float weights before quantization)");
    out.push(table(["setting", "value"], Object.entries(teq).map(([k, v]) => [k, show(v)])));
  }

  out.push("", "tensors");
  const rows = h.tensors.map((e) => {
    const type = e.dtype === "Q"
      ? `Q${e.bits} g${e.groupSize === 0 ? "row" : e.groupSize}`
      : e.dtype;
    const bytes = storedBytes(e);
    return [
      e.name,
      `[${e.shape.join(", ")}]`,
      type,
      String(e.offset),
      String(bytes),
      (8 * bytes / elementCount(e.shape)).toFixed(3),
    ];
  });
  out.push(
    table(
      ["name", "shape", "dtype", "offset", "bytes", "bits/weight"],
      rows,
      [false, false, false, true, true, true],
    ),
  );

  const linear = linearNames(h.config);
  const lin = h.tensors.filter((e) => linear.has(e.name));
  const linBits = lin.reduce((a, e) => a + 8 * storedBytes(e), 0);
  const linWeights = lin.reduce((a, e) => a + elementCount(e.shape), 0);
  const allWeights = h.tensors.reduce((a, e) => a + elementCount(e.shape), 0);
  const tensorBytes = h.tensors.reduce((a, e) => a + storedBytes(e), 0);
  out.push("", "packed formats");
  out.push(formatSummary(h.tensors.filter((e) => e.dtype === "Q")));
  out.push("", "totals");
  out.push(table(["total", "value"], [
    ["file size", `${f.fileSize} bytes (${mb(f.fileSize)})`],
    ["tensors", `${h.tensors.length} (${tensorBytes} bytes of data)`],
    ["parameters", String(allWeights)],
    ["linear-layer weights", String(linWeights)],
    [
      "linear layers: bits/weight",
      linWeights ? (linBits / linWeights).toFixed(3) : "-",
    ],
    ["whole file: bits/parameter", (8 * f.fileSize / allWeights).toFixed(3)],
  ]));
  return out.join("\n");
}

/** One row per packed format (mixed-precision files have several): count, weights, bits, size. */
function formatSummary(q: LowbitTensorEntry[]): string {
  const by = new Map<string, { count: number; weights: number; bytes: number }>();
  for (const e of q) {
    const k = `Q${e.bits} g${e.groupSize === 0 ? "row" : e.groupSize}`;
    const r = by.get(k) ?? { count: 0, weights: 0, bytes: 0 };
    r.count++;
    r.weights += elementCount(e.shape);
    r.bytes += storedBytes(e);
    by.set(k, r);
  }
  if (by.size === 0) return "none";
  const rows = [...by].sort(([a], [b]) => a.localeCompare(b)).map(([k, r]) => [
    k,
    String(r.count),
    String(r.weights),
    (8 * r.bytes / r.weights).toFixed(3),
    String(r.bytes),
  ]);
  return table(
    ["format", "tensors", "weights", "bits/weight", "bytes"],
    rows,
    [false, true, true, true, true],
  );
}

async function main(args: string[]): Promise<void> {
  if (args.length !== 1 || args[0].startsWith("-")) {
    throw new ParameterError("usage: deno task inspect FILE.lowbit");
  }
  await checkInputFile("inspect", args[0]);
  const f = await openLowbit(args[0]);
  try {
    await writeStdout(`${await inspectText(f)}\n`); // `inspect FILE | head` ends quietly
  } finally {
    f.close();
  }
}

if (import.meta.main) runMain(() => main(Deno.args));
