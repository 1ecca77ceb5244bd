/**
 * llama2.c `.bin` checkpoints (legacy export, as read by llama2.c's run.c): a header of 7
 * int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative = untied
 * classifier), seq_len), then float32 tensors, each stacked over layers, in run.c order.
 *
 * llama2.c rotates interleaved pairs (2i, 2i+1) in RoPE; the canonical layout is HF's
 * rotate-half, so q/k rows are permuted per head on read (see `hfRowToLlama2cRow`).
 */
import type { Checkpoint, TensorInfo } from "./checkpoint.ts";
import { type ModelConfig, tensorNames } from "./config.ts";
import { checkModelConfig } from "./config_check.ts";
import { ModelFormatError, ParameterError, UnsupportedModelError } from "../errors.ts";
import { checkFinite } from "./finite.ts";
import { readExact, rowGeometry } from "./safetensors.ts";

const HEADER_BYTES = 7 * 4;
/** Magic of llama2.c's newer export versions ("ak42"), which run.c does not read. */
const VERSIONED_MAGIC = 0x616b3432;

/** Where one canonical tensor lives in the file. */
interface Slot {
  shape: number[];
  offset: number; // absolute byte offset of element 0
  /** Permute rows llama2.c interleaved → HF rotate-half (q and k projections). */
  permute: boolean;
  /** llama2.c's name for the stacked tensor, for messages. */
  source: string;
}

/**
 * The llama2.c row holding HF row `r` of a q/k projection with head size `hd`:
 * HF row h*hd + a*(hd/2) + i = llama2.c row h*hd + 2*i + a (a ∈ {0, 1}, i < hd/2).
 */
export function hfRowToLlama2cRow(r: number, hd: number): number {
  const half = hd / 2, h = Math.floor(r / hd), within = r % hd;
  const a = within >= half ? 1 : 0, i = within - a * half;
  return h * hd + 2 * i + a;
}

/** The header's name of each ModelConfig field it sets, for messages. */
const llama2cFields: Partial<Record<keyof ModelConfig, string>> = {
  dim: "dim",
  hiddenDim: "hidden_dim",
  nLayers: "n_layers",
  nHeads: "n_heads",
  nKvHeads: "n_kv_heads",
  vocabSize: "vocab_size",
  seqLen: "seq_len",
};

/** Parses the 7-int32 header into a ModelConfig (checked, see `checkModelConfig`). */
export function parseLlama2cHeader(path: string, header: Int32Array): ModelConfig {
  if (header[0] === VERSIONED_MAGIC) {
    throw new UnsupportedModelError(
      `${path}: a versioned llama2.c export (magic "ak42", version ${header[1]}); ` +
        `only the legacy format read by run.c is supported (export with --version 0)`,
    );
  }
  const [dim, hiddenDim, nLayers, nHeads, nKvHeads, vocab, seqLen] = header;
  const config: ModelConfig = {
    architecture: "llama2.c",
    dim,
    hiddenDim,
    nLayers,
    nHeads,
    nKvHeads,
    headDim: dim / nHeads,
    vocabSize: Math.abs(vocab),
    seqLen,
    normEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    tiedEmbeddings: vocab > 0,
    qkvBias: false,
    bosId: 1,
    // run.c stops when the model emits BOS (1), which its models use as end of text; EOS (2)
    // is listed too, for the engine's usual stop test.
    eosIds: [1, 2],
  };
  checkModelConfig(
    path,
    config,
    (k) =>
      k === "headDim"
        ? `head size (header dim ${dim} / n_heads ${nHeads})`
        : `header ${llama2cFields[k] ?? k}`,
  );
  return config;
}

