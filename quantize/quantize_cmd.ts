/**
 * `deno task quantize`: turns a checkpoint into a decoupleQ-packed `.lowbit` model file (or an
 * RTN / GPTQ baseline), with a per-layer report (JSON) beside it.
 *
 * @example
 *   deno task quantize --model ../shared/models/stories260K-hf --method decoupleq --bits 2 \
 *     --group-size 32 --calib ../shared/data/tinystories/TinyStories-valid-sample.txt --out m.lowbit
 */
import { parseArgs } from "node:util";
import { ParameterError } from "../runtime/errors.ts";
import { numberOption, runMain } from "../runtime/cli/cli.ts";
import type { Method } from "./sequential.ts";
import type { Bits } from "../runtime/format/qtensor.ts";
import { quantizeModel } from "./quantize_model.ts";

const USAGE = `usage: deno task quantize --model PATH --out FILE [options]
  --method decoupleq|gptq|rtn   (default decoupleq)
  --bits 2|3|4                  (default 4)
  --group-size 32|64|128|0      0 = one group per row (default 128)
  --calib FILE                  calibration text (required for decoupleq and gptq)
  --calib-samples N             calibration sequences, 0 = all (default 128)
  --calib-seqlen N              tokens per sequence, BOS included (default: context, at most 512)
  --iters N                     decoupleQ alternations, stopping early when rows stop improving (default 8)
  --seed S                      calibration sampling seed (default 0)
  --threads N                   CPU threads for decoupleQ stage 1 (default: all cores)
  --stage2 / --no-stage2        decoupleQ stage 2: tune s, z and norms per block (default on for decoupleq)
  --stage2-epochs N             (default 5)
  --stage2-lr X                 stage 2 learning rate, relative to each tensor's mean magnitude (default 0.01)
  --e2e-epochs N                end-to-end stage after stage 2: all s, z and norms against the float
                                model's next-token distributions (KL); 0 = off (default 0)
  --e2e-lr X                    its learning rate, relative as stage 2's (default 0.003)
  --e2e-samples N               its calibration sequences, 0 = all (default 512)
  --e2e-windows                 cut them from the whole text, line breaks included, as eval reads
                                a text (default: from each line, as the main calibration)
  --percdamp X                  Hessian damping, a fraction of its mean diagonal (default 0.01)
  --quantize-head               pack the logits layer too (default: it stays fp16)
  --no-compare                  skip the RTN/GPTQ losses in the per-layer report
  --resume                      continue an interrupted run of the same command (calibrated)
  --tokenizer PATH              tokenizer (default: found beside the model)`;

function int(name: string, v: string, allowed?: number[]): number {
  const what = allowed ? `one of ${allowed.join(", ")}` : "an integer";
  return numberOption(name, v, what, (n) => Number.isInteger(n) && (allowed?.includes(n) ?? true));
}

function positive(name: string, v: string): number {
  return numberOption(name, v, "a positive number", (x) => x > 0 && Number.isFinite(x));
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
      threads: { type: "string", default: String(navigator.hardwareConcurrency) },
      "no-compare": { type: "boolean", default: false },
      "quantize-head": { type: "boolean", default: false },
      resume: { type: "boolean", default: false },
      stage2: { type: "boolean" },
      "no-stage2": { type: "boolean", default: false },
      "stage2-epochs": { type: "string", default: "5" },
      "stage2-lr": { type: "string", default: "0.01" },
      "e2e-epochs": { type: "string", default: "0" },
      "e2e-lr": { type: "string", default: "0.003" },
      "e2e-samples": { type: "string", default: "512" },
      "e2e-windows": { type: "boolean", default: false },
      percdamp: { type: "string", default: "0.01" },
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
  const stage2 = (a.stage2 ?? (method === "decoupleq" && a.calib !== undefined)) && !a["no-stage2"];

  const e2eEpochs = int("e2e-epochs", a["e2e-epochs"]!);
  if (e2eEpochs < 0) throw new ParameterError(`--e2e-epochs must be ≥ 0; got ${e2eEpochs}`);
  const settings = {
    method,
    bits,
    groupSize,
    iters: int("iters", a.iters!),
    stage2,
    e2eEpochs,
    quantizeHead: a["quantize-head"],
  };
  const result = await quantizeModel({
    model: a.model,
    out: a.out,
    tokenizer: a.tokenizer,
    method,
    bits,
    groupSize,
    calib: a.calib
      ? {
        path: a.calib,
        seqLen: a["calib-seqlen"] ? int("calib-seqlen", a["calib-seqlen"]) : undefined,
        samples: int("calib-samples", a["calib-samples"]!),
        seed: int("seed", a.seed!),
      }
      : undefined,
    iters: settings.iters,
    threads: int("threads", a.threads!),
    quantizeHead: a["quantize-head"],
    resume: a.resume,
    compare: !a["no-compare"],
    percdamp: positive("percdamp", a.percdamp!),
    stage2: stage2
      ? {
        epochs: int("stage2-epochs", a["stage2-epochs"]!),
        lr: positive("stage2-lr", a["stage2-lr"]!),
      }
      : null,
    e2e: e2eEpochs > 0
      ? {
        epochs: e2eEpochs,
        lr: positive("e2e-lr", a["e2e-lr"]!),
        samples: int("e2e-samples", a["e2e-samples"]!),
        windows: a["e2e-windows"],
      }
      : null,
  });
  const report = `${a.out}.report.json`;
  await Deno.writeTextFile(report, JSON.stringify({ settings, ...result }, null, 2));
  const size = (await Deno.stat(a.out)).size;
  console.log(
    `wrote ${a.out} (${(size / 1e6).toFixed(2)} MB) in ${result.seconds.toFixed(1)} s; ` +
      `per-layer report: ${report}`,
  );
}

if (import.meta.main) runMain(() => main(Deno.args));
