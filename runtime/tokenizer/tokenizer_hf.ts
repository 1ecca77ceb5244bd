/**
 * Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) tokenizers through
 * `@huggingface/tokenizers`, with ids matching transformers' fast tokenizers.
 */

import {
  ByteFallbackDecoder,
  SequenceDecoder,
  Tokenizer as HfLibTokenizer,
} from "@huggingface/tokenizers";
import { noChatTemplateError, pickChatTemplate, renderChatTemplate } from "./chat_template.ts";
import { TokenizerError } from "../errors.ts";
import type { ChatMessage, Tokenizer, TokenizerData } from "./tokenizer.ts";

/** Options for {@link HfTokenizer}. */
export interface HfOptions {
  /** Where the JSON came from (a path), used in error messages. */
  source?: string;
}

type Config = Record<string, unknown>;

/** A special token's text from a tokenizer_config.json value (a string or `{content}`). */
function tokenText(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (typeof value === "object" && value !== null && "content" in value) {
    const content = (value as { content: unknown }).content;
    if (typeof content === "string") return content;
  }
  return undefined;
}

/**
 * tokenizers.js's ByteFallback decoder uses a TextDecoder that drops U+FEFF at the start of
 * every run of byte tokens; the Rust library keeps it. Swap in one that keeps it.
 */
function keepByteOrderMarks(decoder: unknown): void {
  if (decoder instanceof ByteFallbackDecoder) {
    decoder.text_decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  } else if (decoder instanceof SequenceDecoder) {
    decoder.decoders.forEach(keepByteOrderMarks);
  }
}

