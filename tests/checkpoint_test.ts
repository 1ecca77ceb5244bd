/** Tests of the checkpoint readers: HF config parsing and validation, llama2.c .bin, dispatch. */
import assert from "node:assert/strict";
import { tensorNames } from "../runtime/checkpoint/config.ts";
import { parseHfConfig } from "../runtime/checkpoint/hf_checkpoint.ts";
import { hfRowToLlama2cRow } from "../runtime/checkpoint/llama2c_checkpoint.ts";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { ReferenceModel } from "../runtime/reference/reference.ts";
import {
  hfConfigJson,
  roundToDtype,
  syntheticConfig,
  syntheticTensor,
  writeSyntheticHfCheckpoint,
} from "./synthetic.ts";
import { haveShared, sharedPath, withTempDir } from "./helpers.ts";

const binRel = "models/stories260K/stories260K.bin", hfRel = "models/stories260K-hf";
const binPath = sharedPath(binRel), hfDir = sharedPath(hfRel);
const haveStories = await haveShared(binRel, hfRel);

Deno.test({
  name: "stories260K .bin and -hf expose identical tensors (q/k permuted to HF order)",
  ignore: !haveStories,
  fn: async () => {
    const bin = await openCheckpoint(binPath), hf = await openCheckpoint(hfDir);
    try {
      const { architecture: _a, eosIds: _e, ...binRest } = bin.config;
      const { architecture: _b, eosIds: _f, ...hfRest } = hf.config;
      assert.deepEqual(binRest, hfRest);
      assert.deepEqual(bin.config.eosIds, [1, 2]);
      assert.deepEqual(hf.config.architecture, "LlamaForCausalLM");
      assert.deepEqual([...bin.tensors.keys()].sort(), [...hf.tensors.keys()].sort());
      assert.ok(!bin.tensors.has(tensorNames.lmHead), "tied model exposes lm_head");
      for (const name of hf.tensors.keys()) {
        const a = await bin.read(name), b = await hf.read(name);
        assert.ok(a.every((x, i) => x === b[i]), `${name} differs between .bin and safetensors`);
      }
      // Row ranges across head boundaries of a permuted tensor.
      const wk = tensorNames.wk(3), full = await bin.read(wk);
      assert.deepEqual(
        Array.from(await bin.read(wk, 5, 19)),
        Array.from(full.slice(5 * 64, 19 * 64)),
      );
    } finally {
      bin.close();
      hf.close();
    }
  },
});

Deno.test("hfRowToLlama2cRow maps rotate-half rows to interleaved rows", () => {
  // head size 8: HF rows 0..3 are the even llama2.c rows, 4..7 the odd ones.
  assert.deepEqual([...Array(16).keys()].map((r) => hfRowToLlama2cRow(r, 8)), [
    0,
    2,
    4,
    6,
    1,
    3,
    5,
    7,
    8,
    10,
    12,
    14,
    9,
    11,
    13,
    15,
  ]);
});

/** A llama2.c file: header then float32 values 0, 1, 2, ... (`count` of them). */
function llama2cBytes(header: number[], count: number): Uint8Array {
  const out = new Uint8Array(28 + count * 4);
  out.set(new Uint8Array(Int32Array.from(header).buffer));
  out.set(new Uint8Array(Float32Array.from({ length: count }, (_, i) => i).buffer), 28);
  return out;
}

