/** Tests of runtime/checkpoint/safetensors.ts: header validation, row reads, dtypes, sharded sets. */
import assert from "node:assert/strict";
import { SafetensorsFile, SafetensorsSet } from "../runtime/checkpoint/safetensors.ts";
import {
  encodeDtype,
  roundToDtype,
  syntheticTensor,
  writeSyntheticHfCheckpoint,
} from "./synthetic.ts";
import { withTempDir } from "./helpers.ts";

/** A safetensors file's bytes: u64 header length (or `lenOverride`), header text, data. */
function fileBytes(header: unknown, data: Uint8Array, lenOverride?: bigint): Uint8Array {
  const json = new TextEncoder().encode(
    typeof header === "string" ? header : JSON.stringify(header),
  );
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lenOverride ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

const values = Float32Array.from({ length: 12 }, (_, i) => (i - 5) * 0.375); // exact in f16/bf16

/** Writes one file with `values` as a [3, 4] tensor "w" of `dtype` plus a 1-D "b". */
async function writeSample(dir: string, dtype: "F32" | "F16" | "BF16"): Promise<string> {
  const w = encodeDtype(values, dtype), b = encodeDtype(values.slice(0, 4), dtype);
  const header = {
    __metadata__: { format: "pt" },
    w: { dtype, shape: [3, 4], data_offsets: [0, w.length] },
    b: { dtype, shape: [4], data_offsets: [w.length, w.length + b.length] },
  };
  const data = new Uint8Array(w.length + b.length);
  data.set(w);
  data.set(b, w.length);
  const path = `${dir}/${dtype}.safetensors`;
  await Deno.writeFile(path, fileBytes(header, data));
  return path;
}

Deno.test("reads rows of F32, F16 and BF16 tensors", () =>
  withTempDir(async (dir) => {
    for (const dtype of ["F32", "F16", "BF16"] as const) {
      const f = await SafetensorsFile.open(await writeSample(dir, dtype));
      try {
        assert.deepEqual([...f.tensors.keys()], ["w", "b"], dtype);
        assert.deepEqual(f.tensors.get("w")!.shape, [3, 4]);
        assert.deepEqual(Array.from(await f.readRows("w")), Array.from(values), dtype);
        assert.deepEqual(
          Array.from(await f.readRows("w", 1, 3)),
          Array.from(values.slice(4)),
          dtype,
        );
        assert.deepEqual(Array.from(await f.readRows("b", 1, 3)), Array.from(values.slice(1, 3)));
        // Concurrent reads share one file handle.
        const parts = await Promise.all([0, 1, 2].map((r) => f.readRows("w", r, r + 1)));
        assert.deepEqual(
          parts.flatMap((p) => Array.from(p)),
          Array.from(values),
          `${dtype} parallel`,
        );
      } finally {
        f.close();
      }
    }
  }));

Deno.test("malformed safetensors files give errors naming the file, tensor and values", () =>
  withTempDir(async (dir) => {
    const good = await Deno.readFile(await writeSample(dir, "F32"));
    const put = async (name: string, bytes: Uint8Array) => {
      await Deno.writeFile(`${dir}/${name}`, bytes);
      return `${dir}/${name}`;
    };
    const open = (p: string) => SafetensorsFile.open(p).then((f) => f.close());
    // Truncated: the data area ends before tensor b.
    const cut = await put("cut.safetensors", good.subarray(0, good.length - 10));
    await assert.rejects(() => open(cut), {
      name: "ModelFormatError",
      message: /cut\.safetensors.*tensor b.*truncated/,
    });
    // Header length beyond the file.
    const long = await put("long.safetensors", fileBytes({}, new Uint8Array(0), 1n << 40n));
    await assert.rejects(() => open(long), {
      name: "ModelFormatError",
      message: /long\.safetensors.*header length 1099511627776/,
    });
    // Shorter than the length prefix.
    const tiny = await put("tiny.safetensors", new Uint8Array(5));
    await assert.rejects(() => open(tiny), { name: "ModelFormatError", message: /5 bytes/ });
    // Header not JSON.
    const bad = await put("bad.safetensors", fileBytes("{not json", new Uint8Array(8)));
    await assert.rejects(() => open(bad), {
      name: "ModelFormatError",
      message: /bad\.safetensors.*not valid JSON/,
    });
    // Offsets outside the file, reversed, or not matching shape × dtype.
    const data = new Uint8Array(16);
    const cases: [string, unknown, RegExp][] = [
      ["outside", { x: { dtype: "F32", shape: [8], data_offsets: [0, 32] } }, /\[0, 32\] run past/],
      [
        "reversed",
        { x: { dtype: "F32", shape: [1], data_offsets: [8, 4] } },
        /invalid data_offsets/,
      ],
      [
        "size",
        { x: { dtype: "F32", shape: [3], data_offsets: [0, 16] } },
        /16 bytes but shape \[3\] of F32 needs 12/,
      ],
      ["shape", { x: { dtype: "F32", shape: [-1], data_offsets: [0, 4] } }, /invalid shape/],
    ];
    for (const [name, header, re] of cases) {
      const p = await put(`${name}.safetensors`, fileBytes(header, data));
      const message = new RegExp(`${name}.*tensor x.*${re.source}`);
      await assert.rejects(() => open(p), { name: "ModelFormatError", message });
    }
    // Unsupported dtype: the header is valid, reading converts only F32/F16/BF16.
    const i8 = await put(
      "i8.safetensors",
      fileBytes({ q: { dtype: "I8", shape: [4, 4], data_offsets: [0, 16] } }, data),
    );
    const f = await SafetensorsFile.open(i8);
    try {
      await assert.rejects(() => f.readRows("q"), {
        name: "UnsupportedModelError",
        message: /i8\.safetensors.*tensor q.*dtype I8/,
      });
    } finally {
      f.close();
    }
  }));

Deno.test("sharded BF16 checkpoint round-trips through the index", () =>
  withTempDir(async (dir) => {
    // BF16 rounding is to nearest, ties to even.
    const r = roundToDtype(Float32Array.from([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1.005, -2.5]), "BF16");
    assert.deepEqual(Array.from(r), [1, 1 + 2 ** -6, 1 + 2 ** -7, -2.5]);
    const seed = 7;
    const config = await writeSyntheticHfCheckpoint(dir, {}, { dtype: "BF16", shards: 3, seed });
    const names = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
    assert.deepEqual(names, [
      "config.json",
      "model-00001-of-00003.safetensors",
      "model-00002-of-00003.safetensors",
      "model-00003-of-00003.safetensors",
      "model.safetensors.index.json",
    ]);
    const set = await SafetensorsSet.open(dir);
    try {
      assert.deepEqual(set.files.size, 3);
      for (const [name, t] of set.tensors) {
        const want = roundToDtype(syntheticTensor(name, t.shape, seed), "BF16");
        const got = await set.readRows(name);
        assert.deepEqual(Array.from(got), Array.from(want), name);
        assert.ok(t.dtype === "BF16", `${name} dtype ${t.dtype}`);
      }
      // Row ranges of a matrix.
      const wq = "model.layers.1.self_attn.q_proj.weight";
      const full = await set.readRows(wq);
      assert.deepEqual(
        Array.from(await set.readRows(wq, 5, 9)),
        Array.from(full.slice(5 * config.dim, 9 * config.dim)),
      );
    } finally {
      set.close();
    }
  }));

Deno.test("sharded index errors name the index, tensor and shard", () =>
  withTempDir(async (dir) => {
    await writeSyntheticHfCheckpoint(dir, { nLayers: 1 }, { dtype: "F16", shards: 2, seed: 1 });
    const indexPath = `${dir}/model.safetensors.index.json`;
    const index = JSON.parse(await Deno.readTextFile(indexPath));
    const write = (wm: Record<string, string>) =>
      Deno.writeTextFile(indexPath, JSON.stringify({ ...index, weight_map: wm }));
    await write({ ...index.weight_map, "model.norm.weight": "model-00009-of-00009.safetensors" });
    await assert.rejects(() => SafetensorsSet.open(dir), {
      name: "ModelFormatError",
      message: /index\.json.*model\.norm\.weight.*00009.*does not exist/,
    });
    await write({ ...index.weight_map, "extra.weight": "model-00001-of-00002.safetensors" });
    await assert.rejects(() => SafetensorsSet.open(dir), {
      name: "ModelFormatError",
      message: /extra\.weight.*has no such tensor/,
    });
    await Deno.writeTextFile(indexPath, "{}");
    await assert.rejects(() => SafetensorsSet.open(dir), {
      name: "ModelFormatError",
      message: /weight_map/,
    });
    await Deno.remove(indexPath);
    await assert.rejects(() => SafetensorsSet.open(dir), {
      name: "ModelFormatError",
      message: /neither model\.safetensors nor/,
    });
  }));

Deno.test("data_offsets must cover the data area exactly: no overlap, hole or trailing bytes", () =>
  withTempDir(async (dir) => {
    const open = async (name: string, header: unknown, dataBytes: number) => {
      const p = `${dir}/${name}.safetensors`;
      await Deno.writeFile(p, fileBytes(header, new Uint8Array(dataBytes)));
      return SafetensorsFile.open(p).then((f) => f.close());
    };
    const t = (begin: number, end: number) => ({
      dtype: "F32",
      shape: [(end - begin) / 4],
      data_offsets: [begin, end],
    });
    // k_proj pointing into q_proj's bytes.
    await assert.rejects(() => open("overlap", { q_proj: t(0, 32), k_proj: t(16, 48) }, 48), {
      name: "ModelFormatError",
      message:
        /overlap\.safetensors: tensors q_proj \[0, 32\] and k_proj \[16, 48\] overlap \(data_offsets\)/,
    });
    // The same tensor bytes under two names.
    await assert.rejects(() => open("alias", { a: t(0, 16), b: t(0, 16) }, 16), /overlap/);
    await assert.rejects(() => open("hole", { a: t(0, 16), b: t(32, 48) }, 48), {
      name: "ModelFormatError",
      message:
        /hole\.safetensors: bytes \[16, 32\) of the data area, before tensor b \[32, 48\], belong to no tensor/,
    });
    await assert.rejects(() => open("tail", { a: t(0, 16) }, 24), {
      name: "ModelFormatError",
      message: /tail\.safetensors: the data area has 24 bytes but its tensors cover 16/,
    });
    // Listed out of order, with an empty tensor between: valid.
    await open("ok", {
      b: t(16, 32),
      e: { dtype: "F16", shape: [0], data_offsets: [16, 16] },
      a: t(0, 16),
    }, 32);
  }));

Deno.test("NaN or Inf in a tensor fails its read, naming the tensor and the element", () =>
  withTempDir(async (dir) => {
    for (const dtype of ["F32", "F16", "BF16"] as const) {
      const path = await writeSample(dir, dtype);
      const bytes = await Deno.readFile(path);
      const dataStart = 8 + Number(new DataView(bytes.buffer).getBigUint64(0, true));
      const size = dtype === "F32" ? 4 : 2;
      // w is [3, 4]: element [2, 1] (flat 9) becomes NaN, then b [4] element 3 becomes -Inf.
      bytes.set(encodeDtype(Float32Array.of(NaN), dtype), dataStart + 9 * size);
      bytes.set(encodeDtype(Float32Array.of(-Infinity), dtype), dataStart + (12 + 3) * size);
      await Deno.writeFile(path, bytes);
      const f = await SafetensorsFile.open(path);
      try {
        await assert.rejects(() => f.readRows("w"), {
          name: "ModelFormatError",
          message: new RegExp(`${dtype}\\.safetensors: tensor w holds NaN at \\[2, 1\\]`),
        });
        await assert.rejects(() => f.readRows("w", 2, 3), /tensor w holds NaN at \[2, 1\]/);
        await assert.rejects(() => f.readRowsRaw("b"), /tensor b holds -Inf at \[3\]/);
        // Rows without it read as before.
        assert.deepEqual(Array.from(await f.readRows("w", 0, 2)), Array.from(values.slice(0, 8)));
      } finally {
        f.close();
      }
    }
  }));
