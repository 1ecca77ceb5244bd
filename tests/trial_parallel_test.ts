/**
 * CVXQ's trial quantizations on worker threads (issue 17): D_l(f) from the pool equals the
 * calling thread's bit for bit for rtn, gptq and decoupleQ trials on synthetic layers and
 * through measureDistortions on stories260K, and a failed trial is one clear error naming the
 * layer, the format and the problem.
 */
import assert from "node:assert/strict";
import { CANDIDATES, type Format } from "../quantize/allocate.ts";
import { measureDistortions } from "../quantize/distortion.ts";
import { gptqPlan } from "../quantize/gptq.ts";
import { Hessian } from "../quantize/hessian.ts";
import type { Method } from "../quantize/sequential.ts";
import type { TrialLayer } from "../quantize/trial_distortion.ts";
import { TrialPool } from "../quantize/trial_parallel.ts";
import { calibrationSequences } from "../quantize/calibration.ts";
import { openCheckpoint } from "../runtime/checkpoint/open_checkpoint.ts";
import { loadTokenizer } from "../runtime/tokenizer/load_tokenizer.ts";
import { ParameterError } from "../runtime/errors.ts";
import { haveShared, mulberry32, sharedPath, testGpu } from "./helpers.ts";

const MODEL = "models/stories260K-hf", TEXT = "data/tinystories/TinyStories-valid-sample.txt";
const have = await haveShared(MODEL, TEXT);

/** A calibrated layer: W (N, K) with a few large weights, H from correlated inputs, damped. */
function layer(method: Method, N: number, K: number, seed: number): TrialLayer {
  const u = mulberry32(seed), T = 4 * K;
  const W = Float64Array.from({ length: N * K }, () => (u() - 0.5) * (u() < 0.02 ? 8 : 1));
  const X = new Float64Array(T * K);
  for (let t = 0; t < T; t++) {
    const common = u() - 0.5;
    for (let k = 0; k < K; k++) X[t * K + k] = (u() - 0.5) * (1 + (k % 7)) + common;
  }
  const h = new Hessian(K);
  h.addBatch(X, T);
  const H = h.finalize(0.01);
  return { method, W, N, K, H, plan: method === "rtn" ? null : gptqPlan(H, K), iters: 3 };
}

const SHAPES: [number, number][] = [[24, 64], [40, 96], [16, 128]];

/** D_l(f) of every shape at `formats` on `pool`. */
async function distortions(pool: TrialPool, method: Method, formats: readonly Format[]) {
  const D = [];
  for (const [i, [N, K]] of SHAPES.entries()) {
    D.push(await pool.distortions(`layer${i}`, layer(method, N, K, 7 + i), formats));
  }
  return D;
}

// one pool of two workers for every step: under `deno test` a worker's start type-checks its
// module (seconds)
Deno.test("trial pool on two workers, the threshold at 0", async (t) => {
  const one = new TrialPool({ threads: 1 }), two = new TrialPool({ threads: 2, minWork: 0 });
  try {
    for (const method of ["rtn", "gptq", "decoupleq"] as Method[]) {
      await t.step(`${method}: D equals one thread's bit for bit`, async () => {
        const formats = method === "decoupleq"
          ? CANDIDATES.filter((_, i) => i % 2 === 0)
          : CANDIDATES;
        const want = await distortions(one, method, formats);
        const got = await distortions(two, method, formats);
        assert.equal(one.started, 0);
        assert.equal(two.started, 2, "the trials did not run on the workers");
        assert.ok(want.flat().every((d) => d > 0 && Number.isFinite(d)));
        // Object.is per entry: the same code on the same inputs, not merely close
        assert.deepStrictEqual(got, want);
      });
    }

    await t.step("a failed trial names the layer, the format and the problem", async () => {
      const W2 = { bits: 2, groupSize: 32 } as const;
      const W5 = { bits: 5, groupSize: 64 } as unknown as Format;
      for (const pool of [one, two]) {
        for (const method of ["rtn", "gptq", "decoupleq"] as Method[]) {
          const l = layer(method, 24, 64, 3);
          l.W[5 * 64 + 9] = NaN;
          await assert.rejects(
            pool.distortions("model.layers.1.mlp.up_proj.weight", l, [W2, W2]),
            (e: Error) => {
              assert.equal(e.name, "NumericalError");
              assert.match(
                e.message,
                new RegExp(
                  `^${method} trial quantization of model\\.layers\\.1\\.mlp\\.up_proj\\.weight ` +
                    `\\(24×64\\) at W2 g32: .*W\\[5, 9\\] = NaN.*check the checkpoint`,
                ),
              );
              return true;
            },
          );
          // an invalid format: the quantizer's own check, through the worker
          await assert.rejects(
            pool.distortions("blk.0", layer(method, 24, 64, 4), [W2, W5]),
            (e: Error) => {
              assert.equal(e.name, "ParameterError");
              assert.match(
                e.message,
                new RegExp(`^${method} trial .* of blk\\.0 .* at W5 g64: bits must be 2, 3 or 4`),
              );
              return true;
            },
          );
        }
        // a failed trial leaves the pool usable
        const D = await pool.distortions("ok", layer("rtn", 24, 64, 5), [W2, W2]);
        assert.equal(D[0], D[1]);
      }
    });
  } finally {
    one.close();
    two.close();
  }
});

Deno.test("trial pool: small layers stay on the calling thread; bad thread counts are errors", async () => {
  const pool = new TrialPool({ threads: 2 });
  try {
    const l = layer("rtn", 8, 32, 1); // N·K² = 8192, below MIN_TRIAL_WORK
    assert.equal((await pool.distortions("small", l, CANDIDATES)).length, CANDIDATES.length);
    assert.equal(pool.started, 0);
  } finally {
    pool.close();
  }
  for (const threads of [0, 1.5, NaN]) {
    assert.throws(() => new TrialPool({ threads }), ParameterError);
  }
});

Deno.test({
  name: "measureDistortions: --threads 2 gives the D of --threads 1 on stories260K (rtn trials)",
  ignore: !have,
  fn: async () => {
    const ckpt = await openCheckpoint(sharedPath(MODEL));
    try {
      const tok = await loadTokenizer(sharedPath(MODEL));
      const seqs = calibrationSequences(tok, await Deno.readTextFile(sharedPath(TEXT)), {
        seqLen: 64,
        samples: 4,
        seed: 0,
      });
      const gpu = await testGpu();
      const run = async (threads: number) => {
        const lines: string[] = [];
        const m = await measureDistortions(gpu, ckpt, seqs, {
          formats: CANDIDATES,
          method: "rtn",
          threads,
          minParallelWork: 0,
          log: (l) => lines.push(l),
        });
        return { D: m.map((x) => x.D), lines };
      };
      const one = await run(1), two = await run(2);
      assert.equal(one.D.length, 35);
      assert.deepStrictEqual(two.D, one.D);
      // one progress line per layer, then the total
      assert.equal(two.lines.length, 36);
      assert.match(two.lines[34], /^allocation: measured .*down_proj.* \[35\/35\]/);
      assert.match(
        two.lines[35],
        /measured 35 linears at 9 formats in .* s \(rtn trials, 2 threads\)/,
      );
    } finally {
      ckpt.close();
    }
  },
});
