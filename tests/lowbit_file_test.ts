/** The .lowbit file: writer/reader round trip, embedded tokenizer, corrupt files, inspect. */
import assert from "node:assert/strict";
import { Packr, Unpackr } from "msgpackr";
import type { PackedTensor } from "../runtime/checkpoint/checkpoint.ts";
import {
  expectedShapes,
  type ModelConfig,
  tensorNames as T,
} from "../runtime/checkpoint/config.ts";
import { ModelFormatError, ParameterError, ShapeError } from "../runtime/errors.ts";
import { align, LOWBIT_ALIGN, type LowbitTensorSpec } from "../runtime/format/lowbit_file.ts";
import { createLowbitWriter } from "../runtime/format/lowbit_writer.ts";
import { type LowbitCheckpoint, openLowbit } from "../runtime/format/lowbit_reader.ts";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { inspectText } from "../runtime/cli/inspect_cmd.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import type { TokenizerData } from "../runtime/tokenizer/tokenizer.ts";
import { Llama2cTokenizer } from "../runtime/tokenizer/tokenizer_llama2c.ts";
import { rtnQuantize } from "../quantize/rtn.ts";
import { packQ } from "../runtime/format/pack.ts";
import { type Bits, dequantize } from "../runtime/format/qtensor.ts";
import { roundToDtype, syntheticConfig, syntheticTensor } from "./synthetic.ts";
import { haveShared, sharedPath, testGpu, withTempDir } from "./helpers.ts";
import { loadModel } from "../runtime/model/load.ts";

const tokPath = sharedPath("models/stories260K/tok512.bin");
const haveTok = await Deno.stat(tokPath).then(() => true, () => false);
if (!haveTok) console.warn(`NOTE: ${tokPath} absent: files are written without a tokenizer`);
const tokenizerData: TokenizerData | null = haveTok
  ? new Llama2cTokenizer(await Deno.readFile(tokPath)).toData()
  : null;

/** hiddenDim 72: w2 has K = 72, not a multiple of 32 (padded codes, a short last group). */
const config: ModelConfig = syntheticConfig({ hiddenDim: 72, vocabSize: 512 });
const quantization = { method: "rtn", bits: 4, groupSize: 32, clip: "none", seed: 7 };

/** dtype and quant of each tensor: every bit width, group sizes 0/32/64, F16 and F32. */
function specFor(name: string, shape: number[]): LowbitTensorSpec {
  const q = (bits: Bits, groupSize: number): LowbitTensorSpec => ({
    name,
    shape,
    dtype: "Q",
    quant: { bits, groupSize },
  });
  const table: Record<string, LowbitTensorSpec> = {
    [T.wq(0)]: q(4, 32),
    [T.wk(0)]: q(3, 0),
    [T.wv(0)]: q(2, 64),
    [T.wo(0)]: q(4, 0),
    [T.w1(0)]: q(3, 32),
    [T.w3(0)]: q(2, 32),
    [T.w2(0)]: q(4, 32),
    [T.w2(1)]: q(2, 0),
    [T.w1(1)]: q(3, 64),
    [T.embed]: { name, shape, dtype: "F16" },
    [T.wq(1)]: { name, shape, dtype: "F16" },
  };
  return table[name] ?? { name, shape, dtype: "F32" };
}

interface Expected {
  /** What `read` must return. */
  values: Float32Array;
  packed?: PackedTensor;
}

/** Writes the synthetic model (tensors in reverse order) and returns what reading must give. */
async function writeModel(path: string): Promise<Map<string, Expected>> {
  const tensors = [...expectedShapes(config)].map(([n, s]) => specFor(n, s));
  const w = await createLowbitWriter(path, {
    config,
    tokenizer: tokenizerData,
    quantization,
    tensors,
  });
  const expected = new Map<string, Expected>();
  for (const t of [...tensors].reverse()) {
    const x = syntheticTensor(t.name, t.shape, 11);
    if (t.dtype === "Q") {
      const [N, K] = t.shape;
      const ql = rtnQuantize(x, N, K, { bits: t.quant!.bits, groupSize: t.quant!.groupSize });
      const packed = packQ(ql);
      expected.set(t.name, { values: dequantize(ql), packed });
      await w.writeTensor(t.name, packed);
    } else {
      expected.set(t.name, { values: roundToDtype(x, t.dtype) });
      await w.writeTensor(t.name, x);
    }
  }
  await w.close();
  return expected;
}

