/** What every checkpoint reader (safetensors, llama2.c .bin, .lowbit) gives the loader. */
import type { ModelConfig } from "./config.ts";

export type DType = "F32" | "F16" | "BF16";

/** Low-bit weight settings of a decoupleQ-packed tensor (see docs/FORMAT.md). */
export interface QuantInfo {
  bits: 2 | 3 | 4;
  /** Columns per (s, z) group; 0 = one group per row. */
  groupSize: number;
}

export interface TensorInfo {
  /** Canonical (Hugging Face Llama) name; see `tensorNames` in config.ts. */
  name: string;
  /** Storage type; "Q" = packed low-bit (`quant` says how), read with `readPacked`. */
  dtype: DType | "Q";
  /** Row-major shape, outermost first: `[out, in]` for a linear weight. */
  shape: number[];
  quant?: QuantInfo;
}

/** A packed low-bit weight exactly as the kernels read it (layout in docs/FORMAT.md). */
export interface PackedTensor {
  /** (N, bits · ceil(K/32)) u32 words of codes u = q + 2^(bits-1). */
  qweight: Uint32Array;
  /** (N, nGroups) u32: fp16 s in the low half, fp16 z in the high half. */
  sz: Uint32Array;
}

/**
 * A checkpoint opened for streaming: the config and tensor list are known up front, tensor data
 * is read on demand, one tensor (or a range of its rows) at a time, so the host never holds the
 * whole model.
 */
export interface Checkpoint {
  /** Path of the checkpoint (file or directory), for messages. */
  path: string;
  config: ModelConfig;
  tensors: Map<string, TensorInfo>;
  /**
   * Reads rows `[rowStart, rowEnd)` of a tensor (all of it by default; a 1-D tensor has one
   * row per element) converted to float32, in canonical layout.
   */
  read(name: string, rowStart?: number, rowEnd?: number): Promise<Float32Array>;
  /** Reads a packed low-bit tensor (dtype "Q"); only model files with such tensors have it. */
  readPacked?(name: string): Promise<PackedTensor>;
  close(): void;
}
