/**
 * `deno task bench quantize-1b`: quantizes a synthetic checkpoint of Llama-3.2-1B's shape (random
 * F16 weights, written once to a cache folder) with decoupleQ stage 1, calibrated on the novels
 * text, and reports the time and the peak RSS of the quantizing process (a fresh child, so the
 * peak is its own). `--layers N` quantizes an N-layer model of the same widths instead (a quick
 * probe of the per-block time). An interrupted run resumes at its last finished block (the time
 * then adds up the runs; the peak RSS is the last run's). `--shape smollm` uses SmolLM2-135M's
 * shape (serve's default model), `--method`, `--stage2` and `--calib self` (sequences sampled from
 * the model) time the other ways of quantizing it.
 */
import { parseArgs } from "node:util";
import { quantizeModel } from "../quantize/quantize_model.ts";
import { createGpu } from "../kernels/gpu.ts";
import { intOption } from "../runtime/cli/cli.ts";
import {
  cachedSyntheticCheckpoint,
  llama32_1bLikeConfig,
  smolLm2_135mConfig,
} from "../tests/synthetic.ts";
import type { Method } from "../quantize/sequential.ts";
import { peakRss, recordResults, table, today } from "./results.ts";

const SHARED = new URL("../../shared/", import.meta.url).pathname;
const MB = 1 << 20;

const SHAPES = {
  "1b": { config: llama32_1bLikeConfig, name: "llama-1b", label: "Llama-3.2-1B", title: "1B" },
  smollm: {
    config: smolLm2_135mConfig,
    name: "smollm2-135m",
    label: "SmolLM2-135M",
    title: "SmolLM2-135M",
  },
};

interface Settings {
  shape: keyof typeof SHAPES;
  method: Method;
  stage2: boolean;
  /** "novels" (the novels calibration text) or "self" (sampled from the model). */
  calib: string;
  layers: number;
  bits: 2 | 3 | 4;
  groupSize: number;
  iters: number;
  samples: number;
  seqLen: number;
}

/** The child: quantize, then print one JSON line. */
async function child(dir: string, out: string, s: Settings): Promise<void> {
  const r = await quantizeModel({
    model: dir,
    out,
    tokenizer: `${SHARED}data/novels/tokenizer/tokenizer.json`,
    method: s.method,
    bits: s.bits,
    groupSize: s.groupSize,
    calib: {
      path: s.calib === "self" ? "self" : `${SHARED}data/novels/calib.txt`,
      samples: s.samples,
      seqLen: s.seqLen,
      seed: 0,
    },
    iters: s.iters,
    compare: false,
    stage2: s.stage2 ? { epochs: 5 } : null, // quantize's default epochs
    resume: true, // an interrupted bench continues where it stopped
  });
  const adapter = (await createGpu()).adapterName;
  const fileBytes = (await Deno.stat(out)).size;
  const { seconds, calibTokens } = r;
  console.log(JSON.stringify({ seconds, calibTokens, peakRss: peakRss(), fileBytes, adapter }));
}

export async function benchQuantize1b(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      child: { type: "boolean", default: false },
      layers: { type: "string" },
      bits: { type: "string", default: "2" },
      "group-size": { type: "string", default: "64" },
      iters: { type: "string", default: "1" },
      samples: { type: "string", default: "16" },
      seqlen: { type: "string", default: "256" },
      cache: { type: "string", default: "/tmp/lowbit-bench" },
      shape: { type: "string", default: "1b" },
      method: { type: "string", default: "decoupleq" },
      stage2: { type: "boolean", default: false },
      calib: { type: "string", default: "novels" },
    },
  });
  const shape = values.shape as Settings["shape"];
  if (!(shape in SHAPES)) throw new Error(`--shape must be 1b or smollm; got ${values.shape}`);
  if (!["decoupleq", "gptq", "rtn"].includes(values.method!)) {
    throw new Error(`--method must be decoupleq, gptq or rtn; got ${values.method}`);
  }
  if (values.calib !== "novels" && values.calib !== "self") {
    throw new Error(`--calib must be novels or self; got ${values.calib}`);
  }
  const { config, name, label, title } = SHAPES[shape];
  const s: Settings = {
    shape,
    method: values.method as Method,
    stage2: values.stage2!,
    calib: values.calib!,
    layers: intOption("layers", values.layers ?? String(config.nLayers), 1)!,
    bits: intOption("bits", values.bits!, 2)! as Settings["bits"],
    groupSize: intOption("group-size", values["group-size"]!, 0)!,
    iters: intOption("iters", values.iters!, 0)!,
    samples: intOption("samples", values.samples!, 1)!,
    seqLen: intOption("seqlen", values.seqlen!, 2)!,
  };
  const full = s.layers === config.nLayers;
  const dir = `${values.cache}/${name}${full ? "" : `-L${s.layers}`}-f16`;
  const run = `${s.method}${s.stage2 ? "-s2" : ""}-${s.calib}`;
  const out = `${values.cache}/${name}-L${s.layers}-w${s.bits}g${s.groupSize}-${run}.lowbit`;
  if (values.child) return await child(dir, out, s);
  await cachedSyntheticCheckpoint(
    dir,
    { ...config, nLayers: s.layers },
    shape === "1b" && full ? 2 : 1,
  );
  const cmd = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("./main.ts", import.meta.url).pathname,
      "quantize-1b",
      "--child",
      ...args,
    ],
    stdout: "piped",
    stderr: "inherit",
  });
  const res = await cmd.output();
  if (!res.success) throw new Error("the quantize child failed");
  const r = JSON.parse(new TextDecoder().decode(res.stdout).trim().split("\n").pop()!);
  const rows = [
    [
      "model",
      `${label} shape (dim ${config.dim}, FFN ${config.hiddenDim}, ${s.layers} layers), ` +
      "random F16 weights",
    ],
    ["method", `${methodLabel(s)}, W${s.bits} g${s.groupSize}`],
    [
      "calibration",
      `${s.samples} sequences ${
        s.calib === "self" ? "sampled from the model (--calib self)" : "of novels/calib.txt"
      } (≤ ${s.seqLen} tokens each), ${r.calibTokens} tokens`,
    ],
    ["host load average at the start", Deno.loadavg()[0].toFixed(1)],
    [
      "time",
      `${(r.seconds / 60).toFixed(1)} min (${(r.seconds / s.layers).toFixed(0)} s per block)`,
    ],
    ["peak RSS", `${(r.peakRss / MB).toFixed(0)} MiB`],
    ["output", `${(r.fileBytes / 1e9).toFixed(2)} GB`],
  ];
  for (const [k, v] of rows) console.log(`${k}: ${v}`);
  if (full) {
    // the section name of the default run is the one RESULTS.md has always used
    const key = shape === "1b" && run === "decoupleq-novels" ? "decoupleQ" : methodLabel(s, run);
    await recordResults(
      `quantize ${title} ${key}`,
      r.adapter,
      `${today()}\n\n${table(["figure", "value"], rows)}`,
    );
  }
}

/** "decoupleQ stage 1, 1 alternations", "GPTQ", …; `run` for the section name. */
function methodLabel(s: Settings, run?: string): string {
  if (run) return run;
  if (s.method === "decoupleq") {
    return `decoupleQ stage 1${s.stage2 ? "+2" : ""}, ${s.iters} alternations`;
  }
  return s.method === "gptq" ? "GPTQ" : "RTN (H-weighted clip)";
}
