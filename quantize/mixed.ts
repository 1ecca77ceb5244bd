/**
 * Mixed precision to a size budget (`--bits-budget`, `--size-budget`): the step quantizeModel
 * runs once, before the sequential pass, to decide each block linear's format with one of the
 * allocators of quantize/allocate.ts, on what quantize/distortion.ts measures.
 */
import { Packr } from "msgpackr";
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import { tensorNames as T } from "../runtime/checkpoint/config.ts";
import type { LowbitTensorSpec } from "../runtime/format/lowbit_file.ts";
import {
  align,
  LOWBIT_ALIGN,
  PREAMBLE_BYTES,
  tensorByteSizes,
} from "../runtime/format/lowbit_file.ts";
import { ParameterError } from "../runtime/errors.ts";
import type { Gpu } from "../kernels/gpu.ts";
import {
  type Allocator,
  analyticDistortion,
  candidateRates,
  CANDIDATES,
  checkAllocator,
  checkBudget,
  dualAscent,
  fillBudget,
  type Format,
  formatName,
  type LinearCosts,
  mixQuant,
  rateOf,
  uniformChoice,
} from "./allocate.ts";
import {
  type LayerMeasure,
  measureDistortions,
  outputSensitivity,
  relativeSensitivity,
  roundoffErrors,
} from "./distortion.ts";
import type { Method } from "./sequential.ts";

/** What the user asks for: a budget, an allocator and the candidates. */
export interface BudgetOptions {
  /** Average stored bits per weight over the packed linears, or the whole file's bytes. */
  budget: { bitsPerWeight: number } | { bytes: number };
  allocator: Allocator;
  formats?: Format[];
  /** G²: the backward pass (default) or the relative-error proxy. */
  sensitivity?: "backward" | "relative";
  /** Calibration sequences of the G² backward pass (default 32). */
  sensitivitySamples?: number;
  /** The quantizer of cvxq's trial quantizations (default: the chosen method). */
  trialMethod?: Method;
}

/** The block linears of a checkpoint, in file order, with their shapes. */
export function blockLinears(ckpt: Checkpoint): { name: string; N: number; K: number }[] {
  const out = [];
  for (let l = 0; l < ckpt.config.nLayers; l++) {
    for (const f of [T.wq, T.wk, T.wv, T.wo, T.w1, T.w3, T.w2]) {
      const [N, K] = ckpt.tensors.get(f(l))!.shape;
      out.push({ name: f(l), N, K });
    }
  }
  return out;
}

/**
 * Bytes of a file with these tensors that do not depend on the linears' formats, at most: the
 * preamble, the header (msgpack of the spec with room for every offset and for the
 * quantization record), the float tensors and each array's alignment padding.
 */
export function fixedBytes(spec: {
  config: unknown;
  tokenizer: unknown;
  tensors: LowbitTensorSpec[];
}): number {
  const packr = new Packr({ useRecords: false, variableMapSize: true });
  const entries = spec.tensors.map((t) => ({
    ...t,
    quant: undefined,
    offset: 2 ** 40,
    bytes: 2 ** 40,
    bits: 4,
    groupSize: 128,
    szOffset: 2 ** 40,
    szBytes: 2 ** 40,
  }));
  const header = packr.pack({ config: spec.config, tokenizer: spec.tokenizer, tensors: entries });
  const floats = spec.tensors.filter((t) => t.dtype !== "Q")
    .reduce((a, t) => a + tensorByteSizes(t).data, 0);
  const arrays = spec.tensors.reduce((a, t) => a + (t.dtype === "Q" ? 2 : 1), 0);
  return align(PREAMBLE_BYTES + header.length + 4096) + floats + arrays * LOWBIT_ALIGN;
}

/**
 * The budget as average bits per weight over the block linears, checked against what the
 * candidates allow: a clear error, before any work, when it is unreachable.
 */
