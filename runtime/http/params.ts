/**
 * Request validation for the OpenAI-style endpoints. Every check names the field at fault, so a
 * client gets a 400 with `param` set; null counts as absent, as in OpenAI's API. Parameters
 * OpenAI or vLLM define that this server does not implement are a 400 naming them when they ask
 * for anything but their default; fields neither defines are ignored, as vLLM does.
 */
import type { ChatMessage } from "../tokenizer/tokenizer.ts";
import type { SamplingParams } from "../model/model.ts";
import {
  describeRange,
  inRange,
  LOGIT_BIAS_RANGE,
  MAX_LOGIT_BIAS,
  type NumberRange,
  SAMPLING_RANGES,
  type SamplingName,
} from "../model/sampling.ts";
import { ApiError, badParam } from "./errors.ts";

type Body = Record<string, unknown>;

/** Most stop strings per request (OpenAI's limit). */
export const MAX_STOP = 4;

/** The parameters shared by completions and chat completions. */
export interface GenParams {
  /** Absent: the endpoint's default. */
  maxTokens?: number;
  sampling: SamplingParams;
  stop: string[];
  stream: boolean;
  includeUsage: boolean;
}

function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "string") return `the string ${JSON.stringify(v.slice(0, 40))}`;
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  return typeof v === "object" ? "an object" : `a ${typeof v}`;
}

const present = (body: Body, name: string) => body[name] !== undefined && body[name] !== null;

/** An optional number in [min, max] (integer when `integer`); `gtMin` makes min exclusive. */
export function optNumber(body: Body, name: string, range: NumberRange = {}): number | undefined {
  if (!present(body, name)) return undefined;
  const v = body[name];
  const rule = `${name} must be ${describeRange(range)}`;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw badParam(name, `${rule}; got ${describe(v)}`, "invalid_type");
  }
  if (!inRange(v, range)) throw badParam(name, `${rule}; got ${v}`);
  return v;
}

/** An optional sampling parameter, in its range (shared with the generate CLI). */
const samplingParam = (body: Body, name: SamplingName) =>
  optNumber(body, name, SAMPLING_RANGES[name]);

export function optBool(body: Body, name: string): boolean | undefined {
  if (!present(body, name)) return undefined;
  const v = body[name];
  if (typeof v !== "boolean") {
    throw badParam(name, `${name} must be a boolean; got ${describe(v)}`, "invalid_type");
  }
  return v;
}

/** `model` may be omitted; otherwise it must name the served model (404 model_not_found). */
export function checkModel(body: Body, modelId: string): void {
  if (!present(body, "model")) return;
  const v = body.model;
  if (typeof v !== "string") {
    throw badParam("model", `model must be a string; got ${describe(v)}`, "invalid_type");
  }
  if (v !== modelId) {
    throw new ApiError(
      404,
      `The model \`${v.slice(0, 200)}\` does not exist; this server serves "${modelId}"`,
      { param: "model", code: "model_not_found" },
    );
  }
}

const is = (...values: unknown[]) => (v: unknown) => values.includes(v);
const never = () => false;
const emptyArray = (v: unknown) => Array.isArray(v) && v.length === 0;
const emptyObject = (v: unknown) =>
  typeof v === "object" && v !== null && !Array.isArray(v) && Object.keys(v).length === 0;

/**
 * The parameters OpenAI or vLLM define that this server does not implement, each with the test
 * of the values that ask for nothing (the default; null counts as absent). Any other value is a
 * 400 naming the parameter.
 */
export const UNSUPPORTED: Record<string, (v: unknown) => boolean> = {
  // OpenAI
  echo: is(false),
  best_of: is(1),
  logprobs: is(false, 0),
  top_logprobs: is(0),
  suffix: is(""),
  tools: emptyArray,
  tool_choice: is("none", "auto"),
  functions: emptyArray,
  function_call: is("none", "auto"),
  parallel_tool_calls: is(true),
  response_format: (v) => typeof v === "object" && v !== null && (v as Body).type === "text",
  audio: never,
  modalities: (v) => Array.isArray(v) && v.length === 1 && v[0] === "text",
  prediction: never,
  reasoning_effort: never,
  web_search_options: never,
  store: is(false),
  // vLLM
  use_beam_search: is(false),
  length_penalty: is(1),
  prompt_logprobs: never,
  guided_json: never,
  guided_regex: never,
  guided_choice: never,
  guided_grammar: never,
  structured_outputs: never,
  logits_processors: emptyArray,
  allowed_token_ids: never,
  bad_words: emptyArray,
  stop_token_ids: emptyArray,
  ignore_eos: is(false),
  min_tokens: is(0),
  include_stop_str_in_output: is(false),
  truncate_prompt_tokens: never,
  return_tokens_as_token_ids: is(false),
  add_generation_prompt: is(true),
  continue_final_message: is(false),
  chat_template: never,
  chat_template_kwargs: emptyObject,
  documents: never,
};

