/**
 * `deno task generate`: load a checkpoint, generate text, stream it to stdout; a one-line summary
 * to stderr.
 *
 * @example
 *   deno task generate --model ../shared/models/stories260K/stories260K.bin --temperature 0
 */
import { loadModel } from "../model/load.ts";
import { generate } from "../model/generate.ts";
import { StreamDecoder } from "../tokenizer/stream_decoder.ts";
import {
  describeRange,
  inRange,
  SAMPLING_RANGES,
  type SamplingName,
  validateSamplingParams,
} from "../model/sampling.ts";
import { ParameterError } from "../errors.ts";
import {
  dtypeOption,
  intOption,
  kvCacheOption,
  numberOption,
  parseCli,
  runMain,
  writeStdout,
} from "./cli.ts";
import { describeWeights } from "../model/gpu_weights.ts";
import { encodeChat } from "../tokenizer/chat_template.ts";

const USAGE = `usage: deno task generate --model PATH [options]
  --model PATH         Hugging Face model directory, llama2.c .bin, or .lowbit file
  --tokenizer PATH     tokenizer.json or llama2.c tokenizer.bin (default: found beside the model)
  --prompt TEXT        prompt (default: empty, i.e. BOS only)
  --chat               wrap the prompt in the model's chat template as a user message
  --max-tokens N       tokens to generate (default 256)
  --temperature T      0 = greedy (default 0.8)
  --top-p P            nucleus sampling, 1 = off (default 0.9)
  --top-k K            0 or -1 = off (default 0)
  --min-p P            drop tokens below P × the top token's probability, 0 = off (default 0)
  --presence-penalty X    penalize tokens already generated, in [-2, 2] (default 0)
  --frequency-penalty X   penalize them per occurrence, in [-2, 2] (default 0)
  --repetition-penalty X  vLLM's, over prompt and output, in [0.01, 100]; 1 = off (default 1)
  --seed S             sampling seed (default: random)
  --dtype auto|f32|f16 weight storage on the GPU (default auto: as the checkpoint)
  --ctx N              context length (default: the model's, at most 2048)
  --kv-cache f16|f32   KV cache element type (default f16 where the adapter has shader-f16)
  --adapter NAME|N     Vulkan driver to use (\`--adapter list\` lists them; default
                       $LOWBIT_ADAPTER, else the GPU WebGPU prefers)`;

/**
 * The value of sampling option `--top-p` (for top_p, and so on), checked with the server's rule:
 * `--top-p must be a number > 0 and ≤ 1; got "1.5"`.
 */
export function samplingOption(name: SamplingName, v: string): number {
  const range = SAMPLING_RANGES[name];
  return numberOption(name.replaceAll("_", "-"), v, describeRange(range), (n) => inRange(n, range));
}

async function main(args: string[]): Promise<void> {
  const { values: a } = parseCli({
    args,
    options: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      prompt: { type: "string", default: "" },
      chat: { type: "boolean", default: false },
      "max-tokens": { type: "string", default: "256" },
      temperature: { type: "string", default: "0.8" },
      "top-p": { type: "string", default: "0.9" },
      "top-k": { type: "string", default: "0" },
      "min-p": { type: "string", default: "0" },
      "presence-penalty": { type: "string", default: "0" },
      "frequency-penalty": { type: "string", default: "0" },
      "repetition-penalty": { type: "string", default: "1" },
      seed: { type: "string" },
      dtype: { type: "string", default: "auto" },
      ctx: { type: "string" },
      "kv-cache": { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  if (!a.model) throw new ParameterError(`--model is required\n${USAGE}`);
  const num = (name: string, v: string) => numberOption(name, v, "a number", Number.isFinite);
  const sampling = {
    temperature: samplingOption("temperature", a.temperature!),
    topP: samplingOption("top_p", a["top-p"]!),
    topK: samplingOption("top_k", a["top-k"]!),
    minP: samplingOption("min_p", a["min-p"]!),
    presencePenalty: samplingOption("presence_penalty", a["presence-penalty"]!),
    frequencyPenalty: samplingOption("frequency_penalty", a["frequency-penalty"]!),
    repetitionPenalty: samplingOption("repetition_penalty", a["repetition-penalty"]!),
    seed: a.seed === undefined
      ? (Math.random() * 2 ** 32) >>> 0
      : samplingOption("seed", a.seed) >>> 0,
  };
  validateSamplingParams(sampling);
  const maxTokens = intOption("max-tokens", a["max-tokens"], 1)!;
  const dtype = dtypeOption(a.dtype!);
  const kvType = kvCacheOption(a["kv-cache"]);
  const { model, tokenizer, gpu } = await loadModel(a.model, {
    tokenizer: a.tokenizer,
    dtype,
    ctx: a.ctx === undefined ? undefined : num("ctx", a.ctx),
    kvType,
  });
  const text = a.chat
    ? tokenizer.applyChatTemplate([{ role: "user", content: a.prompt! }])
    : a.prompt!;
  const prompt = a.chat ? encodeChat(tokenizer, text) : tokenizer.encode(text, { bos: true });
  const dec = new StreamDecoder(tokenizer, prompt);
  if (!a.chat) await writeStdout(text); // echo the prompt, as llama.cpp does
  const it = generate(model, { prompt, maxTokens, sampling, stopIds: model.config.eosIds });
  let r = await it.next();
  while (!r.done) {
    await writeStdout(dec.push(r.value));
    r = await it.next();
  }
  await writeStdout(dec.flush() + "\n");
  const s = r.value;
  const decodeTps = s.generatedTokens > 1 ? (s.generatedTokens - 1) / (s.decodeMs / 1000) : 0;
  console.error(
    `prompt ${s.promptTokens} tok | prefill ${
      (s.promptTokens / (s.ttftMs / 1000)).toFixed(1)
    } tok/s | ` +
      `decode ${s.generatedTokens} tok at ${decodeTps.toFixed(1)} tok/s | ` +
      `ttft ${s.ttftMs.toFixed(1)} ms | ${s.finishReason} | ${describeWeights(model.weights)} | ` +
      `KV cache ${model.state.kvType} | ${gpu.adapterName}`,
  );
}

if (import.meta.main) runMain(() => main(Deno.args));
