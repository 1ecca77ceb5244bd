/**
 * `deno task bench quantize-1b`: quantizes a synthetic checkpoint of Llama-3.2-1B's shape (random
 * F16 weights, written once to a cache folder) with decoupleQ stage 1, calibrated on the novels
 * text, and reports the time and the peak RSS of the quantizing process (a fresh child, so the
 * peak is its own). `--layers N` quantizes an N-layer model of the same widths instead (a quick
 * probe of the per-block time). An interrupted run resumes at its last finished block (the time
 * then adds up the runs; the peak RSS is the last run's).
 */
import { parseArgs } from "node:util";
import { quantizeModel } from "../quantize/quantize_model.ts";
import { createGpu } from "../kernels/gpu.ts";
import { intOption } from "../runtime/cli/cli.ts";
import { cachedSyntheticCheckpoint, llama32_1bLikeConfig } from "../tests/synthetic.ts";
import { peakRss, recordResults, table, today } from "./results.ts";

const SHARED = new URL("../../shared/", import.meta.url).pathname;
const MB = 1 << 20;

interface Settings {
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
    method: "decoupleq",
    bits: s.bits,
    groupSize: s.groupSize,
    calib: {
      path: `${SHARED}data/novels/calib.txt`,
      samples: s.samples,
      seqLen: s.seqLen,
      seed: 0,
    },
    iters: s.iters,
    compare: false,
    stage2: null,
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
      layers: { type: "string", default: String(llama32_1bLikeConfig.nLayers) },
      bits: { type: "string", default: "2" },
      "group-size": { type: "string", default: "64" },
      iters: { type: "string", default: "1" },
      samples: { type: "string", default: "16" },
      seqlen: { type: "string", default: "256" },
      cache: { type: "string", default: "/tmp/lowbit-bench" },
    },
  });
  const s: Settings = {
    layers: intOption("layers", values.layers!, 1)!,
    bits: intOption("bits", values.bits!, 2)! as Settings["bits"],
    groupSize: intOption("group-size", values["group-size"]!, 0)!,
    iters: intOption("iters", values.iters!, 0)!,
    samples: intOption("samples", values.samples!, 1)!,
    seqLen: intOption("seqlen", values.seqlen!, 2)!,
  };
  const full = s.layers === llama32_1bLikeConfig.nLayers;
  const dir = `${values.cache}/llama-1b${full ? "" : `-L${s.layers}`}-f16`;
  const out = `${values.cache}/llama-1b-L${s.layers}-w${s.bits}g${s.groupSize}.lowbit`;
  if (values.child) return await child(dir, out, s);
  await cachedSyntheticCheckpoint(
    dir,
    { ...llama32_1bLikeConfig, nLayers: s.layers },
    full ? 2 : 1,
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
    ["model", `Llama-3.2-1B shape (dim 2048, FFN 8192, ${s.layers} layers), random F16 weights`],
    ["method", `decoupleQ stage 1, W${s.bits} g${s.groupSize}, ${s.iters} alternations`],
    [
      "calibration",
      `${s.samples} sequences of novels/calib.txt (≤ ${s.seqLen} tokens each), ${r.calibTokens} tokens`,
    ],
    [
      "time",
      `${(r.seconds / 60).toFixed(1)} min (${(r.seconds / s.layers).toFixed(0)} s per block)`,
    ],
    ["peak RSS", `${(r.peakRss / MB).toFixed(0)} MiB`],
    ["output", `${(r.fileBytes / 1e9).toFixed(2)} GB`],
  ];
  for (const [k, v] of rows) console.log(`${k}: ${v}`);
  if (full) {
    await recordResults(
      "quantize 1B decoupleQ",
      r.adapter,
      `${today()}\n\n${table(["figure", "value"], rows)}`,
    );
  }
}
