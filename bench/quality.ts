/**
 * `deno task bench quality`: perplexity of fp32 and of RTN / GPTQ / decoupleQ (stage 1, stage
 * 1+2, and stage 1+2 then the end-to-end stage) models at several bit widths, with each file's
 * bits per weight and the time its quantization took, written to bench/QUALITY.md. Each row
 * runs the real commands (quantize, eval) as subprocesses; finished rows are kept in
 * bench/quality.json, so an interrupted run resumes where it stopped (`--fresh` starts over, `--only stories|novels` picks a model).
 */
import { parseArgs } from "node:util";

const SHARED = new URL("../../shared/", import.meta.url).pathname;
const ROOT = new URL("../", import.meta.url).pathname;
const CACHE = new URL("./quality.json", import.meta.url);
const OUT = new URL("./QUALITY.md", import.meta.url);

interface Eval {
  label: string;
  text: string;
  args: string[];
}

interface Suite {
  name: string;
  model: string;
  calib: string;
  calibArgs: string[];
  settings: [number, number][]; // bits, group size
  evals: Eval[];
}

const SUITES: Suite[] = [
  {
    name: "stories260K",
    model: `${SHARED}models/stories260K-hf`,
    calib: `${SHARED}data/tinystories/TinyStories-valid-sample.txt`,
    calibArgs: ["--calib-samples", "0", "--calib-seqlen", "512"],
    settings: [[4, 32], [3, 32], [2, 32], [2, 64]],
    evals: [
      {
        label: "TinyStories (per line)",
        text: `${SHARED}data/tinystories/TinyStories-valid-sample.txt`,
        args: ["--per-line"],
      },
      {
        label: "WikiText-2 (60k tokens, ctx 256)",
        text: `${SHARED}data/wikitext-2/wiki.test.raw`,
        args: ["--ctx", "256", "--max-tokens", "60000"],
      },
    ],
  },
  {
    name: "novels-5M",
    model: `${SHARED}models/novels-5M`,
    calib: `${SHARED}data/novels/calib.txt`,
    calibArgs: ["--calib-samples", "128", "--calib-seqlen", "256"],
    settings: [[4, 128], [3, 64], [2, 64], [2, 32]],
    evals: [
      {
        label: "novels held-out (20k tokens)",
        text: `${SHARED}data/novels/heldout.txt`,
        args: ["--ctx", "256", "--max-tokens", "20000"],
      },
      {
        label: "WikiText-2 (20k tokens)",
        text: `${SHARED}data/wikitext-2/wiki.test.raw`,
        args: ["--ctx", "256", "--max-tokens", "20000"],
      },
    ],
  },
];

const METHODS = [
  { label: "RTN", args: ["--method", "rtn", "--calib"] },
  { label: "GPTQ", args: ["--method", "gptq", "--calib"] },
  { label: "decoupleQ stage 1", args: ["--method", "decoupleq", "--no-stage2", "--calib"] },
  { label: "decoupleQ stage 1+2", args: ["--method", "decoupleq", "--stage2", "--calib"] },
  {
    label: "decoupleQ stage 1+2+e2e",
    args: ["--method", "decoupleq", "--stage2", "--e2e-epochs", "2", "--calib"],
  },
];

interface Row {
  suite: string;
  method: string;
  setting: string;
  bitsPerWeight: number | null;
  quantizeSeconds: number | null;
  ppl: number[];
}

async function run(args: string[]): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...args],
    cwd: ROOT,
    stdout: "piped",
    stderr: "inherit",
    env: { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp" },
  }).output();
  if (!out.success) throw new Error(`failed: deno run ${args.join(" ")}`);
  return new TextDecoder().decode(out.stdout);
}

async function evaluate(model: string, e: Eval): Promise<number> {
  const out = await run([
    "runtime/eval_cmd.ts",
    "--model",
    model,
    "--text",
    e.text,
    "--cpu",
    "--json",
    ...e.args,
  ]);
  return JSON.parse(out.trim().split("\n").pop()!).perplexity;
}

function render(rows: Row[]): string {
  let md =
    `# lowbit quantization quality\n\nWritten by \`deno task bench quality\` (perplexity from the float64 ` +
    `CPU reference running each file's dequantized weights; lower is better). Bits per weight ` +
    `count the codes and the fp16 s, z of the linear layers.\n`;
  for (const s of SUITES) {
    md += `\n## ${s.name}\n\n| method | setting | bits/weight | ${
      s.evals.map((e) => e.label).join(" | ")
    } | quantize time |\n`;
    md += `| --- | --- | --- | ${s.evals.map(() => "---").join(" | ")} | --- |\n`;
    for (const r of rows.filter((r) => r.suite === s.name)) {
      const bpw = r.bitsPerWeight === null ? "32" : r.bitsPerWeight.toFixed(2);
      const t = r.quantizeSeconds === null ? "" : `${r.quantizeSeconds.toFixed(0)} s`;
      md += `| ${r.method} | ${r.setting} | ${bpw} | ${
        r.ppl.map((p) => p.toFixed(2)).join(" | ")
      } | ${t} |\n`;
    }
  }
  return md;
}

export async function benchQuality(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: { fresh: { type: "boolean", default: false }, only: { type: "string" } },
  });
  let rows: Row[] = [];
  if (!values.fresh) rows = await Deno.readTextFile(CACHE).then(JSON.parse, () => []);
  const save = async () => {
    await Deno.writeTextFile(CACHE, JSON.stringify(rows, null, 1));
    await Deno.writeTextFile(OUT, render(rows));
  };
  const tmp = await Deno.makeTempDir();
  for (const s of SUITES.filter((s) => !values.only || s.name.startsWith(values.only))) {
    const have = (method: string, setting: string) =>
      rows.some((r) => r.suite === s.name && r.method === method && r.setting === setting);
    if (!have("fp32", "")) {
      const ppl = [];
      for (const e of s.evals) ppl.push(await evaluate(s.model, e));
      rows.push({
        suite: s.name,
        method: "fp32",
        setting: "",
        bitsPerWeight: null,
        quantizeSeconds: null,
        ppl,
      });
      await save();
    }
    for (const [bits, g] of s.settings) {
      for (const m of METHODS) {
        const setting = `W${bits} g${g}`;
        if (have(m.label, setting)) continue;
        const file = `${tmp}/${s.name}-${bits}-${g}.lowbit`;
        console.error(`== ${s.name} ${m.label} ${setting}`);
        await run([
          "quantize/quantize_cmd.ts",
          "--model",
          s.model,
          "--out",
          file,
          "--bits",
          `${bits}`,
          "--group-size",
          `${g}`,
          ...m.args,
          s.calib,
          ...s.calibArgs,
        ]);
        const report = JSON.parse(await Deno.readTextFile(`${file}.report.json`));
        const inspect = await run(["runtime/inspect_cmd.ts", file]);
        const bpw = Number(/linear layers: bits\/weight\s+([\d.]+)/.exec(inspect)?.[1] ?? NaN);
        const ppl = [];
        for (const e of s.evals) ppl.push(await evaluate(file, e));
        rows.push({
          suite: s.name,
          method: m.label,
          setting,
          bitsPerWeight: bpw,
          quantizeSeconds: report.seconds,
          ppl,
        });
        await save();
        console.error(`   perplexity ${ppl.map((p) => p.toFixed(2)).join(" / ")}`);
      }
    }
  }
  await Deno.remove(tmp, { recursive: true });
  console.log(render(rows));
}
