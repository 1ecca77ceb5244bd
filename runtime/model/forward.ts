/**
 * The forward pass on the GPU, as lists of dispatches built once at load time: `decode` for one
 * token (matrix-vector kernels, fused RMSNorm), `prefill` for up to `maxT` tokens (matrix-matrix
 * kernels). Each reads top to bottom like llama2.c's `transformer()`.
 */
import type { ModelConfig } from "../checkpoint/config.ts";
import type { DenseMatrix, GpuWeights, LayerWeights, Matrix } from "./gpu_weights.ts";
import type { RunState } from "./run_state.ts";
import { align, type Bindable, type Gpu } from "../../kernels/gpu.ts";
import { embedGrid, embedPipeline } from "../../kernels/embed.ts";
import { rmsnormGrid, rmsnormPipeline } from "../../kernels/rmsnorm.ts";
import { type Epilogue, unitCount } from "../../kernels/epilogue.ts";
import { matvecBindings, matvecGrid, matvecPipeline, spreadShape } from "../../kernels/matvec.ts";
import {
  matmulBindings,
  matmulGrid,
  matmulPipeline,
  matmulShape,
  type MatmulVariant,
} from "../../kernels/matmul.ts";
import {
  matvecQBindings,
  matvecQGrid,
  matvecQPipeline,
  matvecQShape,
  MAX_Q_BATCH,
} from "../../kernels/matvec_q.ts";
import {
  matmulQBindings,
  matmulQGrid,
  matmulQPipeline,
  matmulQShape,
} from "../../kernels/matmul_q.ts";
import { attentionGrid, attentionPipeline } from "../../kernels/attention.ts";
import { attentionKernelShape, type AttentionKey } from "../../kernels/attention_key.ts";
import { type TunedShape, type TuneKey, tuneKeyString } from "../../kernels/tune_key.ts";
import { denseKernelShape } from "../../kernels/dense_key.ts";
import { type SampleOptions, sampleOptions, samplePipeline } from "../../kernels/sample.ts";
import { adjustPipeline, historyPipeline } from "../../kernels/penalties.ts";

/** One compute dispatch, its grid a function of the step's token count. */
export interface Dispatch {
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
  grid: (ntok: number) => number[];
}

export function encodeDispatches(pass: GPUComputePassEncoder, list: Dispatch[], ntok: number) {
  for (const d of list) {
    pass.setPipeline(d.pipeline);
    pass.setBindGroup(0, d.bindGroup);
    const [x, y = 1, z = 1] = d.grid(ntok);
    pass.dispatchWorkgroups(x, y, z);
  }
}

/** The most tokens one workgroup of the dense texture kernels takes (kernels/dense_texture.ts). */
const DENSE_TT = 8;

/** Resources by binding name: buffers, buffer ranges, textures. */
type Buffers = Record<string, Bindable>;

/** A "store" epilogue shifted to a row chunk's place in the output. */
export function chunkEpilogue(e: Epilogue, rowStart: number): Epilogue {
  return e.kind === "store" ? { ...e, offset: e.offset + rowStart } : e;
}

/**
 * The thread shape of a quantized matrix kernel: the tuner's choice for this adapter and key
 * (`gpu.tuned`, kernels/tuner.ts), used as it is, else the heuristic: matvecQShape spread over
 * the cores, or matmulQShape. `tuned` false gives the heuristic (the tuner's baseline).
 */
export function qKernelShape(gpu: Gpu, key: TuneKey, e: Epilogue, tuned = true): TunedShape {
  const t = tuned ? gpu.tuned.get(tuneKeyString(key)) : undefined;
  if (t) return t;
  if (key.family === "matvec_q") {
    return spreadShape(matvecQShape(gpu, key.K, key.tokens, e), unitCount(e, key.rows), gpu);
  }
  return matmulQShape(gpu, e, key.tokens || undefined, key.norm);
}

/** Builds dispatches from pipelines and named buffers. */
export class Builder {
  /**
   * `rowsPerStep`: build for steps of at most this many tokens (a batched decode step): the
   * matrix kernels then take them all in one token group, and on CPU adapters bind x as a
   * uniform buffer where it fits.
   */
  constructor(readonly gpu: Gpu, readonly state: RunState, readonly rowsPerStep?: number) {}

