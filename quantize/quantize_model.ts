/**
 * Quantizes a checkpoint into a `.lowbit` file: the float tensors as they are (fp16 matrices,
 * f32 vectors), every linear layer packed — with calibration, sequentially through the model
 * (RTN / GPTQ / decoupleQ, optional stage 2); without, plain RTN.
 */
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { expectedShapes, tensorNames as T } from "../runtime/checkpoint/config.ts";
import { ParameterError } from "../runtime/errors.ts";
import { checkInputFile, checkOutputFile } from "../runtime/cli/cli.ts";
import { createLowbitWriter } from "../runtime/format/lowbit_writer.ts";
import type { LowbitTensorSpec } from "../runtime/format/lowbit_file.ts";
import { createGpu } from "../kernels/gpu.ts";
import { calibrationSequences } from "./calibration.ts";
import { SELF_CALIBRATION, selfCalibrationSequences } from "./self_calibration.ts";
import {
  type BlockReport,
  type LayerReport,
  type Method,
  quantizeSequential,
} from "./sequential.ts";
import { packQ } from "../runtime/format/pack.ts";
import { rtnQuantize } from "./rtn.ts";
import type { Bits, QuantizedLinear } from "../runtime/format/qtensor.ts";
import type { PackedTensor } from "../runtime/checkpoint/checkpoint.ts";
import { type E2EReport, tuneLowbitFile } from "./e2e_file.ts";
import { type TeqRecord, type TeqSettings, teqTransform } from "./teq.ts";
import {
  allocateFormats,
  type Allocation,
  blockLinears,
  budgetBitsPerWeight,
  type BudgetOptions,
  fixedBytes,
} from "./mixed.ts";

export interface QuantizeModelOptions {
  model: string;
  out: string;
  tokenizer?: string;
  method: Method;
  bits: Bits;
  groupSize: number;
  /**
   * Calibration text (`path`, or "self": sequences sampled from the float model) and sampling;
   * required for gptq and decoupleq.
   */
  calib?: { path: string; seqLen?: number; samples: number; seed: number };
  iters?: number;
  /** CPU threads for decoupleQ stage 1 and cvxq's trial quantizations (default: all cores). */
  threads?: number;
  /** Pack the logits layer too (a tied model's file gets an untied, packed lm_head). */
  quantizeHead?: boolean;
  compare?: boolean;
  /**
   * Continue an interrupted calibrated run of the same settings from the last finished block:
   * the state is kept beside the output (OUT.resume.json, OUT.resume.bin) after every block and
   * removed when the file is complete.
   */
  resume?: boolean;
  stage2?: { epochs: number; lr?: number } | null;
  /**
   * The end-to-end stage after the file is written ({@link tuneLowbitFile}): all s, z and norms
   * against the float model's next-token distributions, on `samples` calibration sequences
   * (drawn as the main ones, with the same seed: a superset of them when larger; with `windows`,
   * cut from the whole text as `eval` reads it instead of from its lines).
   */
  e2e?: { epochs: number; lr?: number; samples: number; windows?: boolean } | null;
  /** Hessian damping as a fraction of its mean diagonal (default 0.01). */
  percdamp?: number;
  /**
   * TEQ before quantization ({@link teqTransform}): per-channel scales trained on the
   * calibration sequences (or loaded) are folded into the float weights, and the chosen method
   * quantizes the transformed model.
   */
  teq?: TeqSettings | null;
  /**
   * Mixed precision to a budget (quantize/mixed.ts): each block linear's format chosen by an
   * allocator before the sequential pass; `bits`/`groupSize` then apply to the logits layer only.
   */
  budget?: BudgetOptions | null;
  log?: (line: string) => void;
}

export interface QuantizeModelResult {
  seconds: number;
  /** Calibration tokens (0 without calibration). */
  calibTokens: number;
  layers: LayerReport[];
  blocks: BlockReport[];
  e2e: E2EReport | null;
  teq: TeqRecord | null;
  /** The mixed-precision allocation: per linear, each candidate's D, E, G² and the choice. */
  allocation: (Allocation["record"] & { rows: Allocation["rows"]; seconds: number }) | null;
}

