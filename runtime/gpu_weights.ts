/**
 * Uploads a checkpoint's weights to the GPU, one tensor (or one slice of rows) at a time, so host
 * memory stays near the largest slice. q/k/v and gate/up are concatenated row-wise into one
 * matrix each, so one dispatch computes them together.
 */
import type { Checkpoint } from "./checkpoint.ts";
import { type ModelConfig, tensorNames as T } from "./config.ts";
import { GpuError, ShapeError } from "./errors.ts";
import { bytesPer, type DenseFormat } from "../kernels/common.ts";
import { type Gpu, STORAGE } from "../kernels/gpu.ts";

/** A dense weight matrix (rows, K), split into row chunks that each fit one binding. */
export interface DenseMatrix {
  format: DenseFormat;
  rows: number;
  K: number;
  chunks: { rowStart: number; rows: number; buffer: GPUBuffer }[];
}

export interface LayerWeights {
  attnNorm: GPUBuffer; // (dim) f32
  wqkv: DenseMatrix; // (qDim + 2·kvDim, dim)
  bqkv: GPUBuffer | null; // (qDim + 2·kvDim) f32, Qwen2 only
  wo: DenseMatrix; // (dim, qDim)
  ffnNorm: GPUBuffer; // (dim) f32
  w13: DenseMatrix; // (2·hidden, dim): gate rows then up rows
  w2: DenseMatrix; // (dim, hidden)
}

export interface GpuWeights {
  format: DenseFormat;
  embed: DenseMatrix; // (vocab, dim)
  norm: GPUBuffer; // (dim) f32
  lmHead: DenseMatrix; // (vocab, dim); the embedding itself when tied
  layers: LayerWeights[];
  /** Bytes held in GPU weight buffers. */
  bytes: number;
}

export type WeightDType = "f32" | "f16";

/** Rows read per slice: bounds host memory for very large tensors. */
const SLICE_BYTES = 8 << 20;
/** Bytes written between waits for the queue, so wgpu's staging copies are freed. */
const FLUSH_BYTES = 32 << 20;

class Uploader {
  pending = 0;
  bytes = 0;
  constructor(
    readonly gpu: Gpu,
    readonly ckpt: Checkpoint,
    readonly format: DenseFormat,
    readonly onProgress: (bytes: number, total: number) => void,
    readonly total: number,
  ) {}

  async flushIfNeeded(force = false): Promise<void> {
    if (this.pending >= FLUSH_BYTES || (force && this.pending > 0)) {
      this.gpu.device.queue.submit([]);
      await this.gpu.device.queue.onSubmittedWorkDone();
      this.pending = 0;
    }
  }

  write(buffer: GPUBuffer, offset: number, data: Float32Array | Float16Array): void {
    this.gpu.device.queue.writeBuffer(
      buffer,
      offset,
      data.buffer as ArrayBuffer,
      data.byteOffset,
      data.byteLength,
    );
    this.pending += data.byteLength;
    this.bytes += data.byteLength;
    this.onProgress(this.bytes, this.total);
  }

  /** A 1-D f32 vector (norm weight, bias): one or more tensors concatenated. */
  async vector(label: string, names: string[]): Promise<GPUBuffer> {
    const parts = await Promise.all(names.map((n) => this.ckpt.read(n)));
    const total = parts.reduce((a, p) => a + p.length, 0);
    const buf = this.gpu.buffer(label, total * 4, STORAGE | GPUBufferUsage.COPY_DST);
    let off = 0;
    for (const p of parts) {
      this.write(buf, off, p);
      off += p.byteLength;
    }
    await this.flushIfNeeded();
    return buf;
  }

