/**
 * `deno task quantize`: turns a checkpoint into a decoupleQ-packed `.lowbit` model file (or an
 * RTN / GPTQ baseline), with a per-layer report (JSON) beside it.
 *
 * @example
 *   deno task quantize --model ../shared/models/stories260K-hf --method decoupleq --bits 2 \
 *     --group-size 32 --calib ../shared/data/tinystories/TinyStories-valid-sample.txt --out m.lowbit
 */
import { ParameterError } from "../runtime/errors.ts";
import { numberOption, parseCli, runMain } from "../runtime/cli/cli.ts";
import type { Method } from "./sequential.ts";
import type { Bits } from "../runtime/format/qtensor.ts";
import { quantizeModel } from "./quantize_model.ts";
import { type Allocator, checkAllocator, parseFormats, parseSize } from "./allocate.ts";
import type { BudgetOptions } from "./mixed.ts";

const USAGE = `usage: deno task quantize --model PATH --out FILE [options]
  --method decoupleq|gptq|rtn   (default decoupleq)
  --bits 2|3|4                  (default 4)
  --group-size 32|64|128|0      0 = one group per row (default 128)
  --calib FILE|self             calibration text, or self: sequences sampled from the float
                                model (required for decoupleq and gptq)
  --calib-samples N             calibration sequences, 0 = all (default 128)
  --calib-seqlen N              tokens per sequence, BOS included (default: context, at most 512)
  --iters N                     decoupleQ alternations, stopping early when rows stop improving (default 8)
  --seed S                      calibration sampling seed (default 0)
  --threads N                   CPU threads for decoupleQ stage 1 and cvxq's trial quantizations
                                (default: all cores)
  --adapter NAME|N              Vulkan driver for the calibration passes (\`--adapter list\`)
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
  --teq                         TEQ first: per-channel scales of each group of linears trained on the
                                calibration sequences against the fake-quantized model, folded into
                                the float weights, which --method then quantizes (needs --calib)
  --teq-steps N                 its Adam steps (default 1000)
  --teq-lr X                    its learning rate (default 0.001)
  --teq-batch N                 calibration sequences per step (default 1)
  --teq-loss kl|ce              KL to the float model's next-token distributions, or the causal-LM
                                cross-entropy of the reference code (default kl)
  --teq-ste identity|grid       straight-through estimator: identity through the whole fake
                                quantizer (the reference code's), or through the rounding only,
                                each group's range differentiated (default identity)
  --teq-save FILE               write the trained scales (JSON), for --teq-load
  --teq-load FILE               use these scales instead of training (implies --teq)
  --bits-budget B               mixed precision: each linear's format (bits × group size) chosen so
                                that the linears average at most B bits per weight, codes and fp16
                                s, z counted (the figure inspect prints)
  --size-budget SIZE            the same for the whole file: 900MB, 1.2GiB, 350kB (bytes if no unit)
  --allocator cvxq|cvxq-analytic|mixquant|uniform
                                how formats are chosen under a budget (default cvxq): CVXQ on
                                measured output errors, CVXQ's analytic model, MixQuant, or the best
                                single format within the budget
  --formats LIST                candidate formats, e.g. W2g64,W3g32,W4g128 (default: bits 2, 3, 4 ×
                                group size 32, 64, 128)
  --sensitivity backward|relative
                                cvxq's G²: from a backward pass of the float model (default) or the
                                relative output error (no backward pass, for larger models)
  --sensitivity-samples N       calibration sequences of that backward pass (default 32)
  --trial-method decoupleq|gptq|rtn
                                cvxq's trial quantizations (default: --method)
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

/** The budget options, or null without --bits-budget / --size-budget. */
function budgetOptions(a: Record<string, string | boolean | undefined>): BudgetOptions | null {
  const bitsB = a["bits-budget"] as string | undefined,
    sizeB = a["size-budget"] as string | undefined;
  if (bitsB === undefined && sizeB === undefined) {
    for (const k of ["allocator", "formats", "trial-method"]) {
      if (a[k] !== undefined) {
        throw new ParameterError(`--${k} needs --bits-budget or --size-budget`);
      }
    }
    return null;
  }
  if (bitsB !== undefined && sizeB !== undefined) {
    throw new ParameterError("give --bits-budget or --size-budget, not both");
  }
  const allocator = (a.allocator ?? "cvxq") as string;
  checkAllocator(allocator);
  const sensitivity = a.sensitivity as string;
  if (sensitivity !== "backward" && sensitivity !== "relative") {
    throw new ParameterError(`--sensitivity must be backward or relative; got "${sensitivity}"`);
  }
  const trial = a["trial-method"] as Method | undefined;
  if (trial !== undefined && !["decoupleq", "gptq", "rtn"].includes(trial)) {
    throw new ParameterError(`--trial-method must be decoupleq, gptq or rtn; got "${trial}"`);
  }
  return {
    budget: bitsB !== undefined
      ? { bitsPerWeight: positive("bits-budget", bitsB) }
      : { bytes: parseSize(sizeB!) },
    allocator: allocator as Allocator,
    formats: a.formats !== undefined ? parseFormats(a.formats as string) : undefined,
    sensitivity,
    sensitivitySamples: int("sensitivity-samples", a["sensitivity-samples"] as string),
    trialMethod: trial,
  };
}

async function main(args: string[]): Promise<void> {
  const { values: a } = parseCli({
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
      teq: { type: "boolean", default: false },
      "teq-steps": { type: "string", default: "1000" },
      "teq-lr": { type: "string", default: "0.001" },
      "teq-batch": { type: "string", default: "1" },
      "teq-loss": { type: "string", default: "kl" },
      "teq-ste": { type: "string", default: "identity" },
      "teq-save": { type: "string" },
      "teq-load": { type: "string" },
      "bits-budget": { type: "string" },
      "size-budget": { type: "string" },
      allocator: { type: "string" },
      formats: { type: "string" },
      sensitivity: { type: "string", default: "backward" },
      "sensitivity-samples": { type: "string", default: "32" },
      "trial-method": { type: "string" },
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

  const budget = budgetOptions(a);
  const e2eEpochs = int("e2e-epochs", a["e2e-epochs"]!);
  const teqLoss = a["teq-loss"] as "kl" | "ce";
  if (teqLoss !== "kl" && teqLoss !== "ce") {
    throw new ParameterError(`--teq-loss must be kl or ce; got "${a["teq-loss"]}"`);
  }
  const teqSte = a["teq-ste"] as "identity" | "grid";
  if (teqSte !== "identity" && teqSte !== "grid") {
    throw new ParameterError(`--teq-ste must be identity or grid; got "${a["teq-ste"]}"`);
  }
  const teqSteps = int("teq-steps", a["teq-steps"]!), teqBatch = int("teq-batch", a["teq-batch"]!);
  if (teqSteps < 0 || teqBatch < 1) {
    throw new ParameterError(`--teq-steps must be ≥ 0 and --teq-batch ≥ 1`);
  }
  if (e2eEpochs < 0) throw new ParameterError(`--e2e-epochs must be ≥ 0; got ${e2eEpochs}`);
  const settings = {
    method,
    bits,
    groupSize,
    iters: int("iters", a.iters!),
    stage2,
    e2eEpochs,
    quantizeHead: a["quantize-head"],
    teq: a.teq || a["teq-load"] !== undefined,
    budget: budget?.budget ?? null,
    allocator: budget?.allocator ?? null,
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
    teq: settings.teq
      ? {
        steps: teqSteps,
        lr: positive("teq-lr", a["teq-lr"]!),
        batch: teqBatch,
        loss: teqLoss,
        ste: teqSte,
        seed: int("seed", a.seed!),
        save: a["teq-save"],
        load: a["teq-load"],
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
    budget,
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
