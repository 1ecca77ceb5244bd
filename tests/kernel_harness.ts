/**
 * A small harness for kernel tests: buffers from typed arrays, bind groups from a kernel's
 * binding-name list, dispatches of a grid, read-backs.
 */
import { packStep, STEP_BYTES, type StepParams } from "../kernels/common.ts";
import type { DenseFormat } from "../kernels/common.ts";
import { type Bindable, bindingResource, type Gpu } from "../kernels/gpu.ts";
import { allocDense, writeDenseRows } from "../runtime/model/gpu_weights.ts";
import { kvCacheWords, type KvType } from "../kernels/epilogue.ts";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** One dispatch: a pipeline, its buffers by binding name, and the workgroup grid. */
export interface Job {
  pipeline: GPUComputePipeline;
  names: string[];
  bufs: Record<string, Bindable>;
  grid: number[];
}

/**
 * The KV-cache texture layout (KvSource "texture", kernels/epilogue.ts) of a (ctx, kvd) array:
 * texel (head·hd/2 + i, pos) holds elements i and i + hd/2 of that head. Returns 2 words per
 * texel, row-major.
 */
export function kvPairs(a: Float32Array, kvd: number, hd: number): Uint32Array<ArrayBuffer> {
  return kvCacheWords(a, kvd, hd, "f32");
}

/** The inverse of {@link kvPairs}. */
export function kvUnpairs(words: Uint32Array, kvd: number, hd: number): Float32Array {
  const f = new Float32Array(words.buffer, words.byteOffset, words.length);
  const a = new Float32Array(f.length), half = hd / 2, ctx = f.length / kvd;
  for (let p = 0; p < ctx; p++) {
    for (let h = 0; h < kvd / hd; h++) {
      for (let i = 0; i < half; i++) {
        const o = p * kvd + h * hd + i, t = p * kvd + 2 * (h * half + i);
        a[o] = f[t];
        a[o + half] = f[t + 1];
      }
    }
  }
  return a;
}

/**
 * The f16 KV-cache layout (KvType "f16", kernels/epilogue.ts) of a (ctx, kvd) array: word
 * (pos, head·hd/2 + i) holds elements i (low half) and i + hd/2 (high half) of that head, each
 * rounded to f16 (to nearest, ties to even). The same words fill the buffer and the texture.
 */
export function kvHalves(a: Float32Array, kvd: number, hd: number): Uint32Array<ArrayBuffer> {
  return kvCacheWords(a, kvd, hd, "f16");
}

/** The inverse of {@link kvHalves}: (ctx, kvd) values from the packed words. */
export function kvUnhalves(words: Uint32Array, kvd: number, hd: number): Float32Array {
  const halves = new Float16Array(words.buffer, words.byteOffset, words.length * 2);
  return kvUnpairs(new Uint32Array(Float32Array.from(halves).buffer), kvd, hd);
}

export class Harness {
  #owned: (GPUBuffer | GPUTexture)[] = [];
  constructor(readonly gpu: Gpu) {}

  get device(): GPUDevice {
    return this.gpu.device;
  }

  /**
   * A read-write storage buffer holding `data` (padded to a multiple of 16 bytes), with
   * `extraUsage` (e.g. UNIFORM).
   */
  buffer(data: ArrayBufferView, label = "buf", extraUsage = 0): GPUBuffer {
    const size = Math.max(16, Math.ceil(data.byteLength / 16) * 16);
    const buf = this.device.createBuffer({ label, size, usage: RW | extraUsage });
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
      size: STEP_BYTES,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    this.device.queue.writeBuffer(buf, 0, packStep(full));
    this.#owned.push(buf);
    return buf;
  }

  /** `{ buffer, size }`: the first `bytes` of a buffer, for a uniform binding. */
  uniform(data: ArrayBufferView, bytes: number, label = "uniform"): GPUBufferBinding {
    const buffer = this.buffer(data, label, GPUBufferUsage.UNIFORM);
    return { buffer, size: Math.ceil(bytes / 16) * 16 };
  }

