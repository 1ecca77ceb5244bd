/**
 * What the tuner chooses for the attention kernel (kernels/attention.ts) and for what: an
 * {@link AttentionKey} names one attention kernel as the forward plan runs it (heads, KV heads,
 * head dim, the KV cache's element type and layout, decode or prefill), an AttentionShape
 * (kernels/attention.ts: wg, gq) the shape chosen for it. Keys print as one line
 * ("attention h32 kv8 d128 f16 buffer decode"), their name in the tune cache beside the quantized
 * kernels' (kernels/tune_key.ts), and parse back; {@link attentionShapeProblem} says whether a
 * shape can run a key, so that a cache entry is checked before the runtime uses it, and
 * {@link attentionKernelShape} is the runtime's lookup: the tuned shape, else the heuristic.
 * {@link KernelShape} is either kind of tuned shape.
 */
import { type AttentionShape, attentionShape, attentionWorkgroupBytes } from "./attention.ts";
import type { KvSource, KvType } from "./epilogue.ts";
import type { Gpu } from "./gpu.ts";
import { describeShape, type ShapeLimits, type TunedShape } from "./tune_key.ts";

/** One attention kernel as the forward plan runs it (Builder.attention, forward.ts). */
export interface AttentionKey {
  family: "attention";
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  kvType: KvType;
  kv: KvSource;
  /**
   * One token per step (decode); false: the steps of many tokens, prefill and the batched decode
   * steps, which run the same kernel (one workgroup per head group and token).
   */
  decode: boolean;
  /** q bound as a uniform buffer (texture KV, decode only: "+qu"). */
  qUniform: boolean;
}

/** Either kind of tuned shape: a quantized kernel's thread shape or an attention shape. */
export type KernelShape = TunedShape | AttentionShape;

/** The device limits an attention shape must respect (the quantized ones' and the x size). */
export type KernelLimits = ShapeLimits & { maxComputeWorkgroupSizeX?: number };

/** Whether a tune cache key names an attention kernel (the family word that starts it). */
export function isAttentionKeyString(s: string): boolean {
  return s.startsWith("attention ");
}

/** The one-line name of a key, e.g. "attention h6 kv2 d8 f16 texture decode+qu". */
export function attentionKeyString(k: AttentionKey): string {
  return `attention h${k.nHeads} kv${k.nKvHeads} d${k.headDim} ${k.kvType} ${k.kv} ${
    k.decode ? "decode" : "prefill"
  }${k.qUniform ? "+qu" : ""}`;
}

const KEY_RE =
  /^attention h(\d+) kv(\d+) d(\d+) (f16|f32) (buffer|texture) (decode|prefill)(\+qu)?$/;

/**
 * Why `k` names no kernel (a sentence), or null: heads a multiple of the KV heads, an even head
 * dim (rotate-half pairs), q uniform only in texture decode with nHeads·headDim % 4 = 0.
 */
export function attentionKeyProblem(k: AttentionKey): string | null {
  const int = (n: number) => Number.isInteger(n) && n >= 1;
  if (!int(k.nHeads) || !int(k.nKvHeads) || !int(k.headDim)) {
    return "heads, KV heads and head dim must be integers ≥ 1";
  }
  if (k.nHeads % k.nKvHeads !== 0) return `${k.nHeads} heads are no multiple of ${k.nKvHeads}`;
  if (k.headDim % 2 !== 0) return `head dim ${k.headDim} is odd`;
  if (k.qUniform && (!k.decode || k.kv !== "texture" || (k.nHeads * k.headDim) % 4 !== 0)) {
    return "a uniform q needs texture KV, decode and nHeads·headDim % 4 = 0";
  }
  return null;
}

/** The key a {@link attentionKeyString} names, or null where `s` is not one. */
export function parseAttentionKey(s: string): AttentionKey | null {
  const m = KEY_RE.exec(s);
  if (!m) return null;
  const key: AttentionKey = {
    family: "attention",
    nHeads: Number(m[1]),
    nKvHeads: Number(m[2]),
    headDim: Number(m[3]),
    kvType: m[4] as KvType,
    kv: m[5] as KvSource,
    decode: m[6] === "decode",
    qUniform: m[7] !== undefined,
  };
  if (attentionKeyProblem(key) !== null) return null;
  return attentionKeyString(key) === s ? key : null;
}

/** Just the shape fields of `s` (a cache entry also holds its times). */
export function bareAttentionShape(s: AttentionShape): AttentionShape {
  return { wg: s.wg, gq: s.gq };
}

/** The short form of a shape for messages: "wg 32 gq 2". */
export function describeAttentionShape(s: AttentionShape): string {
  return `wg ${s.wg} gq ${s.gq}`;
}

/** Whether a tuned shape is an attention shape (it has wg; a quantized one has tpr). */
export function isAttentionShape(s: KernelShape): s is AttentionShape {
  return "wg" in s;
}

/** The short form of either kind of shape ({@link describeAttentionShape}, describeShape). */
export function describeKernelShape(s: KernelShape): string {
  return isAttentionShape(s) ? describeAttentionShape(s) : describeShape(s);
}

/**
 * Why `s` cannot run `key` (a sentence), or null where it can: the key's own checks
 * ({@link attentionKeyProblem}: those the kernels make of q), wg a power of two, gq an integer
 * dividing nHeads / nKvHeads (the texture kernel's check; 1 for the buffer kernel, one head per
 * workgroup), and the device's threads and workgroup memory where given.
 */
export function attentionShapeProblem(
  key: AttentionKey,
  s: AttentionShape,
  limits?: KernelLimits,
): string | null {
  const keyProblem = attentionKeyProblem(key);
  if (keyProblem) return keyProblem;
  const int = (n: unknown): n is number => typeof n === "number" && Number.isInteger(n) && n >= 1;
  if (!int(s.wg) || (s.wg & (s.wg - 1)) !== 0) return "wg must be a power of two";
  if (!int(s.gq)) return "gq must be an integer ≥ 1";
  const GQ = key.nHeads / key.nKvHeads;
  if (GQ % s.gq !== 0) return `gq = ${s.gq} must divide nHeads / nKvHeads = ${GQ}`;
  if (key.kv === "buffer" && s.gq !== 1) return "the buffer kernel takes one head: gq must be 1";
  if (!limits) return null;
  const maxThreads = Math.min(
    limits.maxComputeInvocationsPerWorkgroup,
    limits.maxComputeWorkgroupSizeX ?? Infinity,
  );
  if (s.wg > maxThreads) return `${s.wg} threads per workgroup exceed the device's ${maxThreads}`;
  const bytes = attentionWorkgroupBytes({ ...key, ...s });
  if (bytes > limits.maxComputeWorkgroupStorageSize) {
    return `${bytes} bytes of workgroup memory exceed the device's ${limits.maxComputeWorkgroupStorageSize}`;
  }
  return null;
}

/**
 * The shape of an attention kernel: the tuner's choice for this adapter and key
 * (`gpu.tunedAttention`), used as it is, else the heuristic (attentionShape). `tuned` false gives
 * the heuristic (the tuner's baseline).
 */
export function attentionKernelShape(gpu: Gpu, key: AttentionKey, tuned = true): AttentionShape {
  const t = tuned ? gpu.tunedAttention.get(attentionKeyString(key)) : undefined;
  return t ?? attentionShape(gpu, key);
}
