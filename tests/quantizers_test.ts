/**
 * Tests of the quantizers (quantize/): linear algebra, Hessian, RTN, GPTQ against a naive
 * reference, decoupleQ's float step against a dense least-squares solve, and the layer-loss
 * ordering decoupleQ < GPTQ < RTN on a synthetic layer with correlated inputs.
 */
import assert from "node:assert/strict";
import { DecoupleQ, decoupleQ } from "../quantize/decoupleq.ts";
import { decoupleQParallel } from "../quantize/decoupleq_parallel.ts";
import { GPTQ, gptqPlan, gptqRound } from "../quantize/gptq.ts";
import { calibratedLayer, Hessian, layerLoss } from "../quantize/hessian.ts";
import {
  cholesky,
  choleskyInverse,
  hinvUpperCholesky,
  inverseSPD,
  solveSymmetric,
} from "../quantize/linalg.ts";
import { type Bits, dequantize, effectiveGroupSize, qRange } from "../runtime/format/qtensor.ts";
import { minMaxScaleZero, roundCode, roundToNearest, RTN } from "../quantize/rtn.ts";
import { floatStep, ScaleZeroLsq } from "../quantize/scale_zero_lsq.ts";
import { mulberry32 } from "./helpers.ts";

function assertClose(a: ArrayLike<number>, b: ArrayLike<number>, tol: number, msg: string): void {
  assert.ok(a.length === b.length, `${msg}: lengths ${a.length} vs ${b.length}`);
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    assert.ok(d <= tol * (1 + Math.abs(b[i])), `${msg}: [${i}] ${a[i]} vs ${b[i]}`);
  }
}

function gaussian(r: () => number): () => number {
  return () => Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r());
}

/** Random SPD (n, n): BᵀB / n + 0.1·I. */
function randomSPD(n: number, seed: number): Float64Array {
  const g = gaussian(mulberry32(seed));
  const B = Float64Array.from({ length: n * n }, g);
  const A = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += B[k * n + i] * B[k * n + j];
      A[i * n + j] = s / n + (i === j ? 0.1 : 0);
    }
  }
  return A;
}
function matmul(A: Float64Array, B: Float64Array, n: number): Float64Array {
  const C = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < n; k++) {
      for (let j = 0; j < n; j++) C[i * n + j] += A[i * n + k] * B[k * n + j];
    }
  }
  return C;
}
function transpose(A: Float64Array, n: number): Float64Array {
  const T = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) T[j * n + i] = A[i * n + j];
  return T;
}
const eye = (n: number) =>
  Float64Array.from({ length: n * n }, (_, i) => i % (n + 1) === 0 ? 1 : 0);

/**
 * Synthetic layer: W (N, K) Gaussian with a few outliers; X = Z·M (T, K) with Z Gaussian, M a
 * random mixing matrix (correlated inputs) and 1 column in 16 scaled ×6 (heavy columns).
 */
function syntheticLayer(N: number, K: number, T: number, seed: number) {
  const g = gaussian(mulberry32(seed));
  const W = Float32Array.from({ length: N * K }, () => 0.02 * g());
  for (let i = 0; i < N * K; i += 97) W[i] *= 4;
  const M = Float64Array.from({ length: K * K }, (_, i) => (i % (K + 1) === 0 ? 1 : 0) + 0.3 * g());
  const Z = Float64Array.from({ length: T * K }, g);
  const X = new Float32Array(T * K);
  for (let t = 0; t < T; t++) {
    for (let k = 0; k < K; k++) {
      const z = Z[t * K + k];
      for (let j = 0; j < K; j++) X[t * K + j] += z * M[k * K + j];
    }
  }
  for (let t = 0; t < T; t++) for (let j = 0; j < K; j += 16) X[t * K + j] *= 6;
  return { W, X };
}

