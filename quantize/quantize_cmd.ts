/**
 * `deno task quantize`: turns a checkpoint into a decoupleQ-packed `.lowbit` model file (or an
 * RTN / GPTQ baseline), with a per-layer report (JSON) beside it.
 *
 * @example
 *   deno task quantize --model ../shared/models/stories260K-hf --method decoupleq --bits 2 \
 *     --group-size 32 --calib ../shared/data/tinystories/TinyStories-valid-sample.txt --out m.lowbit
 */
import { parseArgs } from "node:util";
import { openCheckpoint } from "../runtime/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/load_tokenizer.ts";
import { expectedShapes, tensorNames as T } from "../runtime/config.ts";
import { ParameterError } from "../runtime/errors.ts";
import { numberOption, runMain } from "../runtime/cli.ts";
import { createLowbitWriter } from "../runtime/lowbit_writer.ts";
import type { LowbitTensorSpec } from "../runtime/lowbit_file.ts";
import { createGpu } from "../kernels/gpu.ts";
import { calibrationSequences } from "./calibration.ts";
import {
  type BlockReport,
  type LayerReport,
  type Method,
  quantizeSequential,
} from "./sequential.ts";
import { packQ } from "./pack.ts";
import { rtnQuantize } from "./rtn.ts";
import type { Bits } from "./qtensor.ts";

const USAGE = `usage: deno task quantize --model PATH --out FILE [options]
  --method decoupleq|gptq|rtn   (default decoupleq)
  --bits 2|3|4                  (default 4)
  --group-size 32|64|128|0      0 = one group per row (default 128)
  --calib FILE                  calibration text (required for decoupleq and gptq)
  --calib-samples N             calibration sequences, 0 = all (default 128)
  --calib-seqlen N              tokens per sequence, BOS included (default: context, at most 512)
  --iters N                     decoupleQ alternations, stopping early when rows stop improving (default 8)
  --seed S                      calibration sampling seed (default 0)
  --stage2 / --no-stage2        decoupleQ stage 2: tune s, z and norms per block (default on for decoupleq)
  --stage2-epochs N             (default 5)
  --no-compare                  skip the RTN/GPTQ losses in the per-layer report
  --tokenizer PATH              tokenizer (default: found beside the model)`;

const LINEARS = [T.wq, T.wk, T.wv, T.wo, T.w1, T.w3, T.w2];

function int(name: string, v: string, allowed?: number[]): number {
  const what = allowed ? `one of ${allowed.join(", ")}` : "an integer";
  return numberOption(name, v, what, (n) => Number.isInteger(n) && (allowed?.includes(n) ?? true));
}

