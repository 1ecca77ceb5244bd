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
 *   XDG_RUNTIME_DIR=/tmp deno run -A bench/kernels_q.ts [--reps 10] [--group 64] [--quick]
 */
import { packStep, STEP_BYTES } from "../kernels/common.ts";
import { createGpu, type Gpu } from "../kernels/gpu.ts";
import { matvecBindings, matvecGrid, matvecPipeline, matvecShape } from "../kernels/matvec.ts";
import { matmulBindings, matmulGrid, matmulPipeline } from "../kernels/matmul.ts";
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
import { paddedK } from "../quantize/pack.ts";
import { type Bits, nGroups } from "../quantize/qtensor.ts";

function arg(name: string, def: number): number {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Number(Deno.args[i + 1]) : def;
}
const REPS = arg("reps", 10);
const GROUP = arg("group", 64);
const QUICK = Deno.args.includes("--quick");

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

async function measure(gpu: Gpu, b: Bench) {
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

const gpu = await createGpu();
/** Median wall time of submitting an empty command buffer and waiting for it. */
async function emptySubmit(): Promise<number> {
  const ts: number[] = [];
  for (let i = 0; i < 7; i++) {
    const t0 = performance.now();
    gpu.device.queue.submit([gpu.device.createCommandEncoder().finish()]);
    await gpu.device.queue.onSubmittedWorkDone();
    ts.push(performance.now() - t0);
  }
  return ts.sort((a, b) => a - b)[3];
}
const submitLatency = await emptySubmit();
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
    const format = gpu.shaderF16 ? "f16" : "f16p";
    const w = gpu.buffer("w", N * K * 2, usage);
    if (B === 1) {
      const v = {
        format,
        rows: N,
        K,
        norm: null,
        epilogue: { kind: "store", offset: 0, ld: N },
        ...matvecShape(gpu, K),
      } as const;
      const pipeline = matvecPipeline(gpu, v);
      const bufs: Record<string, GPUBuffer> = { x, w, y };
      benches.push({
        name: `${format} matvec`,
        pipeline,
        bindGroup: gpu.bindGroup(pipeline, matvecBindings(v).map((n) => bufs[n])),
        grid: matvecGrid(v),
        weightBytes: N * K * 2,
      });
    } else {
      const v = { format, rows: N, K, epilogue: { kind: "store", offset: 0, ld: N } } as const;
      const step = gpu.buffer("step", STEP_BYTES, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST);
      gpu.device.queue.writeBuffer(
        step,
        0,
        packStep({ pos: 0, ntok: B, seed: 0, topK: 0, temperature: 0, topP: 1 }),
      );
      const pipeline = matmulPipeline(gpu, v);
      const bufs: Record<string, GPUBuffer> = { step, x, w, y };
      benches.push({
        name: `${format} matmul`,
        pipeline,
        bindGroup: gpu.bindGroup(pipeline, matmulBindings(v).map((n) => bufs[n])),
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
      const r = await measure(gpu, b);
      const f = (v: number, d = 2) => (Number.isFinite(v) ? v.toFixed(d) : "-").padStart(8);
      console.log(
        `${b.name.padEnd(17)} ${`${N}×${K}`.padEnd(11)} ${String(B).padStart(5)} ${f(r.wall)} ${
          f(r.gpuMs)
        } ${f(r.cpu)} ${f(flop / r.wall / 1e6)} ${f(b.weightBytes / r.wall / 1e6)}`,
      );
    }
    w.destroy();
  }
}
