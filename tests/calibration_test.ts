/** Calibration sequences: cut from each line, or from the whole text as `eval` reads it. */
import assert from "node:assert/strict";
import { calibrationSequences } from "../quantize/calibration.ts";
import type { Tokenizer } from "../runtime/tokenizer/tokenizer.ts";

/** One token per character (its code point, so "\n" is 10); BOS is 1. */
const chars = {
  bosId: 1,
  encode: (text: string) => [...text].map((c) => c.codePointAt(0)!),
} as unknown as Tokenizer;
const ids = (s: string) => [1, ...[...s].map((c) => c.codePointAt(0)!)];
const TEXT = "abcde\nfg\n\nhij";

Deno.test("calibration sequences: chunks of each line, BOS first, no line breaks", () => {
  const seqs = calibrationSequences(chars, TEXT, { seqLen: 4, samples: 0, seed: 0 });
  assert.deepEqual(seqs, ["abc", "de", "fg", "hij"].map(ids));
});

Deno.test("calibration sequences with windows: chunks of the whole text, line breaks included", () => {
  const seqs = calibrationSequences(chars, TEXT, { seqLen: 4, samples: 0, seed: 0, windows: true });
  assert.deepEqual(seqs, ["abc", "de\n", "fg\n", "\nhi", "j"].map(ids));
});

Deno.test("calibration sequences: a seeded sample, kept in file order", () => {
  const all = calibrationSequences(chars, TEXT, { seqLen: 4, samples: 0, seed: 0, windows: true });
  const pick = (seed: number) =>
    calibrationSequences(chars, TEXT, { seqLen: 4, samples: 3, seed, windows: true });
  const a = pick(7);
  assert.equal(a.length, 3);
  const at = a.map((s) => all.findIndex((t) => t.join() === s.join()));
  assert.ok(at.every((i, k) => i >= 0 && (k === 0 || i > at[k - 1])), `order ${at}`);
  assert.deepEqual(pick(7), a);
  assert.throws(
    () => calibrationSequences(chars, "\n \n", { seqLen: 4, samples: 0, seed: 0 }),
    /no non-empty line/,
  );
});
