/** Opens a model path (checkpoint and tokenizer) and loads it onto the GPU, with progress. */
import { openCheckpoint } from "../checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../tokenizer/load_tokenizer.ts";
import { GpuModel, type LoadOptions } from "./model.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { createGpu, type Gpu } from "../../kernels/gpu.ts";
import { progress } from "../cli/cli.ts";

export interface LoadedModel {
  gpu: Gpu;
  model: GpuModel;
  tokenizer: Tokenizer;
}

export async function loadModel(
  path: string,
  opts: LoadOptions & { tokenizer?: string; gpu?: Gpu; quiet?: boolean } = {},
): Promise<LoadedModel> {
  const ckpt = await openCheckpoint(path);
  try {
    const tokenizer = await loadTokenizer(path, opts.tokenizer);
    const gpu = opts.gpu ?? await createGpu();
    const bar = opts.onProgress || opts.quiet
      ? undefined
      : progress(`loading ${path}`, { untilEnd: true });
    const model = await GpuModel.load(gpu, ckpt, { ...opts, onProgress: opts.onProgress ?? bar });
    bar?.end();
    return { gpu, model, tokenizer };
  } finally {
    ckpt.close();
  }
}
