/** loadTokenizer: where it looks, what wins, and its errors. */

import assert from "node:assert/strict";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { HfTokenizer } from "../runtime/tokenizer/tokenizer_hf.ts";
import { Llama2cTokenizer } from "../runtime/tokenizer/tokenizer_llama2c.ts";
import {
  exists,
  STORIES_BIN,
  STORIES_HF_DIR,
  STORIES_MODEL,
  tinyConfigJson,
  tinyTokenizerBin,
  tinyTokenizerJson,
} from "./tokenizer_helpers.ts";
import { sharedPath, withTempDir } from "./helpers.ts";

/** Runs `fn` in a fresh temporary directory holding `files`, removed afterwards. */
function withDir(
  files: Record<string, string | Uint8Array>,
  fn: (dir: string) => Promise<void>,
): Promise<void> {
  return withTempDir(async (dir) => {
    for (const [name, content] of Object.entries(files)) {
      if (typeof content === "string") await Deno.writeTextFile(`${dir}/${name}`, content);
      else await Deno.writeFile(`${dir}/${name}`, content);
    }
    await fn(dir);
  });
}

const haveShared = exists(STORIES_MODEL, STORIES_BIN, `${STORIES_HF_DIR}/tokenizer.json`);

Deno.test({
  name: haveShared
    ? "loadTokenizer finds the shared models' tokenizers"
    : "loadTokenizer finds the shared models' tokenizers (skipped: needs ../shared data)",
  ignore: !haveShared,
  async fn() {
    const bin = await loadTokenizer(STORIES_MODEL);
    assert.ok(bin instanceof Llama2cTokenizer, "tok512.bin beside stories260K.bin");
    assert.deepEqual(bin.vocabSize, 512);
    const dir = await loadTokenizer(STORIES_HF_DIR);
    assert.ok(dir instanceof HfTokenizer, "tokenizer.json in stories260K-hf/");
    const file = await loadTokenizer(`${STORIES_HF_DIR}/model.safetensors`);
    assert.ok(file instanceof HfTokenizer, "tokenizer.json beside model.safetensors");
    const explicit = await loadTokenizer(STORIES_HF_DIR, STORIES_BIN);
    assert.ok(explicit instanceof Llama2cTokenizer, "--tokenizer wins");
    if (exists(sharedPath("models/novels-5M/tokenizer.json"))) {
      assert.deepEqual((await loadTokenizer(sharedPath("models/novels-5M"))).vocabSize, 8192);
    }
  },
});

Deno.test("loadTokenizer: order of candidates in a directory", async () => {
  const files = {
    "tokenizer.json": tinyTokenizerJson(),
    "tokenizer_config.json": tinyConfigJson(),
    "tok4096.bin": tinyTokenizerBin(),
    "model.bin": new Uint8Array(8),
    "model.safetensors": new Uint8Array(8),
  };
  await withDir(files, async (dir) => {
    assert.ok((await loadTokenizer(dir)) instanceof HfTokenizer, "directory: tokenizer.json first");
    assert.ok((await loadTokenizer(`${dir}/model.bin`)) instanceof Llama2cTokenizer, ".bin: tok*");
    assert.ok((await loadTokenizer(`${dir}/model.safetensors`)) instanceof HfTokenizer);
    assert.ok(
      (await loadTokenizer("/nonexistent", `${dir}/tok4096.bin`)) instanceof Llama2cTokenizer,
    );
    assert.ok((await loadTokenizer("/nonexistent", dir)) instanceof HfTokenizer, "--tokenizer DIR");
  });
  await withDir({ "tok4096.bin": tinyTokenizerBin() }, async (dir) => {
    assert.ok(
      (await loadTokenizer(dir)) instanceof Llama2cTokenizer,
      "a directory with only tok*.bin",
    );
  });
});

Deno.test("loadTokenizer: chat_template.jinja beside tokenizer.json supplies the template", async () => {
  const files = {
    "tokenizer.json": tinyTokenizerJson(),
    "tokenizer_config.json": tinyConfigJson(),
    "chat_template.jinja": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
  };
  await withDir(files, async (dir) => {
    const tok = await loadTokenizer(dir);
    assert.deepEqual(tok.applyChatTemplate([{ role: "user", content: "hi" }]), "[user] hi\n");
    const data = tok.toData();
    assert.ok(
      data.kind === "hf" && data.tokenizerConfigJson?.includes("chat_template"),
      "embedded",
    );
  });
});

Deno.test("loadTokenizer errors say where they looked and mention --tokenizer", async () => {
  await assert.rejects(() => loadTokenizer("/x/model.bin", "/nonexistent/tok.bin"), {
    name: "TokenizerError",
    message: /\/nonexistent\/tok\.bin.*--tokenizer/,
  });
  await assert.rejects(() => loadTokenizer("/nonexistent/model.bin"), {
    name: "TokenizerError",
    message: /does not exist/,
  });
  await withDir({ "model.bin": new Uint8Array(8) }, async (dir) => {
    const d = RegExp.escape(dir);
    await assert.rejects(() => loadTokenizer(`${dir}/model.bin`), {
      name: "TokenizerError",
      message: new RegExp(
        `${d}/tokenizer\\.bin.*${d}/tok512\\.bin.*${d}/tok\\*\\.bin.*${d}/tokenizer\\.json.*--tokenizer`,
      ),
    });
  });
  await withDir({ "tokenizer.model": "spm" }, async (dir) => {
    await assert.rejects(() => loadTokenizer(dir), {
      name: "TokenizerError",
      message: /SentencePiece.*--tokenizer/,
    });
  });
  await withDir({ "tokenizer.json": "{oops", "tokenizer.bin": new Uint8Array(3) }, async (dir) => {
    const d = RegExp.escape(dir);
    await assert.rejects(() => loadTokenizer(dir), {
      name: "TokenizerError",
      message: new RegExp(`${d}/tokenizer\\.json.*JSON`),
    });
    await assert.rejects(() => loadTokenizer(dir, `${dir}/tokenizer.bin`), {
      name: "TokenizerError",
      message: new RegExp(`${d}/tokenizer\\.bin.*too short`),
    });
  });
});