Deno.test("round trip: F32, F16 and Q at 2/3/4 bits, groups 0/32/64; header kept", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/m.lowbit`;
    const expected = await writeModel(path);
    const f = await openLowbit(path);
    try {
      assert.deepEqual(f.config, config);
      assert.deepEqual(f.header.quantization, quantization);
      assert.equal(f.version, 1);
      assert.equal(f.tensors.size, expected.size);
      for (const e of f.header.tensors) {
        assert.equal(e.offset % LOWBIT_ALIGN, 0, `${e.name} offset aligned`);
        if (e.szOffset !== undefined) assert.equal(e.szOffset % LOWBIT_ALIGN, 0);
      }
      for (const [name, want] of expected) {
        const info = f.tensors.get(name)!;
        const spec = specFor(name, info.shape);
        assert.equal(info.dtype, spec.dtype, name);
        assert.deepEqual(info.quant, spec.quant, name);
        assert.deepEqual(await f.read(name), want.values, name);
        if (want.packed) assert.deepEqual(await f.readPacked(name), want.packed, name);
      }
      // Row ranges, dense and packed (w2.0: K = 72, 3 groups of 32 with a short last one).
      const [e, d] = [T.embed, T.w2(0)];
      assert.deepEqual(await f.read(e, 5, 9), expected.get(e)!.values.slice(5 * 64, 9 * 64));
      assert.deepEqual(await f.read(d, 3, 7), expected.get(d)!.values.slice(3 * 72, 7 * 72));
      await assert.rejects(() => f.read(d, 7, 99), ParameterError);
      await assert.rejects(() => f.readPacked(T.embed), /is F16, not packed/);
    } finally {
      f.close();
    }
    // The file size is the end of the last array: no trailing bytes.
    const last = (await openCheckpoint(path)) as LowbitCheckpoint;
    const t = last.header.tensors.at(-1)!;
    assert.equal(last.fileSize, (t.szOffset ?? t.offset) + (t.szBytes ?? t.bytes));
    last.close();
  });
});

Deno.test("the CPU reference runs a quantized .lowbit (read dequantizes)", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/m.lowbit`;
    const expected = await writeModel(path);
    const f = await openLowbit(path);
    const fromFile = await ReferenceModel.load(f);
    f.close();
    const inMemory = new ReferenceModel(
      config,
      new Map([...expected].map(([n, e]) => [n, e.values])),
    );
    for (const [pos, tok] of [5, 17, 300].entries()) {
      assert.deepEqual(fromFile.forward(tok, pos), inMemory.forward(tok, pos));
    }
  });
});

Deno.test({
  name: "the embedded tokenizer serves the file; --tokenizer still wins",
  ignore: !haveTok,
  fn: async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/m.lowbit`;
      await writeModel(path);
      const f = await openLowbit(path);
      f.close();
      assert.deepEqual(f.header.tokenizer, tokenizerData);
      const original = new Llama2cTokenizer(await Deno.readFile(tokPath));
      const embedded = await loadTokenizer(path);
      const text = "Once upon a time, there was a little girl named Lily.";
      assert.deepEqual(embedded.encode(text), original.encode(text));
      assert.equal(embedded.decode(original.encode(text)), text);
      // An explicit tokenizer file is used instead.
      const hfDir = sharedPath("models/novels-5M");
      if (await haveShared("models/novels-5M/tokenizer.json")) {
        const explicit = await loadTokenizer(path, `${hfDir}/tokenizer.json`);
        assert.equal(explicit.vocabSize, 8192);
      }
    });
  },
});

Deno.test("writer: wrong data, unknown tensor, missing tensors at close", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/m.lowbit`;
    const tensors = [...expectedShapes(config)].map(([n, s]) => specFor(n, s));
    await assert.rejects(
      () => createLowbitWriter(path, { config, tokenizer: null, quantization, tensors: [] }),
      /tensor model\.embed_tokens\.weight is missing/,
    );
    await assert.rejects(
      () =>
        createLowbitWriter(path, {
          config,
          tokenizer: null,
          quantization,
          tensors: tensors.map((t) => (t.name === T.norm ? { ...t, shape: [63] } : t)),
        }),
      ShapeError,
    );
    const w = await createLowbitWriter(path, { config, tokenizer: null, quantization, tensors });
    await assert.rejects(() => w.writeTensor(T.norm, new Float32Array(3)), ShapeError);
    await assert.rejects(() => w.writeTensor("nope", new Float32Array(3)), /not in the file/);
    await assert.rejects(
      () => w.writeTensor(T.wq(0), { qweight: new Uint32Array(1), sz: new Uint32Array(1) }),
      /needs 512 qweight and 128 sz words; got 1 and 1/,
    );
    await w.writeTensor(T.norm, new Float32Array(64));
    await assert.rejects(() => w.writeTensor(T.norm, new Float32Array(64)), /written twice/);
    await assert.rejects(() => w.close(), /never written .*incomplete file was deleted/);
    assert.equal(await Deno.stat(path).then(() => true, () => false), false);
  });
});

