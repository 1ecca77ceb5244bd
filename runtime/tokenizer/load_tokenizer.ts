/** Finds and loads the tokenizer of a model, or rebuilds one embedded in a model file. */

import { dirname, extname, join } from "node:path";
import { TokenizerError } from "../errors.ts";
import { type LowbitCheckpoint, openLowbit } from "../format/lowbit_reader.ts";
import type { Tokenizer, TokenizerData } from "./tokenizer.ts";
import { HfTokenizer } from "./tokenizer_hf.ts";
import { Llama2cTokenizer } from "./tokenizer_llama2c.ts";

const USAGE = "pass one with --tokenizer PATH (a tokenizer.json or a llama2.c tokenizer.bin)";

async function statOrNull(path: string): Promise<Deno.FileInfo | null> {
  try {
    return await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw new TokenizerError(`cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

async function isFile(path: string): Promise<boolean> {
  return (await statOrNull(path))?.isFile ?? false;
}

/**
 * Loads a Hugging Face tokenizer.json with the tokenizer_config.json beside it (when present);
 * a chat_template.jinja beside it supplies the chat template when the config has none.
 */
async function loadHf(jsonPath: string): Promise<HfTokenizer> {
  const dir = dirname(jsonPath);
  const configPath = join(dir, "tokenizer_config.json");
  const templatePath = join(dir, "chat_template.jinja");
  let configJson = (await isFile(configPath)) ? await Deno.readTextFile(configPath) : undefined;
  if (await isFile(templatePath)) {
    let config: unknown = {};
    try {
      config = configJson === undefined ? {} : JSON.parse(configJson);
    } catch {
      // Left as is: HfTokenizer reports the bad JSON with its path.
    }
    if (isRecord(config) && config.chat_template === undefined) {
      config.chat_template = await Deno.readTextFile(templatePath);
      configJson = JSON.stringify(config);
    }
  }
  const source = configJson === undefined ? jsonPath : `${jsonPath} (with ${configPath})`;
  return new HfTokenizer(await Deno.readTextFile(jsonPath), configJson, { source: source });
}

async function loadLlama2c(binPath: string): Promise<Llama2cTokenizer> {
  return new Llama2cTokenizer(await Deno.readFile(binPath), { source: binPath });
}

/** llama2.c tokenizer files in `dir`: tokenizer.bin, tok512.bin, then other tok*.bin. */
async function llama2cCandidates(dir: string, exclude: string): Promise<string[]> {
  const named = ["tokenizer.bin", "tok512.bin"];
  const others: string[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      if (/^tok.*\.bin$/.test(entry.name) && !named.includes(entry.name)) others.push(entry.name);
    }
  } catch {
    // An unreadable directory just has no candidates; the caller lists where it looked.
  }
  return [...named, ...others.sort(), "tok*.bin"]
    .map((name) => join(dir, name))
    .filter((path) => path !== exclude);
}

/**
 * The tokenizer for the model at `modelPath`. `explicitTokenizer` (from --tokenizer) wins: a
 * `.json` file is a Hugging Face tokenizer.json (with the tokenizer_config.json beside it),
 * anything else a llama2.c tokenizer.bin, and a directory is searched like a model directory.
 * For a `.lowbit` file: the tokenizer embedded in it (when it carries one). For a model
 * directory: its tokenizer.json (+ tokenizer_config.json), else a llama2.c tokenizer. For a llama2.c `.bin` model file: tokenizer.bin, tok512.bin or another tok*.bin
 * in its directory, else a tokenizer.json there; for other model files, the reverse order.
 * Throws TokenizerError listing the paths it tried when none exists.
 */
export async function loadTokenizer(
  modelPath: string,
  explicitTokenizer?: string,
): Promise<Tokenizer> {
  if (explicitTokenizer !== undefined) {
    const info = await statOrNull(explicitTokenizer);
    if (info === null) {
      throw new TokenizerError(
        `--tokenizer ${explicitTokenizer} does not exist; ${USAGE}, or leave --tokenizer out ` +
          `to use the one beside the model`,
      );
    }
    if (info.isDirectory) return await searchDirectory(explicitTokenizer, "", explicitTokenizer);
    return extname(explicitTokenizer).toLowerCase() === ".json"
      ? await loadHf(explicitTokenizer)
      : await loadLlama2c(explicitTokenizer);
  }
  const info = await statOrNull(modelPath);
  if (info === null) {
    throw new TokenizerError(`model path ${modelPath} does not exist, so it has no tokenizer`);
  }
  if (info.isDirectory) return await searchDirectory(modelPath, "", modelPath);
  if (extname(modelPath).toLowerCase() === ".lowbit") {
    const lowbit = await openLowbit(modelPath);
    lowbit.close();
    if (lowbit.header.tokenizer !== null) return await tokenizerOf(lowbit);
  }
  return await searchDirectory(dirname(modelPath), modelPath, modelPath);
}

/** The tokenizer embedded in an opened `.lowbit` file; TokenizerError when it has none. */
export function tokenizerOf(lowbit: Pick<LowbitCheckpoint, "path" | "header">): Promise<Tokenizer> {
  const data = lowbit.header.tokenizer;
  if (data === null) {
    return Promise.reject(
      new TokenizerError(`${lowbit.path} carries no tokenizer; ${USAGE}`),
    );
  }
  return tokenizerFromData(data);
}

/** Tries the candidate tokenizer files of `dir` in order; `model` is the model file, if any. */
async function searchDirectory(dir: string, model: string, forWhat: string): Promise<Tokenizer> {
  const hf = join(dir, "tokenizer.json");
  const llama2c = await llama2cCandidates(dir, model);
  const llama2cFirst = model !== "" && extname(model).toLowerCase() === ".bin";
  const order = llama2cFirst ? [...llama2c, hf] : [hf, ...llama2c];
  for (const path of order) {
    if (path.endsWith("*.bin") || !(await isFile(path))) continue;
    return path === hf ? await loadHf(path) : await loadLlama2c(path);
  }
  const spm = join(dir, "tokenizer.model");
  const spmNote = (await isFile(spm))
    ? ` (${spm} is a SentencePiece model, which lowbit does not read: save a tokenizer.json ` +
      `with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir))`
    : "";
  throw new TokenizerError(
    `no tokenizer found for ${forWhat}: looked for ` +
      `${order.join(", ")}${spmNote}; ${USAGE}`,
  );
}

/** Rebuilds a tokenizer from its {@link Tokenizer.toData} form (as embedded in a model file). */
export function tokenizerFromData(data: TokenizerData): Promise<Tokenizer> {
  switch (data.kind) {
    case "llama2c":
      return Promise.resolve(
        new Llama2cTokenizer(data.bytes, {
          source: "the model file's embedded llama2.c tokenizer",
          chatTemplate: data.chatTemplate,
        }),
      );
    case "hf":
      return Promise.resolve(
        new HfTokenizer(data.tokenizerJson, data.tokenizerConfigJson, {
          source: "the model file's embedded tokenizer.json",
        }),
      );
    default:
      return Promise.reject(
        new TokenizerError(
          `the model file embeds a tokenizer of unknown kind ` +
            `${JSON.stringify((data as { kind: unknown }).kind)}; re-create the file with this ` +
            `version of lowbit or ${USAGE}`,
        ),
      );
  }
}