  /** Dense weights (rows·K values) in `format`: f32 as is, f16/f16p as f16 bit patterns. */
  weights(w: Float32Array, format: DenseFormat): GPUBuffer {
    return this.buffer(format === "f32" ? w : new Float16Array(w), `w.${format}`);
  }

  /**
   * Dense weights (rows·K values) as a texture in the layout of the runtime's loader
   * (allocDense / writeDenseRows), written in a few uneven runs of rows so that runs start and
   * end inside texture rows.
   */
  weightTexture(w: Float32Array, K: number, format: DenseFormat): GPUTexture {
    const rows = w.length / K;
    const M = allocDense(this.gpu, `w.${format}`, rows, K, format, "texture");
    if (M.chunks.length !== 1) throw new Error("test weights should fit one texture");
    for (const [a, b] of [[0, Math.min(rows, 3)], [Math.min(rows, 3), rows]]) {
      if (b > a) writeDenseRows(this.gpu, M, a, w.subarray(a * K, b * K));
    }
    const tex = M.chunks[0].data as GPUTexture;
    this.#owned.push(tex);
    return tex;
  }

  /**
   * A KV-cache texture (kvd/2, ctx) holding `a` (ctx, kvd) in the paired layout: rg32uint of f32
   * pairs, or with `type` f16 r32uint of packed halves ({@link kvHalves}).
   */
  kvTexture(a: Float32Array, kvd: number, hd: number, type: KvType = "f32"): GPUTexture {
    const ctx = a.length / kvd, f16 = type === "f16";
    const tex = this.device.createTexture({
      label: "kv",
      size: [kvd / 2, ctx],
      format: f16 ? "r32uint" : "rg32uint",
      usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.STORAGE_BINDING |
        GPUTextureUsage.COPY_DST | GPUTextureUsage.COPY_SRC,
    });
    const data = f16 ? kvHalves(a, kvd, hd) : kvPairs(a, kvd, hd);
    this.device.queue.writeTexture({ texture: tex }, data, {
      bytesPerRow: kvd * (f16 ? 2 : 4),
    }, [kvd / 2, ctx]);
    this.#owned.push(tex);
    return tex;
  }

  /** Reads a KV-cache texture (of element type `type`) back as (ctx, kvd) values. */
  async readKvTexture(
    tex: GPUTexture,
    kvd: number,
    hd: number,
    type: KvType = "f32",
  ): Promise<Float32Array> {
    const words = type === "f16" ? kvd / 2 : kvd;
    const ctx = tex.height, row = words * 4, stride = Math.ceil(row / 256) * 256;
    const staging = this.device.createBuffer({
      size: stride * ctx,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const enc = this.device.createCommandEncoder();
    enc.copyTextureToBuffer({ texture: tex }, { buffer: staging, bytesPerRow: stride }, [
      kvd / 2,
      ctx,
    ]);
    this.device.queue.submit([enc.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const all = new Uint8Array(staging.getMappedRange());
    const out = new Uint32Array(ctx * words);
    for (let p = 0; p < ctx; p++) {
      out.set(new Uint32Array(all.slice(p * stride, p * stride + row).buffer), p * words);
    }
    staging.unmap();
    staging.destroy();
    return type === "f16" ? kvUnhalves(out, kvd, hd) : kvUnpairs(out, kvd, hd);
  }

  bindGroup(pipeline: GPUComputePipeline, names: string[], bufs: Record<string, Bindable>) {
    return this.device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: names.map((n, binding) => {
        const r = bufs[n];
        if (!r) throw new Error(`no buffer named ${n} (bindings: ${names.join(", ")})`);
        return { binding, resource: bindingResource(r) };
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

  /** Destroys every buffer and texture this harness created. */
  release(): void {
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
