/**
 * `deno task eval`: perplexity of a model on a text file (windowing in runtime/reference/perplexity.ts).
 * The result goes to stdout (a line, or JSON with --json), progress to stderr.
 *
 * @example
 *   deno task eval --model ../shared/models/novels-5M --text ../shared/data/novels/heldout.txt \
 *     --max-tokens 20000            # perplexity 67.87 (windows of 255 tokens + BOS)
 *   deno task eval --model ../shared/models/stories260K-hf --per-line \
 *     --text ../shared/data/tinystories/TinyStories-valid-sample.txt   # perplexity 5.63
 */
import { loadModel } from "../model/load.ts";
import { loadTokenizer } from "../tokenizer/load_tokenizer.ts";
import { openCheckpoint } from "../checkpoint/open_checkpoint.ts";
import { ReferenceModel } from "../reference/reference.ts";
import { type LogitsModel, perplexity, referenceLogitsModel } from "../reference/perplexity.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { ParameterError } from "../errors.ts";
import {
  dtypeOption,
  kvCacheOption,
  numberOption,
  parseCli,
  readTextInput,
  runMain,
} from "./cli.ts";

const USAGE = `usage: deno task eval --model PATH --text FILE [options]
  --model PATH         Hugging Face model directory, llama2.c .bin, or .lowbit file
  --text FILE          text to score (UTF-8)
  --tokenizer PATH     tokenizer.json or llama2.c tokenizer.bin (default: found beside the model)
  --ctx N              context N: windows of N-1 tokens, each after BOS (default: the model's
                       context, at most 2048)
  --max-tokens N       score only the first N tokens of the text
  --per-line           score each non-empty line on its own (BOS first)
  --cpu                run the float64 CPU reference instead of the GPU (slow, exact)
  --dtype auto|f32|f16 weight storage on the GPU (default auto: as the checkpoint)
  --kv-cache f16|f32   KV cache element type (default f16 where the adapter has shader-f16)
  --json               print the result as JSON
  --adapter NAME|N     Vulkan driver to use (\`--adapter list\` lists them)`;

function posInt(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  return numberOption(name, v, "a positive integer", (n) => Number.isInteger(n) && n >= 1);
}

/** A progress line on stderr: tokens scored, rewritten in place on a terminal. */
function tokenProgress(label: string): (done: number, total: number) => void {
  const tty = Deno.stderr.isTerminal();
  const start = performance.now();
  let last = 0;
  return (done, total) => {
    const now = performance.now();
    if (done < total && now - last < 500) return;
    last = now;
    const rate = done / ((now - start) / 1000);
    const line = `${label}: ${done} / ${total} tokens (${(100 * done / total).toFixed(0)}%, ` +
      `${rate.toFixed(0)} tok/s)`;
    if (tty) {
      Deno.stderr.writeSync(new TextEncoder().encode(`\r${line}${done >= total ? "\n" : ""}`));
    } else if (done >= total) console.error(line);
  };
}

async function main(args: string[]): Promise<void> {
  const { values: a } = parseCli({
    args,
    options: {
      model: { type: "string" },
      text: { type: "string" },
      tokenizer: { type: "string" },
      ctx: { type: "string" },
      "max-tokens": { type: "string" },
      "per-line": { type: "boolean", default: false },
      cpu: { type: "boolean", default: false },
      dtype: { type: "string", default: "auto" },
      "kv-cache": { type: "string" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  if (!a.model) throw new ParameterError(`--model is required\n${USAGE}`);
  if (!a.text) throw new ParameterError(`--text is required\n${USAGE}`);
  const dtype = dtypeOption(a.dtype!);
  const kvType = kvCacheOption(a["kv-cache"]);
  const ctx = posInt("ctx", a.ctx), maxTokens = posInt("max-tokens", a["max-tokens"]);
  const text = await readTextInput("--text", a.text);

  let model: LogitsModel, tokenizer: Tokenizer, engine: string;
  if (a.cpu) {
    const ckpt = await openCheckpoint(a.model);
    try {
      tokenizer = await loadTokenizer(a.model, a.tokenizer);
      const ref = await ReferenceModel.load(ckpt);
      const max = Math.min(ckpt.config.seqLen, 2048);
      if (ctx !== undefined && (ctx < 2 || ctx > ckpt.config.seqLen)) {
        throw new ParameterError(`--ctx must be in [2, ${ckpt.config.seqLen}]; got ${ctx}`);
      }
      model = referenceLogitsModel(ref, ctx ?? max);
      engine = "cpu float64 reference";
    } finally {
      ckpt.close();
    }
  } else {
    const loaded = await loadModel(a.model, {
      tokenizer: a.tokenizer,
      dtype,
      ctx,
      kvType,
    });
    model = loaded.model;
    tokenizer = loaded.tokenizer;
    engine = `${loaded.gpu.adapterName}, KV cache ${loaded.model.state.kvType}`;
  }

  const t0 = performance.now();
  const r = await perplexity(model, tokenizer, text, {
    perLine: a["per-line"],
    maxTokens,
    onProgress: tokenProgress("scoring"),
  });
  const seconds = (performance.now() - t0) / 1000;
  if (a.json) {
    console.log(JSON.stringify({
      model: a.model,
      text: a.text,
      perplexity: r.perplexity,
      meanNll: r.meanNll,
      tokens: r.tokens,
      windowTokens: r.windowTokens,
      windows: r.windows,
      ctx: r.windowTokens + 1,
      perLine: a["per-line"],
      engine,
      seconds,
    }));
  } else {
    console.log(
      `perplexity ${r.perplexity.toFixed(4)} | ${r.tokens} tokens | ${r.windows} windows of ` +
        `≤ ${r.windowTokens} tokens + BOS${a["per-line"] ? " (per line)" : ""} | mean NLL ` +
        `${r.meanNll.toFixed(5)} nats/token`,
    );
    console.error(`${seconds.toFixed(1)} s on ${engine}`);
  }
}

if (import.meta.main) runMain(() => main(Deno.args));