/** A tokenizer built from a Hugging Face `tokenizer.json` and optional `tokenizer_config.json`. */
export class HfTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number;
  readonly eosId: number;
  readonly #lib: HfLibTokenizer;
  readonly #json: string;
  readonly #configJson?: string;
  readonly #config: Config;
  readonly #source: string;
  readonly #cleanUp: boolean;
  /** Set for Llama tokenizer classes: transformers rebuilds their post-processor from these. */
  readonly #llamaSpecials?: { bos: boolean; eos: boolean };
  /** Whether encoding with special tokens puts a BOS first (what `bos: false` removes). */
  readonly #addsBos: boolean;

  /**
   * Builds the tokenizer from the text of `tokenizer.json` and, optionally, of
   * `tokenizer_config.json`; throws TokenizerError when either is malformed or unsupported.
   */
  constructor(tokenizerJson: string, tokenizerConfigJson?: string, options: HfOptions = {}) {
    this.#source = options.source ?? "the tokenizer.json";
    this.#json = tokenizerJson;
    this.#configJson = tokenizerConfigJson;
    const parse = (text: string, what: string): Config => {
      try {
        const value = JSON.parse(text);
        if (typeof value === "object" && value !== null && !Array.isArray(value)) return value;
      } catch (e) {
        throw new TokenizerError(
          `${what} of ${this.#source} is not valid JSON (${(e as Error).message}); ` +
            `download it again or pass another tokenizer with --tokenizer`,
          { cause: e },
        );
      }
      throw new TokenizerError(`${what} of ${this.#source} is not a JSON object`);
    };
    const json = parse(tokenizerJson, "tokenizer.json");
    if (typeof json.model !== "object" || json.model === null) {
      throw new TokenizerError(
        `${this.#source} has no "model" section, so it is not a Hugging Face tokenizer.json; ` +
          `pass the model's tokenizer.json (or a llama2.c tokenizer.bin) with --tokenizer`,
      );
    }
    this.#config = tokenizerConfigJson === undefined
      ? {}
      : parse(tokenizerConfigJson, "tokenizer_config.json");
    try {
      this.#lib = new HfLibTokenizer(json, this.#config);
    } catch (e) {
      throw new TokenizerError(
        `@huggingface/tokenizers cannot build ${this.#source}: ${(e as Error).message}; ` +
          `pass a supported tokenizer with --tokenizer`,
        { cause: e },
      );
    }
    keepByteOrderMarks(this.#lib.decoder);
    // transformers' own default is false for Llama-style tokenizers; tokenizers.js defaults to
    // true, which would turn "a ." into "a." and break decode(encode(x)) == x.
    this.#cleanUp = this.#config.clean_up_tokenization_spaces === true;

    let maxId = -1;
    for (const id of this.#lib.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;
    this.bosId = this.#specialId(this.#config.bos_token, ["<s>", "<|begin_of_text|>", "<bos>"]);
    this.eosId = this.#specialId(this.#config.eos_token, [
      "</s>",
      "<|end_of_text|>",
      "<|endoftext|>",
      "<eos>",
    ]);
    const cls = this.#config.tokenizer_class;
    if (typeof cls === "string" && /^(Code)?LlamaTokenizer(Fast)?$/.test(cls)) {
      this.#llamaSpecials = {
        bos: this.#config.add_bos_token !== false,
        eos: this.#config.add_eos_token === true,
      };
    }
    this.#addsBos = this.bosId >= 0 && this.#encodeSpecial("")[0] === this.bosId;
  }

  #specialId(configured: unknown, fallbacks: string[]): number {
    const text = tokenText(configured);
    for (const candidate of text === undefined ? fallbacks : [text]) {
      const id = this.#lib.token_to_id(candidate);
      if (id !== undefined) return id;
    }
    return -1;
  }

  /**
   * Text to ids as transformers' fast tokenizer with `add_special_tokens=True` gives them
   * (special-token text such as "<s>" in `text` becomes that token, as there). For Llama
   * tokenizer classes the BOS/EOS come from `add_bos_token`/`add_eos_token`, as transformers
   * rebuilds the post-processor from them; otherwise from tokenizer.json's post-processor.
   * `bos: false` drops the BOS so added (a "<s>" written in the text stays); `bos: true`
   * adds none where transformers adds none (tokenizers without a BOS).
   */
  encode(text: string, options: { bos?: boolean } = {}): number[] {
    const ids = this.#encodeSpecial(text);
    if (options.bos === false && this.#addsBos) ids.shift();
    return ids;
  }

  /** Ids with special tokens added, as transformers' `add_special_tokens=True`. */
  #encodeSpecial(text: string): number[] {
    const llama = this.#llamaSpecials;
    if (llama === undefined || this.bosId < 0) {
      return this.#lib.encode(text, { add_special_tokens: true }).ids;
    }
    const ids = this.#lib.encode(text, { add_special_tokens: false }).ids;
    if (llama.bos) ids.unshift(this.bosId);
    if (llama.eos && this.eosId >= 0) ids.push(this.eosId);
    return ids;
  }

  /**
   * Ids to text with `skip_special_tokens`. As in transformers, the decoder strips the leading
   * space of the first piece (SentencePiece convention) whether or not a BOS precedes it.
   */
  decode(ids: number[]): string {
    if (ids.length === 0) return "";
    return this.#lib.decode(ids, {
      skip_special_tokens: true,
      clean_up_tokenization_spaces: this.#cleanUp,
    });
  }

  /** Renders tokenizer_config.json's `chat_template`; throws TokenizerError when it has none. */
  applyChatTemplate(
    messages: ChatMessage[],
    options: { addGenerationPrompt?: boolean } = {},
  ): string {
    const template = pickChatTemplate(this.#config.chat_template);
    if (template === undefined) throw noChatTemplateError(this.#source, "hf");
    const extra: Record<string, unknown> = {};
    for (const key of ["unk_token", "pad_token", "sep_token", "cls_token", "mask_token"]) {
      const text = tokenText(this.#config[key]);
      if (text !== undefined) extra[key] = text;
    }
    if (Array.isArray(this.#config.additional_special_tokens)) {
      extra.additional_special_tokens = this.#config.additional_special_tokens.map(tokenText);
    }
    return renderChatTemplate(
      template,
      messages,
      {
        bosToken: tokenText(this.#config.bos_token) ?? "",
        eosToken: tokenText(this.#config.eos_token) ?? "",
        extra,
      },
      options.addGenerationPrompt ?? false,
      this.#source,
    );
  }

  /** The JSON texts, for embedding in a model file. */
  toData(): TokenizerData {
    return this.#configJson === undefined
      ? { kind: "hf", tokenizerJson: this.#json }
      : { kind: "hf", tokenizerJson: this.#json, tokenizerConfigJson: this.#configJson };
  }
}
