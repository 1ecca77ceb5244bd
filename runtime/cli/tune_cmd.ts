/**
 * `deno task tune`: tunes the quantized kernels, the dense (f32/f16) ones and the attention kernel
 * of a model (or of synthetic model shapes) on this machine's adapter (kernels/tuner.ts,
 * kernels/tune_dense.ts, kernels/tune_attention.ts): every distinct quantized kernel the forward
 * plans run at batch 1, at the batched decode row counts and in prefill, every dense matrix's
 * decode kernel and, on GPUs, its batched decode steps' lane kernel (a dense model's layers, the
 * fp16 logits layer of a quantized one and of the synthetic shapes), and attention in decode and
 * prefill for the KV cache the runtime uses (`--kv-cache`); progress on stderr, a table of the
 * heuristic shape's time against the tuned one's on stdout, the choices into the tune cache
 * (kernels/tune_cache.ts), which every later run on this adapter reads.
 *
 * @example
 *   deno task tune --model model.lowbit
 *   deno task tune --shapes 7b --bits 2,3,4 --group 128 --out tune.json
 */
import { openCheckpoint } from "../checkpoint/open_checkpoint.ts";
import { type ModelConfig, tensorNames as T } from "../checkpoint/config.ts";
import type { Checkpoint } from "../checkpoint/checkpoint.ts";
import type { Bits } from "../format/qtensor.ts";
import { ParameterError } from "../errors.ts";
import { createGpu, type Gpu } from "../../kernels/gpu.ts";
import { qGroup } from "../../kernels/matvec_q.ts";
import { gpuAdapterId, tuneCachePath } from "../../kernels/tune_cache.ts";
import { describeKernelShape } from "../../kernels/attention_key.ts";
import type { AnyTuneResult } from "../../kernels/tuner.ts";
import {
  autoDType,
  denseChunks,
  denseFormat,
  type WeightDType,
  weightSource,
} from "../model/gpu_weights.ts";
import { llama2_7bConfig, llama32_1bLikeConfig } from "../checkpoint/shapes.ts";
import {
  attentionPlan,
  densePlan,
  layerShapes,
  type MatrixShape,
  type PlanJob,
  type PlanWeights,
  tuneAndSave,
  tunePlan,
} from "../model/tune_plan.ts";
import {
  checkOutputFile,
  intOption,
  kvCacheOption,
  parseCli,
  runMain,
  writeStdout,
} from "./cli.ts";
import { table } from "./inspect_cmd.ts";

const USAGE = `usage: deno task tune (--model PATH | --shapes smoke|1b|7b) [options]
  --model PATH       .lowbit file (or checkpoint): tune the kernels its forward plan runs
  --shapes NAME      synthetic shapes instead: smoke (tiny), 1b (Llama 3.2 1B), 7b (Llama 2 7B)
  --bits LIST        bit widths of the synthetic shapes (default 4), e.g. 2,3,4
  --group G          group size of the synthetic shapes (default 128; 0 = one per row)
  --head             synthetic shapes: the logits layer packed too (quantize --quantize-head)
  --rows LIST        batched decode row counts to tune besides batch 1 (default: those the runtime
                     builds plans for, 8,32 on GPUs and 8 on CPU adapters; none = off)
  --skip-prefill     do not tune the prefill kernels
  --kv-cache f16|f32 the KV cache type of the attention kernels (default: the runtime's, f16
                     where the adapter has shader-f16)
  --repeats N        timed passes per variant, the median is kept (default 3 CPU, 5 GPU)
  --out FILE         cache to write (default $LOWBIT_TUNE_CACHE, else
                     $XDG_CACHE_HOME/lowbit/tune.json or ~/.cache/lowbit/tune.json)
  --adapter NAME|N   Vulkan driver to use (\`--adapter list\` lists them)`;