/** Rejects options this server does not implement when they ask for more than the default. */
function unsupported(body: Body): void {
  for (const [name, isDefault] of Object.entries(UNSUPPORTED)) {
    if (present(body, name) && !isDefault(body[name])) {
      throw badParam(name, `${name} is not supported by this server; leave it out`, "unsupported");
    }
  }
}

/**
 * `logit_bias`: an object from token ids (decimal strings) to biases in [−100, 100], at most
 * MAX_LOGIT_BIAS entries, as OpenAI's. Undefined when absent or empty.
 */
function parseLogitBias(body: Body, vocabSize: number): Map<number, number> | undefined {
  if (!present(body, "logit_bias")) return undefined;
  const v = body.logit_bias;
  const range = describeRange(LOGIT_BIAS_RANGE);
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw badParam(
      "logit_bias",
      `logit_bias must be an object mapping token ids to biases (${range}); got ${describe(v)}`,
      "invalid_type",
    );
  }
  const entries = Object.entries(v as Body);
  if (entries.length > MAX_LOGIT_BIAS) {
    throw badParam(
      "logit_bias",
      `logit_bias holds at most ${MAX_LOGIT_BIAS} entries; got ${entries.length}`,
    );
  }
  const bias = new Map<number, number>();
  for (const [key, b] of entries) {
    const at = `logit_bias.${key.slice(0, 40)}`;
    const id = /^\d{1,10}$/.test(key) ? Number(key) : NaN;
    if (!(id < vocabSize)) {
      throw badParam(
        at,
        `logit_bias keys must be token ids in [0, ${vocabSize}); got ${describe(key)}`,
        "invalid_token",
      );
    }
    if (bias.has(id)) throw badParam(at, `logit_bias names token ${id} twice`);
    if (typeof b !== "number" || !inRange(b, LOGIT_BIAS_RANGE)) {
      const code = typeof b === "number" ? "invalid_value" : "invalid_type";
      throw badParam(at, `${at} must be ${range}; got ${describe(b)}`, code);
    }
    bias.set(id, b);
  }
  return bias.size ? bias : undefined;
}

/**
 * Sampling, length, stop and streaming parameters; `maxTokensLimit` caps max_tokens; logit_bias
 * keys are token ids below `vocabSize`.
 */
