/** What every checkpoint reader (safetensors, llama2.c .bin, .lowbit) gives the loader. */
import type { ModelConfig } from "./config.ts";

export type DType = "F32" | "F16" | "BF16";

export interface TensorInfo {
  /** Canonical (Hugging Face Llama) name; see `tensorNames` in config.ts. */
  name: string;
  dtype: DType;
  /** Row-major shape, outermost first: `[out, in]` for a linear weight. */
  shape: number[];
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
  close(): void;
}