Deno.test("linalg: Cholesky of a known matrix, non-PD error, inverse, H⁻¹ factor, solve", () => {
  const A = new Float64Array([4, 12, -16, 12, 37, -43, -16, -43, 98]);
  assertClose(cholesky(A, 3), [2, 0, 0, 6, 1, 0, -8, 5, 3], 1e-14, "cholesky");
  assert.throws(() => cholesky(new Float64Array([1, 2, 2, 1]), 2), {
    name: "NumericalError",
    message: /pivot 1/,
  });

  // n not a multiple of the 4-row groups.
  for (const n of [19, 77]) {
    const H = randomSPD(n, 3);
    const L = cholesky(H, n);
    assertClose(matmul(L, transpose(L, n), n), H, 1e-10, `L·Lᵀ (${n})`);
    assertClose(matmul(inverseSPD(H, n), H, n), eye(n), 1e-10, `inverse·H (${n})`);
    // U from the reversed-Cholesky route equals gptq.py's chol(chol_inverse(chol(H)), upper).
    const U = hinvUpperCholesky(H, n);
    const naive = transpose(cholesky(choleskyInverse(cholesky(H, n), n), n), n);
    assertClose(U, naive, 1e-10, `upper factor of H⁻¹ (${n})`);
    assertClose(matmul(matmul(transpose(U, n), U, n), H, n), eye(n), 1e-10, `UᵀU·H (${n})`);
  }

  const n = 19, H = randomSPD(n, 3);

  const b = Float64Array.from({ length: n }, (_, i) => i - 3);
  const { x, damp } = solveSymmetric(H, b, n);
  assert.ok(damp === 0, "well-conditioned solve needs no damping");
  const Hx = Array.from({ length: n }, (_, i) => x.reduce((s, xj, j) => s + H[i * n + j] * xj, 0));
  assertClose(Hx, b, 1e-10, "H·x = b");
  // Singular [[1, 1], [1, 1]] with b in its range: damped solve gives the small-norm solution.
  const sing = solveSymmetric(new Float64Array([1, 1, 1, 1]), new Float64Array([2, 2]), 2);
  assert.ok(sing.damp > 0, "singular solve must retry with damping");
  assertClose(sing.x, [1, 1], 1e-4, "small-norm solution");
});

Deno.test("hessian: batched XᵀX/T, dead columns, damping; layerLoss matches direct sums", () => {
  const K = 6, T = 11, g = gaussian(mulberry32(5));
  const X = Float32Array.from({ length: T * K }, g);
  for (let t = 0; t < T; t++) X[t * K + 2] = 0; // column 2 dead
  const h = new Hessian(K);
  h.addBatch(X.subarray(0, 7 * K), 7);
  h.addBatch(X.subarray(7 * K), 4);
  const H = h.finalize(0.01);
  const ref = new Float64Array(K * K);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < K; i++) {
      for (let j = 0; j < K; j++) ref[i * K + j] += X[t * K + i] * X[t * K + j] / T;
    }
  }
  ref[2 * K + 2] = 1;
  let mean = 0;
  for (let k = 0; k < K; k++) mean += ref[k * K + k] / K;
  for (let k = 0; k < K; k++) ref[k * K + k] += 0.01 * mean;
  assertClose(H, ref, 1e-12, "H");
  assert.ok(h.dead![2] === 1 && h.dead!.reduce((a, b) => a + b, 0) === 1, "dead column 2");

  const N = 3, W = Float32Array.from({ length: N * K }, g), What = W.map((w) => w + 0.1 * g());
  const cal = calibratedLayer(W, N, K, h);
  assert.ok([0, 1, 2].every((n) => cal.W[n * K + 2] === 0 && W[n * K + 2] !== 0), "dead W zeroed");
  assertClose(cal.H, H, 0, "calibratedLayer's H");
  const { loss, relative, rows } = layerLoss(W, What, H, N, K);
  let direct = 0, base = 0;
  for (let n = 0; n < N; n++) {
    let r = 0;
    for (let i = 0; i < K; i++) {
      for (let j = 0; j < K; j++) {
        r += (What[n * K + i] - W[n * K + i]) * H[i * K + j] * (What[n * K + j] - W[n * K + j]);
        base += W[n * K + i] * H[i * K + j] * W[n * K + j];
      }
    }
    assertClose([rows[n]], [r], 1e-12, `row ${n} loss`);
    direct += r;
  }
  assertClose([loss, relative], [direct, direct / base], 1e-12, "layer loss");
});

/**
 * Naive GPTQ/OBQ reference: visit columns in `order`, quantize, spread (w − ŵ)/[H_F⁻¹]_ii ·
 * [H_F⁻¹]_{i,:} over the remaining columns F, then eliminate column i from H_F⁻¹.
 */