Deno.test("llama2.c: untied classifier, layout, and truncation errors", () =>
  withTempDir(async (dir) => {
    // dim 16, hidden 24, 2 layers, 2 heads (hd 8), 1 kv head, vocab 32 untied, seq 4.
    const header = [16, 24, 2, 2, 1, -32, 4];
    const per = 16 + 256 + 128 + 128 + 256 + 16 + 3 * 24 * 16; // per-layer floats
    const total = 32 * 16 + 2 * per + 16 + 2 * (4 * 8 / 2) + 32 * 16;
    await Deno.writeFile(`${dir}/m.bin`, llama2cBytes(header, total));
    const ck = await openCheckpoint(`${dir}/m.bin`);
    try {
      assert.deepEqual(ck.config.tiedEmbeddings, false);
      assert.deepEqual(ck.config.vocabSize, 32);
      assert.deepEqual(ck.config.nKvHeads, 1);
      assert.deepEqual((await ck.read(tensorNames.embed, 0, 1))[0], 0);
      assert.deepEqual((await ck.read(tensorNames.attnNorm(1)))[0], 512 + 16);
      assert.deepEqual((await ck.read(tensorNames.lmHead))[0], total - 512); // after freq_cis
      // wq of layer 0 starts after the 2 rms_att rows; HF row 4 is llama2.c row 1.
      const wq = await ck.read(tensorNames.wq(0), 4, 5);
      assert.deepEqual(wq[0], 512 + 32 + 16);
    } finally {
      ck.close();
    }
    // Truncated: only 600 floats, so layer 0's wq runs past the end.
    await Deno.writeFile(`${dir}/cut.bin`, llama2cBytes(header, 600));
    await assert.rejects(() => openCheckpoint(`${dir}/cut.bin`), {
      name: "ModelFormatError",
      message:
        /cut\.bin.*model\.layers\.0\.self_attn\.q_proj\.weight \(llama2\.c wq\[0\]\).*bytes \[2204, 3228\) but the file has 2428 bytes/,
    });
    await Deno.writeFile(`${dir}/bad.bin`, llama2cBytes([16, 24, 2, 3, 1, 32, 4], 10));
    await assert.rejects(() => openCheckpoint(`${dir}/bad.bin`), {
      name: "ModelFormatError",
      message:
        /bad\.bin: head size \(header dim 16 \/ n_heads 3\) is 5\.33+; it must be a positive integer/,
    });
  }));

Deno.test("openCheckpoint rejects what it cannot open", () =>
  withTempDir(async (dir) => {
    await assert.rejects(() => openCheckpoint(dir), {
      name: "ModelFormatError",
      message: /has no config\.json/,
    });
    await Deno.writeTextFile(`${dir}/x.gguf`, "GGUF");
    await assert.rejects(() => openCheckpoint(`${dir}/x.gguf`), {
      name: "ModelFormatError",
      message: /x\.gguf: unknown checkpoint type/,
    });
    await assert.rejects(() => openCheckpoint(`${dir}/nope`), {
      name: "ModelFormatError",
      message: /no such file/,
    });
  }));

