/** Tests of `--calib self` (quantize/self_calibration.ts): sequences sampled from the float model. */
import assert from "node:assert/strict";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { selfCalibrationSequences } from "../quantize/self_calibration.ts";
import { quantizeModel } from "../quantize/quantize_model.ts";
import { openLowbit } from "../runtime/format/lowbit_reader.ts";
import { ParameterError } from "../runtime/errors.ts";
import { haveShared, sharedPath, testGpu, withTempDir } from "./helpers.ts";

const MODEL = "models/stories260K-hf";
const have = await haveShared(MODEL);

Deno.test({
  name: "--calib self: seeded BOS-first sequences from the model, the same whatever the count",
  ignore: !have,
  fn: async () => {
    const gpu = await testGpu();
    const ckpt = await openCheckpoint(sharedPath(MODEL));
    try {
      const tok = await loadTokenizer(sharedPath(MODEL));
      const draw = (count: number, seed: number, slots?: number) =>
        selfCalibrationSequences(gpu, ckpt, tok, { count, seqLen: 40, seed, slots });
      const a = await draw(10, 7);
      assert.equal(a.length, 10);
      for (const s of a) {
        assert.equal(s[0], tok.bosId);
        assert(s.length >= 2 && s.length <= 40, `length ${s.length}`);
        assert(s.every((t) => Number.isInteger(t) && t >= 0 && t < ckpt.config.vocabSize));
      }
      // sequence i depends on (seed, i) only: not on the count, nor on what is sampled beside it
      assert.deepEqual(await draw(4, 7, 3), a.slice(0, 4));
      const b = await draw(4, 8);
      assert.notDeepEqual(b, a.slice(0, 4), "another seed draws other sequences");
      // sampled at temperature 1, the sequences differ from each other
      assert.equal(new Set(a.map((s) => s.join(","))).size, a.length);
      // and they read as the model's text
      const text = tok.decode(a[0].slice(1));
      assert.match(text, /[a-z]+ [a-z]+/i, text);
    } finally {
      ckpt.close();
    }
  },
});

Deno.test({
  name: "quantize --calib self records it in the header; --e2e-windows with it is an error",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const base = {
        model: sharedPath(MODEL),
        method: "gptq" as const,
        bits: 4 as const,
        groupSize: 32,
        calib: { path: "self", seqLen: 32, samples: 8, seed: 1 },
        log: () => {},
      };
      const r = await quantizeModel({ ...base, out: `${dir}/m.lowbit` });
      assert(r.calibTokens > 8 && r.calibTokens <= 8 * 32, `${r.calibTokens} tokens`);
      const f = await openLowbit(`${dir}/m.lowbit`);
      try {
        const q = f.header.quantization as unknown as { calib: { path: string } };
        assert.equal(q.calib.path, "self");
      } finally {
        f.close();
      }
      await assert.rejects(
        () =>
          quantizeModel({
            ...base,
            out: `${dir}/w.lowbit`,
            e2e: { epochs: 1, samples: 8, windows: true },
          }),
        ParameterError,
      );
    }),
});
