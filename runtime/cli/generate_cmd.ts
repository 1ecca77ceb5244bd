/**
 * `deno task generate`: load a checkpoint, generate text, stream it to stdout; a one-line summary
 * to stderr.
 *
 * @example
 *   deno task generate --model ../shared/models/stories260K/stories260K.bin --temperature 0
 */
import { parseArgs } from "node:util";
import { loadModel } from "../model/load.ts";
import { generate } from "../model/generate.ts";
import { StreamDecoder } from "../tokenizer/stream_decoder.ts";
import { validateSamplingParams } from "../model/sampling.ts";
import { ParameterError } from "../errors.ts";
import { dtypeOption, numberOption, runMain } from "./cli.ts";
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
  --top-k K            0 = off (default 0)
  --seed S             sampling seed (default: random)
  --dtype auto|f32|f16 weight storage on the GPU (default auto: as the checkpoint)
  --ctx N              context length (default: the model's, at most 2048)`;

async function main(args: string[]): Promise<void> {
  const { values: a } = parseArgs({
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
      seed: { type: "string" },
      dtype: { type: "string", default: "auto" },
      ctx: { type: "string" },
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
    temperature: num("temperature", a.temperature!),
    topP: num("top-p", a["top-p"]!),
    topK: num("top-k", a["top-k"]!),
    seed: a.seed === undefined ? (Math.random() * 2 ** 32) >>> 0 : num("seed", a.seed) >>> 0,
  };
  validateSamplingParams(sampling);
  const maxTokens = num("max-tokens", a["max-tokens"]!);
  const dtype = dtypeOption(a.dtype!);
  const { model, tokenizer, gpu } = await loadModel(a.model, {
    tokenizer: a.tokenizer,
    dtype,
    ctx: a.ctx === undefined ? undefined : num("ctx", a.ctx),
  });
  const text = a.chat
    ? tokenizer.applyChatTemplate([{ role: "user", content: a.prompt! }])
    : a.prompt!;
  const prompt = a.chat ? encodeChat(tokenizer, text) : tokenizer.encode(text, { bos: true });
  const dec = new StreamDecoder(tokenizer, prompt);
  const out = new TextEncoder();
  if (!a.chat) await Deno.stdout.write(out.encode(text)); // echo the prompt, as llama.cpp does
  const it = generate(model, { prompt, maxTokens, sampling, stopIds: model.config.eosIds });
  let r = await it.next();
  while (!r.done) {
    await Deno.stdout.write(out.encode(dec.push(r.value)));
    r = await it.next();
  }
  await Deno.stdout.write(out.encode(dec.flush() + "\n"));
  const s = r.value;
  const decodeTps = s.generatedTokens > 1 ? (s.generatedTokens - 1) / (s.decodeMs / 1000) : 0;
  console.error(
    `prompt ${s.promptTokens} tok | prefill ${
      (s.promptTokens / (s.ttftMs / 1000)).toFixed(1)
    } tok/s | ` +
      `decode ${s.generatedTokens} tok at ${decodeTps.toFixed(1)} tok/s | ` +
      `ttft ${s.ttftMs.toFixed(1)} ms | ${s.finishReason} | ${describeWeights(model.weights)} | ` +
      gpu.adapterName,
  );
}

if (import.meta.main) runMain(() => main(Deno.args));