Deno.test("HF config parsing: defaults, Qwen2, llama3 scaling, eos lists", () => {
  const base = {
    architectures: ["LlamaForCausalLM"],
    hidden_size: 64,
    intermediate_size: 96,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    vocab_size: 100,
    max_position_embeddings: 256,
    rms_norm_eps: 1e-5,
  };
  const c = parseHfConfig(base, "config.json");
  assert.deepEqual([c.nKvHeads, c.headDim, c.ropeTheta, c.tiedEmbeddings, c.qkvBias], [
    4,
    16,
    10000,
    false,
    false,
  ]);
  assert.deepEqual([c.bosId, c.eosIds, c.ropeScaling], [1, [2], null]);
  const q = parseHfConfig({
    ...base,
    architectures: ["Qwen2ForCausalLM"],
    num_key_value_heads: 2,
    head_dim: 32,
    tie_word_embeddings: true,
    eos_token_id: [7, 9],
    bos_token_id: 5,
    rope_theta: 1e6,
  }, "config.json");
  assert.deepEqual(
    [q.qkvBias, q.nKvHeads, q.headDim, q.tiedEmbeddings, q.bosId, q.eosIds, q.ropeTheta],
    [
      true,
      2,
      32,
      true,
      5,
      [7, 9],
      1e6,
    ],
  );
  const l3 = parseHfConfig({
    ...base,
    rope_scaling: {
      type: "llama3",
      factor: 32,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
  }, "config.json");
  assert.deepEqual(l3.ropeScaling, {
    factor: 32,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  });
  const m = parseHfConfig(
    { ...base, architectures: ["MistralForCausalLM"], sliding_window: 128 },
    "config.json",
  );
  assert.deepEqual(m.seqLen, 128);
});

Deno.test("HF config errors: architecture, rope_scaling, fields", () => {
  const base = hfConfigJson(syntheticConfig());
  assert.throws(
    () => parseHfConfig({ ...base, architectures: ["GPT2LMHeadModel"] }, "m/config.json"),
    {
      name: "UnsupportedModelError",
      message: /m\/config\.json.*GPT2LMHeadModel.*LlamaForCausalLM/,
    },
  );
  assert.throws(
    () =>
      parseHfConfig({ ...base, rope_scaling: { rope_type: "yarn", factor: 4 } }, "m/config.json"),
    { name: "UnsupportedModelError", message: /m\/config\.json.*rope_scaling type "yarn"/ },
  );
  assert.throws(() => parseHfConfig({ ...base, hidden_size: undefined }, "m/config.json"), {
    name: "ModelFormatError",
    message: /"hidden_size" must be a positive integer/,
  });
  assert.throws(() => parseHfConfig({ ...base, num_key_value_heads: 3 }, "m/config.json"), {
    name: "ModelFormatError",
    message:
      /m\/config\.json: "num_attention_heads" 4 is not a multiple of "num_key_value_heads" 3/,
  });
});

Deno.test("HF checkpoint: missing tensors, contradicting shapes, tied lm_head ignored", () =>
  withTempDir(async (dir) => {
    const config = await writeSyntheticHfCheckpoint(dir, {}, { dtype: "F16", shards: 1, seed: 3 });
    const cfgPath = `${dir}/config.json`;
    const json = hfConfigJson(config);
    // Round trip (F16) and bias-free tensor set.
    const ck = await openCheckpoint(dir);
    try {
      assert.deepEqual(ck.tensors.size, 3 + 9 * config.nLayers);
      const name = tensorNames.w2(1), shape = ck.tensors.get(name)!.shape;
      const want = roundToDtype(syntheticTensor(name, shape, 3), "F16");
      assert.deepEqual(Array.from(await ck.read(name)), Array.from(want));
    } finally {
      ck.close();
    }
    // Tied: lm_head.weight present but ignored.
    await Deno.writeTextFile(cfgPath, JSON.stringify({ ...json, tie_word_embeddings: true }));
    const tied = await openCheckpoint(dir);
    assert.ok(!tied.tensors.has(tensorNames.lmHead), "lm_head kept for a tied model");
    tied.close();
    // A third layer the file does not have.
    await Deno.writeTextFile(cfgPath, JSON.stringify({ ...json, num_hidden_layers: 3 }));
    await assert.rejects(() => openCheckpoint(dir), {
      name: "ModelFormatError",
      message: /model\.safetensors: tensor model\.layers\.2\.input_layernorm\.weight is missing/,
    });
    // An FFN width the tensors contradict.
    await Deno.writeTextFile(cfgPath, JSON.stringify({ ...json, intermediate_size: 96 }));
    await assert.rejects(() => openCheckpoint(dir), {
      name: "ShapeError",
      message:
        /model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[128,64\], config\.json implies \[96,64\]/,
    });
    // Qwen2 needs q/k/v biases, which this Llama checkpoint lacks.
    await Deno.writeTextFile(
      cfgPath,
      JSON.stringify({ ...json, architectures: ["Qwen2ForCausalLM"] }),
    );
    await assert.rejects(() => openCheckpoint(dir), {
      name: "ModelFormatError",
      message: /q_proj\.bias is missing/,
    });
    await Deno.writeTextFile(
      cfgPath,
      JSON.stringify({ ...json, architectures: ["FalconForCausalLM"] }),
    );
    await assert.rejects(() => openCheckpoint(dir), {
      name: "UnsupportedModelError",
      message: /FalconForCausalLM/,
    });
  }));

Deno.test("HF checkpoint: sharded Qwen2 with biases and llama3 scaling opens", () =>
  withTempDir(async (dir) => {
    const scaling = {
      factor: 8,
      lowFreqFactor: 1,
      highFreqFactor: 4,
      originalMaxPositionEmbeddings: 64,
    };
    await writeSyntheticHfCheckpoint(dir, {
      qkvBias: true,
      tiedEmbeddings: true,
      ropeScaling: scaling,
    }, {
      dtype: "BF16",
      shards: 2,
      seed: 5,
    });
    const ck = await openCheckpoint(dir);
    try {
      assert.deepEqual([ck.config.architecture, ck.config.qkvBias], ["Qwen2ForCausalLM", true]);
      assert.deepEqual(ck.config.ropeScaling, scaling);
      assert.deepEqual(ck.tensors.get(tensorNames.bk(1))!.shape, [32]);
      const bq = await ck.read(tensorNames.bq(0));
      assert.deepEqual(
        Array.from(bq),
        Array.from(roundToDtype(syntheticTensor(tensorNames.bq(0), [64], 5), "BF16")),
      );
    } finally {
      ck.close();
    }
  }));

Deno.test("HF config values no model can have, or beyond lowbit's limits, are named", () => {
  const base = hfConfigJson(syntheticConfig()); // vocab 256
  const cases: [Record<string, unknown>, string, RegExp][] = [
    [
      { num_hidden_layers: 1e7 },
      "UnsupportedModelError",
      /"num_hidden_layers" is 10000000, above lowbit's limit of 1024/,
    ],
    [
      { hidden_size: 2 ** 20, head_dim: 16 },
      "UnsupportedModelError",
      /"hidden_size" is 1048576, above/,
    ],
    [{ vocab_size: 1e9 }, "UnsupportedModelError", /"vocab_size" is 1000000000, above/],
    [{ head_dim: 15 }, "ModelFormatError", /"head_dim" is 15; it must be even/],
    [
      { head_dim: undefined, num_attention_heads: 3, num_key_value_heads: 3 },
      "ModelFormatError",
      /the head dimension \(hidden_size 64 \/ num_attention_heads 3\) is 21\.33\d*; it must be a positive integer/,
    ],
    [
      { bos_token_id: -1 },
      "ModelFormatError",
      /"bos_token_id" is -1; it must be a token id in \[0, 256\)/,
    ],
    [{ bos_token_id: 256 }, "ModelFormatError", /"bos_token_id" is 256; it must be a token id/],
    [{ bos_token_id: 1.5 }, "ModelFormatError", /"bos_token_id" is 1\.5/],
    [
      { eos_token_id: [2, 300] },
      "ModelFormatError",
      /"eos_token_id" is \[2,300\]; it must be token ids in \[0, 256\)/,
    ],
    [{ eos_token_id: -2 }, "ModelFormatError", /"eos_token_id" is \[-2\]/],
    [{ rms_norm_eps: 0 }, "ModelFormatError", /"rms_norm_eps" is 0; it must be a positive number/],
    [{ rms_norm_eps: -1e-5 }, "ModelFormatError", /"rms_norm_eps" is -0\.00001/],
    [
      { rope_theta: -10000 },
      "ModelFormatError",
      /"rope_theta" is -10000; it must be a positive number/,
    ],
    [
      {
        rope_scaling: {
          rope_type: "llama3",
          factor: 8,
          low_freq_factor: 4,
          high_freq_factor: 1,
          original_max_position_embeddings: 64,
        },
      },
      "ModelFormatError",
      /"rope_scaling" is .*; it must be positive factors with highFreqFactor above lowFreqFactor/,
    ],
  ];
  for (const [change, name, message] of cases) {
    assert.throws(() => parseHfConfig({ ...base, ...change }, "m/config.json"), (e: Error) => {
      assert.equal(e.name, name, `${JSON.stringify(change)}: ${e.message}`);
      assert.match(e.message, message);
      assert.ok(e.message.startsWith("m/config.json: "), e.message);
      return true;
    });
  }
});

Deno.test("HF checkpoint: absurd num_hidden_layers or a NaN weight: one clear error", () =>
  withTempDir(async (dir) => {
    const config = await writeSyntheticHfCheckpoint(dir, {}, { dtype: "F16", shards: 1, seed: 3 });
    const cfgPath = `${dir}/config.json`, json = hfConfigJson(config);
    await Deno.writeTextFile(cfgPath, JSON.stringify({ ...json, num_hidden_layers: 1e7 }));
    await assert.rejects(() => openCheckpoint(dir), {
      name: "UnsupportedModelError",
      message: /config\.json: "num_hidden_layers" is 10000000, above lowbit's limit of 1024/,
    });
    // Within the limit but beyond the file: the first missing layer, not 1000 layers built.
    await Deno.writeTextFile(cfgPath, JSON.stringify({ ...json, num_hidden_layers: 1000 }));
    await assert.rejects(
      () => openCheckpoint(dir),
      /tensor model\.layers\.2\.input_layernorm\.weight is missing/,
    );
    await Deno.writeTextFile(cfgPath, JSON.stringify(json));
    // A NaN in layer 1's down_proj: the checkpoint opens (the header is fine), reading fails.
    const st = `${dir}/model.safetensors`, bytes = await Deno.readFile(st);
    const headerLen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLen)));
    const name = tensorNames.w2(1), [begin] = header[name].data_offsets;
    const cols = config.hiddenDim;
    new DataView(bytes.buffer).setUint16(8 + headerLen + begin + 2 * (3 * cols + 5), 0x7e00, true);
    await Deno.writeFile(st, bytes);
    const ck = await openCheckpoint(dir);
    try {
      await assert.rejects(() => ck.read(name), {
        name: "ModelFormatError",
        message: new RegExp(
          `model\\.safetensors: tensor ${
            name.replaceAll(".", "\\.")
          } holds NaN at \\[3, 5\\] \\(F16\\)`,
        ),
      });
      await assert.rejects(() => ReferenceModel.load(ck), /down_proj\.weight holds NaN/);
    } finally {
      ck.close();
    }
  }));

