/** The adapter's measured ceilings: buffer copy bandwidth and FMA throughput. */
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

export async function ceilings(gpu: Gpu): Promise<{ copyGBs: number; fmaGflops: number }> {
  const { device } = gpu;
  const bytes = gpu.isCpu ? 64 << 20 : 512 << 20;
  const a = device.createBuffer({
    size: bytes,
    usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  const b = device.createBuffer({
    size: bytes,
    usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  const reps = 8;
  const t = await timeSubmit(gpu, (e) => e.copyBufferToBuffer(a, 0, b, 0, bytes), reps);
  const copyGBs = (2 * bytes * reps) / t / 1e9; // read + write
  a.destroy();
  b.destroy();
  const n = gpu.isCpu ? 1 << 14 : 1 << 22, iters = 4096;
  const code = `@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  var a = f32(g.x); var b = a + 1.0; var c = a + 2.0; var d = a + 3.0;
  for (var i = 0u; i < ${iters}u; i++) {
    a = a * 0.9999 + 0.5; b = b * 0.9999 + 0.5; c = c * 0.9999 + 0.5; d = d * 0.9999 + 0.5;
  }
  y[g.x] = a + b + c + d;
}`;
  const p = device.createComputePipeline({
    layout: "auto",
    compute: { module: device.createShaderModule({ code }), entryPoint: "main" },
  });
  const y = device.createBuffer({ size: n * 4, usage: GPUBufferUsage.STORAGE });
  const bg = gpu.bindGroup(p, [y]);
  const tf = await timeSubmit(gpu, (e) => {
    const pass = e.beginComputePass();
    pass.setPipeline(p);
    pass.setBindGroup(0, bg);
    pass.dispatchWorkgroups(n / 64);
    pass.end();
  }, 4);
  y.destroy();
  return { copyGBs, fmaGflops: (n * iters * 4 * 2 * 4) / tf / 1e9 };
}