async function main(args: string[]): Promise<void> {
  const { values: a } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      out: { type: "string" },
      method: { type: "string", default: "decoupleq" },
      bits: { type: "string", default: "4" },
      "group-size": { type: "string", default: "128" },
      calib: { type: "string" },
      "calib-samples": { type: "string", default: "128" },
      "calib-seqlen": { type: "string" },
      iters: { type: "string", default: "8" },
      seed: { type: "string", default: "0" },
      "no-compare": { type: "boolean", default: false },
      stage2: { type: "boolean" },
      "no-stage2": { type: "boolean", default: false },
      "stage2-epochs": { type: "string", default: "5" },
      tokenizer: { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (a.help) return console.log(USAGE);
  if (!a.model || !a.out) throw new ParameterError(`--model and --out are required\n${USAGE}`);
  const method = a.method as Method;
  if (!["decoupleq", "gptq", "rtn"].includes(method)) {
    throw new ParameterError(`--method must be decoupleq, gptq or rtn; got "${a.method}"`);
  }
  const bits = int("bits", a.bits!, [2, 3, 4]) as Bits;
  const groupSize = int("group-size", a["group-size"]!, [0, 32, 64, 128]);
  if (method !== "rtn" && !a.calib) {
    throw new ParameterError(`--method ${method} needs --calib FILE`);
  }
  const stage2 = (a.stage2 ?? method === "decoupleq") && !a["no-stage2"];
  if (stage2 && !a.calib) throw new ParameterError("--stage2 needs --calib FILE");

  const ckpt = await openCheckpoint(a.model);
  const c = ckpt.config;
  const tokenizer = await loadTokenizer(a.model, a.tokenizer);
  const linear = new Set(
    Array.from({ length: c.nLayers }, (_, l) => LINEARS.map((f) => f(l))).flat(),
  );
  const tensors: LowbitTensorSpec[] = [...expectedShapes(c)].map(([name, shape]) => ({
    name,
    shape,
    ...(linear.has(name)
      ? { dtype: "Q" as const, quant: { bits, groupSize } }
      : { dtype: shape.length === 1 ? "F32" as const : "F16" as const }),
  }));
  const settings = {
    method,
    bits,
    groupSize,
    iters: Number(a.iters),
    stage2,
    calib: a.calib ?? null,
    seed: Number(a.seed),
  };
  const writer = await createLowbitWriter(a.out, {
    config: c,
    tokenizer: tokenizer.toData(),
    quantization: { ...settings, calibSamples: Number(a["calib-samples"]), source: a.model },
    tensors,
  });
  const t0 = performance.now();
  // float tensors other than the block norms (which stage 2 may tune) first, one at a time
  const blockNorms = new Set(
    Array.from({ length: c.nLayers }, (_, l) => [T.attnNorm(l), T.ffnNorm(l)]).flat(),
  );
  for (const t of tensors) {
    if (t.dtype !== "Q" && !blockNorms.has(t.name)) {
      await writer.writeTensor(t.name, await ckpt.read(t.name));
    }
  }
  const sink = {
    linear: (name: string, ql: Parameters<typeof packQ>[0]) => writer.writeTensor(name, packQ(ql)),
    norm: (name: string, g: Float32Array) => writer.writeTensor(name, g),
  };
  let reports: { layers: LayerReport[]; blocks: BlockReport[] } = { layers: [], blocks: [] };
  if (a.calib) {
    const text = await Deno.readTextFile(a.calib);
    const seqLen = a["calib-seqlen"]
      ? int("calib-seqlen", a["calib-seqlen"])
      : Math.min(c.seqLen, 512);
    const seqs = calibrationSequences(tokenizer, text, {
      seqLen,
      samples: int("calib-samples", a["calib-samples"]!),
      seed: int("seed", a.seed!),
    });
    console.error(
      `calibration: ${seqs.length} sequences, ${seqs.reduce((n, s) => n + s.length, 0)} tokens`,
    );
    reports = await quantizeSequential(await createGpu(), ckpt, seqs, {
      method,
      bits,
      groupSize,
      iters: int("iters", a.iters!),
      compare: !a["no-compare"],
      stage2: stage2 ? { epochs: int("stage2-epochs", a["stage2-epochs"]!) } : null,
    }, sink);
  } else {
    for (const name of blockNorms) await sink.norm(name, await ckpt.read(name));
    for (const name of linear) {
      const [N, K] = ckpt.tensors.get(name)!.shape;
      await sink.linear(name, rtnQuantize(await ckpt.read(name), N, K, { bits, groupSize }));
      console.error(`rtn ${name} (${N}×${K})`);
    }
  }
  await writer.close();
  ckpt.close();
  const seconds = (performance.now() - t0) / 1000;
  const report = `${a.out}.report.json`;
  await Deno.writeTextFile(report, JSON.stringify({ settings, seconds, ...reports }, null, 2));
  const size = (await Deno.stat(a.out)).size;
  console.log(
    `wrote ${a.out} (${(size / 1e6).toFixed(2)} MB) in ${
      seconds.toFixed(1)
    } s; per-layer report: ${report}`,
  );
}

if (import.meta.main) runMain(() => main(Deno.args));
