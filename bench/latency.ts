/**
 * `deno task bench latency`: prefill and decode speed of fp16 against W4 g128, W3 g128 and W2 g64
 * on stories260K (real weights) and synthetic models at the shapes of SmolLM2-135M,
 * Llama-3.2-1B and Llama-2-7B, plus the adapter's copy bandwidth and FMA ceiling and, through
 * timestamp-query, the decode step's GPU time per kernel, with the matrix-vector kernels'
 * achieved GB/s and GFLOP/s against both ceilings. Results: stdout, bench/RESULTS.md, and
 * bench/latency.json.
 *
 *   deno task bench latency [--shapes stories,smollm,1b,7b] [--formats fp16,w4g128,w3g128,w2g64]
 *                           [--prompts 128,512] [--decode N] [--batches 1,8,32]
 */
import { parseArgs } from "node:util";
import { createGpu, type Gpu } from "../kernels/gpu.ts";
import { profileDispatches } from "../kernels/profile.ts";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { GpuModel, GREEDY } from "../runtime/model/model.ts";
import { generate } from "../runtime/model/generate.ts";
import type { ModelConfig } from "../runtime/checkpoint/config.ts";
import type { Bits } from "../runtime/format/qtensor.ts";
import { cachedSyntheticCheckpoint } from "../tests/synthetic.ts";
import {
  llama2_7bConfig,
  llama32_1bLikeConfig,
  smolLm2_135mConfig,
} from "../runtime/checkpoint/shapes.ts";
import { writeSyntheticLowbit } from "./synthetic_lowbit.ts";
import { type Ceilings, ceilings } from "./ceilings.ts";
import { emptyStepMs, encodeStepUs, IN_FLIGHT } from "./overhead.ts";
import { recordResults, table, today } from "./results.ts";

const CACHE = "/tmp/lowbit-bench";
const STORIES = new URL("../../shared/models/stories260K-hf", import.meta.url).pathname;

const SHAPES: Record<string, ModelConfig | null> = {
  stories: null,
  smollm: smolLm2_135mConfig,
  "1b": llama32_1bLikeConfig,
  "7b": llama2_7bConfig,
};

/** Weight formats; "+head": the logits layer packed too (otherwise fp16). */
const FORMATS: Record<string, { bits: Bits; groupSize: number; head?: boolean } | null> = {
  fp16: null,
  w4g128: { bits: 4, groupSize: 128 },
  w3g128: { bits: 3, groupSize: 128 },
  w2g64: { bits: 2, groupSize: 64 },
  "w4g128+head": { bits: 4, groupSize: 128, head: true },
  "w2g64+head": { bits: 2, groupSize: 64, head: true },
};
const DEFAULT_FORMATS = "fp16,w4g128,w3g128,w2g64";

/** The model file for a shape and format, written once into the cache. */
async function modelPath(shape: string, format: string): Promise<string> {
  const q = FORMATS[format];
  const c = SHAPES[shape];
  await Deno.mkdir(CACHE, { recursive: true });
  if (!c) {
    if (!q) return STORIES;
    const path = `${CACHE}/stories-${format}.lowbit`;
    const ok = await Deno.stat(path).then(() => true, () => false);
    if (!ok) {
      const args = [
        "run",
        "-A",
        new URL("../quantize/quantize_cmd.ts", import.meta.url).pathname,
        "--model",
        STORIES,
        "--method",
        "rtn",
        "--bits",
        `${q.bits}`,
        "--group-size",
        `${q.groupSize}`,
        "--out",
        path,
        ...(q.head ? ["--quantize-head"] : []),
      ];
      const r = await new Deno.Command(Deno.execPath(), { args, stdout: "null", stderr: "piped" })
        .output();
      if (!r.success) {
        const why = new TextDecoder().decode(r.stderr).trim().split("\n").slice(-3).join("\n");
        throw new Error(`quantizing stories260K to ${format} failed: ${why}`);
      }
    }
    return path;
  }
  if (!q) return await cachedSyntheticCheckpoint(`${CACHE}/${shape}-f16`, c);
  const path = `${CACHE}/${shape}-${format}.lowbit`;
  if (!(await Deno.stat(path).then(() => true, () => false))) {
    console.error(`writing ${path} (once)...`);
    await writeSyntheticLowbit(path, c, q.bits, q.groupSize, q.head);
  }
  return path;
}