function naiveGptq(
  W: Float32Array,
  N: number,
  K: number,
  H: Float64Array,
  bits: Bits,
  G: number,
  s: Float32Array,
  z: Float32Array,
  order: Int32Array,
): Int8Array {
  const { qmin, qmax } = qRange(bits), nG = Math.ceil(K / G);
  const Q = new Int8Array(N * K);
  for (let n = 0; n < N; n++) {
    const w = Float64Array.from(W.subarray(n * K, (n + 1) * K));
    const Hinv = inverseSPD(H, K);
    for (let t = 0; t < K; t++) {
      const i = order[t], gi = n * nG + Math.floor(i / G);
      const q = roundCode(w[i], s[gi], z[gi], qmin, qmax);
      Q[n * K + i] = q;
      const d = Hinv[i * K + i], err = (w[i] - (s[gi] * q + z[gi])) / d;
      const rest = Array.from(order.subarray(t + 1));
      for (const j of rest) w[j] -= err * Hinv[i * K + j];
      for (const a of rest) {
        for (const b of rest) Hinv[a * K + b] -= Hinv[a * K + i] * Hinv[i * K + b] / d;
      }
    }
  }
  return Q;
}

Deno.test("gptq: blocked, act-ordered rounding equals the naive OBQ recursion", () => {
  const N = 21, K = 38, G = 8, bits = 3;
  const { W, X } = syntheticLayer(N, K, 120, 11);
  const h = new Hessian(K);
  h.addBatch(X, 120);
  const H = h.finalize();
  const sz = minMaxScaleZero(W, N, K, bits, G);
  const plan = gptqPlan(H, K, true);
  assert.ok(plan.order.some((o, i) => o !== i), "act-order permutes the columns");
  const ref = naiveGptq(W, N, K, H, bits, G, sz.scale, sz.zero, plan.order);
  for (const blocksize of [128, 7]) {
    const q = gptqRound(W, N, K, bits, G, sz, plan, blocksize);
    const diff = q.reduce((c, v, i) => c + (v !== ref[i] ? 1 : 0), 0);
    assert.ok(diff === 0, `blocksize ${blocksize}: ${diff} codes differ from the reference`);
  }
  const rtn = roundToNearest(W, N, K, bits, G, sz);
  assert.ok(rtn.some((v, i) => v !== ref[i]), "error feedback must change some codes");
});

Deno.test("gptq: with a diagonal H it equals round-to-nearest under the same s, z", () => {
  const N = 16, K = 96, G = 32, g = gaussian(mulberry32(9));
  const W = Float32Array.from({ length: N * K }, () => 0.02 * g());
  const H = new Float64Array(K * K);
  for (let k = 0; k < K; k++) H[k * K + k] = 0.5 + ((k * 37) % 11); // distinct → act-order moves
  for (const bits of [2, 3, 4] as Bits[]) {
    const sz = minMaxScaleZero(W, N, K, bits, G);
    const q = gptqRound(W, N, K, bits, G, sz, gptqPlan(H, K, true), 32);
    const rtn = roundToNearest(W, N, K, bits, G, sz);
    assert.ok(q.every((v, i) => v === rtn[i]), `${bits}-bit: GPTQ with diagonal H ≠ RTN`);
  }
});