  bind(pipeline: GPUComputePipeline, names: string[], bufs: Buffers, label: string): GPUBindGroup {
    const s = this.state as unknown as Buffers;
    return this.gpu.bindGroup(pipeline, names.map((n) => bufs[n] ?? s[n]), label);
  }

  /**
   * `{ buffer, size }` binding the first `bytes` of `r` as a uniform buffer, or null where that
   * is not worth it or not possible: GPU adapters, buffers without UNIFORM usage, sizes over the
   * adapter's uniform binding limit.
   */
  uniform(r: Bindable | undefined, bytes: number): GPUBufferBinding | null {
    if (!this.gpu.isCpu || !(r instanceof GPUBuffer)) return null;
    const size = align(bytes, 16);
    // the kernels size their uniform arrays for WebGPU's default limit of 64 KiB
    const limit = Math.min(65536, this.gpu.device.limits.maxUniformBufferBindingSize);
    const ok = (r.usage & GPUBufferUsage.UNIFORM) !== 0 && size <= r.size && size <= limit;
    return ok ? { buffer: r, size } : null;
  }

  /**
   * y = epilogue(W · x) for one token, with an optional fused RMSNorm (weight g). On CPU adapters
   * (texture weights) x and g are bound as uniform buffers where they can be.
   */
  matvec(
    W: Matrix,
    epilogue: Epilogue,
    bufs: Buffers,
    eps: number | null,
    label: string,
  ): Dispatch[] {
    const norm = eps === null ? null : { eps };
    const s = this.state as unknown as Buffers;
    const tex = W.weights === "texture";
    let xb: Buffers = {};
    if (tex) {
      const x = this.uniform(bufs.x ?? s.x, W.K * 4);
      const g = norm ? this.uniform(bufs.g, W.K * 4) : null;
      if (x && (g || !norm)) xb = norm ? { x, g: g! } : { x };
    }
    const xUniform = "x" in xb;
    /** A chunk's tuning-key fields that both families share. */
    const key = (rows: number, e: Epilogue) => ({
      rows,
      K: W.K,
      tokens: 1,
      epilogue: e.kind,
      norm: norm !== null,
      weights: W.weights,
      xUniform,
    });
    if (W.format === "q") {
      return W.chunks.map((c) => {
        const e = chunkEpilogue(this.kvEpilogue(epilogue), c.rowStart);
        const shape = qKernelShape(this.gpu, {
          family: "matvec_q",
          bits: W.bits,
          groupSize: W.groupSize,
          ...key(c.rows, e),
        }, e);
        const v = {
          bits: W.bits,
          groupSize: W.groupSize,
          rows: c.rows,
          K: W.K,
          norm,
          epilogue: e,
          batch: 1,
          weights: W.weights,
          xUniform,
          ...shape,
        };
        const pipeline = matvecQPipeline(this.gpu, v);
        const bufs2 = { ...bufs, ...xb, qweight: c.qweight, sz: c.sz };
        const bindGroup = this.bind(pipeline, matvecQBindings(v), bufs2, label);
        const g = matvecQGrid(v);
        return { pipeline, bindGroup, grid: () => g };
      });
    }
    return W.chunks.map((c) => {
      const e = chunkEpilogue(this.kvEpilogue(epilogue), c.rowStart);
      const v = {
        format: W.format,
        rows: c.rows,
        K: W.K,
        norm,
        epilogue: e,
        weights: W.weights,
        xUniform,
        ...denseKernelShape(this.gpu, { family: "matvec", format: W.format, ...key(c.rows, e) }),
      };
      const pipeline = matvecPipeline(this.gpu, v);
      const bufs2 = { ...bufs, ...xb, w: c.data };
      const bindGroup = this.bind(pipeline, matvecBindings(v), bufs2, label);
      const g = matvecGrid(v);
      return { pipeline, bindGroup, grid: () => g };
    });
  }

  /** The qkv epilogue writes the KV cache in the run state's layout and element type. */
  kvEpilogue(e: Epilogue): Epilogue {
    return e.kind === "qkv" ? { ...e, kv: this.state.kv, kvType: this.state.kvType } : e;
  }

