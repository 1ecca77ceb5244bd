/** StreamDecoder: streamed pieces concatenate to decode(), never with a broken character. */

import assert from "node:assert/strict";
import { StreamDecoder } from "../runtime/tokenizer/stream_decoder.ts";
import type { Tokenizer } from "../runtime/tokenizer/tokenizer.ts";
import { HfTokenizer } from "../runtime/tokenizer/tokenizer_hf.ts";
import { Llama2cTokenizer } from "../runtime/tokenizer/tokenizer_llama2c.ts";
import {
  exists,
  NOVELS_DIR,
  STORIES_BIN,
  STORIES_HF_DIR,
  tinyConfigJson,
  tinyTokenizerBin,
  tinyTokenizerJson,
} from "./tokenizer_helpers.ts";

const TEXTS = [
  "héllo wörld — 日本語 🙂",
  "Once upon a time,  there was a 🐉 named Zoë.\nThe end.",
  "🙂🙂 ünïcödé at the end: ✓",
  " leading space and trailing space ",
];

function tokenizers(): [string, Tokenizer][] {
  const list: [string, Tokenizer][] = [
    ["tiny hf", new HfTokenizer(tinyTokenizerJson(), tinyConfigJson())],
    ["tiny llama2c", new Llama2cTokenizer(tinyTokenizerBin())],
  ];
  for (const dir of [STORIES_HF_DIR, NOVELS_DIR]) {
    if (!exists(`${dir}/tokenizer.json`)) continue;
    const json = Deno.readTextFileSync(`${dir}/tokenizer.json`);
    const config = Deno.readTextFileSync(`${dir}/tokenizer_config.json`);
    list.push([`hf ${dir}`, new HfTokenizer(json, config)]);
  }
  for (const bin of [STORIES_BIN, `${NOVELS_DIR}/tokenizer.bin`]) {
    if (exists(bin)) list.push([`llama2c ${bin}`, new Llama2cTokenizer(Deno.readFileSync(bin))]);
  }
  return list;
}

/** Streams `generated` after `prompt`; returns the pieces, checking none has a broken char. */
function stream(tok: Tokenizer, prompt: number[] | undefined, generated: number[]): string[] {
  const decoder = new StreamDecoder(tok, prompt);
  const pieces = generated.map((id) => decoder.push(id));
  pieces.push(decoder.flush());
  for (const p of pieces) {
    assert.ok(!p.includes("\uFFFD"), `broken character in ${JSON.stringify(p)}`);
  }
  return pieces;
}

Deno.test("StreamDecoder: pieces after the BOS concatenate to decode()", () => {
  for (const [name, tok] of tokenizers()) {
    for (const text of TEXTS) {
      const ids = tok.encode(text);
      assert.deepEqual(ids[0], tok.bosId);
      const pieces = stream(tok, [ids[0]], ids.slice(1));
      assert.deepEqual(pieces.join(""), tok.decode(ids), `${name}: ${text}`);
    }
  }
});

Deno.test("StreamDecoder: a prompt split anywhere, even inside a character", () => {
  for (const [name, tok] of tokenizers()) {
    const text = TEXTS[0];
    const ids = tok.encode(text);
    const full = tok.decode(ids);
    for (let k = 1; k < ids.length; k++) {
      const pieces = stream(tok, ids.slice(0, k), ids.slice(k));
      // The prompt's text up to its last whole character; the stream supplies the rest.
      const before = tok.decode(ids.slice(0, k)).replace(/\uFFFD+$/, "");
      assert.deepEqual(before + pieces.join(""), full, `${name}, split at ${k}`);
    }
  }
});

Deno.test("StreamDecoder: without a prompt the first piece keeps its leading space", () => {
  for (const [name, tok] of tokenizers()) {
    const ids = tok.encode("hello wörld 🙂", { bos: false });
    // The text continues an unseen prompt: "▁hello" is " hello", as in the middle of a text.
    assert.deepEqual(stream(tok, undefined, ids).join(""), " hello wörld 🙂", name);
  }
});

Deno.test("StreamDecoder: holds a split character back until it is complete", () => {
  const tok = new Llama2cTokenizer(tinyTokenizerBin());
  const ids = tok.encode("🙂", { bos: false }); // " " then four byte tokens
  assert.deepEqual(ids.length, 5);
  const decoder = new StreamDecoder(tok);
  assert.deepEqual(ids.map((id) => decoder.push(id)), [" ", "", "", "", "🙂"]);
  assert.deepEqual(decoder.flush(), "");
  // An unfinished character comes out of flush() as U+FFFD.
  const cut = new StreamDecoder(tok);
  assert.deepEqual(ids.slice(0, 3).map((id) => cut.push(id)), [" ", "", ""]);
  assert.deepEqual(cut.flush(), "\uFFFD");
  // Special ids produce no text.
  const special = new StreamDecoder(tok, [tok.bosId]);
  assert.deepEqual([tok.eosId].map((id) => special.push(id)), [""]);
});