Deno.test("decoupleQ float step: block-wise normal equations = dense least squares", () => {
  const N = 3, K = 8, G = 4, nG = 2, m = 4;
  const { W, X } = syntheticLayer(N, K, 40, 21);
  const h = new Hessian(K);
  h.addBatch(X, 40);
  const H = h.finalize();
  const r = mulberry32(4);
  const q = Int8Array.from({ length: N * K }, () => Math.floor(r() * 4) - 2);
  q[K + 5] = 1; // ensure no group is constant
  const lsq = new ScaleZeroLsq(W, N, K, H, G);
  const M = new Float64Array(N * m * m), b = new Float64Array(N * m);
  lsq.normalEquations(q, 0, N, M, b);
  for (let n = 0; n < N; n++) {
    // Dense A (K, 2nG): column g = q on group g, column nG + g = indicator of group g.
    const A = new Float64Array(K * m);
    for (let k = 0; k < K; k++) {
      const gk = Math.floor(k / G);
      A[k * m + gk] = q[n * K + k];
      A[k * m + nG + gk] = 1;
    }
    const AtHA = new Float64Array(m * m), AtHw = new Float64Array(m);
    for (let a = 0; a < m; a++) {
      for (let i = 0; i < K; i++) {
        for (let j = 0; j < K; j++) {
          for (let c = 0; c < m; c++) AtHA[a * m + c] += A[i * m + a] * H[i * K + j] * A[j * m + c];
          AtHw[a] += A[i * m + a] * H[i * K + j] * W[n * K + j];
        }
      }
    }
    assertClose(M.subarray(n * m * m, (n + 1) * m * m), AtHA, 1e-12, `AᵀHA row ${n}`);
    assertClose(b.subarray(n * m, (n + 1) * m), AtHw, 1e-12, `AᵀHw row ${n}`);
    // Gaussian elimination on the dense system, then check the block solver's θ.
    const aug = Array.from({ length: m }, (_, i) => [...AtHA.subarray(i * m, i * m + m), AtHw[i]]);
    for (let c = 0; c < m; c++) {
      for (let i = c + 1; i < m; i++) {
        const f = aug[i][c] / aug[c][c];
        for (let j = c; j <= m; j++) aug[i][j] -= f * aug[c][j];
      }
    }
    const theta = new Array(m).fill(0);
    for (let i = m - 1; i >= 0; i--) {
      let s = aug[i][m];
      for (let j = i + 1; j < m; j++) s -= aug[i][j] * theta[j];
      theta[i] = s / aug[i][i];
    }
    const th = lsq.solve(M, b, n * m * m, n * m, [0, 0]);
    assertClose(th, theta, 1e-9, `θ row ${n}`);
    // And its loss is the minimum: perturbing θ increases (Aθ − w)ᵀH(Aθ − w).
    const lossAt = (t: ArrayLike<number>) => {
      const d = Array.from({ length: K }, (_, k) => {
        let v = -W[n * K + k];
        for (let c = 0; c < m; c++) v += A[k * m + c] * t[c];
        return v;
      });
      return d.reduce((s, di, i) => s + di * d.reduce((u, dj, j) => u + H[i * K + j] * dj, 0), 0);
    };
    for (let c = 0; c < m; c++) {
      const t = Array.from(th);
      t[c] += 1e-3;
      assert.ok(lossAt(t) > lossAt(th), `θ row ${n} not a minimum along ${c}`);
    }
  }
  // A group whose codes are all 0 leaves its scale undetermined: the solver keeps the current one.
  const q0 = q.slice(0, K);
  q0.fill(0, 0, G);
  lsq.normalEquations(q0, 0, 1, M, b);
  const th0 = lsq.solve(M, b, 0, 0, [0.0123, 0.5]);
  assert.ok(th0[0] === 0.0123, `s of an all-zero group must stay 0.0123, got ${th0[0]}`);
  assert.ok(th0.every(Number.isFinite), "finite θ with an all-zero group");
});

/** RTN, GPTQ and decoupleQ losses on the synthetic layer (two calibration batches). */
function runAll(
  W: Float32Array,
  X: Float32Array,
  N: number,
  K: number,
  T: number,
  bits: Bits,
  G: number,
) {
  const rtn = new RTN(W, N, K), gptq = new GPTQ(W, N, K), dq = new DecoupleQ(W, N, K);
  for (const qz of [rtn, gptq, dq]) {
    qz.addBatch(X.subarray(0, (T / 2) * K), T / 2);
    qz.addBatch(X.subarray((T / 2) * K), T / 2);
  }
  const opts = { bits, groupSize: G };
  const out = {
    rtn: rtn.quantize(opts),
    gptq: gptq.quantize(opts),
    dq: dq.quantize(opts),
    dqPlain: dq.quantize({ ...opts, gridCriterion: "plain" }),
  };
  for (const qz of [rtn, gptq, dq]) qz.free();
  return out;
}