/** The file with its header replaced by `mutate(header)`; data shifted to stay 64-aligned. */
function rewriteHeader(file: Uint8Array, mutate: (h: Record<string, unknown>) => void): Uint8Array {
  const dv = new DataView(file.buffer, file.byteOffset);
  const len = dv.getUint32(12, true), oldStart = align(16 + len);
  const header = new Unpackr({ useRecords: false }).unpack(file.subarray(16, 16 + len));
  mutate(header);
  const packr = new Packr({ useRecords: false, variableMapSize: true });
  for (let delta = 0;;) {
    const h = structuredClone(header);
    for (const t of h.tensors) {
      if (typeof t.offset === "number") t.offset += delta;
      if (typeof t.szOffset === "number") t.szOffset += delta;
    }
    const body = packr.pack(h);
    const start = align(16 + body.length);
    if (start > oldStart + delta) {
      delta = start - oldStart;
      continue;
    }
    const out = new Uint8Array(oldStart + delta + file.length - oldStart);
    out.set(file.subarray(0, 16));
    new DataView(out.buffer).setUint32(12, body.length, true);
    out.set(body, 16);
    out.set(file.subarray(oldStart), oldStart + delta);
    return out;
  }
}

/** The header's tensor entry named `name`. */
function entry(h: Record<string, unknown>, name: string): Record<string, unknown> {
  return (h.tensors as Record<string, unknown>[]).find((t) => t.name === name)!;
}

Deno.test("corrupt files are rejected with a message naming the problem", async () => {
  await withTempDir(async (dir) => {
    const good = `${dir}/good.lowbit`;
    await writeModel(good);
    const bytes = await Deno.readFile(good);
    const headerLen = new DataView(bytes.buffer).getUint32(12, true);
    const cases: [string, Uint8Array, RegExp][] = [
      [
        "wrong magic",
        (() => {
          const b = bytes.slice();
          b.set(new TextEncoder().encode("GGUF\x03\0\0\0"));
          return b;
        })(),
        /not a \.lowbit file: it starts with "GGUF\\x03\\x00\\x00\\x00"/,
      ],
      [
        "newer version",
        (() => {
          const b = bytes.slice();
          new DataView(b.buffer).setUint32(8, 2, true);
          return b;
        })(),
        /written by a newer lowbit: format version 2, this reader understands up to 1/,
      ],
      ["short file", bytes.slice(0, 10), /10 bytes, too short for the 16-byte \.lowbit preamble/],
      [
        "truncated header",
        bytes.slice(0, 16 + (headerLen >> 1)),
        new RegExp(`truncated: the header of ${headerLen} bytes runs past the end of the file`),
      ],
      [
        "truncated data",
        bytes.slice(0, bytes.length - 10),
        /bytes \[\d+, \d+\) run past the end of the file \(\d+ bytes\): truncated or corrupt/,
      ],
      [
        "offset outside the file",
        rewriteHeader(bytes, (h) => {
          entry(h, T.wq(0)).offset = align(bytes.length + 4096);
        }),
        /tensor model\.layers\.0\.self_attn\.q_proj\.weight qweight bytes \[\d+, \d+\) run past the end/,
      ],
      [
        "overlapping tensors",
        rewriteHeader(bytes, (h) => {
          entry(h, T.norm).offset = entry(h, T.embed).offset;
        }),
        /tensors .* and .* overlap/,
      ],
      [
        "wrong byte length",
        rewriteHeader(bytes, (h) => {
          entry(h, T.embed).bytes = 65540;
        }),
        /tensor model\.embed_tokens\.weight spans 65540 bytes, but shape \[512,64\] of F16 needs 65536/,
      ],
      [
        "wrong packed length",
        rewriteHeader(bytes, (h) => {
          entry(h, T.wq(0)).bits = 3;
        }),
        /q_proj\.weight qweight spans 2048 bytes, but shape \[64,64\] of Q at 3 bits, group size 32 needs 1536/,
      ],
      [
        "missing tensor",
        rewriteHeader(bytes, (h) => {
          const t = h.tensors as Record<string, unknown>[];
          t.splice(t.indexOf(entry(h, T.norm)), 1);
        }),
        /tensor model\.norm\.weight is missing; the header's config requires it with shape \[64\]/,
      ],
      [
        "unknown dtype",
        rewriteHeader(bytes, (h) => {
          entry(h, T.attnNorm(1)).dtype = "I8";
        }),
        /has unknown dtype "I8" \(this reader knows F32, F16, Q\)/,
      ],
      [
        "bad config",
        rewriteHeader(bytes, (h) => {
          delete (h.config as Record<string, unknown>).nHeads;
        }),
        /header config\.nHeads is missing; it must be a positive integer/,
      ],
    ];
    for (const [what, data, pattern] of cases) {
      const path = `${dir}/${what.replaceAll(" ", "_")}.lowbit`;
      await Deno.writeFile(path, data);
      await assert.rejects(() => openLowbit(path), (e: Error) => {
        assert.ok(e instanceof ModelFormatError, `${what}: ${e}`);
        assert.match(e.message, pattern, what);
        assert.ok(e.message.startsWith(path), `${what}: message names the file`);
        return true;
      });
    }
    // The untouched file still opens after the rewrite round trip.
    (await openLowbit(`${dir}/good.lowbit`)).close();
    const same = `${dir}/same.lowbit`;
    await Deno.writeFile(same, rewriteHeader(bytes, () => {}));
    (await openLowbit(same)).close();
  });
});

