/**
 * Micro-benchmark of the decode matrix-vector kernels: dense f16 (kernels/matvec.ts; at batch 8
 * the dense prefill kernel kernels/matmul.ts over 8 tokens) against the packed W4/W3/W2 kernels
 * (kernels/matvec_q.ts) at N×K = 2048×8192 and 8192×2048, batch 1 and 8.
 *
 * For each kernel: wall-clock time per dispatch over `--reps` dispatches in one submit, less the
 * fixed latency of an empty submit-and-wait (median of 7; ~11 ms on lavapipe), GPU time
 * per dispatch through timestamp-query when the adapter has it (median of `--reps` dispatches,
 * each in its own pass), and on Linux the process CPU time per dispatch (lavapipe runs on the
 * CPU: robust against other processes sharing the cores). GFLOP/s = 2·N·K·batch / time,
 * GB/s = weight bytes / time (wall clock).
 *
 * Rows "buf" bind the packed buffers as the runtime does; rows "tex" read qweight/sz from
 * textures (createQTextures) and, where batch·K·4 ≤ 64 KiB, x as a uniform buffer ("tex+ubo"):
 * the lavapipe fast path.
 *
 *   deno task bench kernels [--reps 10] [--group 64] [--quick]
 *
 * Results: stdout and bench/RESULTS.md.
 */
import { parseArgs } from "node:util";
import { recordResults, table, today } from "./results.ts";
import { stepUniform } from "../kernels/common.ts";
import { createGpu, type Gpu } from "../kernels/gpu.ts";
import { matvecBindings, matvecGrid, matvecPipeline, matvecShape } from "../kernels/matvec.ts";
import { matmulBindings, matmulGrid, matmulPipeline, matmulShape } from "../kernels/matmul.ts";
import { allocDense } from "../runtime/model/gpu_weights.ts";
import {
  createQTextures,
  matvecQBindings,
  matvecQGrid,
  matvecQPipeline,
  matvecQShape,
  type MatvecQVariant,
  type QWeights,
} from "../kernels/matvec_q.ts";
import { profileDispatches } from "../kernels/profile.ts";
import { paddedK } from "../runtime/format/pack.ts";
import { type Bits, nGroups } from "../runtime/format/qtensor.ts";

/** Summed CPU time of this process's threads in ms (Linux), or NaN. */
function cpuMs(): number {
  try {
    let t = 0;
    for (const e of Deno.readDirSync("/proc/self/task")) {
      try {
        t += Number(Deno.readTextFileSync(`/proc/self/task/${e.name}/schedstat`).split(" ")[0]);
      } catch { /* thread exited */ }
    }
    return t / 1e6;
  } catch {
    return NaN;
  }
}

interface Bench {
  name: string;
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
  grid: number[];
  weightBytes: number;
}

async function measure(gpu: Gpu, b: Bench, REPS: number, submitLatency: number) {
  const run = async (n: number) => {
    const enc = gpu.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(b.pipeline);
    pass.setBindGroup(0, b.bindGroup);
    for (let i = 0; i < n; i++) pass.dispatchWorkgroups(b.grid[0], b.grid[1] ?? 1, b.grid[2] ?? 1);
    pass.end();
    gpu.device.queue.submit([enc.finish()]);
    await gpu.device.queue.onSubmittedWorkDone();
  };
  await run(1); // compile and warm up
  const c0 = cpuMs(), t0 = performance.now();
  await run(REPS);
  const wall = (performance.now() - t0 - submitLatency) / REPS, cpu = (cpuMs() - c0) / REPS;
  let gpuMs = NaN;
  if (gpu.timestamps) {
    const d = { pipeline: b.pipeline, bindGroup: b.bindGroup, grid: () => b.grid };
    const us = await profileDispatches(gpu, Array(REPS).fill(d), 1);
    us.sort((a, z) => a - z);
    gpuMs = us[us.length >> 1] / 1000;
  }
  return { wall, cpu, gpuMs };
}

/** A bind group of buffers and textures, in binding order. */
function bindAll(gpu: Gpu, pipeline: GPUComputePipeline, rs: (GPUBuffer | GPUTexture)[]) {
  return gpu.device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: rs.map((r, binding) => ({
      binding,
      resource: r instanceof GPUBuffer ? { buffer: r } : r.createView(),
    })),
  });
}

/** Median wall time of submitting an empty command buffer and waiting for it. */
async function emptySubmit(gpu: Gpu): Promise<number> {
  const ts: number[] = [];
  for (let i = 0; i < 7; i++) {
    const t0 = performance.now();
    gpu.device.queue.submit([gpu.device.createCommandEncoder().finish()]);
    await gpu.device.queue.onSubmittedWorkDone();
    ts.push(performance.now() - t0);
  }
  return ts.sort((a, b) => a - b)[3];
}

