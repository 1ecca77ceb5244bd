/** Opens any supported checkpoint by looking at what the path is. */
import type { Checkpoint } from "./checkpoint.ts";
import { ModelFormatError } from "../errors.ts";
import { openHfCheckpoint } from "./hf_checkpoint.ts";
import { openLlama2cCheckpoint } from "./llama2c_checkpoint.ts";
import { openLowbit } from "../format/lowbit_reader.ts";
import { joinPath } from "./safetensors.ts";

/**
 * Opens a checkpoint:
 * - a directory with `config.json` → Hugging Face safetensors checkpoint;
 * - a `.bin` file → llama2.c checkpoint;
 * - a `.lowbit` file → packed lowbit model (docs/FORMAT.md);
 * anything else → ModelFormatError saying what was expected.
 */
export async function openCheckpoint(path: string): Promise<Checkpoint> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new ModelFormatError(`${path}: no such file or directory`, { cause: e });
    }
    throw e;
  }
  if (info.isDirectory) {
    const hasConfig = await Deno.stat(joinPath(path, "config.json")).then(() => true, () => false);
    if (hasConfig) return await openHfCheckpoint(path);
    throw new ModelFormatError(
      `${path}: directory has no config.json; expected a Hugging Face checkpoint ` +
        `(config.json + model.safetensors or model.safetensors.index.json)`,
    );
  }
  const lower = path.toLowerCase();
  if (lower.endsWith(".bin")) return await openLlama2cCheckpoint(path);
  if (lower.endsWith(".lowbit")) return await openLowbit(path);
  throw new ModelFormatError(
    `${path}: unknown checkpoint type; expected a Hugging Face directory (with config.json), ` +
      `a llama2.c .bin file or a .lowbit file`,
  );
}
