/**
 * Quantizes a checkpoint into a `.lowbit` file: the float tensors as they are (fp16 matrices,
 * f32 vectors), every linear layer packed — with calibration, sequentially through the model
 * (RTN / GPTQ / decoupleQ, optional stage 2); without, plain RTN.
 */
import { openCheckpoint } from "../runtime/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/load_tokenizer.ts";
import { expectedShapes, tensorNames as T } from "../runtime/config.ts";
import { ParameterError } from "../runtime/errors.ts";
import { createLowbitWriter } from "../runtime/lowbit_writer.ts";
import type { LowbitTensorSpec } from "../runtime/lowbit_file.ts";
import { createGpu } from "../kernels/gpu.ts";
import { calibrationSequences } from "./calibration.ts";
import {
  type BlockReport,
  type LayerReport,
  type Method,
  quantizeSequential,
} from "./sequential.ts";
import { packQ } from "./pack.ts";
import { rtnQuantize } from "./rtn.ts";
import type { Bits, QuantizedLinear } from "./qtensor.ts";

export interface QuantizeModelOptions {
  model: string;
  out: string;
  tokenizer?: string;
  method: Method;
  bits: Bits;
  groupSize: number;
  /** Calibration text and sampling; required for gptq and decoupleq. */
  calib?: { path: string; seqLen?: number; samples: number; seed: number };
  iters?: number;
  /** CPU threads for decoupleQ stage 1 (default: all cores). */
  threads?: number;
  /** Pack the logits layer too (a tied model's file gets an untied, packed lm_head). */
  quantizeHead?: boolean;
  compare?: boolean;
  stage2?: { epochs: number } | null;
  log?: (line: string) => void;
}

export interface QuantizeModelResult {
  seconds: number;
  /** Calibration tokens (0 without calibration). */
  calibTokens: number;
  layers: LayerReport[];
  blocks: BlockReport[];
}

const LINEARS = [T.wq, T.wk, T.wv, T.wo, T.w1, T.w3, T.w2];

export async function quantizeModel(o: QuantizeModelOptions): Promise<QuantizeModelResult> {
  const log = o.log ?? ((l: string) => console.error(l));
  if (o.method !== "rtn" && !o.calib) {
    throw new ParameterError(`--method ${o.method} needs --calib FILE`);
  }
  if (o.stage2 && !o.calib) throw new ParameterError("--stage2 needs --calib FILE");
  if (o.threads !== undefined && !(Number.isInteger(o.threads) && o.threads >= 1)) {
    throw new ParameterError(`--threads must be a positive integer; got ${o.threads}`);
  }
  const ckpt = await openCheckpoint(o.model);
  try {
    const src = ckpt.config;
    // a packed logits layer is a tensor of its own, even where the checkpoint ties it
    const c = o.quantizeHead ? { ...src, tiedEmbeddings: false } : src;
    const tokenizer = await loadTokenizer(o.model, o.tokenizer);
    const linear = new Set(
      Array.from({ length: c.nLayers }, (_, l) => LINEARS.map((f) => f(l))).flat(),
    );
    if (o.quantizeHead) linear.add(T.lmHead);
    const quant = { bits: o.bits, groupSize: o.groupSize };
    const tensors: LowbitTensorSpec[] = [...expectedShapes(c)].map(([name, shape]) =>
      linear.has(name)
        ? { name, shape, dtype: "Q" as const, quant }
        : { name, shape, dtype: shape.length === 1 ? "F32" as const : "F16" as const }
    );
    const writer = await createLowbitWriter(o.out, {
      config: c,
      tokenizer: tokenizer.toData(),
      quantization: {
        method: o.method,
        ...quant,
        iters: o.iters ?? null,
        quantizeHead: o.quantizeHead ?? false,
        stage2: o.stage2 ?? null,
        calib: o.calib ?? null,
        source: o.model,
      },
      tensors,
    });
    const t0 = performance.now();
    // float tensors other than the block norms (which stage 2 may tune) first, one at a time
    const blockNorms = new Set(
      Array.from({ length: c.nLayers }, (_, l) => [T.attnNorm(l), T.ffnNorm(l)]).flat(),
    );
    for (const t of tensors) {
      if (t.dtype !== "Q" && !blockNorms.has(t.name)) {
        await writer.writeTensor(t.name, await ckpt.read(t.name));
      }
    }
    const sink = {
      linear: (name: string, ql: QuantizedLinear) => writer.writeTensor(name, packQ(ql)),
      norm: (name: string, g: Float32Array) => writer.writeTensor(name, g),
    };
    let reports: { layers: LayerReport[]; blocks: BlockReport[] } = { layers: [], blocks: [] };
    let calibTokens = 0;
    if (o.calib) {
      const text = await Deno.readTextFile(o.calib.path);
      const seqs = calibrationSequences(tokenizer, text, {
        seqLen: o.calib.seqLen ?? Math.min(c.seqLen, 512),
        samples: o.calib.samples,
        seed: o.calib.seed,
      });
      calibTokens = seqs.reduce((n, s) => n + s.length, 0);
      log(`calibration: ${seqs.length} sequences, ${calibTokens} tokens`);
      reports = await quantizeSequential(await createGpu(), ckpt, seqs, {
        method: o.method,
        ...quant,
        iters: o.iters,
        threads: o.threads,
        quantizeHead: o.quantizeHead,
        compare: o.compare,
        stage2: o.stage2 ?? null,
        log,
      }, sink);
    } else {
      for (const name of blockNorms) await sink.norm(name, await ckpt.read(name));
      for (const name of linear) {
        // the logits layer of a tied checkpoint is its embedding
        const from = name === T.lmHead && src.tiedEmbeddings ? T.embed : name;
        const [N, K] = ckpt.tensors.get(from)!.shape;
        await sink.linear(name, rtnQuantize(await ckpt.read(from), N, K, quant));
        log(`rtn ${name} (${N}×${K})`);
      }
    }
    await writer.close();
    return { seconds: (performance.now() - t0) / 1000, calibTokens, ...reports };
  } finally {
    ckpt.close();
  }
}
