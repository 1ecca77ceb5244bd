/**
 * The llama2.c tokenizer's heap-based merging against a line-by-line port of run.c's
 * O(n²) encode() loop, including ties between equal scores and byte fallback.
 */

import assert from "node:assert/strict";
import { Llama2cTokenizer } from "../runtime/tokenizer/tokenizer_llama2c.ts";
import { exists, HELDOUT, llama2cBin, NOVELS_DIR } from "./tokenizer_helpers.ts";
import { mulberry32 } from "./helpers.ts";

/** run.c's encode(), ported literally (vocab and lookups over raw byte strings). */
function referenceEncode(bin: Uint8Array, text: string, bos: boolean): number[] {
  const view = new DataView(bin.buffer, bin.byteOffset, bin.byteLength);
  const vocab: string[] = [];
  const scores: number[] = [];
  for (let o = 4; o < bin.length;) {
    scores.push(view.getFloat32(o, true));
    const n = view.getInt32(o + 4, true);
    vocab.push(String.fromCharCode(...bin.subarray(o + 8, o + 8 + n)));
    o += 8 + n;
  }
  const index = new Map<string, number>();
  vocab.forEach((v, i) => index.has(v) || index.set(v, i));
  const strLookup = (s: string) => index.get(s) ?? -1;
  const tokens: number[] = [];
  if (bos) tokens.push(1);
  const bytes = new TextEncoder().encode(text);
  if (bytes.length > 0) tokens.push(strLookup(" "));
  let buf = "";
  for (let c = 0; c < bytes.length; c++) {
    if ((bytes[c] & 0xc0) !== 0x80) buf = "";
    buf += String.fromCharCode(bytes[c]);
    const next = c + 1 < bytes.length ? bytes[c + 1] : 0;
    if ((next & 0xc0) === 0x80 && buf.length < 4) continue;
    const id = strLookup(buf);
    if (id !== -1) tokens.push(id);
    else for (let i = 0; i < buf.length; i++) tokens.push(buf.charCodeAt(i) + 3);
    buf = "";
  }
  for (;;) {
    let bestScore = Math.fround(-1e10);
    let bestId = -1;
    let bestIdx = -1;
    for (let i = 0; i < tokens.length - 1; i++) {
      const id = strLookup(vocab[tokens[i]] + vocab[tokens[i + 1]]);
      if (id !== -1 && scores[id] > bestScore) {
        bestScore = scores[id];
        bestId = id;
        bestIdx = i;
      }
    }
    if (bestIdx === -1) break;
    tokens[bestIdx] = bestId;
    tokens.splice(bestIdx + 1, 1);
  }
  return tokens;
}

Deno.test("llama2.c encode matches run.c's loop, ties going to the leftmost pair", () => {
  // Many equal scores, overlapping candidate merges and a piece reachable two ways.
  const entries = [
    { piece: "<unk>", score: 0 },
    { piece: "\n<s>\n", score: 0 },
    { piece: "\n</s>\n", score: 0 },
    ...Array.from({ length: 256 }, (_, b) => ({
      piece: `<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`,
      score: 0,
    })),
    ...[
      [" ", -50],
      ["a", -50],
      ["b", -50],
      ["é", -50],
      ["ab", -1],
      ["ba", -1],
      ["aa", -2],
      ["aba", -1],
      ["bab", -1],
      [" a", -2],
      [" ab", -3],
      ["abab", -1],
      ["baba", -2],
      ["é a", -1],
    ].map(([piece, score]) => ({ piece: piece as string, score: score as number })),
  ];
  const bin = llama2cBin(entries);
  const tok = new Llama2cTokenizer(bin);
  const random = mulberry32(7);
  const alphabet = ["a", "b", " ", "é", "c", "🙂"];
  for (let n = 0; n < 400; n++) {
    let text = "";
    const len = Math.floor(random() * 24);
    for (let i = 0; i < len; i++) text += alphabet[Math.floor(random() * alphabet.length)];
    const bos = n % 2 === 0;
    assert.deepEqual(
      tok.encode(text, { bos }),
      referenceEncode(bin, text, bos),
      JSON.stringify(text),
    );
    assert.deepEqual(tok.decode([1, ...tok.encode(text, { bos: false })]), text);
  }
});

const haveNovels = exists(`${NOVELS_DIR}/tokenizer.bin`, HELDOUT);

Deno.test({
  name: haveNovels
    ? "llama2.c encode matches run.c's loop on novel text"
    : "llama2.c encode matches run.c's loop on novel text (skipped: needs ../shared data)",
  ignore: !haveNovels,
  fn() {
    const bin = Deno.readFileSync(`${NOVELS_DIR}/tokenizer.bin`);
    const tok = new Llama2cTokenizer(bin);
    const text = Deno.readTextFileSync(HELDOUT).slice(0, 200_000);
    const random = mulberry32(11);
    for (let n = 0; n < 30; n++) {
      const start = Math.floor(random() * (text.length - 300));
      const piece = text.slice(start, start + Math.floor(random() * 300));
      assert.deepEqual(tok.encode(piece), referenceEncode(bin, piece, true), JSON.stringify(piece));
    }
  },
});
