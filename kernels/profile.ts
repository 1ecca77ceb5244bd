/**
 * Per-dispatch GPU time through `timestamp-query`: each dispatch runs in its own compute pass
 * with timestamps at its start and end. For benchmarks, not for hot loops.
 */
import type { Gpu } from "./gpu.ts";
import { GpuError } from "./errors.ts";

export interface Timed {
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
  grid: (ntok: number) => number[];
}

/** Runs `list` once for `ntok` tokens and returns each dispatch's GPU time in microseconds. */
export async function profileDispatches(gpu: Gpu, list: Timed[], ntok: number): Promise<number[]> {
  if (!gpu.timestamps) throw new GpuError("this adapter has no timestamp-query feature");
  const { device } = gpu;
  const n = list.length * 2;
  const querySet = device.createQuerySet({ type: "timestamp", count: n });
  const resolve = device.createBuffer({
    size: n * 8,
    usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  });
  const read = device.createBuffer({
    size: n * 8,
    usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
  });
  const enc = device.createCommandEncoder();
  list.forEach((d, i) => {
    const pass = enc.beginComputePass({
      timestampWrites: {
        querySet,
        beginningOfPassWriteIndex: 2 * i,
        endOfPassWriteIndex: 2 * i + 1,
      },
    });
    pass.setPipeline(d.pipeline);
    pass.setBindGroup(0, d.bindGroup);
    const [x, y = 1, z = 1] = d.grid(ntok);
    pass.dispatchWorkgroups(x, y, z);
    pass.end();
  });
  enc.resolveQuerySet(querySet, 0, n, resolve, 0);
  enc.copyBufferToBuffer(resolve, 0, read, 0, n * 8);
  device.queue.submit([enc.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  const t = new BigUint64Array(read.getMappedRange().slice(0));
  read.destroy();
  resolve.destroy();
  querySet.destroy();
  return list.map((_, i) => Number(t[2 * i + 1] - t[2 * i]) / 1000);
}