const LINEARS = [T.wq, T.wk, T.wv, T.wo, T.w1, T.w3, T.w2];

export async function quantizeModel(o: QuantizeModelOptions): Promise<QuantizeModelResult> {
  const log = o.log ?? ((l: string) => console.error(l));
  if (o.method !== "rtn" && !o.calib) {
    throw new ParameterError(`--method ${o.method} needs --calib FILE`);
  }
  if (o.stage2 && !o.calib) throw new ParameterError("--stage2 needs --calib FILE");
  if (o.e2e && !o.calib) throw new ParameterError("--e2e-epochs needs --calib FILE");
  if (o.teq && !o.calib) throw new ParameterError("--teq needs --calib FILE (or self)");
  if (o.threads !== undefined && !(Number.isInteger(o.threads) && o.threads >= 1)) {
    throw new ParameterError(`--threads must be a positive integer; got ${o.threads}`);
  }
  // files first: a run must not spend minutes, then fail on a path
  if (o.calib && o.calib.path !== SELF_CALIBRATION) await checkInputFile("--calib", o.calib.path);
  await checkOutputFile("--out", o.out);
  if (o.teq?.load) await checkInputFile("--teq-load", o.teq.load);
  if (o.teq?.save) await checkOutputFile("--teq-save", o.teq.save);
  if (o.method === "rtn" && o.calib) {
    log(
      "rtn with --calib: each group's clipping range is searched against the calibration " +
        "data's input statistics (diag H); without --calib, RTN is data-free (plain min/max)",
    );
  }
  let ckpt = await openCheckpoint(o.model);
  try {
    const tokenizer = await loadTokenizer(o.model, o.tokenizer);
    // an unreachable budget is an error before any work
    const budgetTarget = o.budget ? checkedBudget(o, ckpt, tokenizer.toData()) : null;
    const gpu = o.calib ? await createGpu() : null;
    let sample: ((samples: number, windows?: boolean) => number[][] | Promise<number[][]>) | null =
      null;
    if (o.calib) {
      const calib = o.calib, seqLen = calib.seqLen ?? Math.min(ckpt.config.seqLen, 512);
      if (calib.path === SELF_CALIBRATION) {
        if (o.e2e?.windows) {
          throw new ParameterError(
            "--e2e-windows cuts a calibration text; --calib self has none",
          );
        }
        sample = (count) =>
          selfCalibrationSequences(gpu!, ckpt, tokenizer, {
            count,
            seqLen,
            seed: calib.seed,
            log,
          });
      } else {
        const text = await Deno.readTextFile(calib.path);
        sample = (samples, windows) =>
          calibrationSequences(tokenizer, text, { seqLen, samples, seed: calib.seed, windows });
      }
    }
    // TEQ transforms the float weights; the chosen method then quantizes the transformed model
    let teq: TeqRecord | null = null, teqSeqs: number[][] | null = null;
    if (o.teq) {
      teqSeqs = await sample!(o.calib!.samples);
      ({ ckpt, record: teq } = await teqTransform(gpu!, ckpt, teqSeqs, {
        ...o.teq,
        method: o.method,
        bits: o.bits,
        groupSize: o.groupSize,
        quantizeHead: o.quantizeHead ?? false,
        log,
      }));
    }
    const src = ckpt.config;
    // a packed logits layer is a tensor of its own, even where the checkpoint ties it
    const c = o.quantizeHead ? { ...src, tiedEmbeddings: false } : src;
    const linear = new Set(
      Array.from({ length: c.nLayers }, (_, l) => LINEARS.map((f) => f(l))).flat(),
    );
    if (o.quantizeHead) linear.add(T.lmHead);
    const quant = { bits: o.bits, groupSize: o.groupSize };
    let mixed: Allocation | null = null;
    if (o.budget) {
      if (o.calib) teqSeqs ??= await sample!(o.calib.samples);
      mixed = await allocateFormats(gpu, ckpt, teqSeqs, budgetTarget!, {
        ...o.budget,
        method: o.method,
        iters: o.iters,
        percdamp: o.percdamp,
        threads: o.threads,
      }, log);
    }
    const tensors: LowbitTensorSpec[] = [...expectedShapes(c)].map(([name, shape]) =>
      linear.has(name)
        ? { name, shape, dtype: "Q" as const, quant: mixed?.formats[name] ?? quant }
        : { name, shape, dtype: shape.length === 1 ? "F32" as const : "F16" as const }
    );
    const quantization = {
      method: o.method,
      ...(mixed ? {} : quant),
      allocation: mixed?.record,
      iters: o.iters ?? null,
      quantizeHead: o.quantizeHead ?? false,
      stage2: o.stage2 ?? null,
      percdamp: o.percdamp ?? 0.01,
      calib: o.calib ?? null,
      teq,
      source: o.model,
    };
    // the key holds TEQ's settings, not its measured results (a resumed run trains again)
    const resumeState = new ResumeState(o.out, JSON.stringify({ ...quantization, teq: o.teq }));
    const state = o.resume ? await resumeState.load() : null;
    if (o.resume && !state) log(`nothing to resume for ${o.out}: starting from the beginning`);
    if (state) log(`resuming ${o.out} at block ${state.next} of ${c.nLayers}`);
    const spec = { config: c, tokenizer: tokenizer.toData(), quantization, tensors };
    const writer = await createLowbitWriter(o.out, spec, { resume: state?.written });
    const t0 = performance.now() - (state?.seconds ?? 0) * 1000;
    const written = [...state?.written ?? []];
    const write = async (name: string, data: Float32Array | PackedTensor) => {
      await writer.writeTensor(name, data);
      written.push(name);
    };
    let reports: { layers: LayerReport[]; blocks: BlockReport[] } = { layers: [], blocks: [] };
    let calibTokens = 0;
    try {
      // float tensors other than the block norms (which stage 2 may tune) first, one at a time
      const blockNorms = new Set(
        Array.from({ length: c.nLayers }, (_, l) => [T.attnNorm(l), T.ffnNorm(l)]).flat(),
      );
      for (const t of tensors) {
        if (t.dtype !== "Q" && !blockNorms.has(t.name) && !written.includes(t.name)) {
          await write(t.name, await ckpt.read(t.name));
        }
      }
      const sink = {
        linear: (name: string, ql: QuantizedLinear) => write(name, packQ(ql)),
        norm: (name: string, g: Float32Array) => write(name, g),
      };
      if (o.calib && sample) {
        const seqs = teqSeqs ?? await sample(o.calib.samples);
        calibTokens = seqs.reduce((n, s) => n + s.length, 0);
        log(`calibration: ${seqs.length} sequences, ${calibTokens} tokens`);
        reports = await quantizeSequential(gpu!, ckpt, seqs, {
          method: o.method,
          ...quant,
          formats: mixed?.formats,
          iters: o.iters,
          threads: o.threads,
          quantizeHead: o.quantizeHead,
          compare: o.compare,
          stage2: o.stage2 ?? null,
          percdamp: o.percdamp,
          log,
          start: state
            ? { block: state.next, ...state.reports, inputs: state.inputs(seqs, c.dim) }
            : undefined,
          onBlockDone: (next, inputs, reports) =>
            resumeState.save({
              next,
              written,
              reports,
              seconds: (performance.now() - t0) / 1000,
            }, inputs),
        }, sink);
      } else {
        for (const name of blockNorms) await sink.norm(name, await ckpt.read(name));
        for (const name of linear) {
          // the logits layer of a tied checkpoint is its embedding
          const from = name === T.lmHead && src.tiedEmbeddings ? T.embed : name;
          const [N, K] = ckpt.tensors.get(from)!.shape;
          const f = mixed?.formats[name] ?? quant;
          await sink.linear(name, rtnQuantize(await ckpt.read(from), N, K, f));
          log(`rtn ${name} (${N}×${K})`);
        }
      }
    } catch (e) {
      await writer.abandon(); // kept for --resume
      throw e;
    }
    await writer.close();
    await resumeState.remove();
    const budget = o.budget?.budget;
    if (budget && "bytes" in budget) {
      const size = (await Deno.stat(o.out)).size;
      if (size > budget.bytes) {
        throw new Error(`${o.out}: ${size} bytes exceed --size-budget ${budget.bytes} (a bug)`);
      }
    }
    let e2e: E2EReport | null = null;
    if (o.e2e && sample) {
      e2e = await tuneLowbitFile(gpu!, ckpt, await sample(o.e2e.samples, o.e2e.windows), o.out, {
        ...o.e2e,
        log,
      });
    }
    const allocation = mixed ? { ...mixed.record, rows: mixed.rows, seconds: mixed.seconds } : null;
    return {
      seconds: (performance.now() - t0) / 1000 + (mixed?.seconds ?? 0),
      calibTokens,
      ...reports,
      e2e,
      teq,
      allocation,
    };
  } finally {
    ckpt.close();
  }
}