interface Row {
  shape: string;
  format: string;
  prefill: Record<string, number>; // prompt length → tok/s
  ttftMs: Record<string, number>;
  decode1: number; // tok/s at batch 1
  /** Total tok/s by batch size above 1 (decodeBatch: one pass over the weights per step). */
  decodeN: Record<string, number>;
  stepGpuMs: number; // GPU time of one decode step (timestamp-query)
  stepWallMs: number; // wall-clock time of one batch-1 decode step
  dispatches: number; // dispatches of a batch-1 decode step
  emptyStepMs: number; // wall-clock time of an empty step of as many dispatches (bench/overhead.ts)
  encodeUs: number; // host µs to encode a batch-1 decode step
  /** Dispatches of a batched step by batch size (its layers and logits; the sampler adds 1). */
  batchDispatches: Record<string, number>;
  matvecGBs: number; // weight bytes / matvec GPU time
  matvecGflops: number;
  weightBytes: number;
}

async function measure(
  gpu: Gpu,
  shape: string,
  format: string,
  prompts: number[],
  nDecode: number,
  batches: number[],
): Promise<Row> {
  const ckpt = await openCheckpoint(await modelPath(shape, format));
  const ctx = Math.min(ckpt.config.seqLen, Math.max(...prompts) + nDecode + 8);
  const slots = Math.max(1, ...batches);
  const model = await GpuModel.load(gpu, ckpt, { dtype: "f16", ctx, maxT: 128, slots });
  ckpt.close();
  const V = ckpt.config.vocabSize;
  const rand = (n: number) => Array.from({ length: n }, (_, i) => (i * 7919 + 13) % V);
  // warm-up: compile every pipeline once
  for await (
    const _ of generate(model, { prompt: rand(130), maxTokens: 3, sampling: GREEDY, stopIds: [] })
  ) { /* */ }
  const prefill: Record<string, number> = {}, ttftMs: Record<string, number> = {};
  for (const p of prompts) {
    if (p >= ctx) { // does not fit the model's context
      [ttftMs[p], prefill[p]] = [NaN, NaN];
      continue;
    }
    const it = generate(model, { prompt: rand(p), maxTokens: 1, sampling: GREEDY, stopIds: [] });
    let r = await it.next();
    while (!r.done) r = await it.next();
    ttftMs[p] = r.value.ttftMs;
    prefill[p] = p / (r.value.ttftMs / 1000);
  }
  const it = generate(model, {
    prompt: rand(8),
    maxTokens: nDecode,
    sampling: GREEDY,
    stopIds: [],
  });
  let r = await it.next();
  while (!r.done) r = await it.next();
  const decode1 = (r.value.generatedTokens - 1) / (r.value.decodeMs / 1000);
  const decodeN: Record<string, number> = {};
  for (const b of batches.filter((b) => b > 1)) {
    decodeN[b] = await decodeBatchRate(gpu, model, b, rand(8), nDecode);
  }
  const dispatches = model.plan.decode.length;
  const emptyMs = await emptyStepMs(gpu, dispatches);
  const encodeUs = encodeStepUs(gpu, model.plan.decode);
  const batchDispatches: Record<string, number> = {};
  for (const b of batches.filter((b) => b > 1)) batchDispatches[b] = model.batchPlan(b).length;
  // GPU time per kernel of one decode step (median of 3)
  const runs: number[][] = [];
  for (let i = 0; i < 3; i++) runs.push(await profileDispatches(gpu, model.plan.decode, 1));
  const med = model.plan.decode.map((_, i) => runs.map((r) => r[i]).sort((a, b) => a - b)[1]);
  const isMatvec = (i: number) => /matvec/.test(model.plan.decode[i].pipeline.label);
  const matvecUs = med.reduce((a, t, i) => a + (isMatvec(i) ? t : 0), 0);
  const stepUs = med.reduce((a, b) => a + b, 0);
  const c = model.config;
  const params = c.nLayers *
      (c.dim * (c.nHeads + 2 * c.nKvHeads) * c.headDim + c.nHeads * c.headDim * c.dim +
        3 * c.dim * c.hiddenDim) +
    c.vocabSize * c.dim;
  const weightBytes = model.weights.bytes - (c.tiedEmbeddings ? 0 : c.vocabSize * c.dim * 2); // the embedding is not read whole
  // On CPU adapters timestamp-query values are not usable (they vary severalfold between runs):
  // there the step time is the wall-clock decode time, and the kernels' rates are per step.
  const stepMs = gpu.isCpu ? 1000 / decode1 : stepUs / 1000;
  const kernelMs = gpu.isCpu ? stepMs : matvecUs / 1000;
  return {
    shape,
    format,
    prefill,
    ttftMs,
    decode1,
    decodeN,
    stepGpuMs: stepMs,
    stepWallMs: 1000 / decode1,
    dispatches,
    emptyStepMs: emptyMs,
    encodeUs,
    batchDispatches,
    matvecGBs: weightBytes / (kernelMs * 1e6),
    matvecGflops: (2 * params) / (kernelMs * 1e6),
    weightBytes,
  };
}
/** A figure with `d` decimals, or "–" where it was not measured. */
const fix = (v: number, d: number) => (Number.isNaN(v) ? "–" : v.toFixed(d));