/** The synthetic shapes: a tiny smoke test and two real models' (runtime/checkpoint/shapes.ts). */
const SHAPES: Record<string, ModelConfig> = {
  smoke: {
    ...llama2_7bConfig,
    dim: 256,
    hiddenDim: 688,
    nHeads: 4,
    nKvHeads: 2,
    headDim: 64,
    vocabSize: 1024,
  },
  "1b": llama32_1bLikeConfig,
  "7b": llama2_7bConfig,
};

/** One layer of a synthetic shape (every layer is alike), its logits layer untied. */
function syntheticModel(name: string): ModelConfig {
  const s = SHAPES[name];
  if (!s) {
    throw new ParameterError(
      `--shapes must be one of ${Object.keys(SHAPES).join(", ")}; got "${name}"`,
    );
  }
  return { ...s, nLayers: 1, seqLen: 2048, tiedEmbeddings: false };
}

/**
 * Every matrix of one layer packed at `bits`, `group`; the logits layer too with `head`, else
 * fp16 as quantize leaves it (in the runtime's f16 format and row chunks).
 */
function syntheticWeights(
  gpu: Gpu,
  c: ModelConfig,
  bits: Bits,
  group: number,
  head: boolean,
): PlanWeights {
  const q = (rows: number, K: number): MatrixShape => ({
    format: "q",
    bits,
    groupSize: group,
    K,
    weights: weightSource(gpu),
    chunks: [{ rowStart: 0, rows }],
  });
  return {
    layers: [layerShapes(c, q)],
    lmHead: head ? q(c.vocabSize, c.dim) : denseShape(gpu, "lm_head", c.vocabSize, c.dim, "f16"),
  };
}

/** A dense matrix as the loader uploads it: the adapter's format of `dtype`, its row chunks. */
function denseShape(
  gpu: Gpu,
  label: string,
  rows: number,
  K: number,
  dtype: WeightDType,
): MatrixShape {
  const format = denseFormat(gpu, dtype);
  return {
    format,
    K,
    weights: weightSource(gpu),
    chunks: denseChunks(gpu, label, rows, K, format),
  };
}

/**
 * The matrices of a checkpoint as the loader stacks them (gpu_weights.ts uploadWeights), dense
 * ones in the format `--dtype auto` gives them.
 */
function checkpointWeights(gpu: Gpu, ckpt: Checkpoint): PlanWeights {
  const c = ckpt.config;
  const dtype = autoDType(ckpt);
  const m = (names: string[]): MatrixShape => {
    const infos = names.map((n) => ckpt.tensors.get(n));
    const first = infos[0];
    if (!first || infos.some((t) => !t)) {
      return { format: "missing", K: 0, weights: weightSource(gpu), chunks: [] };
    }
    const rows = infos.reduce((a, t) => a + t!.shape[0], 0);
    if (first.dtype !== "Q") return denseShape(gpu, names[0], rows, first.shape[1], dtype);
    return {
      format: "q",
      bits: first.quant?.bits,
      groupSize: first.quant?.groupSize,
      K: first.shape[1],
      weights: weightSource(gpu),
      chunks: [{ rowStart: 0, rows }],
    };
  };
  const layers = Array.from({ length: c.nLayers }, (_, l) => ({
    wqkv: m([T.wq(l), T.wk(l), T.wv(l)]),
    wo: m([T.wo(l)]),
    w13: m([T.w1(l), T.w3(l)]),
    w2: m([T.w2(l)]),
  }));
  return { layers, lmHead: m([c.tiedEmbeddings ? T.embed : T.lmHead]) };
}

function listOption(name: string, v: string, ok: (n: number) => boolean, what: string): number[] {
  const parts = v.split(",").map((s) => s.trim());
  const out = parts.map(Number);
  if (parts.some((p) => p === "") || !out.every(ok)) {
    throw new ParameterError(`--${name} must be a comma-separated list of ${what}; got "${v}"`);
  }
  return out;
}

const us = (t: number) => (Number.isFinite(t) ? t.toFixed(t < 100 ? 1 : 0) : "-");