/** Byte layout of every canonical tensor, in run.c's order; also the bytes the file needs. */
function layout(c: ModelConfig): { slots: Map<string, Slot>; size: number } {
  const slots = new Map<string, Slot>();
  const kvDim = c.nKvHeads * c.headDim;
  let offset = HEADER_BYTES;
  // Adds a tensor stacked over layers (or a single one when `perLayer` is null).
  const add = (
    source: string,
    perLayer: ((l: number) => string) | null,
    shape: number[],
    permute = false,
  ) => {
    const bytes = shape.reduce((a, b) => a * b, 1) * 4;
    if (perLayer === null) {
      slots.set(source, { shape, offset, permute, source });
      offset += bytes;
      return;
    }
    for (let l = 0; l < c.nLayers; l++) {
      slots.set(perLayer(l), { shape, offset, permute, source: `${source}[${l}]` });
      offset += bytes;
    }
  };
  const n = tensorNames;
  add(n.embed, null, [c.vocabSize, c.dim]); // token_embedding_table (vocab, dim)
  add("rms_att_weight", n.attnNorm, [c.dim]); // (layer, dim)
  add("wq", n.wq, [c.dim, c.dim], true); // (layer, dim, dim)
  add("wk", n.wk, [kvDim, c.dim], true); // (layer, kv_dim, dim)
  add("wv", n.wv, [kvDim, c.dim]); // (layer, kv_dim, dim)
  add("wo", n.wo, [c.dim, c.dim]); // (layer, dim, dim)
  add("rms_ffn_weight", n.ffnNorm, [c.dim]); // (layer, dim)
  add("w1", n.w1, [c.hiddenDim, c.dim]); // (layer, hidden, dim)
  add("w2", n.w2, [c.dim, c.hiddenDim]); // (layer, dim, hidden)
  add("w3", n.w3, [c.hiddenDim, c.dim]); // (layer, hidden, dim)
  add(n.norm, null, [c.dim]); // rms_final_weight (dim)
  // Legacy freq_cis_real and freq_cis_imag, unused: seq_len * head_size / 2 floats each.
  offset += 2 * (c.seqLen * c.headDim / 2) * 4;
  if (!c.tiedEmbeddings) add(n.lmHead, null, [c.vocabSize, c.dim]); // wcls (vocab, dim)
  // Rename the single tensors' sources to llama2.c's names for messages.
  slots.get(n.embed)!.source = "token_embedding_table";
  slots.get(n.norm)!.source = "rms_final_weight";
  if (!c.tiedEmbeddings) slots.get(n.lmHead)!.source = "wcls";
  return { slots, size: offset };
}

/** Opens a llama2.c `.bin` checkpoint; tensors are read on demand under canonical names. */
export async function openLlama2cCheckpoint(path: string): Promise<Checkpoint> {
  const file = await Deno.open(path, { read: true });
  try {
    const fileSize = (await file.stat()).size;
    if (fileSize < HEADER_BYTES) {
      throw new ModelFormatError(
        `${path}: file is ${fileSize} bytes, shorter than the ${HEADER_BYTES}-byte llama2.c header`,
      );
    }
    const headerBytes = new Uint8Array(HEADER_BYTES);
    await readExact(file, path, 0, headerBytes);
    const config = parseLlama2cHeader(path, new Int32Array(headerBytes.buffer));
    const { slots } = layout(config);
    const tensors = new Map<string, TensorInfo>();
    for (const [name, s] of slots) {
      const end = s.offset + s.shape.reduce((a, b) => a * b, 1) * 4;
      if (end > fileSize) {
        throw new ModelFormatError(
          `${path}: tensor ${name} (llama2.c ${s.source}) needs bytes [${s.offset}, ${end}) ` +
            `but the file has ${fileSize} bytes: truncated`,
        );
      }
      tensors.set(name, { name, dtype: "F32", shape: s.shape });
    }
    let queue: Promise<unknown> = Promise.resolve();
    // Reads `count` float32 rows of `rowElems` starting at row `first` of a slot, serialized.
    const readRows = (s: Slot, first: number, count: number, rowElems: number) => {
      const buf = new Uint8Array(count * rowElems * 4);
      const job = queue.then(() => readExact(file, path, s.offset + first * rowElems * 4, buf));
      queue = job.catch(() => {});
      return job.then(() => new Float32Array(buf.buffer));
    };
    return {
      path,
      config,
      tensors,
      async read(name: string, rowStart?: number, rowEnd?: number): Promise<Float32Array> {
        const s = slots.get(name);
        if (!s) throw new ParameterError(`${path}: checkpoint has no tensor ${name}`);
        const { rows, rowElems } = rowGeometry(s.shape);
        const r0 = rowStart ?? 0, r1 = rowEnd ?? rows;
        if (!Number.isInteger(r0) || !Number.isInteger(r1) || r0 < 0 || r1 > rows || r0 > r1) {
          throw new ParameterError(`${path}: tensor ${name} rows [${r0}, ${r1}) outside ${rows}`);
        }
        const checked = (out: Float32Array) => {
          const bytes = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
          checkFinite(path, name, s.shape, "F32", bytes, r0 * rowElems);
          return out;
        };
        if (!s.permute) return checked(await readRows(s, r0, r1 - r0, rowElems));
        // Permutation stays within a head: read the whole heads covering [r0, r1).
        const hd = config.headDim;
        const h0 = Math.floor(r0 / hd) * hd, h1 = Math.ceil(r1 / hd) * hd;
        const src = await readRows(s, h0, h1 - h0, rowElems);
        const out = new Float32Array((r1 - r0) * rowElems);
        for (let r = r0; r < r1; r++) {
          const from = hfRowToLlama2cRow(r, hd) - h0;
          out.set(src.subarray(from * rowElems, (from + 1) * rowElems), (r - r0) * rowElems);
        }
        return checked(out);
      },
      close: () => file.close(),
    };
  } catch (e) {
    file.close();
    throw e;
  }
}
