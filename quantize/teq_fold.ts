/**
 * TEQ's equivalent transformation (arXiv 2310.10944) for the Llama family: the groups of linear
 * layers that read one input, each with a positive per-input-channel scale vector s, and the
 * folding. A group's consumers use W·diag(s); their input is divided by s, which is folded into
 * whatever produced it, so the folded float model computes exactly what the original did:
 *
 *   input_layernorm → {q, k, v}          1/s into the RMSNorm weight
 *   v → o                                1/s into v's rows (and its bias); attention is linear in
 *                                        V, and o's input channel h·hd + i is KV head
 *                                        ⌊h / (nHeads/nKvHeads)⌋'s channel i (grouped-query)
 *   post_attention_layernorm → {gate, up} 1/s into the RMSNorm weight
 *   up → down                            1/s into up's rows: silu(gate)·up is linear in up
 *   final norm → lm_head                 only when the logits layer is packed (the file unties it)
 *
 * Every folded tensor is W'[n, k] = W[n, k]·c[k]/r[n]: c the s of the group it consumes (expanded
 * through `index` for o), r the s of the group it produces for (a 1-D norm or bias: its entries).
 */
import type { Checkpoint, TensorInfo } from "../runtime/checkpoint/checkpoint.ts";
import { type ModelConfig, tensorNames as T } from "../runtime/checkpoint/config.ts";
import { NumericalError, ParameterError } from "../runtime/errors.ts";

/** One group: consumers scale their input channels by s, producers divide their outputs. */
export interface TeqGroup {
  /** "0.attn", "0.vo", "0.ffn", "0.down" (layer.kind), or "head". */
  key: string;
  kind: "attn" | "vo" | "ffn" | "down" | "head";
  /** Entries of s. */
  size: number;
  /** Tensors whose column k is multiplied by s[index[k]] (s[k] without an index). */
  consumers: { name: string; index?: Int32Array }[];
  /** Tensors whose row (1-D: entry) n is divided by s[n]. */
  producers: string[];
}

/** One s vector per group key. */
export type TeqScales = Map<string, Float64Array>;

/** The smallest s (the reference code's clamp). */
export const S_MIN = 1e-5;

/** Column k of o's input (head h, channel i) → the v channel it reads: kvHead(h)·hd + i. */
export function gqaIndex(c: ModelConfig): Int32Array {
  const group = c.nHeads / c.nKvHeads, hd = c.headDim;
  const index = new Int32Array(c.nHeads * hd);
  for (let h = 0; h < c.nHeads; h++) {
    for (let i = 0; i < hd; i++) index[h * hd + i] = Math.floor(h / group) * hd + i;
  }
  return index;
}

/** The TEQ groups of a model; the logits layer's only with `head` (when it is packed). */
export function teqGroups(c: ModelConfig, o: { head: boolean }): TeqGroup[] {
  const groups: TeqGroup[] = [];
  const kvDim = c.nKvHeads * c.headDim, o2v = gqaIndex(c);
  for (let l = 0; l < c.nLayers; l++) {
    groups.push(
      {
        key: `${l}.attn`,
        kind: "attn",
        size: c.dim,
        consumers: [{ name: T.wq(l) }, { name: T.wk(l) }, { name: T.wv(l) }],
        producers: [T.attnNorm(l)],
      },
      {
        key: `${l}.vo`,
        kind: "vo",
        size: kvDim,
        consumers: [{ name: T.wo(l), index: o2v }],
        producers: c.qkvBias ? [T.wv(l), T.bv(l)] : [T.wv(l)],
      },
      {
        key: `${l}.ffn`,
        kind: "ffn",
        size: c.dim,
        consumers: [{ name: T.w1(l) }, { name: T.w3(l) }],
        producers: [T.ffnNorm(l)],
      },
      {
        key: `${l}.down`,
        kind: "down",
        size: c.hiddenDim,
        consumers: [{ name: T.w2(l) }],
        producers: [T.w3(l)],
      },
    );
  }
  if (o.head) {
    groups.push({
      key: "head",
      kind: "head",
      size: c.dim,
      consumers: [{ name: T.lmHead }],
      producers: [T.norm],
    });
  }
  return groups;
}

/** s = 1 for every group. */
export function identityScales(groups: TeqGroup[]): TeqScales {
  return new Map(groups.map((g) => [g.key, new Float64Array(g.size).fill(1)]));
}

/**
 * Throws unless `scales` holds, for every group, `size` finite entries ≥ {@link S_MIN}, and
 * nothing else: a scale that went non-finite or non-positive must never reach a file.
 */
export function checkScales(groups: TeqGroup[], scales: TeqScales, what = "TEQ scales"): void {
  const keys = new Set(groups.map((g) => g.key));
  for (const k of scales.keys()) {
    if (!keys.has(k)) throw new ParameterError(`${what}: no TEQ group "${k}" in this model`);
  }
  for (const g of groups) {
    const s = scales.get(g.key);
    if (!s) throw new ParameterError(`${what}: group "${g.key}" has no scales`);
    if (s.length !== g.size) {
      throw new ParameterError(`${what}: group "${g.key}" has ${s.length} scales, needs ${g.size}`);
    }
    for (let i = 0; i < s.length; i++) {
      if (!Number.isFinite(s[i]) || !(s[i] >= S_MIN)) {
        throw new NumericalError(
          `${what}: s[${i}] of group "${g.key}" is ${s[i]}; every scale must be finite and ≥ ` +
            `${S_MIN}`,
        );
      }
    }
  }
}