  /**
   * epilogue(W · x[t]) for each of the step's tokens, with an optional fused RMSNorm of x (weight
   * g; quantized W only, see {@link fusesNorm}).
   */
  matmul(
    W: Matrix,
    epilogue: Epilogue,
    bufs: Buffers,
    label: string,
    eps: number | null = null,
  ): Dispatch[] {
    if (eps !== null && !fusesNorm(W)) throw new Error(`${label}: no fused norm for ${W.format}`);
    const norm = eps === null ? null : { eps };
    // the dense texture kernels take at most DENSE_TT tokens per workgroup: more rows run as
    // several token groups, and x as a uniform buffer needs the step in one group; with buffer
    // weights a batched step runs the lane variant, every row in one group
    const rows = this.rowsPerStep;
    const tt = rows && W.format !== "q" && W.weights === "texture"
      ? Math.min(rows, DENSE_TT)
      : rows;
    const s = this.state as unknown as Buffers;
    let x = tt && tt === rows && W.weights === "texture"
      ? this.uniform(bufs.x ?? s.x, tt * W.K * 4)
      : null;
    const g = x && norm ? this.uniform(bufs.g, W.K * 4) : null;
    if (norm && !g) x = null;
    const xb: Buffers = x ? (g ? { x, g } : { x }) : {};
    if (W.format === "q") {
      return W.chunks.map((c) => {
        const e = chunkEpilogue(this.kvEpilogue(epilogue), c.rowStart);
        const v = {
          bits: W.bits,
          groupSize: W.groupSize,
          rows: c.rows,
          K: W.K,
          epilogue: e,
          norm,
          weights: W.weights,
          xUniform: x !== null,
          ...qKernelShape(this.gpu, {
            family: "matmul_q",
            bits: W.bits,
            groupSize: W.groupSize,
            rows: c.rows,
            K: W.K,
            tokens: tt ?? 0,
            epilogue: e.kind,
            norm: norm !== null,
            weights: W.weights,
            xUniform: x !== null,
          }, e),
        };
        const pipeline = matmulQPipeline(this.gpu, v);
        const bufs2 = { ...bufs, ...xb, qweight: c.qweight, sz: c.sz };
        const bindGroup = this.bind(pipeline, matmulQBindings(v), bufs2, label);
        return { pipeline, bindGroup, grid: (n: number) => matmulQGrid(v, n) };
      });
    }
    return W.chunks.map((c) => {
      const e = chunkEpilogue(this.kvEpilogue(epilogue), c.rowStart);
      const v: MatmulVariant = {
        format: W.format,
        rows: c.rows,
        K: W.K,
        epilogue: e,
        weights: W.weights,
        xUniform: x !== null,
        ...(W.weights === "texture" ? matmulShape(e, tt) : tt
          ? denseKernelShape(this.gpu, {
            family: "matmul_lane",
            format: W.format,
            rows: c.rows,
            K: W.K,
            tokens: tt,
            epilogue: e.kind,
            norm: false,
            weights: W.weights,
            xUniform: false,
          })
          : {}),
      };
      const pipeline = matmulPipeline(this.gpu, v);
      const bindGroup = this.bind(
        pipeline,
        matmulBindings(v),
        { ...bufs, ...xb, w: c.data },
        label,
      );
      return { pipeline, bindGroup, grid: (n: number) => matmulGrid(v, n) };
    });
  }

  rmsnorm(dim: number, eps: number, bufs: Buffers): Dispatch {
    const pipeline = rmsnormPipeline(this.gpu, { dim, eps });
    const bindGroup = this.bind(pipeline, ["step", "x", "g", "y"], bufs, "rmsnorm");
    return { pipeline, bindGroup, grid: rmsnormGrid };
  }

  embed(E: DenseMatrix): Dispatch[] {
    return E.chunks.map((c) => {
      const v = {
        format: E.format,
        dim: E.K,
        rowStart: c.rowStart,
        rows: c.rows,
        weights: E.weights,
      };
      const pipeline = embedPipeline(this.gpu, v);
      const bindGroup = this.bind(pipeline, ["step", "tokens", "e", "x"], { e: c.data }, "embed");
      return { pipeline, bindGroup, grid: (n: number) => embedGrid(v, n) };
    });
  }

