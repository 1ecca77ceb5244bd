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
import { GpuModel } from "../runtime/model/model.ts";

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

/** Every linear layer 4-bit, group 32 (as the GPU model needs: one format per fused group). */
function uniformSpec(name: string, shape: number[]): LowbitTensorSpec {
  if (name === T.embed) return { name, shape, dtype: "F16" };
  if (shape.length === 1) return { name, shape, dtype: "F32" };
  return { name, shape, dtype: "Q", quant: { bits: 4, groupSize: 32 } };
}

/** Writes the synthetic model (tensors in reverse order) and returns what reading must give. */
async function writeModel(path: string, spec = specFor): Promise<Map<string, Expected>> {
  const tensors = [...expectedShapes(config)].map(([n, s]) => spec(n, s));
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

const packr = new Packr({ useRecords: false, variableMapSize: true });

/**
 * The file with its header replaced by `encode(mutate(header))`; data shifted to stay
 * 64-aligned.
 */
function rewriteHeader(
  file: Uint8Array,
  mutate: (h: Record<string, unknown>) => void,
  encode: (h: Record<string, unknown>) => Uint8Array = (h) => packr.pack(h),
): Uint8Array {
  const dv = new DataView(file.buffer, file.byteOffset);
  const len = dv.getUint32(12, true), oldStart = align(16 + len);
  const header = new Unpackr({ useRecords: false }).unpack(file.subarray(16, 16 + len));
  mutate(header);
  for (let delta = 0;;) {
    const h = structuredClone(header);
    for (const t of h.tensors) {
      if (typeof t.offset === "number") t.offset += delta;
      if (typeof t.szOffset === "number") t.szOffset += delta;
    }
    const body = encode(h);
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

/** A msgpack map/array header (map16/array16) of `n` entries. */
const containerHeader = (kind: "map" | "array", n: number) =>
  Uint8Array.of(kind === "map" ? 0xde : 0xdc, n >> 8, n & 0xff);

/** A 64-bit msgpack integer: uint64 (0xcf) or int64 (0xd3), whatever its size. */
function int64(v: unknown, signed: boolean): Uint8Array {
  const b = new Uint8Array(9);
  b[0] = signed ? 0xd3 : 0xcf;
  const dv = new DataView(b.buffer);
  if (signed) dv.setBigInt64(1, BigInt(v as number));
  else dv.setBigUint64(1, BigInt(v as number));
  return b;
}

/** `h` as msgpack with every tensor's offsets as uint64 and byte lengths as int64. */
function pack64(h: Record<string, unknown>): Uint8Array {
  const parts: Uint8Array[] = [containerHeader("map", Object.keys(h).length)];
  for (const [k, v] of Object.entries(h)) {
    parts.push(packr.pack(k));
    if (k !== "tensors") {
      parts.push(packr.pack(v));
      continue;
    }
    const tensors = v as Record<string, unknown>[];
    parts.push(containerHeader("array", tensors.length));
    for (const t of tensors) {
      parts.push(containerHeader("map", Object.keys(t).length));
      for (const [tk, tv] of Object.entries(t)) {
        parts.push(packr.pack(tk));
        if (tk === "offset" || tk === "szOffset") parts.push(int64(tv, false));
        else if (tk === "bytes" || tk === "szBytes") parts.push(int64(tv, true));
        else parts.push(packr.pack(tv));
      }
    }
  }
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  parts.reduce((at, p) => (out.set(p, at), at + p.length), 0);
  return out;
}

Deno.test("64-bit MessagePack integers are read; beyond 2^53 they are named", async () => {
  await withTempDir(async (dir) => {
    const good = `${dir}/good.lowbit`;
    const expected = await writeModel(good);
    const bytes = await Deno.readFile(good);
    const path = `${dir}/u64.lowbit`;
    const file = rewriteHeader(bytes, () => {}, pack64);
    // The header does hold 64-bit integers (0xcf = uint64).
    const len = new DataView(file.buffer).getUint32(12, true);
    assert.ok(file.subarray(16, 16 + len).includes(0xcf));
    await Deno.writeFile(path, file);
    const f = await openLowbit(path);
    try {
      assert.deepEqual(f.config, config);
      for (const e of f.header.tensors) {
        assert.equal(typeof e.offset, "number");
        assert.equal(typeof e.bytes, "number");
      }
      for (const [name, want] of expected) assert.deepEqual(await f.read(name), want.values, name);
    } finally {
      f.close();
    }
    const far = `${dir}/far.lowbit`;
    const index = (h: Record<string, unknown>) =>
      (h.tensors as Record<string, unknown>[]).indexOf(entry(h, T.wq(0)));
    let at = -1;
    await Deno.writeFile(
      far,
      rewriteHeader(bytes, (h) => {
        at = index(h);
        entry(h, T.wq(0)).szOffset = 2n ** 53n + 64n;
      }, pack64),
    );
    await assert.rejects(() => openLowbit(far), {
      name: "ModelFormatError",
      message: new RegExp(
        `far\\.lowbit: header tensors\\[${at}\\]\\.szOffset is 9007199254741056, beyond the ` +
          `integers a reader represents exactly`,
      ),
    });
  });
});

Deno.test("headers the format cannot mean are rejected, naming the field and value", async () => {
  await withTempDir(async (dir) => {
    const good = `${dir}/good.lowbit`;
    await writeModel(good);
    const bytes = await Deno.readFile(good);
    const cfg =
      (change: Partial<Record<keyof ModelConfig, unknown>>) => (h: Record<string, unknown>) =>
        Object.assign(h.config as Record<string, unknown>, change);
    let deep: unknown = 1;
    for (let i = 0; i < 40; i++) deep = [deep];
    const cases: [string, (h: Record<string, unknown>) => void, string, RegExp][] = [
      [
        "architecture",
        cfg({ architecture: "GPT2LMHeadModel" }),
        "UnsupportedModelError",
        /header config\.architecture "GPT2LMHeadModel" is not supported \(supported: LlamaForCausalLM, .*llama2\.c\)/,
      ],
      [
        "huge nLayers",
        cfg({ nLayers: 1e7 }),
        "UnsupportedModelError",
        /header config\.nLayers is 10000000, above lowbit's limit of 1024/,
      ],
      [
        "huge dim",
        cfg({ dim: 2 ** 40 }),
        "UnsupportedModelError",
        /header config\.dim is 1099511627776, above lowbit's limit of 65536/,
      ],
      [
        "more layers than the table",
        cfg({ nLayers: 5 }),
        "ModelFormatError",
        /header config\.nLayers is 5, but the tensor table has no tensor of layer 2 \(it has tensors of 2 layers\)/,
      ],
      [
        "fewer layers than the table",
        cfg({ nLayers: 1 }),
        "ModelFormatError",
        /tensor model\.layers\.1\.\S+ belongs to layer 1, but header config\.nLayers is 1/,
      ],
      [
        "stray tensor of a later layer",
        (h) => void (entry(h, T.attnNorm(1)).name = T.attnNorm(7)),
        "ModelFormatError",
        /tensor model\.layers\.7\.input_layernorm\.weight belongs to layer 7, but header config\.nLayers is 2/,
      ],
      [
        "odd headDim",
        cfg({ headDim: 15 }),
        "ModelFormatError",
        /config\.headDim is 15; it must be even/,
      ],
      [
        "heads",
        cfg({ nKvHeads: 3 }),
        "ModelFormatError",
        /header config\.nHeads 4 is not a multiple of header config\.nKvHeads 3/,
      ],
      [
        "bosId",
        cfg({ bosId: 512 }),
        "ModelFormatError",
        /header config\.bosId is 512; it must be a token id in \[0, 512\)/,
      ],
      [
        "eosIds",
        cfg({ eosIds: [2, 9999] }),
        "ModelFormatError",
        /header config\.eosIds is \[2,9999\]; it must be token ids in \[0, 512\)/,
      ],
      [
        "normEps",
        cfg({ normEps: 0 }),
        "ModelFormatError",
        /config\.normEps is 0; it must be a positive number/,
      ],
      [
        "ropeTheta",
        cfg({ ropeTheta: -1 }),
        "ModelFormatError",
        /config\.ropeTheta is -1; it must be/,
      ],
      [
        "NaN ropeTheta",
        cfg({ ropeTheta: NaN }),
        "ModelFormatError",
        /config\.ropeTheta is NaN; it must be/,
      ],
      [
        "ropeScaling",
        cfg({
          ropeScaling: {
            factor: 0,
            lowFreqFactor: 1,
            highFreqFactor: 4,
            originalMaxPositionEmbeddings: 64,
          },
        }),
        "ModelFormatError",
        /config\.ropeScaling is \{"factor":0,.*\}; it must be positive factors/,
      ],
      [
        "nesting",
        (h) => void (h.quantization = { method: "rtn", deep }),
        "ModelFormatError",
        /the header nests deeper than 32 at quantization\.deep/,
      ],
    ];
    for (const [what, mutate, name, pattern] of cases) {
      const path = `${dir}/${what.replaceAll(" ", "_")}.lowbit`;
      await Deno.writeFile(path, rewriteHeader(bytes, mutate));
      await assert.rejects(() => openLowbit(path), (e: Error) => {
        assert.equal(e.name, name, `${what}: ${e.message}`);
        assert.match(e.message, pattern, what);
        assert.ok(e.message.startsWith(path), `${what}: message names the file`);
        return true;
      });
    }
  });
});

/** The file at `path` with `bits` (little-endian u16 or u32) written at absolute `offset`. */
async function patch(path: string, out: string, offset: number, bits: number, width: 2 | 4) {
  const b = await Deno.readFile(path);
  const dv = new DataView(b.buffer);
  if (width === 2) dv.setUint16(offset, bits, true);
  else dv.setUint32(offset, bits, true);
  await Deno.writeFile(out, b);
}

Deno.test("NaN or Inf in dense data or a packed s/z fails the load, naming the tensor", async () => {
  await withTempDir(async (dir) => {
    const good = `${dir}/good.lowbit`;
    await writeModel(good, uniformSpec);
    const f0 = await openLowbit(good);
    const at = (name: string) => f0.header.tensors.find((t) => t.name === name)!;
    f0.close();
    // embed (F16 [512, 64]) element [3, 5]; norm (F32 [64]) element 9; wq.0 (Q, 2 groups per
    // row) z of row 4, group 1 (the high half of sz word 9); w2.1 (K = 72: 3 groups) s of row 2.
    const cases: [string, string, number, number, 2 | 4, RegExp][] = [
      [
        "f16",
        T.embed,
        at(T.embed).offset + 2 * (3 * 64 + 5),
        0x7c00,
        2,
        /holds \+Inf at \[3, 5\] \(F16\)/,
      ],
      ["f32", T.norm, at(T.norm).offset + 4 * 9, 0xffc00000, 4, /holds NaN at \[9\] \(F32\)/],
      [
        "z",
        T.wq(0),
        at(T.wq(0)).szOffset! + 4 * (4 * 2 + 1) + 2,
        0xfc00,
        2,
        /holds -Inf in its offset z of row 4, group 1/,
      ],
      [
        "s",
        T.w2(1),
        at(T.w2(1)).szOffset! + 4 * 6,
        0x7e00,
        2,
        /holds NaN in its scale s of row 2, group 0/,
      ],
    ];
    const gpu = await testGpu();
    for (const [what, name, offset, bits, width, pattern] of cases) {
      const path = `${dir}/${what}.lowbit`;
      await patch(good, path, offset, bits, width);
      const message = new RegExp(
        `^${path}: tensor ${name.replaceAll(".", "\\.")} ${pattern.source}`,
      );
      const f = await openLowbit(path); // the header is fine
      try {
        await assert.rejects(() => f.read(name), { name: "ModelFormatError", message }, what);
        if (what === "s" || what === "z") {
          await assert.rejects(
            () => f.readPacked(name),
            { name: "ModelFormatError", message },
            what,
          );
        }
        await assert.rejects(() => ReferenceModel.load(f), { name: "ModelFormatError", message });
      } finally {
        f.close();
      }
      // The GPU model: the load fails, rather than a model that generates nothing.
      const g = await openLowbit(path);
      try {
        await assert.rejects(() => GpuModel.load(gpu, g), { name: "ModelFormatError", message });
      } finally {
        g.close();
      }
    }
  });
});

Deno.test("the writer refuses NaN, ±Inf and values beyond fp16", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/m.lowbit`;
    const tensors = [...expectedShapes(config)].map(([n, s]) => specFor(n, s));
    const w = await createLowbitWriter(path, { config, tokenizer: null, quantization, tensors });
    const x = new Float32Array(64);
    x[3] = NaN;
    await assert.rejects(() => w.writeTensor(T.norm, x), {
      name: "ParameterError",
      message: /tensor model\.norm\.weight holds NaN or ±Inf at element 3; not written/,
    });
    const big = new Float32Array(512 * 64);
    big[700] = 1e6; // finite in F32, +Inf in F16
    await assert.rejects(
      () => w.writeTensor(T.embed, big),
      /beyond fp16's ±65504\) at element 700/,
    );
    const packed = packQ(rtnQuantize(syntheticTensor(T.wq(0), [64, 64], 1), 64, 64, {
      bits: 4,
      groupSize: 32,
    }));
    packed.sz[5] = 0x7c00_3c00;
    await assert.rejects(
      () => w.writeTensor(T.wq(0), packed),
      /\(sz: its scales and offsets\) holds/,
    );
    await w.abandon();
    // A config the reader would reject is refused before anything is written.
    await assert.rejects(
      () =>
        createLowbitWriter(`${dir}/bad.lowbit`, {
          config: { ...config, bosId: 512 },
          tokenizer: null,
          quantization,
          tensors,
        }),
      /config\.bosId is 512/,
    );
  });
});
