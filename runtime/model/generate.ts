/**
 * The generation loop. The sampled token never leaves the GPU between steps: each decode step
 * reads its input token from the token buffer where the previous step's sampler wrote it. Steps
 * are submitted ahead, `batch` at a time, with a copy of the new token ids into a mappable buffer
 * after each batch; the host reads those asynchronously while later steps run, so it never waits
 * on the GPU per token. A stop found late discards the few steps already in flight.
 */
import type { GpuModel, SamplingParams } from "./model.ts";
import { ParameterError } from "../errors.ts";

export interface GenerateRequest {
  prompt: number[]; // token ids, BOS included when the model wants it
  maxTokens: number;
  sampling: SamplingParams;
  stopIds: number[];
}

export interface GenerateOptions {
  /** Decode steps per read-back (default 8). */
  batch?: number;
  /** Read-backs in flight (default 3): batch × inflight steps run ahead of the host. */
  inflight?: number;
}

export interface GenerateStats {
  promptTokens: number;
  generatedTokens: number;
  /** From start to the first generated token known on the host. */
  ttftMs: number;
  /** From the first generated token to the last. */
  decodeMs: number;
  finishReason: "stop" | "length";
}

interface Readback {
  from: number; // token buffer index of the first id
  count: number;
  staging: GPUBuffer;
  done: Promise<void>;
}

/**
 * Generates tokens for one request on `model` (which it resets: the prompt starts at position 0).
 * Yields each generated id as it reaches the host; returns the stats. Stop ids are not yielded.
 */
export async function* generate(
  model: GpuModel,
  req: GenerateRequest,
  opts: GenerateOptions = {},
): AsyncGenerator<number, GenerateStats> {
  const n = req.prompt.length;
  if (n === 0) throw new ParameterError("the prompt must hold at least one token");
  if (n >= model.ctx) {
    throw new ParameterError(`prompt of ${n} tokens does not fit the context of ${model.ctx}`);
  }
  if (!Number.isInteger(req.maxTokens) || req.maxTokens < 1) {
    throw new ParameterError(`max tokens must be a positive integer; got ${req.maxTokens}`);
  }
  const batch = opts.batch ?? 8, inflight = opts.inflight ?? 3;
  const device = model.gpu.device;
  const maxNew = Math.min(req.maxTokens, model.ctx - n);
  const stop = new Set(req.stopIds);
  const pool: GPUBuffer[] = [];
  const reads: Readback[] = [];
  const readback = (from: number, count: number) => (enc: GPUCommandEncoder) => {
    const staging = pool.pop() ??
      device.createBuffer({
        size: batch * 4,
        usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
      });
    enc.copyBufferToBuffer(model.state.tokens, from * 4, staging, 0, count * 4);
    // mapAsync is called after the submit below, through `pending`
    pending = { from, count, staging, done: Promise.resolve() };
  };
  let pending: Readback | null = null;
  const launch = () => {
    const r = pending!;
    pending = null;
    r.done = r.staging.mapAsync(GPUMapMode.READ);
    reads.push(r);
  };

  const t0 = performance.now();
  model.writeTokens(0, req.prompt);
  model.prefill(0, n, req.sampling, readback(n, 1));
  launch();
  let scheduled = 1; // tokens sampled or being sampled
  let pos = n; // next decode position
  let generated = 0;
  let tFirst = 0;
  let finishReason: GenerateStats["finishReason"] = "length";
  try {
    outer: while (true) {
      // decode steps are scheduled once the first token is back: queued behind the prefill they
      // would delay its read-back (and the time to first token) on adapters that resolve
      // mapAsync only when the queue is idle
      while (tFirst > 0 && reads.length < inflight && scheduled < maxNew) {
        const count = Math.min(batch, maxNew - scheduled);
        for (let j = 0; j < count; j++) {
          model.decode(
            pos,
            req.sampling,
            j === count - 1 ? readback(pos + 2 - count, count) : undefined,
          );
          pos++;
          scheduled++;
        }
        launch();
      }
      const r = reads.shift();
      if (!r) break;
      await r.done;
      model.gpu.check("a decode step");
      const ids = new Uint32Array(r.staging.getMappedRange(0, r.count * 4).slice(0));
      r.staging.unmap();
      pool.push(r.staging);
      for (const id of ids) {
        if (generated === 0) tFirst = performance.now();
        if (stop.has(id)) {
          finishReason = "stop";
          break outer;
        }
        generated++;
        yield id;
      }
    }
  } finally {
    // Steps still in flight finish on their own; their buffers are released once mapped.
    for (const r of reads) r.done.then(() => r.staging.destroy(), () => {});
    for (const b of pool) b.destroy();
  }
  const tEnd = performance.now();
  return {
    promptTokens: n,
    generatedTokens: generated,
    ttftMs: tFirst - t0,
    decodeMs: tEnd - tFirst,
    finishReason,
  };
}
