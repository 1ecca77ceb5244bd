/**
 * Request validation for the OpenAI-style endpoints. Every check names the field at fault, so a
 * client gets a 400 with `param` set; null counts as absent, as in OpenAI's API.
 */
import type { ChatMessage } from "../tokenizer/tokenizer.ts";
import type { SamplingParams } from "../model/model.ts";
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
export function optNumber(
  body: Body,
  name: string,
  range: { min?: number; max?: number; integer?: boolean; gtMin?: boolean } = {},
): number | undefined {
  if (!present(body, name)) return undefined;
  const v = body[name];
  const { min = -Infinity, max = Infinity, integer = false, gtMin = false } = range;
  const kind = integer ? "an integer" : "a number";
  const lo = gtMin ? `> ${min}` : `≥ ${min}`;
  const bounds = [min > -Infinity ? lo : "", max < Infinity ? `≤ ${max}` : ""].filter(Boolean);
  const rule = `${name} must be ${kind}${bounds.length ? " " + bounds.join(" and ") : ""}`;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw badParam(name, `${rule}; got ${describe(v)}`, "invalid_type");
  }
  if ((integer && !Number.isSafeInteger(v)) || v < min || (gtMin && v === min) || v > max) {
    throw badParam(name, `${rule}; got ${v}`);
  }
  return v;
}

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

const isTextFormat = (v: unknown) =>
  typeof v === "object" && v !== null && (v as Body).type === "text";

/** Rejects options this server does not implement when they ask for more than the default. */
function unsupported(body: Body): void {
  const zeroOr = (name: string) => present(body, name) && body[name] !== 0;
  const checks: [string, boolean][] = [
    ["echo", present(body, "echo") && body.echo !== false],
    ["best_of", present(body, "best_of") && body.best_of !== 1],
    ["logprobs", present(body, "logprobs") && body.logprobs !== false && body.logprobs !== 0],
    ["top_logprobs", zeroOr("top_logprobs")],
    ["suffix", present(body, "suffix") && body.suffix !== ""],
    ["presence_penalty", zeroOr("presence_penalty")],
    ["frequency_penalty", zeroOr("frequency_penalty")],
    ["tools", Array.isArray(body.tools) ? body.tools.length > 0 : present(body, "tools")],
    ["response_format", present(body, "response_format") && !isTextFormat(body.response_format)],
  ];
  for (const [name, bad] of checks) {
    if (bad) {
      throw badParam(name, `${name} is not supported by this server; leave it out`, "unsupported");
    }
  }
}

/** Sampling, length, stop and streaming parameters; `maxTokensLimit` caps max_tokens. */
export function parseGenParams(body: Body, maxTokensLimit: number): GenParams {
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
    temperature: optNumber(body, "temperature", { min: 0, max: 2 }) ?? 1,
    topP: optNumber(body, "top_p", { min: 0, max: 1, gtMin: true }) ?? 1,
    topK: optNumber(body, "top_k", { min: 0, integer: true }) ?? 0,
    seed: (optNumber(body, "seed", { integer: true }) ?? Math.random() * 2 ** 32) >>> 0,
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
