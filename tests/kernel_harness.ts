/**
 * A small harness for kernel tests: buffers from typed arrays, bind groups from a kernel's
 * binding-name list, dispatches of a grid, read-backs.
 */
import { packStep, type StepParams } from "../kernels/common.ts";
import type { DenseFormat } from "../kernels/common.ts";
import type { Gpu } from "../kernels/gpu.ts";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** One dispatch: a pipeline, its buffers by binding name, and the workgroup grid. */
export interface Job {
  pipeline: GPUComputePipeline;
  names: string[];
  bufs: Record<string, GPUBuffer>;
  grid: number[];
}

export class Harness {
  #owned: GPUBuffer[] = [];
  constructor(readonly gpu: Gpu) {}

  get device(): GPUDevice {
    return this.gpu.device;
  }

  /** A read-write storage buffer holding `data` (padded to a multiple of 16 bytes). */
  buffer(data: ArrayBufferView, label = "buf"): GPUBuffer {
    const size = Math.max(16, Math.ceil(data.byteLength / 16) * 16);
    const buf = this.device.createBuffer({ label, size, usage: RW });
    const bytes = new Uint8Array(size);
    bytes.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    this.device.queue.writeBuffer(buf, 0, bytes);
    this.#owned.push(buf);
    return buf;
  }

  /** A uniform Step (fields not given are 0, topP 1). */
  step(s: Partial<StepParams>): GPUBuffer {
    const full: StepParams = { pos: 0, ntok: 1, seed: 0, topK: 0, temperature: 0, topP: 1, ...s };
    const buf = this.device.createBuffer({
      label: "step",
      size: 32,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    this.device.queue.writeBuffer(buf, 0, packStep(full));
    this.#owned.push(buf);
    return buf;
  }

  /** Dense weights (rows·K values) in `format`: f32 as is, f16/f16p as f16 bit patterns. */
  weights(w: Float32Array, format: DenseFormat): GPUBuffer {
    return this.buffer(format === "f32" ? w : new Float16Array(w), `w.${format}`);
  }

  bindGroup(pipeline: GPUComputePipeline, names: string[], bufs: Record<string, GPUBuffer>) {
    return this.device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: names.map((n, binding) => {
        const buffer = bufs[n];
        if (!buffer) throw new Error(`no buffer named ${n} (bindings: ${names.join(", ")})`);
        return { binding, resource: { buffer } };
      }),
    });
  }

  /** Encodes the jobs in order in one compute pass and submits them. */
  run(...jobs: Job[]): void {
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    for (const j of jobs) {
      pass.setPipeline(j.pipeline);
      pass.setBindGroup(0, this.bindGroup(j.pipeline, j.names, j.bufs));
      const [x, y = 1, z = 1] = j.grid;
      pass.dispatchWorkgroups(x, y, z);
    }
    pass.end();
    this.device.queue.submit([enc.finish()]);
  }

  async #read(buf: GPUBuffer, bytes: number): Promise<ArrayBuffer> {
    const size = Math.ceil(bytes / 4) * 4;
    const staging = this.device.createBuffer({
      size,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const enc = this.device.createCommandEncoder();
    enc.copyBufferToBuffer(buf, 0, staging, 0, size);
    this.device.queue.submit([enc.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const out = staging.getMappedRange().slice(0);
    staging.unmap();
    staging.destroy();
    return out;
  }

  async readF32(buf: GPUBuffer, n: number): Promise<Float32Array> {
    return new Float32Array(await this.#read(buf, n * 4));
  }

  async readU32(buf: GPUBuffer, n: number): Promise<Uint32Array> {
    return new Uint32Array(await this.#read(buf, n * 4));
  }

  /** Destroys every buffer this harness created. */
  release(): void {
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
