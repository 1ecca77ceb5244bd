/**
 * Per-step overhead of a decode step: what a step costs beyond its kernels' work. An "empty
 * step" has the real step's dispatch count, each dispatch with a pipeline and bind group of its
 * own (as the real step switches both at every dispatch), running a kernel that does nothing;
 * steps are submitted one per submit with several in flight, as generation runs them. Its time
 * per step is what dispatches, barriers, bind-group switches and submits cost alone.
 */
import type { Gpu } from "../kernels/gpu.ts";
import { type Dispatch, encodeDispatches } from "../runtime/model/forward.ts";

/**
 * Steps submitted between waits (generate keeps up to 24 in flight): a wait costs ~11 ms in
 * Deno, which spread over 4 steps was most of a small model's step on lavapipe.
 */
export const IN_FLIGHT = 16;

/**
 * `n` dispatches of an empty one-workgroup kernel, with `pipelines` distinct pipelines used in
 * turn and a bind group per dispatch (each over its own small buffer).
 */
export function emptyPlan(gpu: Gpu, n: number, pipelines = 8): Dispatch[] {
  const ps = Array.from({ length: Math.max(1, Math.min(n, pipelines)) }, (_, i) =>
    gpu.pipeline(
      `empty${i}`,
      () =>
        `@group(0) @binding(0) var<storage, read_write> b: array<u32>;
@compute @workgroup_size(1) fn main() { if (b[0] == ${i + 1}u) { b[0] = 0u; } }`,
    ));
  return Array.from({ length: n }, (_, i) => {
    const pipeline = ps[i % ps.length];
    const buffer = gpu.buffer(`empty${i}`, 16, GPUBufferUsage.STORAGE);
    return { pipeline, bindGroup: gpu.bindGroup(pipeline, [buffer], "empty"), grid: () => [1] };
  });
}

/**
 * Wall-clock milliseconds per step of `encode` (one pass, one submit per step, each after a
 * small queue.writeBuffer as a decode step's uniform), best of 3.
 */
export async function stepWallMs(
  gpu: Gpu,
  encode: (pass: GPUComputePassEncoder) => void,
  steps: number,
): Promise<number> {
  const { device } = gpu;
  const uniform = gpu.buffer("empty_step", 16, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST);
  const word = new Uint32Array(4);
  const run = () => {
    device.queue.writeBuffer(uniform, 0, word);
    const enc = device.createCommandEncoder();
    const pass = enc.beginComputePass();
    encode(pass);
    pass.end();
    device.queue.submit([enc.finish()]);
  };
  run(); // warm-up (first dispatch compiles on some drivers)
  await device.queue.onSubmittedWorkDone();
  let best = Infinity;
  for (let r = 0; r < 3; r++) {
    const t0 = performance.now();
    for (let i = 1; i <= steps; i++) {
      run();
      if (i % IN_FLIGHT === 0) await device.queue.onSubmittedWorkDone();
    }
    await device.queue.onSubmittedWorkDone();
    best = Math.min(best, (performance.now() - t0) / steps);
  }
  return best;
}

/** Milliseconds per empty step with `n` dispatches. */
export function emptyStepMs(gpu: Gpu, n: number, steps = 64): Promise<number> {
  const plan = emptyPlan(gpu, n);
  return stepWallMs(gpu, (pass) => encodeDispatches(pass, plan, 1), steps);
}

/**
 * Host microseconds to encode one step of `plan` (command encoder, pass, its dispatches,
 * finish; nothing submitted), median of `reps`: the CPU side of a step's overhead, which bounds
 * the step rate whatever the GPU does.
 */
export function encodeStepUs(gpu: Gpu, plan: Dispatch[], ntok = 1, reps = 64): number {
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    const enc = gpu.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    encodeDispatches(pass, plan, ntok);
    pass.end();
    enc.finish();
    times.push((performance.now() - t0) * 1000);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(reps / 2)];
}
