/**
 * One Llama decoder block on the CPU, forward and backward, over one sequence (T tokens at
 * positions 0..T−1, causal), for decoupleQ's stage 2 (tuning scales, zeros and norm weights
 * against the full-precision block's output). The math is runtime/reference/reference.ts's, layer by
 * layer:
 *
 *   xn1 = rmsnorm(x, g1);  q, k, v = xn1·Wq/k/vᵀ (+ b);  rope(q), rope(k)
 *   att = causal softmax(q·kᵀ/√hd)·v (GQA);  h = x + att·Woᵀ
 *   xn2 = rmsnorm(h, g2);  m = silu(xn2·W1ᵀ) ⊙ (xn2·W3ᵀ);  out = h + m·W2ᵀ
 *
 * Storage and arithmetic are float64 throughout: in V8 float64 loops are as fast as float32
 * ones, exact enough for finite-difference checks, and keeping every hot loop on one array
 * type keeps it monomorphic (mixing Float32Array and Float64Array at the same load site halves
 * the matmul speed). Inputs may be Float32Array or Float64Array; they are copied in.
 *
 * Every matrix product is written as C (M, N) = A (M, K)·B (N, K)ᵀ over contiguous rows
 * ({@link gemmABt}); backward products use transposed copies (weights transposed once per
 * {@link BlockMath.setParams}, activations per call).
 */
import { type ModelConfig, ropeInvFreq } from "../runtime/checkpoint/config.ts";
import { ShapeError } from "../runtime/errors.ts";

/** The seven linear layers of a block, in the order they run. */
export type LinearKey = "wq" | "wk" | "wv" | "wo" | "w1" | "w3" | "w2";
export const LINEAR_KEYS: readonly LinearKey[] = ["wq", "wk", "wv", "wo", "w1", "w3", "w2"];

/** What a block needs of the model config. */
export type BlockConfig = Pick<
  ModelConfig,
  | "dim"
  | "hiddenDim"
  | "nHeads"
  | "nKvHeads"
  | "headDim"
  | "normEps"
  | "ropeTheta"
  | "ropeScaling"
  | "qkvBias"
>;

/** Any float vector the block accepts as input. */
export type FloatArray = Float32Array | Float64Array;

/** A block's parameters: linear weights (N, K) row-major, norm weights (dim), q/k/v biases. */
export interface BlockParams {
  linears: Record<LinearKey, FloatArray>;
  attnNorm: FloatArray;
  ffnNorm: FloatArray;
  /** Required when config.qkvBias. */
  bias?: { bq: FloatArray; bk: FloatArray; bv: FloatArray } | null;
}

/** Gradients of a scalar loss, accumulated over sequences by {@link BlockMath.backward}. */
export interface BlockGrads {
  /** dL/dŴ (N, K) per linear: Σ_t δ_t x_tᵀ. */
  linears: Record<LinearKey, Float64Array>;
  attnNorm: Float64Array; // (dim)
  ffnNorm: Float64Array; // (dim)
}

/** (N, K) of each linear layer. */
export function linearShapes(c: BlockConfig): Record<LinearKey, [number, number]> {
  const qd = c.nHeads * c.headDim, kvd = c.nKvHeads * c.headDim;
  return {
    wq: [qd, c.dim],
    wk: [kvd, c.dim],
    wv: [kvd, c.dim],
    wo: [c.dim, qd],
    w1: [c.hiddenDim, c.dim],
    w3: [c.hiddenDim, c.dim],
    w2: [c.dim, c.hiddenDim],
  };
}

/** Zeroed gradients for a block of this config. */
export function createGrads(c: BlockConfig): BlockGrads {
  const shapes = linearShapes(c);
  const linears = {} as Record<LinearKey, Float64Array>;
  for (const key of LINEAR_KEYS) linears[key] = new Float64Array(shapes[key][0] * shapes[key][1]);
  return { linears, attnNorm: new Float64Array(c.dim), ffnNorm: new Float64Array(c.dim) };
}

