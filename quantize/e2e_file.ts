/**
 * The end-to-end stage ({@link tuneEndToEnd}) applied to a written `.lowbit` file: its codes,
 * scales, zeros and norms are read back, tuned against the float checkpoint's next-token
 * distributions on the calibration sequences, and the file is rewritten with the tuned s, z and
 * norms (every other tensor as it was, the settings recorded under `quantization.e2e`).
 */
import type { Checkpoint, PackedTensor } from "../runtime/checkpoint/checkpoint.ts";
import { tensorNames as T } from "../runtime/checkpoint/config.ts";
import { ParameterError } from "../runtime/errors.ts";
import { openLowbit } from "../runtime/format/lowbit_reader.ts";
import { createLowbitWriter } from "../runtime/format/lowbit_writer.ts";
import type { Gpu } from "../kernels/gpu.ts";
import { LINEAR_KEYS, type LinearKey } from "./block_math.ts";
import { linearName } from "./block_runner.ts";
import { E2E_DEFAULTS, type E2EHistory, type E2EOptions, tuneEndToEnd } from "./e2e.ts";
import { packQ, unpackQ } from "../runtime/format/pack.ts";
import type { QuantizedLinear } from "../runtime/format/qtensor.ts";
import { embedInputs, floatFinalHidden } from "./sequential.ts";
import type { Stage2Block } from "./stage2.ts";

export interface E2EReport extends E2EHistory {
  ms: number;
}

/**
 * Tunes the quantized file `path` (made from `ckpt`) end to end on `seqs` and rewrites it in
 * place (through a temporary file beside it). `windows` (recorded in the header) says that
 * `seqs` were cut from the whole calibration text rather than from its lines.
 */
export async function tuneLowbitFile(
  gpu: Gpu,
  ckpt: Checkpoint,
  seqs: number[][],
  path: string,
  opts: E2EOptions & { windows?: boolean },
): Promise<E2EReport> {
  const log = opts.log ?? (() => {});
  const teacher = await floatFinalHidden(gpu, ckpt, seqs);
  const q = await openLowbit(path);
  const tmp = `${path}.e2e.tmp`;
  let report: E2EReport;
  try {
    const { config: c, tensors } = q.header;
    const entry = new Map(tensors.map((e) => [e.name, e]));
    const blocks: Stage2Block[] = [];
    for (let l = 0; l < c.nLayers; l++) {
      const linears = {} as Record<LinearKey, QuantizedLinear>;
      for (const key of LINEAR_KEYS) {
        const e = entry.get(linearName(key, l))!;
        if (e.dtype !== "Q") {
          throw new ParameterError(`${path}: ${e.name} is ${e.dtype}; e2e tunes packed layers`);
        }
        const [N, K] = e.shape;
        linears[key] = unpackQ(await q.readPacked(e.name), N, K, e.bits!, e.groupSize!);
      }
      const bias = c.qkvBias
        ? { bq: await q.read(T.bq(l)), bk: await q.read(T.bk(l)), bv: await q.read(T.bv(l)) }
        : null;
      blocks.push({
        linears,
        attnNorm: await q.read(T.attnNorm(l)),
        ffnNorm: await q.read(T.ffnNorm(l)),
        bias,
      });
    }
    // the student runs what the file holds: its (fp16) embedding and logits layer
    const head = await q.read(c.tiedEmbeddings ? T.embed : T.lmHead);
    const inputs = await embedInputs(q, seqs);
    log(`e2e: ${seqs.length} sequences, ${c.nLayers} blocks`);
    const r = tuneEndToEnd(c, { blocks, finalNorm: await q.read(T.norm), head }, inputs, teacher, {
      ...opts,
      log,
    });

    const tuned = new Map<string, Float32Array | PackedTensor>([[T.norm, r.model.finalNorm]]);
    r.model.blocks.forEach((b, l) => {
      for (const key of LINEAR_KEYS) tuned.set(linearName(key, l), packQ(b.linears[key]));
      tuned.set(T.attnNorm(l), b.attnNorm);
      tuned.set(T.ffnNorm(l), b.ffnNorm);
    });
    const w = await createLowbitWriter(tmp, {
      config: c,
      tokenizer: q.header.tokenizer,
      quantization: {
        ...q.header.quantization,
        e2e: {
          epochs: opts.epochs ?? E2E_DEFAULTS.epochs,
          lr: opts.lr ?? E2E_DEFAULTS.lr,
          samples: seqs.length,
          windows: opts.windows ?? false,
        },
      },
      tensors: tensors.map((e) => ({
        name: e.name,
        shape: e.shape,
        dtype: e.dtype,
        quant: e.dtype === "Q" ? { bits: e.bits!, groupSize: e.groupSize! } : undefined,
      })),
    });
    for (const e of tensors) {
      const data = tuned.get(e.name) ??
        (e.dtype === "Q" ? await q.readPacked(e.name) : await q.read(e.name));
      await w.writeTensor(e.name, data);
    }
    await w.close();
    report = { ...r.history, ms: r.ms };
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw e;
  } finally {
    q.close();
  }
  await Deno.rename(tmp, path);
  return report;
}
