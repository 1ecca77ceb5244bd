/**
 * The two tokenizer implementations against each other and the shared data: llama2.c
 * tokenizer.bin (run.c's encoder) and Hugging Face tokenizer.json (@huggingface/tokenizers).
 */

import assert from "node:assert/strict";
import { tokenizerFromData } from "../runtime/tokenizer/load_tokenizer.ts";
import type { Tokenizer } from "../runtime/tokenizer/tokenizer.ts";
import { HfTokenizer } from "../runtime/tokenizer/tokenizer_hf.ts";
import { Llama2cTokenizer } from "../runtime/tokenizer/tokenizer_llama2c.ts";
import {
  exists,
  HELDOUT,
  NOVELS_DIR,
  STORIES_BIN,
  STORIES_HF_DIR,
  tinyConfigJson,
  TINYSTORIES,
  tinyTokenizerBin,
  tinyTokenizerJson,
} from "./tokenizer_helpers.ts";

const haveStories = exists(STORIES_BIN, `${STORIES_HF_DIR}/tokenizer.json`, TINYSTORIES);
const haveNovels = exists(`${NOVELS_DIR}/tokenizer.bin`, `${NOVELS_DIR}/tokenizer.json`, HELDOUT);
const skipNote = (what: string) => `${what} (skipped: needs ../shared data, absent here)`;

function hf(dir: string): HfTokenizer {
  const json = Deno.readTextFileSync(`${dir}/tokenizer.json`);
  const config = Deno.readTextFileSync(`${dir}/tokenizer_config.json`);
  return new HfTokenizer(json, config, { source: `${dir}/tokenizer.json` });
}

function llama2c(path: string): Llama2cTokenizer {
  return new Llama2cTokenizer(Deno.readFileSync(path), { source: path });
}

/** The first `n` non-empty paragraphs (lines) of heldout.txt. */
function heldoutParagraphs(n: number): string[] {
  const text = Deno.readTextFileSync(HELDOUT);
  return text.split("\n").filter((l) => l.trim().length > 0).slice(0, n);
}

function assertSameIds(a: Tokenizer, b: Tokenizer, lines: string[], bos = true): void {
  for (const [i, line] of lines.entries()) {
    assert.deepEqual(
      a.encode(line, { bos }),
      b.encode(line, { bos }),
      `line ${i}: ${line.slice(0, 60)}`,
    );
  }
}

function assertRoundTrip(tok: Tokenizer, lines: string[]): void {
  for (const [i, line] of lines.entries()) {
    assert.deepEqual(tok.decode(tok.encode(line)), line, `round trip of line ${i}`);
  }
}

Deno.test({
  name: haveStories ? "stories260K: tokenizer.json and tok512.bin agree on TinyStories" : skipNote(
    "stories260K: tokenizer.json and tok512.bin agree",
  ),
  ignore: !haveStories,
  fn() {
    const a = hf(STORIES_HF_DIR);
    const b = llama2c(STORIES_BIN);
    assert.deepEqual([a.vocabSize, a.bosId, a.eosId], [512, 1, 2]);
    assert.deepEqual([b.vocabSize, b.bosId, b.eosId], [512, 1, 2]);
    const lines = Deno.readTextFileSync(TINYSTORIES).split("\n").filter((l) => l.length > 0);
    assert.ok(lines.length >= 18, `only ${lines.length} lines in ${TINYSTORIES}`);
    assertSameIds(a, b, lines);
    assertSameIds(a, b, lines.slice(0, 3), false);
    assertRoundTrip(a, lines);
    assertRoundTrip(b, lines);
  },
});

Deno.test({
  name: haveNovels
    ? "novels: tokenizer.json and tokenizer.bin agree on 50 held-out paragraphs"
    : skipNote(
      "novels: tokenizer.json and tokenizer.bin agree",
    ),
  ignore: !haveNovels,
  fn() {
    const a = hf(NOVELS_DIR);
    const b = llama2c(`${NOVELS_DIR}/tokenizer.bin`);
    assert.deepEqual([a.vocabSize, b.vocabSize], [8192, 8192]);
    // run.c's encoder (highest-scoring adjacent pair first) and the BPE merge ranks that
    // tokenizer.json got from SentencePiece order merges the same way: ids agree exactly.
    const lines = heldoutParagraphs(50);
    assertSameIds(a, b, lines);
    assertRoundTrip(a, lines);
    assertRoundTrip(b, lines);
  },
});

Deno.test({
  name: haveNovels ? "novels: the documented differences between the two tokenizers" : skipNote(
    "novels: documented differences",
  ),
  ignore: !haveNovels,
  fn() {
    const a = hf(NOVELS_DIR);
    const b = llama2c(`${NOVELS_DIR}/tokenizer.bin`);
    const tricky = [
      "  two  spaces\tand a tab\n\nnew paragraph",
      "digits 1234567 and 3.14159",
      "héllo wörld — 日本語 🙂",
      "\uFEFFa byte order mark, e\u0301 combining, ﬁ ligature, Ａ full width",
      "",
    ];
    assertSameIds(a, b, tricky);
    assertRoundTrip(a, tricky);
    assertRoundTrip(b, tricky);
    // 1. Special-token text: transformers (and tokenizers.js) turn "<s>" in the text into
    //    BOS; run.c spells it out character by character.
    assert.deepEqual(a.encode("<s>hi"), [1, 1, ...a.encode("hi", { bos: false })]);
    assert.ok(!b.encode("<s>hi", { bos: false }).includes(1), "llama2.c never emits BOS from text");
    // 2. Decoding without BOS: the SentencePiece decoder strips the first piece's leading
    //    space; run.c's decode() does so only after BOS.
    const ids = a.encode("hello", { bos: false });
    assert.deepEqual(ids, b.encode("hello", { bos: false }));
    assert.deepEqual([a.decode(ids), b.decode(ids)], ["hello", " hello"]);
    assert.deepEqual([a.decode([1, ...ids]), b.decode([1, ...ids])], ["hello", "hello"]);
  },
});

