/**
 * `deno task bench quality`: perplexity of fp32 and of RTN / GPTQ / decoupleQ (stage 1, stage
 * 1+2, and stage 1+2 then the end-to-end stage) models at several bit widths, with each file's
 * bits per weight and the time its quantization took, written to bench/QUALITY.md. Each row
 * runs the real commands (quantize, eval) as subprocesses; finished rows are kept in
 * bench/quality.json, so an interrupted run resumes where it stopped (`--fresh` starts over,
 * `--only stories|novels` picks a model, `--setting "W2 g64"` one setting). Finished rows are
 * merged into the cache as they land, so runs for different settings may go side by side.
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

interface E2ERun {
  args: string[];
  note: string;
}

interface Suite {
  name: string;
  model: string;
  calib: string;
  calibArgs: string[];
  settings: [number, number][]; // bits, group size
  /** Quantize arguments of the end-to-end stage, and how the table states them. */
  e2e: E2ERun;
  /** Other end-to-end settings for some settings, e.g. `{ "W2 g32": … }`. */
  e2eBySetting?: Record<string, E2ERun>;
  evals: Eval[];
}

const SUITES: Suite[] = [
  {
    name: "stories260K",
    model: `${SHARED}models/stories260K-hf`,
    calib: `${SHARED}data/tinystories/TinyStories-valid-sample.txt`,
    calibArgs: ["--calib-samples", "0", "--calib-seqlen", "512"],
    settings: [[4, 32], [3, 32], [2, 32], [2, 64]],
    e2e: { args: ["--e2e-epochs", "2"], note: "2 epochs over all 40 calibration sequences" },
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
    e2e: {
      args: ["--e2e-epochs", "2", "--e2e-samples", "1024"],
      note: "2 epochs over 1024 calibration sequences (lines)",
    },
    e2eBySetting: {
      "W2 g32": {
        args: ["--e2e-epochs", "3", "--e2e-samples", "420", "--e2e-windows"],
        note: "3 epochs over 420 windows of the whole calibration text, as eval reads a text",
      },
    },
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
    args: ["--method", "decoupleq", "--stage2", "--calib"],
    e2e: true,
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
    "runtime/cli/eval_cmd.ts",
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
    `count the codes and the fp16 s, z of the linear layers. Quantize times are wall-clock on a ` +
    `2-core machine, sometimes shared by settings run side by side.\n`;
  for (const s of SUITES) {
    md += `\n## ${s.name}\n\nThe end-to-end stage: ${s.e2e.note}${
      Object.entries(s.e2eBySetting ?? {}).map(([k, e]) => `; at ${k}, ${e.note}`).join("")
    }.\n\n| method | setting | bits/weight | ${
      s.evals.map((e) => e.label).join(" | ")
    } | quantize time |\n`;
    md += `| --- | --- | --- | ${s.evals.map(() => "---").join(" | ")} | --- |\n`;
    const settings = ["", ...s.settings.map(([b, g]) => `W${b} g${g}`)];
    const methods = ["fp32", ...METHODS.map((m) => m.label)];
    const order = (r: Row) => settings.indexOf(r.setting) * 100 + methods.indexOf(r.method);
    for (const r of rows.filter((r) => r.suite === s.name).sort((a, b) => order(a) - order(b))) {
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
    options: {
      fresh: { type: "boolean", default: false },
      only: { type: "string" },
      setting: { type: "string" },
    },
  });
  const load = (): Promise<Row[]> => Deno.readTextFile(CACHE).then(JSON.parse, () => []);
  const suites = SUITES.filter((s) => !values.only || s.name.startsWith(values.only));
  if (
    values.setting &&
    !suites.some((s) => s.settings.some(([b, g]) => `W${b} g${g}` === values.setting))
  ) {
    throw new Error(`--setting ${values.setting}: no such setting (e.g. "W2 g64")`);
  }
  if (values.fresh) await Deno.remove(CACHE).catch(() => {});
  let rows = await load();
  const same = (a: Row, b: Row) =>
    a.suite === b.suite && a.method === b.method && a.setting === b.setting;
  /** Adds `row` to what the cache holds now (another run may have added rows since). */
  const save = async (row: Row) => {
    rows = [...(await load()).filter((r) => !same(r, row)), row];
    await Deno.writeTextFile(CACHE, JSON.stringify(rows, null, 1));
    await Deno.writeTextFile(OUT, render(rows));
  };
  const tmp = await Deno.makeTempDir();
  for (const s of suites) {
    const have = (method: string, setting: string) =>
      rows.some((r) => r.suite === s.name && r.method === method && r.setting === setting);
    if (!have("fp32", "")) {
      const ppl = [];
      for (const e of s.evals) ppl.push(await evaluate(s.model, e));
      await save({
        suite: s.name,
        method: "fp32",
        setting: "",
        bitsPerWeight: null,
        quantizeSeconds: null,
        ppl,
      });
    }
    for (const [bits, g] of s.settings) {
      const setting = `W${bits} g${g}`;
      if (values.setting && values.setting !== setting) continue;
      for (const m of METHODS) {
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
          ...("e2e" in m ? (s.e2eBySetting?.[setting] ?? s.e2e).args : []),
        ]);
        const report = JSON.parse(await Deno.readTextFile(`${file}.report.json`));
        const inspect = await run(["runtime/cli/inspect_cmd.ts", file]);
        const bpw = Number(/linear layers: bits\/weight\s+([\d.]+)/.exec(inspect)?.[1] ?? NaN);
        const ppl = [];
        for (const e of s.evals) ppl.push(await evaluate(file, e));
        await save({
          suite: s.name,
          method: m.label,
          setting,
          bitsPerWeight: bpw,
          quantizeSeconds: report.seconds,
          ppl,
        });
        console.error(`   perplexity ${ppl.map((p) => p.toFixed(2)).join(" / ")}`);
      }
    }
  }
  await Deno.remove(tmp, { recursive: true });
  const md = render(await load()); // with the rows of any run beside this one
  await Deno.writeTextFile(OUT, md);
  console.log(md);
}