  /**
   * att = softmax(q·Kᵀ/√d)·V for the step's tokens over layer l's cache; `decode` (one token)
   * lets CPU adapters read q as a uniform buffer. The shape (wg, gq) is the tuner's choice for
   * this key (`gpu.tunedAttention`), else the heuristic (attentionKernelShape).
   */
  attention(c: ModelConfig, l: number, decode = false): Dispatch {
    const tex = this.state.kv === "texture";
    const qd = c.nHeads * c.headDim;
    const q = tex && decode && qd % 4 === 0 ? this.uniform(this.state.q, qd * 4) : null;
    const key: AttentionKey = {
      family: "attention",
      nHeads: c.nHeads,
      nKvHeads: c.nKvHeads,
      headDim: c.headDim,
      kvType: this.state.kvType,
      kv: this.state.kv,
      decode,
      qUniform: q !== null,
    };
    const v = { ...key, ...attentionKernelShape(this.gpu, key) };
    const pipeline = attentionPipeline(this.gpu, v);
    const bufs: Buffers = {
      kcache: this.state.kcache[l],
      vcache: this.state.vcache[l],
      out: this.state.att,
      ...(q ? { q } : {}),
    };
    const bindGroup = this.bind(
      pipeline,
      ["step", "q", "kcache", "vcache", "out"],
      bufs,
      `attention.${l}`,
    );
    return { pipeline, bindGroup, grid: (n: number) => attentionGrid(v, n) };
  }

  /**
   * The sampler of the step's last token over state.logits, or, given (ntok, vocab) `logits`,
   * the per-row sampler over them.
   */
  sample(vocab: number, logits?: GPUBuffer): Dispatch {
    const cpu = sampleOptions(this.gpu, vocab);
    const opts: SampleOptions = logits ? { wg: cpu.wg, perRow: true } : cpu;
    const pipeline = samplePipeline(this.gpu, vocab, opts);
    const uni = opts.logitsUniform ? this.uniform(this.state.logits, vocab * 4) : null;
    const bindGroup = this.bind(
      pipeline,
      ["step", "logits", "tokens", "scfg", "hist"],
      logits ? { logits } : uni ? { logits: uni } : {},
      logits ? "sample_rows" : "sample",
    );
    return { pipeline, bindGroup, grid: (n: number) => (logits ? [n] : [1]) };
  }

  /**
   * Logit bias and penalties applied in place to `logits` (as `sample`), for the sampler after.
   */
  adjust(vocab: number, logits?: GPUBuffer): Dispatch {
    const opts = { wg: sampleOptions(this.gpu, vocab).wg, perRow: logits !== undefined };
    const pipeline = adjustPipeline(this.gpu, vocab, opts);
    const bindGroup = this.bind(
      pipeline,
      ["step", "logits", "scfg", "hist"],
      logits ? { logits } : {},
      logits ? "adjust_rows" : "adjust",
    );
    return { pipeline, bindGroup, grid: (n: number) => (logits ? [n] : [1]) };
  }

  /** Resets the sampler history of the step's last row's slot to its prompt. */
  history(vocab: number): Dispatch {
    const pipeline = historyPipeline(this.gpu, vocab, this.gpu.isCpu ? 8 : 256);
    const bindGroup = this.bind(pipeline, ["step", "tokens", "hist"], {}, "history");
    return { pipeline, bindGroup, grid: () => [1] };
  }
}

/** The fused q, k, v epilogue of a model (RoPE, the KV cache write, the optional bias). */
export function qkvEpilogue(c: ModelConfig): Epilogue {
  return {
    kind: "qkv",
    nHeads: c.nHeads,
    nKvHeads: c.nKvHeads,
    headDim: c.headDim,
    bias: c.qkvBias,
  };
}

export interface ForwardPlan {
  /** One decode step: embed tokens[pos], all layers, logits, sample into tokens[pos + 1]. */
  decode: Dispatch[];
  /** Prefill of ntok tokens through all layers, leaving the residual stream in x. */
  prefill: Dispatch[];
  /** After prefill and a copy of x's last row into xlast: logits and sampling. */
  prefillHead: Dispatch[];
  /** `decode` and `prefillHead` with the logit bias and penalties applied before sampling. */
  decodeAdjusted: Dispatch[];
  prefillHeadAdjusted: Dispatch[];
  /** Resets the sampler history of a sequence to its prompt (before a prefill's sampler). */
  history: Dispatch;
}

