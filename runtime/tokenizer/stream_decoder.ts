/**
 * Incremental detokenization for streaming: each new id yields the text it completes, never a
 * broken UTF-8 character, with SentencePiece leading spaces right. The method of vLLM's
 * `detokenize_incrementally`: decode a short window of earlier ids with and without the new
 * ones and emit the difference; hold back text that ends in U+FFFD (a partial character).
 */

import type { Tokenizer } from "./tokenizer.ts";

/** Context ids kept from the prompt, as vLLM's initial incremental-detokenization offset. */
const PROMPT_WINDOW = 5;
/** A byte-fallback character spans at most 4 ids; back off this far over a split prompt end. */
const MAX_CHAR_IDS = 4;

/** Turns a stream of generated ids into text pieces whose concatenation is the full text. */
export class StreamDecoder {
  readonly #tok: Tokenizer;
  /** Ids a window may draw on: a few prompt ids, then every id pushed. */
  #ids: number[];
  /** The window's start: ids before it no longer affect new text. */
  #prefixOffset: number;
  /** Ids before this are emitted. */
  #readOffset: number;
  /**
   * Ids decoded before a window that does not start with BOS, so that decoders stripping the
   * first piece's leading space (SentencePiece, llama2.c after BOS) strip it from these.
   */
  readonly #anchor: number[];
  /** decode(anchor), cut from the front of anchored decodes. */
  readonly #anchorText: string;

  /**
   * `prompt`: the ids the generated ones continue (the prompt, BOS included), so the first
   * generated piece is decoded in context: after a lone BOS its leading space is dropped, as
   * a full decode() would. Without it, the first piece keeps its leading space (the text is
   * taken to continue a prompt).
   */
  constructor(tok: Tokenizer, prompt: number[] = []) {
    this.#tok = tok;
    const anchor = tok.encode("a", { bos: false });
    const anchorText = tok.decode(anchor);
    this.#anchor = anchorText.length > 0 ? anchor : [];
    this.#anchorText = anchorText.length > 0 ? anchorText : "";
    this.#ids = prompt.slice(-PROMPT_WINDOW);
    this.#prefixOffset = 0;
    this.#readOffset = this.#ids.length;
    // A prompt cut mid-character: treat its last ids as not yet emitted.
    for (let i = 0; i < MAX_CHAR_IDS && this.#readOffset > 0; i++) {
      if (!this.#decodeWindow(0, this.#readOffset).endsWith("\uFFFD")) break;
      this.#readOffset--;
    }
  }

  #decodeWindow(start: number, end: number): string {
    const window = this.#ids.slice(start, end);
    if (window.length > 0 && window[0] === this.#tok.bosId) return this.#tok.decode(window);
    if (this.#anchor.length === 0) return this.#tok.decode(window);
    return this.#tok.decode([...this.#anchor, ...window]).slice(this.#anchorText.length);
  }

  /** Adds one id; returns the text it completes ("" while a character is incomplete). */
  push(id: number): string {
    this.#ids.push(id);
    const prefixText = this.#decodeWindow(this.#prefixOffset, this.#readOffset);
    const newText = this.#decodeWindow(this.#prefixOffset, this.#ids.length);
    if (newText.length <= prefixText.length || newText.endsWith("\uFFFD")) return "";
    this.#prefixOffset = this.#readOffset;
    this.#readOffset = this.#ids.length;
    this.#trim();
    return newText.slice(prefixText.length);
  }

  /** Returns whatever is held back (a trailing partial character comes out as U+FFFD). */
  flush(): string {
    const prefixText = this.#decodeWindow(this.#prefixOffset, this.#readOffset);
    const newText = this.#decodeWindow(this.#prefixOffset, this.#ids.length);
    this.#prefixOffset = this.#readOffset = this.#ids.length;
    this.#trim();
    return newText.length > prefixText.length ? newText.slice(prefixText.length) : "";
  }

  /** Drops ids before the window so memory stays bounded on long generations. */
  #trim(): void {
    if (this.#prefixOffset < 1024) return;
    this.#ids = this.#ids.slice(this.#prefixOffset);
    this.#readOffset -= this.#prefixOffset;
    this.#prefixOffset = 0;
  }
}