/** The budget of `o` as bits per weight over the block linears; throws when unreachable. */
function checkedBudget(
  o: QuantizeModelOptions,
  ckpt: Awaited<ReturnType<typeof openCheckpoint>>,
  tokenizer: unknown,
): number {
  if (o.quantizeHead) {
    throw new ParameterError("--quantize-head is not supported with a size or bits budget");
  }
  const c = ckpt.config, linear = new Set(blockLinears(ckpt).map((l) => l.name));
  const tensors = [...expectedShapes(c)].map(([name, shape]) => ({
    name,
    shape,
    dtype: linear.has(name) ? "Q" as const : shape.length === 1 ? "F32" as const : "F16" as const,
  }));
  return budgetBitsPerWeight(
    o.budget!,
    blockLinears(ckpt),
    fixedBytes({ config: c, tokenizer, tensors }),
  );
}

interface SavedState {
  next: number;
  written: string[];
  reports: { layers: LayerReport[]; blocks: BlockReport[] };
  seconds: number;
}

/**
 * Where an interrupted quantization resumes from, kept beside the output: OUT.resume.json (the
 * settings, the next block, the tensors written, the reports so far) and OUT.resume.bin (that
 * block's calibration inputs, f32). Each is written to a temporary name and renamed.
 */
class ResumeState {
  private readonly json: string;
  private readonly bin: string;