Deno.test("quantizers: layer loss decoupleQ < GPTQ < RTN at 2, 3, 4 bits, G = 32 and 64", () => {
  const N = 64, K = 256, T = 384;
  const { W, X } = syntheticLayer(N, K, T, 1);
  const h = new Hessian(K);
  h.addBatch(X, T);
  const H = h.finalize();
  const fmt = (x: number) => x.toExponential(3);
  for (const bits of [2, 3, 4] as Bits[]) {
    for (const G of [32, 64]) {
      const { rtn, gptq, dq, dqPlain } = runAll(W, X, N, K, T, bits, G);
      console.log(
        `W${bits} g${G}: loss (relative) RTN ${fmt(rtn.loss.loss)} (${fmt(rtn.loss.relative)})` +
          ` GPTQ ${fmt(gptq.loss.loss)} (${fmt(gptq.loss.relative)})` +
          ` decoupleQ ${fmt(dq.loss.loss)} (${fmt(dq.loss.relative)})` +
          ` [grid "plain": ${fmt(dqPlain.loss.loss)}]` +
          ` history ${dq.history.map((s) => fmt(s.loss)).join(" → ")}`,
      );
      assert.ok(gptq.loss.loss < 0.9 * rtn.loss.loss, `W${bits}g${G}: GPTQ not below RTN`);
      assert.ok(dq.loss.loss < 0.99 * gptq.loss.loss, `W${bits}g${G}: decoupleQ not below GPTQ`);
      // The history starts at GPTQ (same static groups, same act-order) and never increases.
      assertClose([dq.history[0].loss], [gptq.loss.loss], 1e-9, "decoupleQ iteration 0 = GPTQ");
      for (let i = 1; i < dq.history.length; i++) {
        const [a, b] = [dq.history[i - 1].loss, dq.history[i].loss];
        assert.ok(b <= a, `W${bits}g${G}: loss rose from ${a} to ${b} at iteration ${i}`);
        assert.ok(dq.history[i].lossAfterInteger <= a, "integer step kept the better rows");
      }
      const last = dq.history[dq.history.length - 1].loss;
      assertClose([last], [dq.loss.loss], 1e-12, "history ends at the reported loss");
      const direct = layerLoss(W, dequantize(dq.ql, new Float64Array(N * K)), H, N, K);
      assertClose(
        [dq.loss.loss, dq.loss.relative],
        [direct.loss, direct.relative],
        1e-8,
        "dQ loss",
      );
      for (const r of [rtn, gptq, dq]) {
        assert.ok(r.ql.scale.every((s) => Math.f16round(s) === s), "scales are fp16 values");
        assert.ok(r.ql.zero.every((z) => Math.f16round(z) === z), "zeros are fp16 values");
      }
    }
  }
});

Deno.test("decoupleQ float step never increases a row's loss and lowers most rows", () => {
  const N = 48, K = 128, T = 256, G = 32, bits = 2;
  const { W, X } = syntheticLayer(N, K, T, 2);
  const h = new Hessian(K);
  h.addBatch(X, T);
  const H = h.finalize();
  const sz = minMaxScaleZero(W, N, K, bits, G);
  const gptqLoss = new Float64Array(N);
  const q = gptqRound(W, N, K, bits, G, sz, gptqPlan(H, K), 128, gptqLoss);
  const lsq = new ScaleZeroLsq(W, N, K, H, G);
  const step = floatStep(lsq, q, sz);
  const ql = { N, K, bits, groupSize: G, q } as const;
  const before = layerLoss(W, dequantize({ ...ql, ...sz }, new Float64Array(N * K)), H, N, K);
  const after = layerLoss(W, dequantize({ ...ql, ...step.sz }, new Float64Array(N * K)), H, N, K);
  assertClose(gptqLoss, before.rows, 1e-8, "GPTQ's |e|² = layerLoss rows");
  assertClose(step.before, before.rows, 1e-8, "quadratic-form loss before = layerLoss rows");
  assertClose(step.after, after.rows, 1e-8, "quadratic-form loss after = layerLoss rows");
  let lowered = 0;
  for (let n = 0; n < N; n++) {
    assert.ok(after.rows[n] <= before.rows[n], `row ${n}: ${before.rows[n]} → ${after.rows[n]}`);
    if (after.rows[n] < 0.99 * before.rows[n]) lowered++;
  }
  assert.ok(lowered > N / 2, `only ${lowered}/${N} rows lowered by the float step`);
  // The full algorithm's per-row result is no worse than its GPTQ start, row by row.
  const dq = decoupleQ(W, N, K, H, { bits, groupSize: G });
  for (let n = 0; n < N; n++) {
    assert.ok(dq.loss.rows[n] <= before.rows[n] * (1 + 1e-9), `decoupleQ row ${n} got worse`);
  }
});

Deno.test("decoupleQ float step: row blocks and column pairs on odd shapes match layerLoss", () => {
  // N not a multiple of the row block (8) nor of 4; K not a multiple of G; odd per-row group.
  for (const [N, K, G] of [[45, 120, 32], [13, 121, 0], [6, 75, 25]]) {
    const { W, X } = syntheticLayer(N, K, 200, N + K);
    const h = new Hessian(K);
    h.addBatch(X, 200);
    const H = h.finalize();
    const sz = minMaxScaleZero(W, N, K, 3, G);
    const q = gptqRound(W, N, K, 3, G, sz, gptqPlan(H, K));
    const step = floatStep(new ScaleZeroLsq(W, N, K, H, G, 8), q, sz);
    const ql = { N, K, bits: 3, groupSize: effectiveGroupSize(K, G), q } as const;
    const deq = (s: typeof sz) => dequantize({ ...ql, ...s }, new Float64Array(N * K));
    const tag = `(${N}, ${K}) G ${G}`;
    assertClose(step.before, layerLoss(W, deq(sz), H, N, K).rows, 1e-8, `${tag} before`);
    assertClose(step.after, layerLoss(W, deq(step.sz), H, N, K).rows, 1e-8, `${tag} after`);
  }
});