Deno.test("inspect prints every tensor and the totals; errors are one line, exit 1", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/m.lowbit`;
    await writeModel(path);
    const f = await openLowbit(path);
    const text = await inspectText(f);
    f.close();
    for (const name of expectedShapes(config).keys()) assert.ok(text.includes(name), name);
    assert.match(text, /Q3 grow/);
    assert.match(text, /linear layers: bits\/weight/);
    assert.match(text, /\bmethod\s+rtn\b/);
    if (haveTok) assert.match(text, /vocab\s+512/);

    const cmd = (file: string) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", "--no-check", "runtime/cli/inspect_cmd.ts", file],
        cwd: new URL("..", import.meta.url).pathname,
        env: { XDG_RUNTIME_DIR: "/tmp" },
      }).output();
    const ok = await cmd(path);
    assert.equal(ok.code, 0, new TextDecoder().decode(ok.stderr));
    assert.ok(new TextDecoder().decode(ok.stdout).includes(T.w2(1)));
    await Deno.writeTextFile(`${dir}/bad.lowbit`, "GGUF and more bytes than sixteen");
    const bad = await cmd(`${dir}/bad.lowbit`);
    const err = new TextDecoder().decode(bad.stderr).trim();
    assert.equal(bad.code, 1);
    assert.match(
      err,
      /^error: .*bad\.lowbit: not a \.lowbit file: it starts with "GGUF and", not the magic/,
    );
    assert.equal(err.split("\n").length, 1);
  });
});

Deno.test({
  name: "one .lowbit file serves: stories260K re-saved as .lowbit runs like the original",
  ignore: !(await haveShared("models/stories260K-hf")),
  fn: async () => {
    await withTempDir(async (dir) => {
      const src = sharedPath("models/stories260K-hf"), path = `${dir}/stories260K.lowbit`;
      const ckpt = await openCheckpoint(src);
      const tokenizer = await loadTokenizer(src);
      const tensors = [...ckpt.tensors.values()].map((t) => ({
        name: t.name,
        shape: t.shape,
        dtype: "F32" as const,
      }));
      const w = await createLowbitWriter(path, {
        config: ckpt.config,
        tokenizer: tokenizer.toData(),
        quantization: { method: "none" },
        tensors,
      });
      for (const t of tensors) await w.writeTensor(t.name, await ckpt.read(t.name));
      await w.close();
      ckpt.close();
      const gpu = await testGpu();
      const a = await loadModel(src, { gpu, quiet: true, dtype: "f32" });
      const b = await loadModel(path, { gpu, quiet: true, dtype: "f32" });
      const ids = b.tokenizer.encode("Once upon a time");
      assert.deepEqual(ids, a.tokenizer.encode("Once upon a time"));
      assert.deepEqual(await b.model.logitsAt(0, ids), await a.model.logitsAt(0, ids));
    });
  },
});