  constructor(out: string, private readonly key: string) {
    this.json = `${out}.resume.json`;
    this.bin = `${out}.resume.bin`;
  }

  async save(s: SavedState, inputs: Float32Array[]): Promise<void> {
    const bytes = new Uint8Array(inputs.reduce((n, x) => n + x.byteLength, 0));
    let o = 0;
    for (const x of inputs) {
      bytes.set(new Uint8Array(x.buffer, x.byteOffset, x.byteLength), o);
      o += x.byteLength;
    }
    await Deno.writeFile(`${this.bin}.tmp`, bytes);
    await Deno.rename(`${this.bin}.tmp`, this.bin);
    await Deno.writeTextFile(`${this.json}.tmp`, JSON.stringify({ key: this.key, ...s }));
    await Deno.rename(`${this.json}.tmp`, this.json);
  }

  /** The saved state, or null when there is none; throws when it is for other settings. */
  async load(): Promise<
    (SavedState & { inputs: (seqs: number[][], dim: number) => Float32Array[] }) | null
  > {
    const text = await Deno.readTextFile(this.json).catch(() => null);
    if (text === null) return null;
    const s = JSON.parse(text) as SavedState & { key: string };
    if (s.key !== this.key) {
      throw new ParameterError(
        `${this.json} is the state of a run with other settings; remove it to start over`,
      );
    }
    const bytes = await Deno.readFile(this.bin).catch(() => {
      throw new ParameterError(`${this.bin} is missing; remove ${this.json} to start over`);
    });
    const inputs = (seqs: number[][], dim: number) => {
      const need = seqs.reduce((n, q) => n + q.length, 0) * dim * 4;
      if (bytes.length !== need) {
        throw new ParameterError(
          `${this.bin} holds ${bytes.length} bytes; the calibration needs ${need}`,
        );
      }
      let o = 0;
      return seqs.map((q) => {
        const x = new Float32Array(bytes.buffer.slice(o, o + q.length * dim * 4));
        o += q.length * dim * 4;
        return x;
      });
    };
    return { ...s, inputs };
  }

  async remove(): Promise<void> {
    for (const f of [this.json, this.bin]) await Deno.remove(f).catch(() => {});
  }
}
