/**
 * Shared pieces of the tokenizer tests: paths of the shared data and a tiny synthetic
 * tokenizer in both formats.
 */

import { sharedPath } from "./helpers.ts";

/** Whether every path exists (tests on real data are skipped otherwise). */
export function exists(...paths: string[]): boolean {
  try {
    for (const p of paths) Deno.statSync(p);
    return true;
  } catch {
    return false;
  }
}

export const STORIES_BIN = sharedPath("models/stories260K/tok512.bin");
export const STORIES_MODEL = sharedPath("models/stories260K/stories260K.bin");
export const STORIES_HF_DIR = sharedPath("models/stories260K-hf");
export const NOVELS_DIR = sharedPath("data/novels/tokenizer");
export const TINYSTORIES = sharedPath("data/tinystories/TinyStories-valid-sample.txt");
export const HELDOUT = sharedPath("data/novels/heldout.txt");

/** Pieces (with SentencePiece "▁" for space) and merges of the tiny synthetic tokenizer. */
const TINY_PIECES = [
  "▁",
  "h",
  "i",
  "e",
  "l",
  "o",
  "é",
  "▁h",
  "▁hi",
  "ll",
  "▁he",
  "▁hell",
  "▁hello",
];
const TINY_MERGES = ["▁ h", "▁h i", "l l", "▁h e", "▁he ll", "▁hell o"];

/** The ids of the synthetic vocabulary: 0-2 special, 3-258 bytes, then {@link TINY_PIECES}. */
function tinyVocab(): [string, number][] {
  const vocab: [string, number][] = [["<unk>", 0], ["<s>", 1], ["</s>", 2]];
  for (let b = 0; b < 256; b++) {
    vocab.push([`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`, b + 3]);
  }
  TINY_PIECES.forEach((p, i) => vocab.push([p, 259 + i]));
  return vocab;
}

/** A Llama-style tokenizer.json (SentencePiece BPE with byte fallback) over a tiny vocabulary. */
export function tinyTokenizerJson(): string {
  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  return JSON.stringify({
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
    normalizer: {
      type: "Sequence",
      normalizers: [{ type: "Prepend", prepend: "▁" }, {
        type: "Replace",
        pattern: { String: " " },
        content: "▁",
      }],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "▁" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab: Object.fromEntries(tinyVocab()),
      merges: TINY_MERGES,
    },
  });
}

/** A tokenizer_config.json for the tiny tokenizer, with `extra` merged in. */
export function tinyConfigJson(extra: Record<string, unknown> = {}): string {
  return JSON.stringify({
    add_bos_token: true,
    add_eos_token: false,
    bos_token: "<s>",
    eos_token: "</s>",
    unk_token: "<unk>",
    clean_up_tokenization_spaces: false,
    tokenizer_class: "LlamaTokenizer",
    ...extra,
  });
}

/**
 * The same vocabulary as a llama2.c tokenizer.bin, as llama2.c's tokenizer.py exports it
 * ("▁" as " ", BOS/EOS as "\n<s>\n"/"\n</s>\n", merged pieces scored by merge order).
 */
export function tinyTokenizerBin(): Uint8Array {
  const merged = new Map(TINY_MERGES.map((m, i) => [m.replace(" ", ""), -i]));
  return llama2cBin(
    tinyVocab().map(([piece, id]) => ({
      piece: id === 1 ? "\n<s>\n" : id === 2 ? "\n</s>\n" : piece.replaceAll("▁", " "),
      score: id < 259 ? 0 : merged.get(piece) ?? -100 - id,
    })),
  );
}

/** A llama2.c tokenizer.bin holding `entries` in id order. */
export function llama2cBin(entries: { piece: string; score: number }[]): Uint8Array {
  const enc = new TextEncoder();
  const encoded = entries.map((e) => ({ bytes: enc.encode(e.piece), score: e.score }));
  const size = 4 + encoded.reduce((n, e) => n + 8 + e.bytes.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setInt32(0, Math.max(1, ...encoded.map((e) => e.bytes.length)), true);
  let offset = 4;
  for (const e of encoded) {
    view.setFloat32(offset, e.score, true);
    view.setInt32(offset + 4, e.bytes.length, true);
    out.set(e.bytes, offset + 8);
    offset += 8 + e.bytes.length;
  }
  return out;
}