export function parseGenParams(body: Body, maxTokensLimit: number, vocabSize: number): GenParams {
  unsupported(body);
  const n = optNumber(body, "n", { integer: true });
  if (n !== undefined && n !== 1) {
    throw badParam("n", `n must be 1 (this server returns one choice); got ${n}`, "unsupported");
  }
  const maxName = present(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  const maxTokens = optNumber(body, maxName, { min: 1, integer: true });
  if (maxTokens !== undefined && maxTokens > maxTokensLimit) {
    throw badParam(
      maxName,
      `${maxName} is ${maxTokens}; this server allows at most ${maxTokensLimit} (--max-tokens-limit)`,
      "max_tokens_exceeded",
    );
  }
  const sampling: SamplingParams = {
    temperature: samplingParam(body, "temperature") ?? 1,
    topP: samplingParam(body, "top_p") ?? 1,
    topK: samplingParam(body, "top_k") ?? 0,
    seed: (samplingParam(body, "seed") ?? Math.random() * 2 ** 32) >>> 0,
    // absent: off
    minP: samplingParam(body, "min_p"),
    presencePenalty: samplingParam(body, "presence_penalty"),
    frequencyPenalty: samplingParam(body, "frequency_penalty"),
    repetitionPenalty: samplingParam(body, "repetition_penalty"),
    logitBias: parseLogitBias(body, vocabSize),
  };
  const stream = optBool(body, "stream") ?? false;
  let includeUsage = false;
  if (present(body, "stream_options")) {
    const so = body.stream_options;
    if (!stream) {
      throw badParam("stream_options", "stream_options is only allowed when stream is true");
    }
    if (typeof so !== "object" || so === null || Array.isArray(so)) {
      throw badParam(
        "stream_options",
        `stream_options must be an object; got ${describe(so)}`,
        "invalid_type",
      );
    }
    const v = (so as Body).include_usage;
    if (v !== undefined && v !== null && typeof v !== "boolean") {
      throw badParam(
        "stream_options.include_usage",
        `stream_options.include_usage must be a boolean; got ${describe(v)}`,
        "invalid_type",
      );
    }
    includeUsage = v === true;
  }
  return { maxTokens, sampling, stop: parseStop(body), stream, includeUsage };
}

/** `stop`: a string or an array of up to 4 non-empty strings. */
function parseStop(body: Body): string[] {
  if (!present(body, "stop")) return [];
  const v = body.stop;
  const list = typeof v === "string" ? [v] : v;
  const rule = `stop must be a string or an array of at most ${MAX_STOP} non-empty strings`;
  if (!Array.isArray(list)) throw badParam("stop", `${rule}; got ${describe(v)}`, "invalid_type");
  if (list.length > MAX_STOP) throw badParam("stop", `${rule}; got ${list.length}`);
  list.forEach((s, i) => {
    if (typeof s !== "string" || s.length === 0) {
      throw badParam(`stop[${i}]`, `${rule}; stop[${i}] is ${describe(s)}`, "invalid_type");
    }
  });
  return list as string[];
}

/**
 * The completions `prompt`: a string, an array of one string, or an array of token ids (a
 * token-id prompt is used as is, with no BOS added).
 */
export function parsePrompt(body: Body, vocabSize: number): string | number[] {
  const v = body.prompt;
  if (typeof v === "string") return v;
  if (Array.isArray(v) && v.length === 1 && typeof v[0] === "string") return v[0];
  const rule = "prompt must be a string or an array of token ids";
  if (!Array.isArray(v) || v.length === 0) {
    const got = v === undefined ? "nothing" : describe(v);
    throw badParam("prompt", `${rule}; got ${got}`, v === undefined ? "missing" : "invalid_type");
  }
  if (v.every((s) => typeof s === "string")) {
    throw badParam(
      "prompt",
      `only one prompt per request is supported; got ${v.length}`,
      "unsupported",
    );
  }
  v.forEach((id, i) => checkTokenId(id, i, "prompt", vocabSize));
  return v as number[];
}

/** Throws unless `id` is a token id of the vocabulary. */
export function checkTokenId(id: unknown, i: number, param: string, vocabSize: number): void {
  if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id >= vocabSize) {
    throw badParam(
      `${param}[${i}]`,
      `${param}[${i}] must be a token id in [0, ${vocabSize}); got ${describe(id)}`,
      "invalid_token",
    );
  }
}

const ROLES = new Set(["system", "developer", "user", "assistant", "tool"]);

/**
 * Chat `messages`: a non-empty array of {role, content} (content: a string or text parts), at
 * most `maxMessages` of them.
 */
export function parseMessages(body: Body, maxMessages: number): ChatMessage[] {
  const v = body.messages;
  if (Array.isArray(v) && v.length > maxMessages) {
    throw badParam(
      "messages",
      `messages has ${v.length} messages; at most ${maxMessages} fit the context`,
      "context_length_exceeded",
    );
  }
  if (!Array.isArray(v) || v.length === 0) {
    const got = v === undefined ? "nothing" : describe(v);
    throw badParam(
      "messages",
      `messages must be a non-empty array of {role, content}; got ${got}`,
      v === undefined ? "missing" : "invalid_type",
    );
  }
  return v.map((m, i) => {
    const at = `messages[${i}]`;
    if (typeof m !== "object" || m === null || Array.isArray(m)) {
      throw badParam(
        at,
        `${at} must be an object {role, content}; got ${describe(m)}`,
        "invalid_type",
      );
    }
    const { role, content } = m as Body;
    if (typeof role !== "string" || !ROLES.has(role)) {
      throw badParam(
        `${at}.role`,
        `${at}.role must be one of ${[...ROLES].join(", ")}; got ${describe(role)}`,
      );
    }
    return { role, content: messageText(content, `${at}.content`) };
  });
}

/** A message's content as text: a string, null (empty) or an array of `{type: "text", text}`. */
function messageText(content: unknown, at: string): string {
  if (typeof content === "string") return content;
  if (content === null || content === undefined) return "";
  const rule = `${at} must be a string or an array of {type: "text", text} parts`;
  if (!Array.isArray(content)) {
    throw badParam(at, `${rule}; got ${describe(content)}`, "invalid_type");
  }
  return content.map((p, j) => {
    const part = p as Body;
    if (
      typeof p !== "object" || p === null || part.type !== "text" || typeof part.text !== "string"
    ) {
      throw badParam(`${at}[${j}]`, `${rule}; ${at}[${j}] is not a text part`, "invalid_type");
    }
    return part.text;
  }).join("");
}