export async function benchKernels(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      reps: { type: "string", default: "10" },
      group: { type: "string", default: "64" },
      quick: { type: "boolean", default: false },
    },
  });
  const REPS = Number(values.reps), GROUP = Number(values.group), QUICK = values.quick!;
  const gpu = await createGpu();
  const submitLatency = await emptySubmit(gpu);
  const rows: string[][] = [];
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST;
  const shapes: [number, number][] = QUICK ? [[2048, 8192]] : [[2048, 8192], [8192, 2048]];
  const batches = QUICK ? [1] : [1, 8];
  console.log(
    `adapter: ${gpu.adapterName}${gpu.isCpu ? " (CPU)" : ""}, group size ${GROUP}, ` +
      `${REPS} dispatches per submit, timestamps ${gpu.timestamps ? "on" : "off"}`,
  );
  console.log(
    "kernel            N×K         batch  wall ms   GPU ms   CPU ms  GFLOP/s    GB/s",
  );
  for (const [N, K] of shapes) {
    for (const B of batches) {
      const flop = 2 * N * K * B;
      const x = gpu.buffer("x", B * K * 4, usage | GPUBufferUsage.UNIFORM);
      const y = gpu.buffer("y", B * N * 4, usage);
      const benches: Bench[] = [];
      // dense f16
      // dense f16 in the runtime's layout for this adapter (textures on CPU adapters)
      const format = gpu.shaderF16 ? "f16" : "f16p";
      const dense = allocDense(gpu, "w", N, K, format);
      const w = dense.chunks[0].data;
      const store = { kind: "store", offset: 0, ld: N } as const;
      if (B === 1) {
        const tex = dense.weights === "texture";
        const v = {
          format,
          rows: N,
          K,
          norm: null,
          epilogue: store,
          weights: dense.weights,
          xUniform: tex && K * 4 <= 65536,
          ...matvecShape(gpu, K, dense.weights),
        } as const;
        const pipeline = matvecPipeline(gpu, v);
        const bufs: Record<string, GPUBuffer | GPUTexture> = { x, w, y };
        benches.push({
          name: `${format} matvec`,
          pipeline,
          bindGroup: bindAll(gpu, pipeline, matvecBindings(v).map((n) => bufs[n])),
          grid: matvecGrid(v),
          weightBytes: N * K * 2,
        });
      } else {
        const v = {
          format,
          rows: N,
          K,
          epilogue: store,
          weights: dense.weights,
          ...(dense.weights === "texture" ? matmulShape(store) : {}),
        } as const;
        const step = stepUniform(gpu, "step", { pos: 0, ntok: B });
        const pipeline = matmulPipeline(gpu, v);
        const bufs: Record<string, GPUBuffer | GPUTexture> = { step, x, w, y };
        benches.push({
          name: `${format} matmul`,
          pipeline,
          bindGroup: bindAll(gpu, pipeline, matmulBindings(v).map((n) => bufs[n])),
          grid: matmulGrid(v, B),
          weightBytes: N * K * 2,
        });
      }
      // packed W4/W3/W2
      for (const bits of [4, 3, 2] as Bits[]) {
        const words = N * bits * paddedK(K) / 32, nG = nGroups(K, GROUP);
        const weightBytes = 4 * (words + N * nG);
        const sources: [QWeights, boolean][] = [["buffer", false], ["texture", B * K * 4 <= 65536]];
        for (const [weights, xUniform] of sources) {
          const v: MatvecQVariant = {
            bits,
            groupSize: GROUP,
            rows: N,
            K,
            norm: null,
            epilogue: { kind: "store", offset: 0, ld: N },
            batch: B,
            weights,
            xUniform,
            ...matvecQShape(gpu, K, B),
          };
          const pipeline = matvecQPipeline(gpu, v);
          const entries: GPUBindingResource[] = [];
          const zeros = { qweight: new Uint32Array(words), sz: new Uint32Array(N * nG) };
          const tex = weights === "texture"
            ? createQTextures(gpu, zeros, { bits, K, groupSize: GROUP })
            : null;
          for (const n of matvecQBindings(v)) {
            if (n === "x") entries.push({ buffer: x });
            else if (n === "y") entries.push({ buffer: y });
            else if (tex) entries.push(tex[n as "qweight" | "sz"].createView());
            else entries.push({ buffer: gpu.upload(n, zeros[n as "qweight" | "sz"]) });
          }
          const bindGroup = gpu.device.createBindGroup({
            layout: pipeline.getBindGroupLayout(0),
            entries: entries.map((resource, binding) => ({ binding, resource })),
          });
          const src = weights === "buffer" ? "buf" : xUniform ? "tex+ubo" : "tex";
          benches.push({
            name: `W${bits} ${src}`,
            pipeline,
            bindGroup,
            grid: matvecQGrid(v),
            weightBytes,
          });
        }
      }
      for (const b of benches) {
        const r = await measure(gpu, b, REPS, submitLatency);
        const f = (v: number, d = 2) => (Number.isFinite(v) ? v.toFixed(d) : "-").padStart(8);
        console.log(
          `${b.name.padEnd(17)} ${`${N}×${K}`.padEnd(11)} ${String(B).padStart(5)} ${f(r.wall)} ${
            f(r.gpuMs)
          } ${f(r.cpu)} ${f(flop / r.wall / 1e6)} ${f(b.weightBytes / r.wall / 1e6)}`,
        );
        rows.push([
          b.name,
          `${N}×${K}`,
          String(B),
          r.wall.toFixed(2),
          r.cpu.toFixed(2),
          (flop / r.wall / 1e6).toFixed(2),
          (b.weightBytes / r.wall / 1e6).toFixed(2),
        ]);
      }
      w.destroy();
    }
  }
  const head = ["kernel", "N×K", "batch", "wall ms", "CPU ms", "GFLOP/s", "GB/s"];
  await recordResults(
    "decode kernels",
    gpu.adapterName,
    `${today()}. One dispatch of each decode kernel (wall clock per dispatch over ${REPS} in one ` +
      `submit, less an empty submit's latency; CPU ms: the process's CPU time per dispatch), ` +
      `group size ${GROUP} for the packed kernels, dense f16 in the runtime's layout for this ` +
      `adapter. "tex+ubo": packed weights in textures and x as a uniform buffer (the CPU-adapter ` +
      `path). GFLOP/s = 2·N·K·batch / wall time.\n\n${table(head, rows)}`,
  );
}
