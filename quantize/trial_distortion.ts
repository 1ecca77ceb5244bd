/**
 * One trial quantization of CVXQ's measurement (quantize/distortion.ts): a calibrated layer W
 * (N, K) quantized at one candidate format f by the chosen method, under its damped H (K, K),
 * with the GPTQ plan shared by every format of the layer, and its output error
 * D_l(f) = tr(ΔW·H·ΔWᵀ). The main thread and the workers of quantize/trial_parallel.ts run
 * this same code, so their D agree bit for bit.
 */
import { dequantize, type QuantizedLinear } from "../runtime/format/qtensor.ts";
import { NumericalError } from "../runtime/errors.ts";
import { layerLoss } from "./hessian.ts";
import { diagonal, rtnQuantize } from "./rtn.ts";
import { type GptqPlan, gptqQuantize } from "./gptq.ts";
import { decoupleQ } from "./decoupleq.ts";
import { type Format, formatName } from "./allocate.ts";
import type { Method } from "./sequential.ts";

/** A calibrated layer and what its trials share (the plan: null for rtn). */
export interface TrialLayer {
  method: Method;
  W: Float64Array;
  N: number;
  K: number;
  H: Float64Array;
  plan: GptqPlan | null;
  iters?: number;
}

/** One trial quantization of a calibrated layer with a shared GPTQ plan. */
export function trial(l: TrialLayer, f: Format): QuantizedLinear {
  const { method, W, N, K, H, plan } = l;
  if (method === "rtn") {
    return rtnQuantize(W, N, K, { ...f, clip: "hdiag", Hdiag: diagonal(H, K) });
  }
  if (method === "gptq") return gptqQuantize(W, N, K, H, { ...f, clip: "hdiag", plan: plan! });
  return decoupleQ(W, N, K, H, { ...f, iters: l.iters, plan: plan! }).ql;
}

/**
 * D_l(f) = tr(ΔW·H·ΔWᵀ) of the trial at f. A NumericalError where it is not finite, naming the
 * first non-finite entry of W or H (rtn and decoupleQ would otherwise hand the allocator NaN).
 */
export function trialDistortion(l: TrialLayer, f: Format): number {
  const { W, N, K, H } = l;
  const D = layerLoss(W, dequantize(trial(l, f), new Float64Array(N * K)), H, N, K).loss;
  if (Number.isFinite(D)) return D;
  const at = (A: Float64Array, name: string, i: number) =>
    `${name}[${Math.floor(i / K)}, ${i % K}] = ${A[i]}`;
  const w = W.findIndex((x) => !Number.isFinite(x)), h = H.findIndex((x) => !Number.isFinite(x));
  const why = w >= 0
    ? `${at(W, "W", w)}: check the checkpoint`
    : h >= 0
    ? `${at(H, "H", h)}: the layer's inputs hold NaN or Inf`
    : "the quantized weights are not finite";
  throw new NumericalError(`D_l(f) = ${D}, ${why}`);
}

/** A trial's error as one clear error naming the layer, the format and the method. */
export function trialError(name: string, l: TrialLayer, f: Format, e: unknown): Error {
  const err = new Error(
    `${l.method} trial quantization of ${name} (${l.N}×${l.K}) at ${formatName(f)}: ` +
      (e instanceof Error ? e.message : String(e)),
    { cause: e },
  );
  // the project's error kinds stay what they are (runMain prints them as one line)
  if (e instanceof Error) err.name = e.name;
  return err;
}
