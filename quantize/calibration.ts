/** Calibration sequences from a text file, BOS first: cut from each line, or from the whole text. */
import type { Tokenizer } from "../runtime/tokenizer/tokenizer.ts";
import { ParameterError } from "../runtime/errors.ts";
import { splitWindows, textWindows } from "../runtime/reference/perplexity.ts";
import { pcgHash } from "../runtime/model/sampling.ts";

export interface CalibrationOptions {
  /** Tokens per sequence, BOS included. */
  seqLen: number;
  /** Sequences to keep (0 = all); chosen at random (seeded) when there are more. */
  samples: number;
  seed: number;
  /**
   * Cut the sequences from the whole text, line breaks included, as `eval` reads a text
   * ({@link textWindows}), instead of from each line.
   */
  windows?: boolean;
}

/**
 * Each non-empty line is tokenized and split into chunks of seqLen − 1 tokens, each with BOS
 * in front (as the stories260K reference: BOS per line, 511-token chunks), or with `windows`
 * the whole text is; `samples` of the chunks are kept, in file order.
 */
export function calibrationSequences(
  tok: Tokenizer,
  text: string,
  o: CalibrationOptions,
): number[][] {
  if (!Number.isInteger(o.seqLen) || o.seqLen < 2) {
    throw new ParameterError(`calibration sequence length must be an integer ≥ 2; got ${o.seqLen}`);
  }
  const chunks = o.windows
    ? textWindows(tok, text, o.seqLen - 1)
    : text.split("\n").filter((l) => l.trim() !== "").flatMap((line) =>
      splitWindows(tok.encode(line, { bos: false }), o.seqLen - 1)
    );
  const seqs = chunks.map((c) => [tok.bosId, ...c]);
  if (seqs.length === 0) throw new ParameterError("the calibration text has no non-empty line");
  if (o.samples <= 0 || o.samples >= seqs.length) return seqs;
  // seeded selection without replacement: sort by hash, keep the first `samples`, in file order
  const keys = seqs.map((_, i) => pcgHash(pcgHash(o.seed) ^ i));
  const keep = seqs.map((_, i) => i).sort((a, b) => keys[a] - keys[b]).slice(0, o.samples);
  return keep.sort((a, b) => a - b).map((i) => seqs[i]);
}