Deno.test("llama2.c: an absurd header fails early; NaN names the canonical element", () =>
  withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/huge.bin`, llama2cBytes([16, 24, 1e7, 2, 1, 32, 4], 100));
    await assert.rejects(() => openCheckpoint(`${dir}/huge.bin`), {
      name: "UnsupportedModelError",
      message: /huge\.bin: header n_layers is 10000000, above lowbit's limit of 1024/,
    });
    await Deno.writeFile(`${dir}/neg.bin`, llama2cBytes([16, 24, 2, 2, -1, 32, 4], 100));
    await assert.rejects(() => openCheckpoint(`${dir}/neg.bin`), {
      name: "ModelFormatError",
      message: /neg\.bin: header n_kv_heads is -1; it must be a positive integer/,
    });
    // dim 16, 2 heads of 8, tied: wq of layer 0 starts after the embedding and 2 rms_att rows.
    const header = [16, 24, 2, 2, 1, 32, 4];
    const per = 16 + 256 + 128 + 128 + 256 + 16 + 3 * 24 * 16;
    const total = 32 * 16 + 2 * per + 16 + 2 * (4 * 8 / 2);
    const bytes = llama2cBytes(header, total);
    // llama2.c row 2 of head 0 (pair 1, first half) is rotate-half row 1.
    const at = 28 + 4 * (32 * 16 + 2 * 16 + 2 * 16 + 7);
    new DataView(bytes.buffer).setFloat32(at, Infinity, true);
    await Deno.writeFile(`${dir}/inf.bin`, bytes);
    const ck = await openCheckpoint(`${dir}/inf.bin`);
    try {
      await assert.rejects(() => ck.read(tensorNames.wq(0)), {
        name: "ModelFormatError",
        message:
          /inf\.bin: tensor model\.layers\.0\.self_attn\.q_proj\.weight holds \+Inf at \[1, 7\] \(F32\)/,
      });
      await assert.rejects(() => ck.read(tensorNames.wq(0), 1, 2), /holds \+Inf at \[1, 7\]/);
      assert.equal((await ck.read(tensorNames.wq(0), 2, 4)).length, 32); // other rows read
    } finally {
      ck.close();
    }
  }));