export function buildForward(gpu: Gpu, c: ModelConfig, w: GpuWeights, s: RunState): ForwardPlan {
  const b = new Builder(gpu, s);
  const eps = c.normEps;
  const qkv = qkvEpilogue(c);
  const gateup: Epilogue = { kind: "gateup", hidden: c.hiddenDim };
  const logits: Epilogue = { kind: "store", offset: 0, ld: c.vocabSize };

  const decode: Dispatch[] = [];
  decode.push(...b.embed(w.embed)); // x = E[token]
  w.layers.forEach((L, l) => {
    const kv = { kcache: s.kcache[l], vcache: s.vcache[l], bias: L.bqkv! };
    // q, k, v = rmsnorm(x) · Wqkv, RoPE, k and v into the cache
    decode.push(...b.matvec(L.wqkv, qkv, { g: L.attnNorm, ...kv }, eps, `qkv.${l}`));
    decode.push(b.attention(c, l, true)); // att = softmax(q·Kᵀ/√d) · V
    decode.push(...b.matvec(L.wo, { kind: "add" }, { x: s.att, y: s.x }, null, `wo.${l}`)); // x += Wo·att
    // h = silu(W1·rmsnorm(x)) * (W3·rmsnorm(x))
    decode.push(...b.matvec(L.w13, gateup, { g: L.ffnNorm, y: s.h }, eps, `w13.${l}`));
    decode.push(...b.matvec(L.w2, { kind: "add" }, { x: s.h, y: s.x }, null, `w2.${l}`)); // x += W2·h
  });
  // logits = rmsnorm(x) · Wcls; next token = sample(logits)
  decode.push(...b.matvec(w.lmHead, logits, { g: w.norm, y: s.logits }, eps, "logits"));
  const sample = b.sample(c.vocabSize), adjust = b.adjust(c.vocabSize);
  const decodeAdjusted = [...decode, adjust, sample];
  decode.push(sample);

  const prefill = layersPlan(b, c, w);
  const head = b.matvec(w.lmHead, logits, { x: s.xlast, g: w.norm, y: s.logits }, eps, "logits");
  return {
    decode,
    prefill,
    prefillHead: [...head, sample],
    decodeAdjusted,
    prefillHeadAdjusted: [...head, adjust, sample],
    history: b.history(c.vocabSize),
  };
}

/** Embedding and every layer for the step's tokens (prefill kernels). */
function layersPlan(b: Builder, c: ModelConfig, w: GpuWeights): Dispatch[] {
  return [...b.embed(w.embed), ...w.layers.flatMap((L, l) => layerPlan(b, c, L, l))];
}

/** Whether the matrix kernels of W fuse an RMSNorm of their input (the quantized ones do). */
export function fusesNorm(W: Matrix): boolean {
  return W.format === "q";
}

/**
 * out = epilogue(rmsnorm(x; g) · Wᵀ) for the step's tokens: one fused dispatch where W's kernels
 * fuse the norm, else the norm into xn and the product from it.
 */
function normMatmul(
  b: Builder,
  W: Matrix,
  e: Epilogue,
  g: GPUBuffer,
  bufs: Buffers,
  eps: number,
  label: string,
): Dispatch[] {
  const s = b.state;
  if (fusesNorm(W)) return b.matmul(W, e, { x: s.x, g, ...bufs }, label, eps);
  return [
    b.rmsnorm(W.K, eps, { x: s.x, g, y: s.xn }),
    ...b.matmul(W, e, { x: s.xn, ...bufs }, label),
  ];
}

/**
 * One layer for the step's tokens as the runtime runs it: {@link layerStages} with the norms
 * fused into the quantized q, k, v and gate/up products (five dispatches a layer instead of seven
 * where the weights are quantized).
 */
function layerPlan(b: Builder, c: ModelConfig, L: LayerWeights, l: number): Dispatch[] {
  const s = b.state, eps = c.normEps;
  const kv = { kcache: s.kcache[l], vcache: s.vcache[l], bias: L.bqkv! };
  return [
    ...normMatmul(b, L.wqkv, qkvEpilogue(c), L.attnNorm, kv, eps, `qkv.${l}`),
    b.attention(c, l),
    ...b.matmul(L.wo, { kind: "add" }, { x: s.att, y: s.x }, `wo.${l}`),
    ...normMatmul(
      b,
      L.w13,
      { kind: "gateup", hidden: c.hiddenDim },
      L.ffnNorm,
      { y: s.h },
      eps,
      `w13.${l}`,
    ),
    ...b.matmul(L.w2, { kind: "add" }, { x: s.h, y: s.x }, `w2.${l}`),
  ];
}