export function budgetBitsPerWeight(
  o: BudgetOptions,
  linears: { name: string; N: number; K: number }[],
  fixed: number,
): number {
  checkAllocator(o.allocator);
  const formats = o.formats ?? [...CANDIDATES];
  const layers: LinearCosts[] = linears.map((l) => ({
    name: l.name,
    n: l.N * l.K,
    bpw: candidateRates(l.N, l.K, formats),
    cost: formats.map(() => 0),
  }));
  const n = layers.reduce((a, l) => a + l.n, 0);
  if ("bytes" in o.budget) {
    const bpw = ((o.budget.bytes - fixed) * 8) / n;
    checkBudget(
      layers,
      bpw,
      `--size-budget ${o.budget.bytes} bytes (${bpw.toFixed(3)} bits per linear weight ` +
        `after ${fixed} bytes of header, float tensors and padding)`,
    );
    return bpw;
  }
  checkBudget(layers, o.budget.bitsPerWeight, `--bits-budget ${o.budget.bitsPerWeight}`);
  return o.budget.bitsPerWeight;
}

/** The linears the GPU runs as one matrix (q/k/v, gate/up), which must share a format. */
const FUSED = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]];

/**
 * The allocation units: the linears of each fused matrix of a block (q/k/v, gate/up) summed
 * into one (weights, bits and costs add), every other linear alone. `unitOf[i]` is linear i's.
 */
export function fusedUnits(linears: LinearCosts[]): { units: LinearCosts[]; unitOf: number[] } {
  const units: LinearCosts[] = [], unitOf: number[] = [], key = new Map<string, number>();
  for (const l of linears) {
    const fused = FUSED.find((names) => names.some((n) => l.name.includes(`.${n}.`)));
    const k = fused ? l.name.replace(new RegExp(fused.join("|")), fused.join("+")) : l.name;
    let u = key.get(k);
    if (u === undefined) {
      u = units.length;
      key.set(k, u);
      units.push({ name: k, n: 0, bpw: l.bpw.map(() => 0), cost: l.cost.map(() => 0) });
    }
    const t = units[u], n0 = t.n;
    t.n += l.n;
    t.bpw = t.bpw.map((b, f) => (b * n0 + l.bpw[f] * l.n) / t.n);
    t.cost = t.cost.map((c, f) => c + l.cost[f]);
    unitOf.push(u);
  }
  return { units, unitOf };
}

/** One linear's row of OUT.report.json: each candidate's figures and the choice. */
export interface AllocationRow {
  name: string;
  N: number;
  K: number;
  G2: number | null;
  candidates: { format: string; bpw: number; D: number | null; E: number; cost: number }[];
  choice: string;
}

/** The allocation: each linear's format, the header record and the report rows. */
export interface Allocation {
  formats: Record<string, Format>;
  /** The header's `quantization.allocation`. */
  record: Record<string, unknown>;
  rows: AllocationRow[];
  seconds: number;
}

/**
 * Decides every block linear's format for a target of `target` bits per weight. cvxq and
 * cvxq-analytic need the GPU and calibration sequences (H, and G² unless the proxy is chosen);
 * mixquant and uniform are data-free.
 */
