/** Renders Hugging Face style Jinja chat templates with `@huggingface/jinja`. */

import { Template } from "@huggingface/jinja";
import { TokenizerError } from "../errors.ts";
import type { ChatMessage, Tokenizer } from "./tokenizer.ts";

/** What a chat template sees besides the messages. */
export interface ChatTemplateContext {
  bosToken: string;
  eosToken: string;
  /** Extra variables (for example `unk_token`, `pad_token`), passed through unchanged. */
  extra?: Record<string, unknown>;
}

const cache = new Map<string, Template>();

/**
 * Renders `template` for `messages` with the variables transformers passes: `messages`,
 * `bos_token`, `eos_token`, `add_generation_prompt` (and `raise_exception`, built in).
 * `source` names where the template came from, for error messages.
 */
export function renderChatTemplate(
  template: string,
  messages: ChatMessage[],
  context: ChatTemplateContext,
  addGenerationPrompt: boolean,
  source: string,
): string {
  let compiled = cache.get(template);
  if (compiled === undefined) {
    try {
      compiled = new Template(template);
    } catch (e) {
      throw new TokenizerError(
        `the chat template of ${source} does not parse (${(e as Error).message}); ` +
          `fix its "chat_template" or pass a tokenizer with a valid one via --tokenizer`,
        { cause: e },
      );
    }
    cache.set(template, compiled);
  }
  try {
    return compiled.render({
      ...context.extra,
      messages: messages.map((m) => ({ ...m })),
      bos_token: context.bosToken,
      eos_token: context.eosToken,
      add_generation_prompt: addGenerationPrompt,
    });
  } catch (e) {
    throw new TokenizerError(
      `the chat template of ${source} failed on these messages: ${(e as Error).message}`,
      { cause: e },
    );
  }
}

/** The error for a tokenizer without a chat template, naming the file and the fixes. */
export function noChatTemplateError(source: string, kind: "hf" | "llama2c"): TokenizerError {
  const where = kind === "hf"
    ? `no "chat_template" in its tokenizer_config.json and no chat_template.jinja beside it`
    : `llama2.c tokenizer.bin files carry none`;
  return new TokenizerError(
    `${source} has no chat template (${where}), so chat messages cannot be rendered; use a ` +
      `plain completion prompt, or pass --tokenizer a tokenizer.json whose ` +
      `tokenizer_config.json has a "chat_template"`,
  );
}

/**
 * Picks the template from a `tokenizer_config.json` `chat_template` value: a string, or a list
 * of `{name, template}` (the one named "default", else the first).
 */
export function pickChatTemplate(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (Array.isArray(value)) {
    const named = value.filter((t): t is { name: string; template: string } =>
      typeof t === "object" && t !== null && typeof t.template === "string"
    );
    return (named.find((t) => t.name === "default") ?? named[0])?.template;
  }
  return undefined;
}

/**
 * A rendered chat as ids. Like transformers, the rendered text is encoded without an added BOS
 * when the template already wrote the BOS token; otherwise with the tokenizer's usual BOS.
 */
export function encodeChat(tok: Tokenizer, text: string): number[] {
  const ids = tok.encode(text, { bos: false });
  return tok.bosId >= 0 && ids.includes(tok.bosId) ? ids : tok.encode(text, { bos: true });
}