/**
 * The row counts of the batched decode plans (GpuModel.decodeBatch builds one per count on first
 * use): a step of B rows runs the smallest plan of at least B rows (its kernels take every row in
 * one token group, each weight read once per step), a step of more rows the prefill kernels. Two
 * sizes, since a plan's kernels compute all of its rows: a step of 3 rows is cheaper in the 8-row
 * plan. CPU adapters stop at 8: 32 rows of x pass the 64 KiB uniform limit from K = 512 on, and
 * read from a storage buffer (a per-lane loop on lavapipe) the 32-row kernels took 1.8× the time
 * per row of the 8-row ones (`deno task tune`, SmolLM2 shape W4 g128, qkv: 5833 µs at 32 rows,
 * 810 µs at 8), so there more rows run the prefill kernels.
 */
export function decodeRowPlans(gpu: Gpu): readonly number[] {
  return gpu.isCpu ? [8] : [8, MAX_Q_BATCH];
}

/**
 * A batched decode step of up to `rows` (≤ MAX_Q_BATCH) sequences, up to the logits of every row
 * in `out`:
 * the prefill's dispatches with the matrix kernels taking every row in one token group, so that
 * each weight is read once per step (the batched matrix-vector product of continuous batching).
 */
export function buildDecodeRows(
  gpu: Gpu,
  c: ModelConfig,
  w: GpuWeights,
  s: RunState,
  rows: number,
  out: GPUBuffer,
): Dispatch[] {
  const b = new Builder(gpu, s, rows);
  return [...layersPlan(b, c, w), ...logitsPlan(b, c, w, out)];
}

/**
 * One layer of the prefill, in its seven stages (each a list of dispatches): the quantizer runs
 * prefixes of it to capture each linear layer's inputs.
 */
export function layerStages(b: Builder, c: ModelConfig, L: LayerWeights, l: number): Dispatch[][] {
  const s = b.state, eps = c.normEps;
  const qkv = qkvEpilogue(c);
  const kv = { kcache: s.kcache[l], vcache: s.vcache[l], bias: L.bqkv! };
  return [
    [b.rmsnorm(c.dim, eps, { x: s.x, g: L.attnNorm, y: s.xn })], // xn = rmsnorm(x)
    b.matmul(L.wqkv, qkv, { x: s.xn, ...kv }, `qkv.${l}`), // q, k, v = xn·Wqkv, RoPE, cache
    [b.attention(c, l)], // att = softmax(q·Kᵀ/√d)·V
    b.matmul(L.wo, { kind: "add" }, { x: s.att, y: s.x }, `wo.${l}`), // x += att·Woᵀ
    [b.rmsnorm(c.dim, eps, { x: s.x, g: L.ffnNorm, y: s.xn })], // xn = rmsnorm(x)
    b.matmul(L.w13, { kind: "gateup", hidden: c.hiddenDim }, { x: s.xn, y: s.h }, `w13.${l}`), // h = silu(g)·u
    b.matmul(L.w2, { kind: "add" }, { x: s.h, y: s.x }, `w2.${l}`), // x += h·W2ᵀ
  ];
}

/** After prefill: the logits of every token of the step into `out` (ntok, vocab). */
export function buildAllLogits(
  gpu: Gpu,
  c: ModelConfig,
  w: GpuWeights,
  s: RunState,
  out: GPUBuffer,
): Dispatch[] {
  return logitsPlan(new Builder(gpu, s), c, w, out);
}

/** The per-row sampler over (ntok, vocab) logits in `out`, and the adjust kernel before it. */
export function buildRowSampler(
  gpu: Gpu,
  c: ModelConfig,
  s: RunState,
  out: GPUBuffer,
): { sample: Dispatch; adjust: Dispatch } {
  const b = new Builder(gpu, s);
  return { sample: b.sample(c.vocabSize, out), adjust: b.adjust(c.vocabSize, out) };
}

/** The final norm and the logits of every token of the step into `out` (ntok, vocab). */
function logitsPlan(b: Builder, c: ModelConfig, w: GpuWeights, out: GPUBuffer): Dispatch[] {
  const logits: Epilogue = { kind: "store", offset: 0, ld: c.vocabSize };
  return normMatmul(b, w.lmHead, logits, w.norm, { y: out }, c.normEps, "logits_all");
}
