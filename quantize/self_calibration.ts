/**
 * `--calib self`: calibration sequences sampled from the float model itself, data-free, as in
 * LLM-QAT (arXiv 2305.17888): each sequence starts at BOS and is sampled at temperature 1 (no
 * top-k, no top-p) until `seqLen` tokens or the model's end of sequence. Sequences run together
 * on the GPU through the serving engine's continuous batching; sequence i is sampled with seed
 * pcgHash(seed ^ i), so the set depends only on (model, count, seqLen, seed).
 */
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import type { Tokenizer } from "../runtime/tokenizer/tokenizer.ts";
import type { Gpu } from "../kernels/gpu.ts";
import { GpuModel } from "../runtime/model/model.ts";
import { Engine } from "../runtime/model/engine.ts";
import { pcgHash } from "../runtime/model/sampling.ts";
import { ParameterError } from "../runtime/errors.ts";

/** The `--calib` value that asks for self-calibration. */
export const SELF_CALIBRATION = "self";

export interface SelfCalibrationOptions {
  /** Sequences to sample. */
  count: number;
  /** Tokens per sequence, BOS included (at most). */
  seqLen: number;
  seed: number;
  /** Sequences sampled at once (default 8). */
  slots?: number;
  log?: (line: string) => void;
}

/** `count` sequences of at most `seqLen` tokens, BOS first, sampled from the float model. */
export async function selfCalibrationSequences(
  gpu: Gpu,
  ckpt: Checkpoint,
  tokenizer: Tokenizer,
  o: SelfCalibrationOptions,
): Promise<number[][]> {
  const c = ckpt.config;
  if (!Number.isInteger(o.count) || o.count < 1) {
    throw new ParameterError(`--calib self needs --calib-samples ≥ 1; got ${o.count}`);
  }
  if (!Number.isInteger(o.seqLen) || o.seqLen < 2 || o.seqLen > c.seqLen) {
    throw new ParameterError(
      `--calib-seqlen must be an integer in [2, ${c.seqLen}] (the model's context); got ${o.seqLen}`,
    );
  }
  const bos = tokenizer.bosId >= 0 ? tokenizer.bosId : c.bosId;
  if (bos < 0) throw new ParameterError("--calib self needs a model with a BOS token");
  const log = o.log ?? (() => {});
  // the float model: f32 weights and an f32 KV cache
  const model = await GpuModel.load(gpu, ckpt, { ctx: o.seqLen, dtype: "f32", kvType: "f32" });
  const engine = new Engine(model, tokenizer, "self-calibration", {
    slots: o.slots ?? 8,
    maxQueue: o.count,
  });
  const stopIds = [...new Set([...c.eosIds, tokenizer.eosId].filter((t) => t >= 0))];
  const seqs: number[][] = new Array(o.count);
  let done = 0, tokens = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: o.count }, async (_, i) => {
    const seq = [bos];
    const job = engine.submit({
      prompt: [bos],
      maxTokens: o.seqLen - 1,
      sampling: { temperature: 1, topK: 0, topP: 1, seed: pcgHash(o.seed ^ i) },
      stopIds,
    });
    for await (const id of job) seq.push(id);
    seqs[i] = seq;
    done++;
    tokens += seq.length;
    const s = (performance.now() - t0) / 1000;
    if (done === o.count || done % 16 === 0) {
      log(
        `self-calibration: ${done} / ${o.count} sequences, ${tokens} tokens ` +
          `(${(tokens / Math.max(s, 1e-3)).toFixed(0)} tok/s)`,
      );
    }
  }));
  return seqs;
}