Deno.test("decoupleQ on worker threads equals one thread (no early stop)", async () => {
  const N = 70, K = 96, G = 32, g = gaussian(mulberry32(5));
  const W = Float64Array.from({ length: N * K }, () => 0.02 * g());
  const R = 48, B = Float64Array.from({ length: R * K }, g), H = new Float64Array(K * K);
  for (let a = 0; a < R; a++) {
    for (let i = 0; i < K; i++) {
      for (let j = 0; j < K; j++) H[i * K + j] += (B[a * K + i] * B[a * K + j]) / R;
    }
  }
  for (let i = 0; i < K; i++) H[i * K + i] += 0.05;
  const opts = { bits: 2, groupSize: G, iters: 4, minImprovedFraction: 0 } as const;
  const one = decoupleQ(W, N, K, H, opts);
  const par = await decoupleQParallel(W, N, K, H, opts, { threads: 3, minWork: 0 });
  assert.deepEqual(par.ql.q, one.ql.q);
  assert.deepEqual(par.ql.scale, one.ql.scale);
  assert.deepEqual(par.ql.zero, one.ql.zero);
  assertClose(par.loss.rows, one.loss.rows, 1e-12, "per-row losses");
  assert.ok(Math.abs(par.loss.relative - one.loss.relative) <= 1e-12 * one.loss.relative);
  assert.equal(par.history.at(-1)!.loss.toPrecision(10), one.history.at(-1)!.loss.toPrecision(10));
  await assert.rejects(
    decoupleQParallel(W, N, K, H, { ...opts, bits: 5 as 2 }, { threads: 2, minWork: 0 }),
    /decoupleQ worker/,
  );
});

const bench = Deno.permissions.querySync({ name: "env", variable: "LOWBIT_BENCH" }).state ===
    "granted" && Deno.env.get("LOWBIT_BENCH") === "1";

Deno.test({
  name: "timing: decoupleQ stage 1 at W2 g64 (LOWBIT_BENCH=1; prints, asserts nothing)",
  ignore: !bench,
  fn() {
    for (const [N, K] of [[688, 256], [256, 688], [2048, 2048]]) {
      const g = gaussian(mulberry32(N + K));
      const W = Float32Array.from({ length: N * K }, () => 0.02 * g());
      // H = BᵀB/64 + diagonal (correlated inputs, 1 heavy column in 16) without a long X.
      const R = 64, B = Float64Array.from({ length: R * K }, g), H = new Float64Array(K * K);
      for (let a = 0; a < R; a++) {
        for (let i = 0; i < K; i++) {
          const v = B[a * K + i] / R;
          for (let j = 0; j < K; j++) H[i * K + j] += v * B[a * K + j];
        }
      }
      for (let i = 0; i < K; i++) H[i * K + i] += 0.1 + (i % 16 === 0 ? 5 : 0);
      let t = performance.now();
      const lap = () => {
        const now = performance.now(), dt = (now - t) / 1000;
        t = now;
        return dt.toFixed(2);
      };
      const plan = gptqPlan(H, K);
      const tPlan = lap();
      const sz = minMaxScaleZero(W, N, K, 2, 64);
      const q = gptqRound(W, N, K, 2, 64, sz, plan);
      const tRound = lap();
      const lsq = new ScaleZeroLsq(W, N, K, H, 64);
      const tPre = lap();
      lsq.step(q, sz);
      const tStep = lap();
      const dq = decoupleQ(W, N, K, H, { bits: 2, groupSize: 64 });
      const tAll = lap();
      console.log(
        `(${N}, ${K}) W2 g64: decoupleQ ${tAll} s for ${dq.history.length - 1} iterations ` +
          `(rows improved per iteration: ${
            dq.history.map((s) => s.improvedRows).join(", ")
          }); parts: ` +
          `H⁻¹ factor ${tPlan} s, gptqRound ${tRound} s, W·H ${tPre} s, float step ${tStep} s`,
      );
    }
  },
});
