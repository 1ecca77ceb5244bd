/** The tokenizer interface the engine, the CLIs and the server use. */

export interface ChatMessage {
  role: string;
  content: string;
}

export interface Tokenizer {
  vocabSize: number;
  bosId: number;
  eosId: number;
  /** Text to ids. `bos` prepends the BOS id (default true). */
  encode(text: string, options?: { bos?: boolean }): number[];
  /** Ids to text, dropping special tokens. */
  decode(ids: number[]): string;
  /** Renders a chat with the model's template; throws when the model has none. */
  applyChatTemplate(messages: ChatMessage[], options?: { addGenerationPrompt?: boolean }): string;
  /** Serializable form, stored inside .lowbit files so one file serves. */
  toData(): TokenizerData;
}

export type TokenizerData =
  | { kind: "llama2c"; bytes: Uint8Array; chatTemplate?: string }
  | { kind: "hf"; tokenizerJson: string; tokenizerConfigJson?: string };