/**
 * Total decode tok/s at batch `batch`: that many sequences, each prefilled with `prompt` in its
 * own slot, then `steps` batched decode steps (each one submit, several in flight).
 */
async function decodeBatchRate(
  gpu: Gpu,
  model: GpuModel,
  batch: number,
  prompt: number[],
  steps: number,
): Promise<number> {
  const n = prompt.length;
  for (let slot = 0; slot < batch; slot++) {
    model.writeTokens(0, prompt, slot);
    model.prefill(0, n, GREEDY, undefined, slot);
  }
  const rows = (p: number) =>
    Array.from({ length: batch }, (_, slot) => ({ slot, pos: p, sampling: GREEDY }));
  model.decodeBatch(rows(n)); // warm-up: compiles the batched pipelines
  await gpu.device.queue.onSubmittedWorkDone();
  const t0 = performance.now();
  for (let i = 1; i <= steps; i++) {
    model.decodeBatch(rows(n + i));
    if (i % IN_FLIGHT === 0) await gpu.device.queue.onSubmittedWorkDone();
  }
  await gpu.device.queue.onSubmittedWorkDone();
  return (batch * steps) / ((performance.now() - t0) / 1000);
}

export async function benchLatency(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      shapes: { type: "string" },
      formats: { type: "string", default: DEFAULT_FORMATS },
      prompts: { type: "string" },
      decode: { type: "string" },
      batches: { type: "string", default: "1,8,32" },
    },
  });
  const batches = values.batches!.split(",").map(Number);
  if (batches.some((b) => !Number.isInteger(b) || b < 1 || b > 256)) {
    throw new Error(`--batches ${values.batches}: batch sizes are integers 1..256`);
  }
  const gpu = await createGpu();
  // CPU adapters: the 7B shape does not fit the point
  const shapes = (values.shapes ?? (gpu.isCpu ? "stories,smollm,1b" : "stories,smollm,1b,7b"))
    .split(",");
  const prompts = (values.prompts ?? "128,512").split(",").map(Number);
  const ceil = await ceilings(gpu);
  console.log(`${gpu.adapterName}: ${ceilingsText(ceil)}`);
  const rows: Row[] = [];
  for (const shape of shapes) {
    for (const format of values.formats!.split(",")) {
      // decode steps: 64, or 16 for the 1B and 7B shapes on CPU adapters (seconds per step)
      const big = shape === "1b" || shape === "7b";
      const nDecode = Number(values.decode ?? (gpu.isCpu && big ? 16 : 64));
      const r = await measure(gpu, shape, format, prompts, nDecode, batches);
      rows.push(r);
      console.log(
        `${shape} ${format}: prefill ${
          prompts.map((p) => `${p}:${fix(r.prefill[p], 1)}`).join(" ")
        } tok/s, ` +
          `decode ${r.decode1.toFixed(1)} tok/s (${
            Object.entries(r.decodeN).map(([b, v]) => `batch ${b}: ${v.toFixed(1)}`).join(", ")
          }), step ${r.stepGpuMs.toFixed(2)} ms GPU, ${r.stepWallMs.toFixed(2)} ms wall, empty ` +
          `step of ${r.dispatches} dispatches ${r.emptyStepMs.toFixed(2)} ms (encoding ${
            r.encodeUs.toFixed(0)
          } µs; batched steps ${
            Object.entries(r.batchDispatches).map(([b, n]) => `${b}: ${n}`).join(", ")
          } dispatches), matvec ${r.matvecGBs.toFixed(2)} GB/s ` +
          `${r.matvecGflops.toFixed(2)} GFLOP/s`,
      );
      await recordLatency(gpu, ceil, prompts, batches, rows);
    }
  }
}

