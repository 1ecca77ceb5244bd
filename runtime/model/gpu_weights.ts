/**
 * Uploads a checkpoint's weights to the GPU, one tensor (or one slice of rows) at a time, so host
 * memory stays near the largest slice. q/k/v and gate/up are concatenated row-wise into one
 * matrix each, so one dispatch computes them together.
 */
import type { Checkpoint } from "../checkpoint/checkpoint.ts";
import { type ModelConfig, tensorNames as T } from "../checkpoint/config.ts";
import { GpuError, ShapeError } from "../errors.ts";
import { elementCount, tensorByteSizes } from "../format/lowbit_file.ts";
import {
  bytesPer,
  DENSE_TEX_WIDTH,
  type DenseFormat,
  denseRowTexels,
  denseTexels,
  denseTextureFormat,
  texSize,
  type WeightSource,
  writeTexels,
} from "../../kernels/common.ts";
import { denseTexMaxRows } from "../../kernels/dense_texture.ts";
import { createQTextures } from "../../kernels/matvec_q.ts";
import { type Gpu, STORAGE } from "../../kernels/gpu.ts";

/**
 * A dense weight matrix (rows, K), split into row chunks that each fit one binding: storage
 * buffers, or on CPU adapters textures (`weights: "texture"`, layout in kernels/common.ts).
 */
export interface DenseMatrix {
  format: DenseFormat;
  weights: WeightSource;
  rows: number;
  K: number;
  chunks: { rowStart: number; rows: number; data: GPUBuffer | GPUTexture }[];
}

/**
 * A decoupleQ-packed matrix (layout in docs/FORMAT.md), split into row chunks likewise: storage
 * buffers, or on CPU adapters textures (kernels/matvec_q.ts createQTextures).
 */
export interface PackedMatrix {
  format: "q";
  weights: WeightSource;
  bits: 2 | 3 | 4;
  groupSize: number; // 0 = one group per row
  rows: number;
  K: number;
  chunks: {
    rowStart: number;
    rows: number;
    qweight: GPUBuffer | GPUTexture;
    sz: GPUBuffer | GPUTexture;
  }[];
}

/** Where an adapter's weights go: textures on CPU adapters, storage buffers on GPUs. */
export function weightSource(gpu: Gpu): WeightSource {
  return gpu.isCpu ? "texture" : "buffer";
}

export type Matrix = DenseMatrix | PackedMatrix;

export interface LayerWeights {
  attnNorm: GPUBuffer; // (dim) f32
  wqkv: Matrix; // (qDim + 2·kvDim, dim)
  bqkv: GPUBuffer | null; // (qDim + 2·kvDim) f32, Qwen2 only
  wo: Matrix; // (dim, qDim)
  ffnNorm: GPUBuffer; // (dim) f32
  w13: Matrix; // (2·hidden, dim): gate rows then up rows
  w2: Matrix; // (dim, hidden)
}

/**
 * What runs: the linear layers' formats (each distinct one, for a mixed-precision file) and the
 * logits layer's, e.g. "linears W4 g128, logits f16" or "linears W3 g64 + W2 g64, logits f16".
 */
export function describeWeights(w: GpuWeights): string {
  const d = (m: Matrix) => (m.format === "q" ? `W${m.bits} g${m.groupSize}` : m.format);
  const linears = new Set(w.layers.flatMap((l) => [l.wqkv, l.wo, l.w13, l.w2].map(d)));
  return `linears ${[...linears].join(" + ")}, logits ${d(w.lmHead)}`;
}

export interface GpuWeights {
  format: DenseFormat;
  embed: DenseMatrix; // (vocab, dim)
  norm: GPUBuffer; // (dim) f32
  lmHead: Matrix; // (vocab, dim); the embedding itself when tied
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