/** How one tensor folds: its columns times `col[index[k]]`, its rows divided by `row[n]`. */
export interface TensorFold {
  col?: { s: Float64Array; index?: Int32Array; group: string };
  row?: { s: Float64Array; group: string };
}

/** The fold of every tensor the groups touch, keyed by tensor name. */
export function tensorFolds(groups: TeqGroup[], scales: TeqScales): Map<string, TensorFold> {
  const folds = new Map<string, TensorFold>();
  const at = (name: string) => folds.get(name) ?? folds.set(name, {}).get(name)!;
  for (const g of groups) {
    const s = scales.get(g.key)!;
    for (const c of g.consumers) at(c.name).col = { s, index: c.index, group: g.key };
    for (const p of g.producers) at(p).row = { s, group: g.key };
  }
  return folds;
}

/**
 * Folds rows [r0, r0 + rows) of a tensor with K columns (1 for a vector) in place:
 * W[n, k]·c[k]/r[n].
 */
export function foldRows<A extends Float32Array | Float64Array>(
  W: A,
  K: number,
  f: TensorFold,
  r0 = 0,
): A {
  const rows = W.length / K, col = f.col, row = f.row;
  let c: Float64Array | null = null;
  if (col) {
    c = new Float64Array(K);
    for (let k = 0; k < K; k++) c[k] = col.s[col.index ? col.index[k] : k];
  }
  for (let n = 0; n < rows; n++) {
    const o = n * K, r = row ? 1 / row.s[r0 + n] : 1;
    if (c) { for (let k = 0; k < K; k++) W[o + k] = W[o + k] * c[k] * r; }
    else if (row) { for (let k = 0; k < K; k++) W[o + k] = W[o + k] * r; }
  }
  return W;
}

/**
 * The checkpoint as TEQ transforms it: every tensor a group touches is read folded. With a
 * `head` group on a tied checkpoint, the result is untied: its `lm_head.weight` is the folded
 * embedding, the embedding itself unchanged.
 */
export function teqCheckpoint(ckpt: Checkpoint, groups: TeqGroup[], scales: TeqScales): Checkpoint {
  checkScales(groups, scales);
  const folds = tensorFolds(groups, scales);
  const untie = ckpt.config.tiedEmbeddings && groups.some((g) => g.kind === "head");
  const tensors = new Map<string, TensorInfo>(ckpt.tensors);
  if (untie) {
    const e = ckpt.tensors.get(T.embed)!;
    tensors.set(T.lmHead, { ...e, name: T.lmHead });
  }
  for (const name of folds.keys()) {
    if (!tensors.has(name)) throw new ParameterError(`${ckpt.path}: TEQ folds ${name}, absent`);
  }
  return {
    path: ckpt.path,
    config: untie ? { ...ckpt.config, tiedEmbeddings: false } : ckpt.config,
    tensors,
    async read(name, rowStart, rowEnd) {
      const src = untie && name === T.lmHead ? T.embed : name;
      const data = await ckpt.read(src, rowStart, rowEnd);
      const f = folds.get(name);
      if (!f) return data;
      const shape = tensors.get(name)!.shape;
      return foldRows(data, shape.length === 1 ? 1 : shape[1], f, rowStart ?? 0);
    },
    close: () => ckpt.close(),
  };
}

/** What a `--teq-save` file holds besides the scales (the settings they were trained with). */
export type TeqFileInfo = Record<string, unknown>;

/** Writes the scales as JSON: `{ lowbitTeq: 1, info, scales: { key: [s…] } }`. */
export async function saveScales(path: string, scales: TeqScales, info: TeqFileInfo) {
  const obj = {
    lowbitTeq: 1,
    info,
    scales: Object.fromEntries([...scales].map(([k, s]) => [k, [...s]])),
  };
  await Deno.writeTextFile(path, JSON.stringify(obj));
}

/** Reads a {@link saveScales} file and checks it against the model's groups. */
export async function loadScales(
  path: string,
  groups: TeqGroup[],
): Promise<{ scales: TeqScales; info: TeqFileInfo }> {
  let obj: { lowbitTeq?: number; info?: TeqFileInfo; scales?: Record<string, unknown> };
  try {
    obj = JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    throw new ParameterError(`--teq-load ${path}: ${(e as Error).message}`, { cause: e });
  }
  if (obj?.lowbitTeq !== 1 || typeof obj.scales !== "object" || obj.scales === null) {
    throw new ParameterError(`--teq-load ${path}: not a lowbit TEQ scales file (lowbitTeq: 1)`);
  }
  const scales: TeqScales = new Map();
  for (const [k, v] of Object.entries(obj.scales)) {
    if (!Array.isArray(v) || !v.every((x) => typeof x === "number" || x === null)) {
      throw new ParameterError(`--teq-load ${path}: group "${k}" is not an array of numbers`);
    }
    // JSON writes NaN and ±Infinity as null: they stay non-finite, and checkScales names them
    scales.set(k, Float64Array.from(v, (x) => x === null ? NaN : x));
  }
  checkScales(groups, scales, `--teq-load ${path}`);
  return { scales, info: obj.info ?? {} };
}