/** Sets every gradient to zero. */
export function zeroGrads(g: BlockGrads): void {
  for (const key of LINEAR_KEYS) g.linears[key].fill(0);
  g.attnNorm.fill(0);
  g.ffnNorm.fill(0);
}

// ---------------------------------------------------------------------------------------------
// Matrix products.

/**
 * C (M, N) = A (M, K)·B (N, K)ᵀ, or C += that when `accumulate`. All row-major. Register
 * blocked 4×4 (16 float64 accumulators; the JIT keeps them in registers), remainders 4×1, 1×1.
 */
export function gemmABt(
  C: Float64Array,
  A: Float64Array,
  B: Float64Array,
  M: number,
  N: number,
  K: number,
  accumulate = false,
): void {
  const M4 = M - (M % 4), N4 = N - (N % 4);
  for (let m = 0; m < M4; m += 4) {
    const a0 = m * K, a1 = a0 + K, a2 = a1 + K, a3 = a2 + K;
    for (let n = 0; n < N4; n += 4) {
      const b0 = n * K, b1 = b0 + K, b2 = b1 + K, b3 = b2 + K;
      let s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      let s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
      for (let k = 0; k < K; k++) {
        const w0 = B[b0 + k], w1 = B[b1 + k], w2 = B[b2 + k], w3 = B[b3 + k];
        let x = A[a0 + k];
        s00 += x * w0, s01 += x * w1, s02 += x * w2, s03 += x * w3;
        x = A[a1 + k];
        s10 += x * w0, s11 += x * w1, s12 += x * w2, s13 += x * w3;
        x = A[a2 + k];
        s20 += x * w0, s21 += x * w1, s22 += x * w2, s23 += x * w3;
        x = A[a3 + k];
        s30 += x * w0, s31 += x * w1, s32 += x * w2, s33 += x * w3;
      }
      let c = m * N + n;
      if (accumulate) {
        C[c] += s00, C[c + 1] += s01, C[c + 2] += s02, C[c + 3] += s03, c += N;
        C[c] += s10, C[c + 1] += s11, C[c + 2] += s12, C[c + 3] += s13, c += N;
        C[c] += s20, C[c + 1] += s21, C[c + 2] += s22, C[c + 3] += s23, c += N;
        C[c] += s30, C[c + 1] += s31, C[c + 2] += s32, C[c + 3] += s33;
      } else {
        C[c] = s00, C[c + 1] = s01, C[c + 2] = s02, C[c + 3] = s03, c += N;
        C[c] = s10, C[c + 1] = s11, C[c + 2] = s12, C[c + 3] = s13, c += N;
        C[c] = s20, C[c + 1] = s21, C[c + 2] = s22, C[c + 3] = s23, c += N;
        C[c] = s30, C[c + 1] = s31, C[c + 2] = s32, C[c + 3] = s33;
      }
    }
    for (let n = N4; n < N; n++) {
      const b = n * K;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let k = 0; k < K; k++) {
        const w = B[b + k];
        s0 += A[a0 + k] * w, s1 += A[a1 + k] * w, s2 += A[a2 + k] * w, s3 += A[a3 + k] * w;
      }
      const c = m * N + n;
      if (accumulate) C[c] += s0, C[c + N] += s1, C[c + 2 * N] += s2, C[c + 3 * N] += s3;
      else C[c] = s0, C[c + N] = s1, C[c + 2 * N] = s2, C[c + 3 * N] = s3;
    }
  }
  for (let m = M4; m < M; m++) {
    const a = m * K;
    for (let n = 0; n < N; n++) {
      const b = n * K;
      let s = 0;
      for (let k = 0; k < K; k++) s += A[a + k] * B[b + k];
      if (accumulate) C[m * N + n] += s;
      else C[m * N + n] = s;
    }
  }
}

/** out (cols, rows) = inᵀ for `inp` (rows, cols). */
export function transpose(out: Float64Array, inp: FloatArray, rows: number, cols: number): void {
  for (let r = 0; r < rows; r++) {
    const o = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = inp[o + c];
  }
}