  write(buffer: GPUBuffer, offset: number, data: Float32Array | Float16Array | Uint32Array): void {
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

  /**
   * A 1-D f32 vector (norm weight, bias): one or more tensors concatenated. Also a uniform buffer:
   * decode kernels on CPU adapters read norm weights as uniforms.
   */
  async vector(label: string, names: string[]): Promise<GPUBuffer> {
    const parts = await Promise.all(names.map((n) => this.ckpt.read(n)));
    const total = parts.reduce((a, p) => a + p.length, 0);
    const usage = STORAGE | GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST;
    const buf = this.gpu.buffer(label, total * 4, usage);
    let off = 0;
    for (const p of parts) {
      this.write(buf, off, p);
      off += p.byteLength;
    }
    await this.flushIfNeeded();
    return buf;
  }

  /** Packed or dense, as the checkpoint stores the first of `names`. */
  linear(label: string, names: string[]): Promise<Matrix> {
    const info = this.ckpt.tensors.get(names[0])!;
    return info.dtype === "Q" ? this.packed(label, names) : this.matrix(label, names);
  }

  /** Packed low-bit tensors stacked row-wise (rows are independent in the layout). */
  async packed(label: string, names: string[]): Promise<PackedMatrix> {
    const infos = names.map((n) => this.ckpt.tensors.get(n)!);
    const { bits, groupSize } = infos[0].quant!;
    const K = infos[0].shape[1];
    for (const t of infos) {
      if (
        t.dtype !== "Q" || t.quant!.bits !== bits || t.quant!.groupSize !== groupSize ||
        t.shape[1] !== K
      ) {
        throw new ShapeError(
          `${label}: ${t.name} must be packed like ${names[0]} (${bits}-bit, group ${groupSize})`,
        );
      }
    }
    const rows = infos.reduce((a, t) => a + t.shape[0], 0);
    const qWords = bits * Math.ceil(K / 32),
      szWords = groupSize === 0 ? 1 : Math.ceil(K / groupSize);
    const weights = weightSource(this.gpu);
    if (weights === "texture") {
      // textures are written whole: gather the tensors' words on the host
      const qweight = new Uint32Array(rows * qWords), sz = new Uint32Array(rows * szWords);
      let r = 0;
      for (const t of infos) {
        const p = await this.ckpt.readPacked!(t.name);
        qweight.set(p.qweight, r * qWords);
        sz.set(p.sz, r * szWords);
        r += t.shape[0];
      }
      const tex = createQTextures(this.gpu, { qweight, sz }, { bits, K, groupSize }, label);
      this.pending += qweight.byteLength + sz.byteLength;
      this.bytes += qweight.byteLength + sz.byteLength;
      this.onProgress(this.bytes, this.total);
      await this.flushIfNeeded();
      return {
        format: "q",
        weights,
        bits,
        groupSize,
        rows,
        K,
        chunks: [{ rowStart: 0, rows, qweight: tex.qweight, sz: tex.sz }],
      };
    }
    const maxRows = Math.floor(this.gpu.maxBinding / (qWords * 4));
    if (rows > maxRows) {
      throw new GpuError(
        `${label}: ${rows} packed rows exceed the adapter's binding limit of ${maxRows}`,
      );
    }
    const usage = STORAGE | GPUBufferUsage.COPY_DST;
    const qweight = this.gpu.buffer(`${label}.q`, rows * qWords * 4, usage);
    const sz = this.gpu.buffer(`${label}.sz`, rows * szWords * 4, usage);
    let r = 0;
    for (const t of infos) {
      const p = await this.ckpt.readPacked!(t.name);
      this.write(qweight, r * qWords * 4, p.qweight);
      this.write(sz, r * szWords * 4, p.sz);
      r += t.shape[0];
      await this.flushIfNeeded();
    }
    return {
      format: "q",
      weights,
      bits,
      groupSize,
      rows,
      K,
      chunks: [{ rowStart: 0, rows, qweight, sz }],
    };
  }

  /** A matrix made of the given tensors stacked row-wise, chunked to the binding limit. */
  async matrix(label: string, names: string[]): Promise<DenseMatrix> {
    const shapes = names.map((n) => this.ckpt.tensors.get(n)!.shape);
    const K = shapes[0][1];
    const M = allocDense(this.gpu, label, shapes.reduce((a, s) => a + s[0], 0), K, this.format);
    // copy each tensor in slices of rows
    const sliceRows = Math.max(1, Math.floor(SLICE_BYTES / (K * 4)));
    let dst = 0;
    for (let i = 0; i < names.length; i++) {
      const n = shapes[i][0];
      for (let r0 = 0; r0 < n; r0 += sliceRows) {
        const data = await this.ckpt.read(names[i], r0, Math.min(n, r0 + sliceRows));
        this.pending += writeDenseRows(this.gpu, M, dst + r0, data);
        this.bytes += data.length * bytesPer(this.format);
        this.onProgress(this.bytes, this.total);
        await this.flushIfNeeded();
      }
      dst += n;
    }
    return M;
  }
}

/** The dense format of `dtype` on this adapter: f32, or f16 (native with shader-f16, else f16p). */
export function denseFormat(gpu: Gpu, dtype: WeightDType): DenseFormat {
  return dtype === "f32" ? "f32" : gpu.shaderF16 ? "f16" : "f16p";
}

/** The weight dtype `--dtype auto` picks: the checkpoint's (its first tensor's), f32 or f16. */
export function autoDType(ckpt: Checkpoint): WeightDType {
  const t = ckpt.tensors.values().next().value;
  return t?.dtype === "F32" ? "f32" : "f16";
}

/**
 * The row chunks {@link allocDense} splits a dense (rows, K) matrix into: as many rows as fit one
 * binding (buffers) or one texture.
 */
export function denseChunks(
  gpu: Gpu,
  label: string,
  rows: number,
  K: number,
  format: DenseFormat,
  weights: WeightSource = weightSource(gpu),
): { rowStart: number; rows: number }[] {
  if (K % 4 !== 0) throw new ShapeError(`${label}: inner dimension ${K} is not a multiple of 4`);
  const tex = weights === "texture";
  const maxRows = tex
    ? denseTexMaxRows(K, format, gpu.device.limits.maxTextureDimension2D)
    : Math.floor(gpu.maxBinding / (K * bytesPer(format)));
  if (maxRows < 1) {
    throw new GpuError(
      `${label}: one row exceeds the adapter's ${tex ? "texture" : "binding"} limit`,
    );
  }
  const out: { rowStart: number; rows: number }[] = [];
  for (let r = 0; r < rows; r += maxRows) {
    out.push({ rowStart: r, rows: Math.min(maxRows, rows - r) });
  }
  return out;
}

/**
 * A dense (rows, K) matrix in row chunks that each fit one binding (buffers) or one texture
 * ({@link denseChunks}); contents unset. `weights` defaults to the adapter's choice
 * ({@link weightSource}).
 */
export function allocDense(
  gpu: Gpu,
  label: string,
  rows: number,
  K: number,
  format: DenseFormat,
  weights: WeightSource = weightSource(gpu),
): DenseMatrix {
  const data = (r: number, n: number): GPUBuffer | GPUTexture =>
    weights === "texture"
      ? gpu.device.createTexture({
        label: `${label}[${r}]`,
        size: texSize(n * denseRowTexels(K, format), DENSE_TEX_WIDTH),
        format: denseTextureFormat(format),
        usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST,
      })
      : gpu.buffer(`${label}[${r}]`, n * K * bytesPer(format), STORAGE | GPUBufferUsage.COPY_DST);
  const chunks = denseChunks(gpu, label, rows, K, format, weights)
    .map((c) => ({ ...c, data: data(c.rowStart, c.rows) }));
  return { format, weights, rows, K, chunks };
}

/**
 * Writes rows [row0, row0 + data.length / K) of a dense matrix from float32 values (converted to
 * the matrix's format); a run of rows may straddle chunks. Returns the bytes queued.
 */
export function writeDenseRows(gpu: Gpu, M: DenseMatrix, row0: number, data: Float32Array): number {
  const K = M.K, n = data.length / K;
  if (M.weights === "texture") {
    const RT = denseRowTexels(K, M.format);
    let bytes = 0;
    for (let r = 0; r < n;) {
      const c = M.chunks.find((c) => row0 + r < c.rowStart + c.rows)!;
      const take = Math.min(n - r, c.rowStart + c.rows - (row0 + r));
      const words = denseTexels(data.subarray(r * K, (r + take) * K), K, M.format);
      const start = (row0 + r - c.rowStart) * RT;
      writeTexels(gpu.device, c.data as GPUTexture, DENSE_TEX_WIDTH, start, words);
      bytes += words.byteLength;
      r += take;
    }
    return bytes;
  }
  const rowBytes = K * bytesPer(M.format);
  const conv = M.format === "f32" ? data : new Float16Array(data);
  for (let r = 0; r < n;) {
    const c = M.chunks.find((c) => row0 + r < c.rowStart + c.rows)!;
    const take = Math.min(n - r, c.rowStart + c.rows - (row0 + r));
    const sub = conv.subarray(r * K, (r + take) * K);
    gpu.device.queue.writeBuffer(
      c.data as GPUBuffer,
      (row0 + r - c.rowStart) * rowBytes,
      sub.buffer as ArrayBuffer,
      sub.byteOffset,
      sub.byteLength,
    );
    r += take;
  }
  return conv.byteLength;
}

/** Uploads every weight of `ckpt`. `dtype` picks f32 or f16 storage for the matrices. */
export async function uploadWeights(
  gpu: Gpu,
  ckpt: Checkpoint,
  dtype: WeightDType,
  onProgress: (bytes: number, total: number) => void = () => {},
): Promise<GpuWeights> {
  const c: ModelConfig = ckpt.config;
  const format = denseFormat(gpu, dtype);
  let total = 0;
  for (const t of ckpt.tensors.values()) {
    if (t.name === T.lmHead && c.tiedEmbeddings) continue;
    if (t.dtype === "Q") {
      const b = tensorByteSizes({ shape: t.shape, dtype: "Q", ...t.quant! });
      total += b.data + b.sz; // codes and (s, z), as the uploader counts them
    } else total += elementCount(t.shape) * (t.shape.length === 1 ? 4 : bytesPer(format));
  }
  const up = new Uploader(gpu, ckpt, format, onProgress, total);
  const embed = await up.matrix("embed", [T.embed]);
  const layers: LayerWeights[] = [];
  for (let l = 0; l < c.nLayers; l++) {
    layers.push({
      attnNorm: await up.vector(`attn_norm.${l}`, [T.attnNorm(l)]),
      wqkv: await up.linear(`wqkv.${l}`, [T.wq(l), T.wk(l), T.wv(l)]),
      bqkv: c.qkvBias ? await up.vector(`bqkv.${l}`, [T.bq(l), T.bk(l), T.bv(l)]) : null,
      wo: await up.linear(`wo.${l}`, [T.wo(l)]),
      ffnNorm: await up.vector(`ffn_norm.${l}`, [T.ffnNorm(l)]),
      w13: await up.linear(`w13.${l}`, [T.w1(l), T.w3(l)]),
      w2: await up.linear(`w2.${l}`, [T.w2(l)]),
    });
  }
  const norm = await up.vector("norm", [T.norm]);
  const lmHead = c.tiedEmbeddings ? embed : await up.linear("lm_head", [T.lmHead]);
  await up.flushIfNeeded(true);
  return { format, embed, norm, lmHead, layers, bytes: up.bytes };
}