export async function allocateFormats(
  gpu: Gpu | null,
  ckpt: Checkpoint,
  seqs: number[][] | null,
  target: number,
  o: BudgetOptions & { method: Method; iters?: number; percdamp?: number; threads?: number },
  log: (line: string) => void,
): Promise<Allocation> {
  const t0 = performance.now();
  const formats = o.formats ?? [...CANDIDATES];
  const cvxq = o.allocator === "cvxq" || o.allocator === "cvxq-analytic";
  if (cvxq && (!gpu || !seqs)) {
    throw new ParameterError(`--allocator ${o.allocator} needs --calib FILE (H and G²)`);
  }
  let measures: LayerMeasure[];
  if (cvxq) {
    const trialMethod = o.allocator === "cvxq" ? o.trialMethod ?? o.method : null;
    log(
      `allocation: ${o.allocator} over ${formats.map(formatName).join(", ")}` +
        (trialMethod ? `, trial quantizations with ${trialMethod}` : ""),
    );
    measures = await measureDistortions(gpu!, ckpt, seqs!, {
      formats,
      method: trialMethod,
      iters: o.iters,
      percdamp: o.percdamp,
      threads: o.threads,
      log,
    });
  } else {
    measures = [];
    for (const { name, N, K } of blockLinears(ckpt)) {
      const W = await ckpt.read(name);
      measures.push({
        name,
        N,
        K,
        energy: NaN,
        traceH: NaN,
        D: null,
        E: roundoffErrors(W, N, K, formats),
        ms: 0,
      });
    }
  }
  let G2: Map<string, number> | null = null;
  const sensitivity = o.sensitivity ?? "backward";
  if (cvxq) {
    G2 = sensitivity === "relative"
      ? relativeSensitivity(measures)
      : await outputSensitivity(ckpt, seqs!.slice(0, o.sensitivitySamples ?? 32), log);
  }
  const perLinear: LinearCosts[] = [];
  for (const m of measures) {
    const bpw = candidateRates(m.N, m.K, formats);
    let cost = m.E;
    if (o.allocator === "cvxq") cost = m.D!.map((d) => G2!.get(m.name)! * d);
    if (o.allocator === "cvxq-analytic") {
      const W = await ckpt.read(m.name);
      cost = analyticDistortion(W, m.N, m.K, m.traceH, formats).map((d) => G2!.get(m.name)! * d);
    }
    perLinear.push({ name: m.name, n: m.N * m.K, bpw, cost });
  }
  // the GPU runs q/k/v and gate/up as one matrix each: they share a format
  const { units: layers, unitOf } = fusedUnits(perLinear);
  const record: Record<string, unknown> = {
    allocator: o.allocator,
    budget: o.budget,
    targetBitsPerWeight: target,
    candidates: formats.map(formatName),
  };
  let unitChoice: number[];
  if (cvxq) {
    const r = dualAscent(layers, target);
    unitChoice = r.choice;
    Object.assign(record, {
      lambda: r.lambda,
      iterations: r.iterations,
      sensitivity,
      trialMethod: o.allocator === "cvxq" ? o.trialMethod ?? o.method : null,
    });
    log(
      `allocation: λ = ${r.lambda.toExponential(4)} after ${r.iterations.ascent} dual-ascent ` +
        `and ${r.iterations.bisection} bisection steps, ${r.iterations.fill} fill upgrades`,
    );
  } else if (o.allocator === "mixquant") {
    const r = mixQuant(layers, target);
    // QEM's rule moves in steps; the bits it leaves go to the best E drops per bit that fit
    const filled = fillBudget(layers, r.choice, target);
    unitChoice = filled.choice;
    Object.assign(record, {
      qem: r.qem,
      iterations: { bisection: r.iterations, fill: filled.steps },
      reference: "own widest",
      rateBeforeFill: r.rate,
    });
    log(`allocation: QEM = ${r.qem.toFixed(4)} after ${r.iterations} bisection steps`);
  } else {
    unitChoice = uniformChoice(layers, formats, target);
  }
  const choice = unitOf.map((u) => unitChoice[u]);
  const rate = rateOf(perLinear, choice);
  const counts: Record<string, number> = {};
  for (const f of choice) {
    counts[formatName(formats[f])] = (counts[formatName(formats[f])] ?? 0) + 1;
  }
  Object.assign(record, { bitsPerWeight: rate, counts });
  log(
    `allocation: ${rate.toFixed(4)} bits per weight (target ${target.toFixed(4)}): ` +
      Object.entries(counts).map(([k, v]) => `${v}× ${k}`).join(", "),
  );
  const rows: AllocationRow[] = measures.map((m, i) => ({
    name: m.name,
    N: m.N,
    K: m.K,
    G2: G2?.get(m.name) ?? null,
    candidates: formats.map((f, j) => ({
      format: formatName(f),
      bpw: perLinear[i].bpw[j],
      D: m.D?.[j] ?? null,
      E: m.E[j],
      cost: perLinear[i].cost[j],
    })),
    choice: formatName(formats[choice[i]]),
  }));
  return {
    formats: Object.fromEntries(measures.map((m, i) => [m.name, formats[choice[i]]])),
    record,
    rows,
    seconds: (performance.now() - t0) / 1000,
  };
}
