/**
 * `deno task bench blocks --model FLOAT --file Q.lowbit [--file ...] --text FILE`: where a
 * quantized model's perplexity increase comes from. For each file and each decoder block b,
 * the perplexity of the float model with block b's tensors (linear layers and norms) taken from
 * the file and everything else float, on the float64 CPU reference; the per-block increases
 * are then compared with the whole file's. Recorded in bench/RESULTS.md.
 *
 * @example
 *   deno task bench blocks --model ../shared/models/novels-5M --file gptq.lowbit \
 *     --file dq.lowbit --text ../shared/data/novels/heldout.txt
 */
import { parseArgs } from "node:util";
import { expectedShapes, tensorNames as T } from "../runtime/checkpoint/config.ts";
import type { Checkpoint } from "../runtime/checkpoint/checkpoint.ts";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import { perplexity, referenceLogitsModel } from "../runtime/reference/perplexity.ts";
import { ParameterError } from "../runtime/errors.ts";
import { numberOption } from "../runtime/cli/cli.ts";
import { recordResults, table, today } from "./results.ts";

/** Perplexity of `base` with the tensors `fromQ` accepts read from `q` instead. */
async function splicedPerplexity(
  base: Checkpoint,
  q: Checkpoint,
  fromQ: (name: string) => boolean,
  score: (ref: ReferenceModel) => Promise<number>,
): Promise<number> {
  const weights = new Map<string, Float32Array>();
  for (const name of expectedShapes(base.config).keys()) {
    weights.set(name, await (fromQ(name) ? q : base).read(name));
  }
  return score(new ReferenceModel(base.config, weights));
}

export async function benchBlocks(args: string[]): Promise<void> {
  const { values: a } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      file: { type: "string", multiple: true },
      text: { type: "string" },
      ctx: { type: "string", default: "256" },
      "max-tokens": { type: "string", default: "20000" },
    },
  });
  if (!a.model || !a.file?.length || !a.text) {
    throw new ParameterError(
      "usage: deno task bench blocks --model FLOAT --file Q.lowbit [--file ...] --text FILE " +
        "[--ctx 256] [--max-tokens 20000]",
    );
  }
  const posInt = (name: string, v: string) =>
    numberOption(name, v, "a positive integer", (n) => Number.isInteger(n) && n >= 1);
  const ctx = posInt("ctx", a.ctx!), maxTokens = posInt("max-tokens", a["max-tokens"]!);
  const text = await Deno.readTextFile(a.text);
  const base = await openCheckpoint(a.model);
  const tokenizer = await loadTokenizer(a.model);
  const L = base.config.nLayers;
  const score = async (ref: ReferenceModel) =>
    (await perplexity(referenceLogitsModel(ref, ctx), tokenizer, text, { maxTokens })).perplexity;
  const fp = await score(await ReferenceModel.load(base));
  console.error(`float: ${fp.toFixed(3)}`);
  const rows: (string | number)[][] = [];
  for (const path of a.file) {
    const q = await openCheckpoint(path);
    const inc: number[] = [];
    for (let b = 0; b < L; b++) {
      const prefix = T.attnNorm(b).slice(0, T.attnNorm(b).lastIndexOf("input_layernorm"));
      const p = await splicedPerplexity(base, q, (n) => n.startsWith(prefix), score);
      inc.push(p - fp);
      console.error(`${path} block ${b}: ${p.toFixed(3)} (+${(p - fp).toFixed(3)})`);
    }
    const all = await splicedPerplexity(base, q, (n) => n.startsWith("model.layers."), score);
    q.close();
    const sum = inc.reduce((x, y) => x + y, 0);
    rows.push([
      path.split("/").pop()!,
      ...inc.map((d) => `+${d.toFixed(2)}`),
      `+${sum.toFixed(2)}`,
      `+${(all - fp).toFixed(2)}`,
    ]);
  }
  base.close();
  const body = `${today()}, ${a.model.split("/").pop()} on the first ${maxTokens} tokens of ` +
    `${a.text.split("/").pop()} (windows of ${ctx}, float64 CPU reference; float ` +
    `${fp.toFixed(2)}). Perplexity increase with one block from the file, the rest float:\n\n` +
    table([
      "file",
      ...Array.from({ length: L }, (_, b) => `block ${b}`),
      "sum",
      "all blocks",
    ], rows);
  console.log(body);
  await recordResults(`quality per block ${a.model.split("/").pop()}`, "cpu reference", body);
}
