/**
 * The llama2.c `tokenizer.bin` tokenizer: int32 max_token_length, then per token a float32
 * score, an int32 byte length and the piece's bytes. Encoding and decoding follow
 * karpathy/llama2.c `run.c` (`encode()` and `decode()`).
 */

import { noChatTemplateError, renderChatTemplate } from "./chat_template.ts";
import { TokenizerError } from "../errors.ts";
import type { ChatMessage, Tokenizer, TokenizerData } from "./tokenizer.ts";

const BOS = 1;
const EOS = 2;
/** run.c starts its best score at -1e10f: pairs scoring no higher never merge. */
const MIN_SCORE = Math.fround(-1e10);

const utf8 = new TextEncoder();
/** ignoreBOM keeps a leading U+FEFF that the text really contains. */
const utf8Decoder = new TextDecoder("utf-8", { ignoreBOM: true });

/** Bytes as a string of code units 0..255, so lookups compare raw bytes exactly as C does. */
function binary(bytes: Uint8Array, start = 0, end = bytes.length): string {
  let s = "";
  for (let i = start; i < end; i++) s += String.fromCharCode(bytes[i]);
  return s;
}

/** Options for {@link Llama2cTokenizer}. */
export interface Llama2cOptions {
  /** Where the bytes came from (a path), used in error messages. */
  source?: string;
  /** A Jinja chat template to attach (tokenizer.bin files have none). */
  chatTemplate?: string;
}

