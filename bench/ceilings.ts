/**
 * The adapter's measured ceilings: buffer copy bandwidth, the read bandwidth of a compute shader
 * (the bound of a memory-bound kernel; copies may run on slower copy engines) and FMA throughput.
 */
import type { Gpu } from "../kernels/gpu.ts";

async function timeSubmit(
  gpu: Gpu,
  encode: (e: GPUCommandEncoder) => void,
  reps: number,
): Promise<number> {
  const { device } = gpu;
  let best = Infinity;
  for (let r = 0; r < 3; r++) {
    const e = device.createCommandEncoder();
    for (let i = 0; i < reps; i++) encode(e);
    const t0 = performance.now();
    device.queue.submit([e.finish()]);
    await device.queue.onSubmittedWorkDone();
    best = Math.min(best, performance.now() - t0);
  }
  return best / 1000;
}

/** A compute pipeline from WGSL with entry point main. */
function pipeline(device: GPUDevice, code: string): GPUComputePipeline {
  return device.createComputePipeline({
    layout: "auto",
    compute: { module: device.createShaderModule({ code }), entryPoint: "main" },
  });
}

/** Times `reps` dispatches of `p` over `grid` workgroups, in seconds. */
function timeDispatch(
  gpu: Gpu,
  p: GPUComputePipeline,
  bufs: GPUBuffer[],
  grid: number,
  reps: number,
) {
  const bg = gpu.bindGroup(p, bufs);
  return timeSubmit(gpu, (e) => {
    const pass = e.beginComputePass();
    pass.setPipeline(p);
    pass.setBindGroup(0, bg);
    pass.dispatchWorkgroups(grid);
    pass.end();
  }, reps);
}

/** The adapter's measured ceilings: buffer copy and shader read bandwidth, FMA rate. */
export interface Ceilings {
  copyGBs: number;
  readGBs: number;
  fmaGflops: number;
}

export async function ceilings(gpu: Gpu): Promise<Ceilings> {
  const { device } = gpu;
  const bytes = gpu.isCpu ? 64 << 20 : 512 << 20;
  const usage = GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST | GPUBufferUsage.STORAGE;
  const a = device.createBuffer({ size: bytes, usage });
  const b = device.createBuffer({ size: bytes, usage });
  const reps = 8;
  const t = await timeSubmit(gpu, (e) => e.copyBufferToBuffer(a, 0, b, 0, bytes), reps);
  const copyGBs = (2 * bytes * reps) / t / 1e9; // read + write
  // read: 4096 workgroups of 256 threads, each summing every 2^20-th vec4
  const nv = bytes / 16, threads = 4096 * 256;
  const read = pipeline(
    device,
    `@group(0) @binding(0) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> b: array<vec4<f32>>;
@compute @workgroup_size(256) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  var s = vec4<f32>(0.0);
  for (var i = g.x; i < ${nv}u; i += ${threads}u) { s += a[i]; }
  if (s.x == 1.0e30) { b[g.x] = s; } // never true: keeps the loads
}`,
  );
  const tr = await timeDispatch(gpu, read, [a, b], threads / 256, reps);
  const readGBs = (bytes * reps) / tr / 1e9;
  a.destroy();
  b.destroy();
  // FMA: 2^22 threads (16384 workgroups of 256), 4 independent chains of `iters` FMAs
  const n = gpu.isCpu ? 1 << 14 : 1 << 22, iters = 4096;
  const fma = pipeline(
    device,
    `@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(256) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  var a = f32(g.x); var b = a + 1.0; var c = a + 2.0; var d = a + 3.0;
  for (var i = 0u; i < ${iters}u; i++) {
    a = a * 0.9999 + 0.5; b = b * 0.9999 + 0.5; c = c * 0.9999 + 0.5; d = d * 0.9999 + 0.5;
  }
  y[g.x] = a + b + c + d;
}`,
  );
  const y = device.createBuffer({ size: n * 4, usage: GPUBufferUsage.STORAGE });
  const tf = await timeDispatch(gpu, fma, [y], n / 256, 4);
  y.destroy();
  return { copyGBs, readGBs, fmaGflops: (n * iters * 4 * 2 * 4) / tf / 1e9 };
}