/** Y (T, N) = X (T, K)·Wᵀ (+ b): W (N, K). */
export function linearForward(
  Y: Float64Array,
  X: Float64Array,
  W: Float64Array,
  T: number,
  N: number,
  K: number,
  b?: Float64Array | null,
): void {
  gemmABt(Y, X, W, T, N, K);
  if (b) {
    for (let t = 0; t < T; t++) {
      const o = t * N;
      for (let n = 0; n < N; n++) Y[o + n] += b[n];
    }
  }
}

/**
 * Backward of Y = X·Wᵀ: dW (N, K) += dYᵀ·X, and dX (T, K) = dY·W (+= when `accumulateDx`).
 * `Wt` is Wᵀ (K, N); `scratchA` ≥ N·T and `scratchB` ≥ K·T hold dYᵀ and Xᵀ.
 */
export function linearBackward(
  dY: Float64Array,
  X: Float64Array,
  Wt: Float64Array,
  T: number,
  N: number,
  K: number,
  dW: Float64Array,
  dX: Float64Array | null,
  accumulateDx: boolean,
  scratchA: Float64Array,
  scratchB: Float64Array,
): void {
  transpose(scratchA, dY, T, N); // (N, T)
  transpose(scratchB, X, T, K); // (K, T)
  gemmABt(dW, scratchA, scratchB, N, K, T, true);
  if (dX) gemmABt(dX, dY, Wt, T, K, N, accumulateDx);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

/** Y = X·g/√(mean(X²) + eps) per row of X (T, D); inv[t] = 1/√(mean(X_t²) + eps). */
export function rmsnormForward(
  Y: Float64Array,
  inv: Float64Array,
  X: Float64Array,
  g: Float64Array,
  T: number,
  D: number,
  eps: number,
): void {
  for (let t = 0; t < T; t++) {
    const o = t * D;
    let ss = 0;
    for (let i = 0; i < D; i++) ss += X[o + i] * X[o + i];
    const r = 1 / Math.sqrt(ss / D + eps);
    inv[t] = r;
    for (let i = 0; i < D; i++) Y[o + i] = X[o + i] * r * g[i];
  }
}

/**
 * Backward of {@link rmsnormForward}: dg += Σ_t dY_t ⊙ X_t·r_t and
 * dX_t += r_t·(dY_t ⊙ g) − X_t·r_t³·⟨dY_t ⊙ g, X_t⟩/D (always accumulated).
 */
export function rmsnormBackward(
  dY: Float64Array,
  X: Float64Array,
  inv: Float64Array,
  g: Float64Array,
  T: number,
  D: number,
  dX: Float64Array,
  dg: Float64Array,
): void {
  for (let t = 0; t < T; t++) {
    const o = t * D, r = inv[t];
    let dot = 0;
    for (let i = 0; i < D; i++) {
      const dy = dY[o + i], x = X[o + i];
      dot += dy * g[i] * x;
      dg[i] += dy * x * r;
    }
    const c = (r * r * r * dot) / D;
    for (let i = 0; i < D; i++) dX[o + i] += r * dY[o + i] * g[i] - c * X[o + i];
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE (rotate-half): dims (i, i + hd/2) of every head rotate by angle t·invFreq[i].

/** cos/sin tables (T, hd/2) of angle t·invFreq[i]. */
export function ropeTables(
  invFreq: Float64Array,
  T: number,
): { cos: Float64Array; sin: Float64Array } {
  const half = invFreq.length;
  const cos = new Float64Array(T * half), sin = new Float64Array(T * half);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < half; i++) {
      cos[t * half + i] = Math.cos(t * invFreq[i]);
      sin[t * half + i] = Math.sin(t * invFreq[i]);
    }
  }
  return { cos, sin };
}

/**
 * Rotates V (T, nh·hd) in place: by +angle (forward) or −angle (`inverse`, which is the
 * backward: the rotation's transpose).
 */
export function rope(
  V: Float64Array,
  T: number,
  nh: number,
  hd: number,
  cos: Float64Array,
  sin: Float64Array,
  inverse = false,
): void {
  const half = hd / 2, width = nh * hd, sign = inverse ? -1 : 1;
  for (let t = 0; t < T; t++) {
    const ct = t * half;
    for (let h = 0; h < nh; h++) {
      const o = t * width + h * hd;
      for (let i = 0; i < half; i++) {
        const c = cos[ct + i], s = sign * sin[ct + i];
        const x0 = V[o + i], x1 = V[o + i + half];
        V[o + i] = x0 * c - x1 * s;
        V[o + i + half] = x0 * s + x1 * c;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Causal attention with grouped KV heads.

/** Shape of the attention: head h reads KV head ⌊h / (nHeads / nKvHeads)⌋. */
export interface AttentionShape {
  T: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
}

/**
 * att (T, nHeads·hd) = softmax_causal(q·kᵀ/√hd)·v per head; stores the probabilities in
 * P (nHeads, T, T) (row t holds positions 0..t). Key positions go four at a time.
 */
export function attentionForward(
  att: Float64Array,
  P: Float64Array,
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  sh: AttentionShape,
): void {
  const { T, nHeads, nKvHeads, headDim: hd } = sh;
  const qw = nHeads * hd, kw = nKvHeads * hd, group = nHeads / nKvHeads;
  const scale = 1 / Math.sqrt(hd);
  for (let h = 0; h < nHeads; h++) {
    const qo = h * hd, ko = Math.floor(h / group) * hd;
    for (let t = 0; t < T; t++) {
      const p = (h * T + t) * T, qt = t * qw + qo;
      // Scores q_t·k_s/√hd, s ≤ t.
      let s = 0;
      for (; s + 3 <= t; s += 4) {
        const k0 = s * kw + ko, k1 = k0 + kw, k2 = k1 + kw, k3 = k2 + kw;
        let d0 = 0, d1 = 0, d2 = 0, d3 = 0;
        for (let i = 0; i < hd; i++) {
          const x = q[qt + i];
          d0 += x * k[k0 + i], d1 += x * k[k1 + i], d2 += x * k[k2 + i], d3 += x * k[k3 + i];
        }
        P[p + s] = d0 * scale, P[p + s + 1] = d1 * scale;
        P[p + s + 2] = d2 * scale, P[p + s + 3] = d3 * scale;
      }
      for (; s <= t; s++) {
        const ks = s * kw + ko;
        let d = 0;
        for (let i = 0; i < hd; i++) d += q[qt + i] * k[ks + i];
        P[p + s] = d * scale;
      }
      // Softmax over s ≤ t.
      let max = -Infinity;
      for (let s = 0; s <= t; s++) if (P[p + s] > max) max = P[p + s];
      let sum = 0;
      for (let s = 0; s <= t; s++) sum += P[p + s] = Math.exp(P[p + s] - max);
      const r = 1 / sum;
      for (let s = 0; s <= t; s++) P[p + s] *= r;
      // att_t = Σ_s P[t, s]·v_s.
      for (let i = 0; i < hd; i++) att[qt + i] = 0;
      s = 0;
      for (; s + 3 <= t; s += 4) {
        const w0 = P[p + s], w1 = P[p + s + 1], w2 = P[p + s + 2], w3 = P[p + s + 3];
        const v0 = s * kw + ko, v1 = v0 + kw, v2 = v1 + kw, v3 = v2 + kw;
        for (let i = 0; i < hd; i++) {
          att[qt + i] += w0 * v[v0 + i] + w1 * v[v1 + i] + w2 * v[v2 + i] + w3 * v[v3 + i];
        }
      }
      for (; s <= t; s++) {
        const w = P[p + s], vs = s * kw + ko;
        for (let i = 0; i < hd; i++) att[qt + i] += w * v[vs + i];
      }
    }
  }
}

/**
 * Backward of {@link attentionForward}: dq (overwritten), dk, dv (zeroed here, then
 * accumulated over the heads sharing them). dS = P ⊙ (dP − ⟨P, dP⟩)/√hd with dP = datt·vᵀ;
 * dq_t = Σ_s dS[t, s]·k_s, dk_s += dS[t, s]·q_t, dv_s += P[t, s]·datt_t. `dp` is scratch of
 * length ≥ T. Key positions go four at a time.
 */
export function attentionBackward(
  datt: Float64Array,
  P: Float64Array,
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  sh: AttentionShape,
  dq: Float64Array,
  dk: Float64Array,
  dv: Float64Array,
  dp: Float64Array,
): void {
  const { T, nHeads, nKvHeads, headDim: hd } = sh;
  const qw = nHeads * hd, kw = nKvHeads * hd, group = nHeads / nKvHeads;
  const scale = 1 / Math.sqrt(hd);
  dk.fill(0, 0, T * kw);
  dv.fill(0, 0, T * kw);
  for (let h = 0; h < nHeads; h++) {
    const qo = h * hd, ko = Math.floor(h / group) * hd;
    for (let t = 0; t < T; t++) {
      const p = (h * T + t) * T, qt = t * qw + qo;
      // dP[s] = datt_t·v_s.
      let s = 0;
      for (; s + 3 <= t; s += 4) {
        const v0 = s * kw + ko, v1 = v0 + kw, v2 = v1 + kw, v3 = v2 + kw;
        let d0 = 0, d1 = 0, d2 = 0, d3 = 0;
        for (let i = 0; i < hd; i++) {
          const a = datt[qt + i];
          d0 += a * v[v0 + i], d1 += a * v[v1 + i], d2 += a * v[v2 + i], d3 += a * v[v3 + i];
        }
        dp[s] = d0, dp[s + 1] = d1, dp[s + 2] = d2, dp[s + 3] = d3;
      }
      for (; s <= t; s++) {
        const vs = s * kw + ko;
        let d = 0;
        for (let i = 0; i < hd; i++) d += datt[qt + i] * v[vs + i];
        dp[s] = d;
      }
      // dS[s] = P[s]·(dP[s] − ⟨P, dP⟩)/√hd, in place of dP.
      let pdp = 0;
      for (let s = 0; s <= t; s++) pdp += P[p + s] * dp[s];
      for (let s = 0; s <= t; s++) dp[s] = P[p + s] * (dp[s] - pdp) * scale;
      // dq_t, dk_s, dv_s.
      for (let i = 0; i < hd; i++) dq[qt + i] = 0;
      s = 0;
      for (; s + 3 <= t; s += 4) {
        const k0 = s * kw + ko, k1 = k0 + kw, k2 = k1 + kw, k3 = k2 + kw;
        const e0 = dp[s], e1 = dp[s + 1], e2 = dp[s + 2], e3 = dp[s + 3];
        const w0 = P[p + s], w1 = P[p + s + 1], w2 = P[p + s + 2], w3 = P[p + s + 3];
        for (let i = 0; i < hd; i++) {
          const x = q[qt + i], a = datt[qt + i];
          dq[qt + i] += e0 * k[k0 + i] + e1 * k[k1 + i] + e2 * k[k2 + i] + e3 * k[k3 + i];
          dk[k0 + i] += e0 * x, dk[k1 + i] += e1 * x, dk[k2 + i] += e2 * x, dk[k3 + i] += e3 * x;
          dv[k0 + i] += w0 * a, dv[k1 + i] += w1 * a, dv[k2 + i] += w2 * a, dv[k3 + i] += w3 * a;
        }
      }
      for (; s <= t; s++) {
        const e = dp[s], w = P[p + s], ks = s * kw + ko;
        for (let i = 0; i < hd; i++) {
          dq[qt + i] += e * k[ks + i];
          dk[ks + i] += e * q[qt + i];
          dv[ks + i] += w * datt[qt + i];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU.

/** m = silu(a) ⊙ b elementwise over n entries. */
export function siluMulForward(m: Float64Array, a: Float64Array, b: Float64Array, n: number) {
  for (let i = 0; i < n; i++) {
    const x = a[i];
    m[i] = (x / (1 + Math.exp(-x))) * b[i];
  }
}

/** da = dm ⊙ b ⊙ silu′(a), db = dm ⊙ silu(a); silu′(x) = σ(x)·(1 + x·(1 − σ(x))). */
export function siluMulBackward(
  dm: Float64Array,
  a: Float64Array,
  b: Float64Array,
  da: Float64Array,
  db: Float64Array,
  n: number,
): void {
  for (let i = 0; i < n; i++) {
    const x = a[i], sg = 1 / (1 + Math.exp(-x));
    da[i] = dm[i] * b[i] * sg * (1 + x * (1 - sg));
    db[i] = dm[i] * x * sg;
  }
}

// ---------------------------------------------------------------------------------------------
// The block.

/**
 * Forward and backward of one decoder block over sequences of up to `maxT` tokens. Buffers are
 * allocated once; {@link forward} caches what {@link backward} needs, so a backward pass
 * applies to the latest forward pass.
 */
export class BlockMath {
  readonly dim: number;
  readonly hiddenDim: number;
  readonly qDim: number;
  readonly kvDim: number;
  readonly shapes: Record<LinearKey, [number, number]>;
  #c: BlockConfig;
  #maxT: number;
  #cos: Float64Array;
  #sin: Float64Array;
  // Parameters (float64 copies) and transposed weights for the backward products.
  #W = {} as Record<LinearKey, Float64Array>;
  #Wt = {} as Record<LinearKey, Float64Array>;
  #g1: Float64Array;
  #g2: Float64Array;
  #bq: Float64Array | null = null;
  #bk: Float64Array | null = null;
  #bv: Float64Array | null = null;
  #hasParams = false;
  // Forward caches.
  #T = 0;
  #x: Float64Array;
  #inv1: Float64Array;
  #xn1: Float64Array;
  #q: Float64Array;
  #k: Float64Array;
  #v: Float64Array;
  #P: Float64Array;
  #att: Float64Array;
  #h: Float64Array;
  #inv2: Float64Array;
  #xn2: Float64Array;
  #a: Float64Array;
  #b: Float64Array;
  #m: Float64Array;
  #out: Float64Array;
  // Backward scratch.
  #dOut: Float64Array;
  #dh: Float64Array;
  #dm: Float64Array;
  #da: Float64Array;
  #db: Float64Array;
  #dxn: Float64Array;
  #datt: Float64Array;
  #dq: Float64Array;
  #dk: Float64Array;
  #dv: Float64Array;
  #dp: Float64Array;
  #tA: Float64Array;
  #tB: Float64Array;

  constructor(config: BlockConfig, maxT: number) {
    const c = config;
    if (c.nHeads % c.nKvHeads !== 0 || c.headDim % 2 !== 0) {
      throw new ShapeError(
        `block: nHeads ${c.nHeads} must be a multiple of nKvHeads ${c.nKvHeads}, headDim ` +
          `${c.headDim} even`,
      );
    }
    this.#c = c;
    this.#maxT = maxT;
    this.dim = c.dim;
    this.hiddenDim = c.hiddenDim;
    this.qDim = c.nHeads * c.headDim;
    this.kvDim = c.nKvHeads * c.headDim;
    this.shapes = linearShapes(c);
    for (const key of LINEAR_KEYS) {
      const [N, K] = this.shapes[key];
      this.#W[key] = new Float64Array(N * K);
      this.#Wt[key] = new Float64Array(N * K);
    }
    this.#g1 = new Float64Array(c.dim);
    this.#g2 = new Float64Array(c.dim);
    if (c.qkvBias) {
      this.#bq = new Float64Array(this.qDim);
      this.#bk = new Float64Array(this.kvDim);
      this.#bv = new Float64Array(this.kvDim);
    }
    ({ cos: this.#cos, sin: this.#sin } = ropeTables(ropeInvFreq(c as ModelConfig), maxT));
    const { dim, hiddenDim: hid, qDim, kvDim } = this;
    const f = (n: number) => new Float64Array(maxT * n);
    this.#x = f(dim), this.#inv1 = f(1), this.#xn1 = f(dim);
    this.#q = f(qDim), this.#k = f(kvDim), this.#v = f(kvDim);
    this.#P = new Float64Array(c.nHeads * maxT * maxT);
    this.#att = f(qDim), this.#h = f(dim), this.#inv2 = f(1), this.#xn2 = f(dim);
    this.#a = f(hid), this.#b = f(hid), this.#m = f(hid), this.#out = f(dim);
    this.#dOut = f(dim), this.#dh = f(dim), this.#dm = f(hid), this.#da = f(hid);
    this.#db = f(hid), this.#dxn = f(dim), this.#datt = f(qDim);
    this.#dq = f(qDim), this.#dk = f(kvDim), this.#dv = f(kvDim), this.#dp = f(1);
    const widest = Math.max(dim, hid, qDim);
    this.#tA = f(widest), this.#tB = f(widest);
  }

  /** Copies the parameters in (as float64) and prepares the transposed weights. */
  setParams(p: BlockParams): void {
    for (const key of LINEAR_KEYS) {
      const [N, K] = this.shapes[key], W = p.linears[key];
      if (W.length !== N * K) {
        throw new ShapeError(`block: ${key} has ${W.length} entries, expected (${N}, ${K})`);
      }
      this.#W[key].set(W);
      transpose(this.#Wt[key], this.#W[key], N, K);
    }
    if (p.attnNorm.length !== this.dim || p.ffnNorm.length !== this.dim) {
      throw new ShapeError(`block: norm weights must have ${this.dim} entries`);
    }
    this.#g1.set(p.attnNorm);
    this.#g2.set(p.ffnNorm);
    if (this.#c.qkvBias) {
      if (!p.bias) throw new ShapeError("block: config.qkvBias needs bq, bk, bv");
      this.#bq!.set(p.bias.bq);
      this.#bk!.set(p.bias.bk);
      this.#bv!.set(p.bias.bv);
    }
    this.#hasParams = true;
  }

  /**
   * Runs the block on x (T, dim) and returns its output (T, dim): a view of an internal buffer,
   * valid until the next forward.
   */
  forward(x: FloatArray, T: number): Float64Array {
    if (!this.#hasParams) throw new ShapeError("block: forward before setParams");
    if (!Number.isInteger(T) || T < 1 || T > this.#maxT || x.length !== T * this.dim) {
      throw new ShapeError(
        `block: input of ${x.length} entries for T = ${T} (≤ ${this.#maxT}) × ${this.dim}`,
      );
    }
    const c = this.#c, { dim, hiddenDim: hid, qDim, kvDim } = this, W = this.#W;
    this.#T = T;
    const X = this.#x;
    X.set(x);
    rmsnormForward(this.#xn1, this.#inv1, X, this.#g1, T, dim, c.normEps);
    linearForward(this.#q, this.#xn1, W.wq, T, qDim, dim, this.#bq);
    linearForward(this.#k, this.#xn1, W.wk, T, kvDim, dim, this.#bk);
    linearForward(this.#v, this.#xn1, W.wv, T, kvDim, dim, this.#bv);
    rope(this.#q, T, c.nHeads, c.headDim, this.#cos, this.#sin);
    rope(this.#k, T, c.nKvHeads, c.headDim, this.#cos, this.#sin);
    attentionForward(this.#att, this.#P, this.#q, this.#k, this.#v, this.#attShape(T));
    const h = this.#h;
    linearForward(h, this.#att, W.wo, T, dim, qDim);
    for (let i = 0; i < T * dim; i++) h[i] += X[i];
    rmsnormForward(this.#xn2, this.#inv2, h, this.#g2, T, dim, c.normEps);
    linearForward(this.#a, this.#xn2, W.w1, T, hid, dim);
    linearForward(this.#b, this.#xn2, W.w3, T, hid, dim);
    siluMulForward(this.#m, this.#a, this.#b, T * hid);
    const out = this.#out;
    linearForward(out, this.#m, W.w2, T, dim, hid);
    for (let i = 0; i < T * dim; i++) out[i] += h[i];
    return out.subarray(0, T * dim);
  }

  /**
   * Backpropagates dL/d(out) (T, dim) of the latest forward pass, adding into `grads`; writes
   * dL/dx into `dx` (T, dim) when given. Biases get no gradient (they are not tuned).
   * `onOutputGrad`, when given, sees each linear's output gradient dL/dY (T, N) (q and k before
   * RoPE), e.g. to measure output sensitivities (quantize/distortion.ts).
   */
  backward(
    dOut: FloatArray,
    grads: BlockGrads,
    dx?: Float64Array,
    onOutputGrad?: (key: LinearKey, dY: Float64Array) => void,
  ): void {
    const T = this.#T, c = this.#c, { dim, hiddenDim: hid, qDim, kvDim } = this;
    if (T === 0 || dOut.length !== T * dim) {
      throw new ShapeError(`block: backward needs dOut (${T}, ${dim}) of the latest forward`);
    }
    const Wt = this.#Wt, gW = grads.linears, tA = this.#tA, tB = this.#tB;
    const dO = this.#dOut, dh = this.#dh;
    dO.set(dOut);
    // out = h + m·W2ᵀ.
    dh.set(dO.subarray(0, T * dim));
    onOutputGrad?.("w2", dO.subarray(0, T * dim));
    linearBackward(dO, this.#m, Wt.w2, T, dim, hid, gW.w2, this.#dm, false, tA, tB);
    siluMulBackward(this.#dm, this.#a, this.#b, this.#da, this.#db, T * hid);
    onOutputGrad?.("w1", this.#da.subarray(0, T * hid));
    onOutputGrad?.("w3", this.#db.subarray(0, T * hid));
    linearBackward(this.#da, this.#xn2, Wt.w1, T, hid, dim, gW.w1, this.#dxn, false, tA, tB);
    linearBackward(this.#db, this.#xn2, Wt.w3, T, hid, dim, gW.w3, this.#dxn, true, tA, tB);
    rmsnormBackward(this.#dxn, this.#h, this.#inv2, this.#g2, T, dim, dh, grads.ffnNorm);
    // h = x + att·Woᵀ.
    onOutputGrad?.("wo", dh.subarray(0, T * dim));
    linearBackward(dh, this.#att, Wt.wo, T, dim, qDim, gW.wo, this.#datt, false, tA, tB);
    const dq = this.#dq, dk = this.#dk, dv = this.#dv;
    attentionBackward(
      this.#datt,
      this.#P,
      this.#q,
      this.#k,
      this.#v,
      this.#attShape(T),
      dq,
      dk,
      dv,
      this.#dp,
    );
    rope(dq, T, c.nHeads, c.headDim, this.#cos, this.#sin, true);
    rope(dk, T, c.nKvHeads, c.headDim, this.#cos, this.#sin, true);
    onOutputGrad?.("wq", dq.subarray(0, T * qDim));
    onOutputGrad?.("wk", dk.subarray(0, T * kvDim));
    onOutputGrad?.("wv", dv.subarray(0, T * kvDim));
    linearBackward(dq, this.#xn1, Wt.wq, T, qDim, dim, gW.wq, this.#dxn, false, tA, tB);
    linearBackward(dk, this.#xn1, Wt.wk, T, kvDim, dim, gW.wk, this.#dxn, true, tA, tB);
    linearBackward(dv, this.#xn1, Wt.wv, T, kvDim, dim, gW.wv, this.#dxn, true, tA, tB);
    rmsnormBackward(this.#dxn, this.#x, this.#inv1, this.#g1, T, dim, dh, grads.attnNorm);
    if (dx) dx.set(dh.subarray(0, T * dim));
  }

  #attShape(T: number): AttentionShape {
    const c = this.#c;
    return { T, nHeads: c.nHeads, nKvHeads: c.nKvHeads, headDim: c.headDim };
  }
}