Deno.test("tiny synthetic tokenizer: both formats give the same ids and text", () => {
  const a = new HfTokenizer(tinyTokenizerJson(), tinyConfigJson());
  const b = new Llama2cTokenizer(tinyTokenizerBin());
  const lines = ["hello", "hi hello hihi", "héllo wörld — 日本語 🙂", " lead", "", "<unk> x"];
  assertSameIds(a, b, lines.slice(0, 5));
  assertRoundTrip(a, lines.slice(0, 5));
  assertRoundTrip(b, lines);
  assert.deepEqual(a.encode("hello"), [1, 259 + 12]);
  assert.deepEqual(b.encode("hi hello", { bos: false }), [259 + 8, 259 + 12]);
  assert.deepEqual(a.encode(""), [1]);
  assert.deepEqual(b.encode(""), [1]);
  assert.deepEqual(b.encode("", { bos: false }), []);
  assert.deepEqual(a.decode([]), "");
  assert.deepEqual(b.decode([]), "");
  // Special and out-of-range ids are dropped.
  assert.deepEqual(b.decode([1, 259 + 12, 2, 0, 9999]), "hello");
  assert.deepEqual(a.decode([1, 259 + 12, 2, 0]), "hello");
});

Deno.test("HF tokenizer: BOS follows add_bos_token/add_eos_token like LlamaTokenizerFast", () => {
  const noBos = new HfTokenizer(tinyTokenizerJson(), tinyConfigJson({ add_bos_token: false }));
  assert.deepEqual(noBos.encode("hi"), [259 + 8]);
  assert.deepEqual(noBos.encode("hi", { bos: false }), [259 + 8]);
  const withEos = new HfTokenizer(tinyTokenizerJson(), tinyConfigJson({ add_eos_token: true }));
  assert.deepEqual(withEos.encode("hi"), [1, 259 + 8, 2]);
  assert.deepEqual(withEos.encode("hi", { bos: false }), [259 + 8, 2]);
  // Without a config, tokenizer.json's post-processor decides (it adds <s>).
  const bare = new HfTokenizer(tinyTokenizerJson());
  assert.deepEqual(bare.encode("hi"), [1, 259 + 8]);
  assert.deepEqual(bare.encode("hi", { bos: false }), [259 + 8]);
  // A "<s>" written in the text stays when the added BOS is dropped.
  assert.deepEqual(bare.encode("<s>hi", { bos: false }), [1, 259 + 8]);
});

Deno.test("toData / tokenizerFromData round trip", async () => {
  const tokenizers: Tokenizer[] = [
    new HfTokenizer(tinyTokenizerJson(), tinyConfigJson({ chat_template: "{{ bos_token }}" })),
    new HfTokenizer(tinyTokenizerJson()),
    new Llama2cTokenizer(tinyTokenizerBin()),
    new Llama2cTokenizer(tinyTokenizerBin(), { chatTemplate: "{{ eos_token }}" }),
  ];
  if (haveStories) tokenizers.push(hf(STORIES_HF_DIR), llama2c(STORIES_BIN));
  for (const tok of tokenizers) {
    const data = tok.toData();
    const back = await tokenizerFromData(data);
    assert.deepEqual(back.constructor, tok.constructor);
    assert.deepEqual([back.vocabSize, back.bosId, back.eosId], [
      tok.vocabSize,
      tok.bosId,
      tok.eosId,
    ]);
    const text = "hello héllo 🙂";
    assert.deepEqual(back.encode(text), tok.encode(text));
    assert.deepEqual(back.decode(tok.encode(text)), tok.decode(tok.encode(text)));
    const again = back.toData();
    assert.deepEqual(again.kind, data.kind);
    if (again.kind === "llama2c" && data.kind === "llama2c") {
      assert.deepEqual([...again.bytes], [...data.bytes]);
      assert.deepEqual(again.chatTemplate, data.chatTemplate);
    } else {
      assert.deepEqual(again, data);
    }
  }
  await assert.rejects(
    () => tokenizerFromData({ kind: "nope" } as unknown as Parameters<typeof tokenizerFromData>[0]),
    { name: "TokenizerError", message: /unknown kind/ },
  );
});

Deno.test("malformed tokenizer files give TokenizerError naming the file", () => {
  const bin = tinyTokenizerBin();
  assert.throws(
    () => new Llama2cTokenizer(bin.subarray(0, bin.length - 3), { source: "x/tokenizer.bin" }),
    { name: "TokenizerError", message: /x\/tokenizer\.bin.*past the end/ },
  );
  assert.throws(() => new Llama2cTokenizer(new Uint8Array(2)), {
    name: "TokenizerError",
    message: /too short/,
  });
  assert.throws(() => new HfTokenizer("{not json", undefined, { source: "y/tokenizer.json" }), {
    name: "TokenizerError",
    message: /y\/tokenizer\.json.*not valid JSON/,
  });
  assert.throws(() => new HfTokenizer("{}"), { name: "TokenizerError", message: /no "model"/ });
});