  /** A matrix made of the given tensors stacked row-wise, chunked to the binding limit. */
  async matrix(label: string, names: string[]): Promise<DenseMatrix> {
    const shapes = names.map((n) => this.ckpt.tensors.get(n)!.shape);
    const K = shapes[0][1];
    if (K % 4 !== 0) {
      throw new ShapeError(`${names[0]}: inner dimension ${K} is not a multiple of 4`);
    }
    const rows = shapes.reduce((a, s) => a + s[0], 0);
    const rowBytes = K * bytesPer(this.format);
    const maxRows = Math.floor(this.gpu.maxBinding / rowBytes);
    if (maxRows < 1) throw new GpuError(`${label}: one row exceeds the adapter's binding limit`);
    const chunks: DenseMatrix["chunks"] = [];
    for (let r = 0; r < rows; r += maxRows) {
      const n = Math.min(maxRows, rows - r);
      const buffer = this.gpu.buffer(
        `${label}[${r}]`,
        n * rowBytes,
        STORAGE | GPUBufferUsage.COPY_DST,
      );
      chunks.push({ rowStart: r, rows: n, buffer });
    }
    // copy each tensor in slices of rows, into whichever chunk holds them
    const sliceRows = Math.max(1, Math.floor(SLICE_BYTES / (K * 4)));
    let dst = 0;
    for (let i = 0; i < names.length; i++) {
      const n = shapes[i][0];
      for (let r0 = 0; r0 < n; r0 += sliceRows) {
        const r1 = Math.min(n, r0 + sliceRows);
        const data = await this.ckpt.read(names[i], r0, r1);
        const conv = this.format === "f32" ? data : new Float16Array(data);
        // a slice may straddle two chunks
        for (let r = r0; r < r1;) {
          const row = dst + r;
          const c = chunks[Math.floor(row / maxRows)];
          const take = Math.min(r1 - r, c.rowStart + c.rows - row);
          const sub = conv.subarray((r - r0) * K, (r - r0 + take) * K);
          this.write(c.buffer, (row - c.rowStart) * rowBytes, sub);
          r += take;
        }
        await this.flushIfNeeded();
      }
      dst += n;
    }
    return { format: this.format, rows, K, chunks };
  }
}

/** Uploads every weight of `ckpt`. `dtype` picks f32 or f16 storage for the matrices. */
export async function uploadWeights(
  gpu: Gpu,
  ckpt: Checkpoint,
  dtype: WeightDType,
  onProgress: (bytes: number, total: number) => void = () => {},
): Promise<GpuWeights> {
  const c: ModelConfig = ckpt.config;
  const format: DenseFormat = dtype === "f32" ? "f32" : gpu.shaderF16 ? "f16" : "f16p";
  let total = 0;
  for (const t of ckpt.tensors.values()) {
    if (t.name === T.lmHead && c.tiedEmbeddings) continue;
    total += t.shape.reduce((a, b) => a * b, 1) * (t.shape.length === 1 ? 4 : bytesPer(format));
  }
  const up = new Uploader(gpu, ckpt, format, onProgress, total);
  const embed = await up.matrix("embed", [T.embed]);
  const layers: LayerWeights[] = [];
  for (let l = 0; l < c.nLayers; l++) {
    layers.push({
      attnNorm: await up.vector(`attn_norm.${l}`, [T.attnNorm(l)]),
      wqkv: await up.matrix(`wqkv.${l}`, [T.wq(l), T.wk(l), T.wv(l)]),
      bqkv: c.qkvBias ? await up.vector(`bqkv.${l}`, [T.bq(l), T.bk(l), T.bv(l)]) : null,
      wo: await up.matrix(`wo.${l}`, [T.wo(l)]),
      ffnNorm: await up.vector(`ffn_norm.${l}`, [T.ffnNorm(l)]),
      w13: await up.matrix(`w13.${l}`, [T.w1(l), T.w3(l)]),
      w2: await up.matrix(`w2.${l}`, [T.w2(l)]),
    });
  }
  const norm = await up.vector("norm", [T.norm]);
  const lmHead = c.tiedEmbeddings ? embed : await up.matrix("lm_head", [T.lmHead]);
  await up.flushIfNeeded(true);
  return { format, embed, norm, lmHead, layers, bytes: up.bytes };
}