function ceilingsText(ceil: Ceilings): string {
  return `copy ${ceil.copyGBs.toFixed(1)} GB/s (read + write), shader read ${
    ceil.readGBs.toFixed(1)
  } GB/s, FMA ${ceil.fmaGflops.toFixed(1)} GFLOP/s`;
}

/**
 * Writes the rows measured so far: the "latency" section of bench/RESULTS.md and
 * bench/latency.json (after each row, so that a run cut short keeps what it measured).
 */
async function recordLatency(
  gpu: Gpu,
  ceil: Ceilings,
  prompts: number[],
  batches: number[],
  rows: Row[],
): Promise<void> {
  // the bandwidth ceiling: the faster of a buffer copy and a compute shader's reads
  const bw = Math.max(ceil.copyGBs, ceil.readGBs);
  const head = [
    "model",
    "weights",
    ...prompts.flatMap((p) => [`prefill ${p} tok/s`, `TTFT ${p} ms`]),
    "decode tok/s (batch 1)",
    ...batches.filter((b) => b > 1).map((b) => `decode tok/s (batch ${b}, ×batch 1)`),
    gpu.isCpu ? "decode step ms (wall)" : "decode step GPU ms",
    "step wall ms",
    "empty step ms (dispatches)",
    "encode µs",
    ...batches.filter((b) => b > 1).map((b) => `batch ${b} dispatches`),
    "matvec GB/s (% of bandwidth)",
    "matvec GFLOP/s (% of FMA)",
  ];
  const body = rows.map((r) => [
    r.shape,
    r.format,
    ...prompts.flatMap((p) => [fix(r.prefill[p], 1), fix(r.ttftMs[p], 0)]),
    r.decode1.toFixed(1),
    ...batches.filter((b) => b > 1).map((b) =>
      `${r.decodeN[b].toFixed(1)} (${(r.decodeN[b] / r.decode1).toFixed(1)}×)`
    ),
    r.stepGpuMs.toFixed(2),
    r.stepWallMs.toFixed(2),
    `${r.emptyStepMs.toFixed(2)} (${r.dispatches})`,
    r.encodeUs.toFixed(0),
    ...batches.filter((b) => b > 1).map((b) => `${r.batchDispatches[b]}`),
    `${r.matvecGBs.toFixed(2)} (${(100 * r.matvecGBs / bw).toFixed(0)}%)`,
    `${r.matvecGflops.toFixed(2)} (${(100 * r.matvecGflops / ceil.fmaGflops).toFixed(0)}%)`,
  ]);
  await recordResults(
    "latency",
    gpu.adapterName,
    `${today()}. Ceilings: ${
      ceilingsText(ceil)
    }; bandwidth = the faster of the two. Synthetic weights except stories260K; the logits layer stays fp16 except in the "+head" rows. Batch N: N sequences stepped together ` +
      `(GpuModel.decodeBatch), total tok/s. Empty step: as many dispatches of an empty kernel, ` +
      `each with its own bind group (bench/overhead.ts): the step's cost beyond its kernels; ` +
      `encode: host time to record a batch-1 step; batch N dispatches: a batched step's layers ` +
      `and logits.\n\n${table(head, body)}`,
  );
  await Deno.writeTextFile(
    new URL("./latency.json", import.meta.url),
    JSON.stringify({ adapter: gpu.adapterName, ceil, rows }, null, 1),
  );
}