/** A tokenizer read from llama2.c's `tokenizer.bin` format. */
export class Llama2cTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId = BOS;
  readonly eosId = EOS;
  /** The longest piece in bytes, as stored in the header. */
  readonly maxTokenLength: number;
  readonly #bytes: Uint8Array;
  readonly #source: string;
  readonly #chatTemplate?: string;
  readonly #pieces: Uint8Array[] = [];
  readonly #keys: string[] = [];
  readonly #scores: Float32Array;
  /** Bytes each id decodes to: the piece, or the raw byte for `<0xXX>` pieces. */
  readonly #decoded: Uint8Array[] = [];
  readonly #lookup = new Map<string, number>();

  /** Parses `bytes` (a whole tokenizer.bin); throws TokenizerError when malformed. */
  constructor(bytes: Uint8Array, options: Llama2cOptions = {}) {
    this.#bytes = bytes;
    this.#source = options.source ?? "the llama2.c tokenizer";
    this.#chatTemplate = options.chatTemplate;
    const fail = (what: string) =>
      new TokenizerError(
        `${this.#source} is not a valid llama2.c tokenizer.bin: ${what}; re-export it with ` +
          `llama2.c's tokenizer.py, or pass the model's tokenizer.json with --tokenizer`,
      );
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (bytes.length < 4) throw fail(`${bytes.length} bytes, too short for its header`);
    this.maxTokenLength = view.getInt32(0, true);
    if (this.maxTokenLength <= 0 || this.maxTokenLength > 1 << 16) {
      throw fail(`max_token_length ${this.maxTokenLength} in the header is implausible`);
    }
    const scores: number[] = [];
    let offset = 4;
    while (offset < bytes.length) {
      const id = scores.length;
      if (offset + 8 > bytes.length) throw fail(`truncated in the header of token ${id}`);
      const score = view.getFloat32(offset, true);
      const length = view.getInt32(offset + 4, true);
      offset += 8;
      if (length < 0 || offset + length > bytes.length) {
        throw fail(`token ${id} claims ${length} bytes at offset ${offset - 4}, past the end`);
      }
      const piece = bytes.subarray(offset, offset + length);
      offset += length;
      scores.push(score);
      this.#pieces.push(piece);
      const key = binary(piece);
      this.#keys.push(key);
      if (!this.#lookup.has(key)) this.#lookup.set(key, id);
      const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(key);
      this.#decoded.push(byte ? Uint8Array.of(parseInt(byte[1], 16)) : piece);
    }
    if (scores.length <= EOS) throw fail(`only ${scores.length} tokens`);
    this.vocabSize = scores.length;
    this.#scores = Float32Array.from(scores);
  }

  /** The raw bytes of token `id`'s piece (for BOS/EOS, llama2.c's "\n<s>\n" style pieces). */
  piece(id: number): Uint8Array {
    return this.#pieces[id];
  }

  /** Text to ids, exactly as run.c `encode(t, text, bos, eos=0, ...)`. */
  encode(text: string, options: { bos?: boolean } = {}): number[] {
    const ids: number[] = [];
    if (options.bos ?? true) ids.push(BOS);
    const bytes = utf8.encode(text);
    if (bytes.length > 0) this.#pushChar(ids, bytes, 0, 1, " ");
    // Group UTF-8 bytes into characters of at most 4 bytes, as run.c does.
    let start = 0;
    let len = 0;
    for (let i = 0; i < bytes.length; i++) {
      if ((bytes[i] & 0xc0) !== 0x80) {
        start = i;
        len = 0;
      }
      len++;
      if (i + 1 < bytes.length && (bytes[i + 1] & 0xc0) === 0x80 && len < 4) continue;
      this.#pushChar(ids, bytes, start, i + 1);
      start = i + 1;
      len = 0;
    }
    return this.#merge(ids);
  }

  /** Appends the id of one character, or its bytes' fallback ids (byte + 3). */
  #pushChar(ids: number[], bytes: Uint8Array, start: number, end: number, key?: string): void {
    const id = this.#lookup.get(key ?? binary(bytes, start, end));
    if (id !== undefined) {
      ids.push(id);
    } else if (key !== undefined) {
      // run.c would push -1 for a vocabulary without " "; fall back to the space byte instead.
      ids.push(0x20 + 3);
    } else {
      for (let i = start; i < end; i++) ids.push(bytes[i] + 3);
    }
  }

  /**
   * Repeatedly merges the adjacent pair whose concatenation is a piece with the highest
   * score (the leftmost on ties), as run.c's O(n²) loop does, in O(n log n) with a heap.
   */
  #merge(ids: number[]): number[] {
    const n = ids.length;
    if (n < 2) return ids;
    const tok = Int32Array.from(ids);
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    const heap = new PairHeap();
    const consider = (left: number) => {
      const right = next[left];
      if (left < 0 || right < 0) return;
      const merged = this.#lookup.get(this.#keys[tok[left]] + this.#keys[tok[right]]);
      if (merged === undefined || !(this.#scores[merged] > MIN_SCORE)) return;
      heap.push({
        score: this.#scores[merged],
        left,
        right,
        lt: tok[left],
        rt: tok[right],
        merged,
      });
    };
    for (let i = 0; i + 1 < n; i++) consider(i);
    for (let p = heap.pop(); p !== undefined; p = heap.pop()) {
      if (next[p.left] !== p.right || tok[p.left] !== p.lt || tok[p.right] !== p.rt) continue;
      tok[p.left] = p.merged;
      const after = next[p.right];
      next[p.left] = after;
      if (after >= 0) prev[after] = p.left;
      next[p.right] = -2; // removed
      consider(prev[p.left]);
      consider(p.left);
    }
    const out: number[] = [];
    for (let i = 0; i >= 0; i = next[i]) out.push(tok[i]);
    return out;
  }

  /**
   * Ids to text as run.c `decode()` pieces joined: a leading space is dropped from the piece
   * after BOS, `<0xXX>` pieces are raw bytes, and the bytes are UTF-8 decoded together (so a
   * character split over byte tokens comes out whole). Special ids (0-2) and ids outside the
   * vocabulary are dropped.
   */
  decode(ids: number[]): string {
    const parts: Uint8Array[] = [];
    let total = 0;
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      let bytes = id > EOS ? this.#decoded[id] : undefined;
      if (bytes === undefined) continue;
      if (i > 0 && ids[i - 1] === BOS && this.#pieces[id][0] === 0x20) bytes = bytes.subarray(1);
      parts.push(bytes);
      total += bytes.length;
    }
    const all = new Uint8Array(total);
    let offset = 0;
    for (const p of parts) {
      all.set(p, offset);
      offset += p.length;
    }
    return utf8Decoder.decode(all);
  }

  /** Renders the attached chat template; throws TokenizerError when there is none. */
  applyChatTemplate(
    messages: ChatMessage[],
    options: { addGenerationPrompt?: boolean } = {},
  ): string {
    if (this.#chatTemplate === undefined) throw noChatTemplateError(this.#source, "llama2c");
    return renderChatTemplate(
      this.#chatTemplate,
      messages,
      { bosToken: "<s>", eosToken: "</s>", extra: { unk_token: "<unk>" } },
      options.addGenerationPrompt ?? false,
      this.#source,
    );
  }

  /** The tokenizer.bin bytes (and chat template), for embedding in a model file. */
  toData(): TokenizerData {
    return this.#chatTemplate === undefined
      ? { kind: "llama2c", bytes: this.#bytes }
      : { kind: "llama2c", bytes: this.#bytes, chatTemplate: this.#chatTemplate };
  }
}

interface Pair {
  score: number;
  left: number;
  right: number;
  lt: number;
  rt: number;
  merged: number;
}

/** A binary max-heap of candidate merges: highest score first, then leftmost. */
class PairHeap {
  readonly #items: Pair[] = [];

  #before(a: Pair, b: Pair): boolean {
    return a.score > b.score || (a.score === b.score && a.left < b.left);
  }

  push(p: Pair): void {
    const items = this.#items;
    let i = items.length;
    items.push(p);
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.#before(items[i], items[parent])) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }

  pop(): Pair | undefined {
    const items = this.#items;
    const top = items[0];
    const last = items.pop();
    if (items.length > 0 && last !== undefined) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let best = i;
        if (l < items.length && this.#before(items[l], items[best])) best = l;
        if (r < items.length && this.#before(items[r], items[best])) best = r;
        if (best === i) break;
        [items[i], items[best]] = [items[best], items[i]];
        i = best;
      }
    }
    return top;
  }
}