/** The summary: the heuristic shape's time against the tuned one's, per kernel. */
export function summaryTable(results: AnyTuneResult[]): string {
  const rows = results.map((r) => [
    r.name,
    String(r.variants.length),
    String(r.variants.filter((v) => v.error !== null).length),
    us(r.defaultUs),
    us(r.us),
    Number.isFinite(r.defaultUs) && Number.isFinite(r.us)
      ? `${(r.defaultUs / r.us).toFixed(2)}×`
      : "-",
    r.shape ? describeKernelShape(r.shape) : "none correct",
  ]);
  return table(
    ["kernel", "variants", "rejected", "default µs", "tuned µs", "speedup", "tuned shape"],
    rows,
    [false, true, true, true, true, true, false],
  );
}

async function main(args: string[]): Promise<void> {
  const { values: a } = parseCli({
    args,
    options: {
      model: { type: "string" },
      shapes: { type: "string" },
      bits: { type: "string", default: "4" },
      group: { type: "string", default: "128" },
      head: { type: "boolean", default: false },
      rows: { type: "string" },
      "skip-prefill": { type: "boolean", default: false },
      "kv-cache": { type: "string" },
      repeats: { type: "string" },
      out: { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  if ((a.model === undefined) === (a.shapes === undefined)) {
    throw new ParameterError(`give one of --model and --shapes\n${USAGE}`);
  }
  const bitsList = listOption("bits", a.bits!, (n) => n === 2 || n === 3 || n === 4, "2, 3, 4");
  const group = intOption("group", a.group, 0)!;
  const batchRows = a.rows === undefined
    ? undefined
    : a.rows === "none"
    ? []
    : listOption("rows", a.rows, (n) => Number.isInteger(n) && n >= 1 && n <= 32, "1..32");
  const repeats = intOption("repeats", a.repeats, 1);
  const kvType = kvCacheOption(a["kv-cache"]);
  const config = a.shapes !== undefined ? syntheticModel(a.shapes) : null;
  if (config) {
    try {
      qGroup(config.dim, group);
    } catch {
      throw new ParameterError(`--group must be 0 or a multiple of 32; got ${group}`);
    }
  }
  const out = a.out ?? tuneCachePath();
  if (a.out !== undefined) await checkOutputFile("--out", a.out);

  const gpu = await createGpu();
  const plan = { batchRows, prefill: !a["skip-prefill"], kvType };
  const jobs: PlanJob[] = [];
  if (config) {
    for (const bits of bitsList) {
      const w = syntheticWeights(gpu, config, bits as Bits, group, a.head!);
      jobs.push(...tunePlan(gpu, config, w, plan));
    }
    // the dense logits layer is the same at every bit width
    const w = syntheticWeights(gpu, config, bitsList[0] as Bits, group, a.head!);
    jobs.push(...densePlan(gpu, config, w, plan));
    jobs.push(...attentionPlan(gpu, config, plan));
  } else {
    const ckpt = await openCheckpoint(a.model!);
    try {
      const w = checkpointWeights(gpu, ckpt);
      jobs.push(...tunePlan(gpu, ckpt.config, w, plan));
      jobs.push(...densePlan(gpu, ckpt.config, w, plan));
      jobs.push(...attentionPlan(gpu, ckpt.config, plan));
    } finally {
      ckpt.close();
    }
  }
  console.error(
    `tuning ${jobs.length} kernels on "${gpuAdapterId(gpu)}"${
      gpu.timestamps ? "" : " (no timestamp-query: wall-clock timing)"
    }`,
  );
  const results = await gpu.validated(
    "tuning",
    () => tuneAndSave(gpu, jobs, { path: out, repeats }),
  );
  await writeStdout(summaryTable(results) + "\n");
  const kept = results.filter((r) => r.shape).length;
  console.error(`wrote ${kept} tuned shapes for "${gpuAdapterId(gpu)}" to ${out}`);
  const none = results.filter((r) => !r.shape);
  if (none.length) {
    console.error(`warning: no correct variant for ${none.map((r) => r.name).join("; ")}`);
  }
}

if (import.meta.main) runMain(() => main(Deno.args));
