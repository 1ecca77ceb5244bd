/**
 * `deno task bench load`: loads a synthetic 1B-parameter F16 checkpoint (Llama-3.2-1B shape,
 * written once to a cache folder) and reports the load time, the read rate, and the peak host
 * memory beyond the GPU buffers (peak RSS minus the bytes held in GPU buffers, since lavapipe
 * keeps those in host memory). The load runs in a fresh child process so its peak RSS is its own.
 * It also reports the cost of the NaN/Inf check every reader runs on the data it reads
 * (`runtime/checkpoint/finite.ts`): its rate on 256 MiB of F16, times the checkpoint's bytes.
 */
import { parseArgs } from "node:util";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { GpuModel } from "../runtime/model/model.ts";
import { firstNonFinite } from "../runtime/checkpoint/finite.ts";
import { createGpu } from "../kernels/gpu.ts";
import { cachedSyntheticCheckpoint, llama32_1bLikeConfig } from "../tests/synthetic.ts";
import { peakRss, recordResults, table, today } from "./results.ts";

const MB = 1 << 20;

async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for await (const e of Deno.readDir(dir)) {
    if (e.isFile) n += (await Deno.stat(`${dir}/${e.name}`)).size;
  }
  return n;
}

/** Bytes per second of the NaN/Inf check over F16 data: the best of 3 passes over 256 MiB. */
function finiteCheckRate(): number {
  const probe = new Uint8Array(256 * MB);
  new Uint16Array(probe.buffer).fill(0x3c00); // 1.0: finite, as a real checkpoint's data
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    if (firstNonFinite("F16", probe) !== -1) throw new Error("the probe is finite");
    best = Math.min(best, (performance.now() - t0) / 1000);
  }
  return probe.length / best;
}

/** The child: load, then print one JSON line. */
async function child(path: string): Promise<void> {
  const gpu = await createGpu();
  const t0 = performance.now();
  const ckpt = await openCheckpoint(path);
  const model = await GpuModel.load(gpu, ckpt, { ctx: 2048 });
  await gpu.device.queue.onSubmittedWorkDone();
  const seconds = (performance.now() - t0) / 1000;
  ckpt.close();
  const gpuBytes = model.weights.bytes + model.state.bytes;
  const rss = peakRss(); // before the check's probe buffer
  const checkRate = finiteCheckRate();
  console.log(
    JSON.stringify({ seconds, gpuBytes, peakRss: rss, checkRate, adapter: gpu.adapterName }),
  );
}

export async function benchLoad(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      child: { type: "string" },
      dir: { type: "string", default: "/tmp/lowbit-bench/llama-1b-f16" },
    },
  });
  if (values.child) return await child(values.child);
  const dir = await cachedSyntheticCheckpoint(values.dir!, llama32_1bLikeConfig, 2);
  const fileBytes = await dirBytes(dir);
  // Wall-clock figures: a busy host slows them, so the record says how busy it was.
  const busy = `host load average ${Deno.loadavg()[0].toFixed(1)} on ` +
    `${navigator.hardwareConcurrency} cores at the start`;
  const cmd = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", new URL("./main.ts", import.meta.url).pathname, "load", "--child", dir],
    stdout: "piped",
    stderr: "inherit",
  });
  const out = await cmd.output();
  if (!out.success) throw new Error("the load child failed");
  const r = JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").pop()!);
  const overhead = r.peakRss - r.gpuBytes;
  const checkSeconds = fileBytes / r.checkRate;
  const rows = [
    ["checkpoint", `${(fileBytes / 1e9).toFixed(2)} GB F16, 2 shards`],
    ["load time", `${r.seconds.toFixed(1)} s`],
    ["read rate", `${(fileBytes / 1e9 / r.seconds).toFixed(2)} GB/s`],
    [
      "NaN/Inf check (part of the load time)",
      `${checkSeconds.toFixed(2)} s (${(r.checkRate / 1e9).toFixed(1)} GB/s, ` +
      `${(100 * checkSeconds / r.seconds).toFixed(1)}% of the load)`,
    ],
    ["GPU buffers", `${(r.gpuBytes / MB).toFixed(0)} MiB`],
    ["peak RSS", `${(r.peakRss / MB).toFixed(0)} MiB`],
    [
      "host overhead (peak RSS − GPU buffers)",
      `${(overhead / MB).toFixed(0)} MiB (target < 512 MiB)`,
    ],
  ];
  for (const [k, v] of rows) console.log(`${k}: ${v}`);
  await recordResults(
    "load 1B F16",
    r.adapter,
    `${today()}, ${busy}.\n\n${table(["figure", "value"], rows)}`,
  );
}
