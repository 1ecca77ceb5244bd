/**
 * `deno task bench profile [--model PATH] [--pos N] [--reps N]`: wall-clock time of each kernel of
 * one decode step at position `pos` (default 128) of stories260K (or the model given): each
 * dispatch of the decode plan is encoded `reps` times back to back in one pass and submitted
 * once, less the fixed latency of an empty submit-and-wait (~11 ms on lavapipe); best of 3. So
 * each figure includes the per-dispatch overhead, which dominates small models on CPU adapters
 * (lavapipe's timestamp queries, one pass per dispatch, vary severalfold between runs). Also the
 * whole step, `reps / 10` steps in one pass. Dispatches of one pipeline (one per layer) are
 * averaged.
 */
import { parseArgs } from "node:util";
import { loadModel } from "../runtime/model/load.ts";
import { GREEDY } from "../runtime/model/model.ts";
import { type Dispatch, encodeDispatches } from "../runtime/model/forward.ts";
import { recordResults, table, today } from "./results.ts";

const STORIES =
  new URL("../../shared/models/stories260K/stories260K.bin", import.meta.url).pathname;

export async function benchProfile(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      pos: { type: "string", default: "128" },
      reps: { type: "string", default: "200" },
    },
  });
  const path = values.model ?? STORIES;
  const { model, gpu } = await loadModel(path, { quiet: true });
  const pos = Math.min(Number(values.pos), model.ctx - 2), reps = Number(values.reps);
  const { device } = gpu;
  // fill the KV cache up to pos; the last step leaves the step uniform at pos
  for (let p = 0; p <= pos; p++) model.decode(p, GREEDY);
  await device.queue.onSubmittedWorkDone();

  const wait = async (enc?: GPUCommandEncoder) => {
    const t0 = performance.now();
    device.queue.submit(enc ? [enc.finish()] : []);
    await device.queue.onSubmittedWorkDone();
    return performance.now() - t0;
  };
  let latency = Infinity;
  for (let r = 0; r < 5; r++) latency = Math.min(latency, await wait());
  /** Microseconds per run of `list`, `n` runs back to back. */
  const time = async (list: Dispatch[], n: number) => {
    let best = Infinity;
    for (let r = 0; r < 3; r++) {
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      for (let i = 0; i < n; i++) encodeDispatches(pass, list, 1);
      pass.end();
      best = Math.min(best, ((await wait(enc)) - latency) / n);
    }
    return best * 1000;
  };

  const plan = model.plan.decode;
  const byKernel = new Map<string, number[]>();
  for (const d of plan) {
    const us = await time([d], reps);
    const name = d.pipeline.label || "?";
    byKernel.set(name, [...(byKernel.get(name) ?? []), us]);
  }
  const step = await time(plan, Math.max(1, Math.round(reps / 10)));
  const rows: (string | number)[][] = [];
  let sum = 0;
  for (const [name, t] of byKernel) {
    const total = t.reduce((a, b) => a + b, 0);
    sum += total;
    rows.push([name, t.length, (total / t.length).toFixed(1), total.toFixed(0)]);
  }
  rows.push(["sum of the dispatches", plan.length, "", sum.toFixed(0)]);
  rows.push(["whole step (back to back)", plan.length, "", step.toFixed(0)]);
  const out = table(["kernel", "dispatches", "µs each", "µs per step"], rows);
  console.log(out);
  console.log(`=> ${(1e6 / step).toFixed(0)} steps/s at position ${pos}`);
  const name = path.split("/").slice(-2).join("/");
  await recordResults(
    `decode kernels ${name}`,
    gpu.adapterName,
    `${today()}, position ${pos}, ${reps} dispatches back to back per kernel, best of 3, ` +
      `weights ${model.weights.format} in ${
        model.weights.layers[0]?.wqkv.weights ?? "buffer"
      }s.\n\n${out}`,
  );
}
