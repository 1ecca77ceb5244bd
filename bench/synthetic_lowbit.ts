/**
 * Synthetic packed models for the benchmarks: random codes and fp16 scales/zeros for every
 * linear layer (with `head`, the logits layer too, untied), random fp16 embeddings, unit norms,
 * written as a .lowbit one tensor at a time.
 */
import {
  expectedShapes,
  type ModelConfig,
  tensorNames as T,
} from "../runtime/checkpoint/config.ts";
import { createLowbitWriter } from "../runtime/format/lowbit_writer.ts";
import { paddedK } from "../runtime/format/pack.ts";
import { type Bits, nGroups } from "../runtime/format/qtensor.ts";
import { syntheticTensorChunks } from "../tests/synthetic.ts";

const LINEARS = [T.wq, T.wk, T.wv, T.wo, T.w1, T.w3, T.w2];

export async function writeSyntheticLowbit(
  path: string,
  c: ModelConfig,
  bits: Bits,
  groupSize: number,
  head = false,
): Promise<void> {
  if (head) c = { ...c, tiedEmbeddings: false };
  const linear = new Set(
    Array.from({ length: c.nLayers }, (_, l) => LINEARS.map((f) => f(l))).flat(),
  );
  if (head) linear.add(T.lmHead);
  const tensors = [...expectedShapes(c)].map(([name, shape]) =>
    linear.has(name)
      ? { name, shape, dtype: "Q" as const, quant: { bits, groupSize } }
      : { name, shape, dtype: shape.length === 1 ? "F32" as const : "F16" as const }
  );
  const w = await createLowbitWriter(path, {
    config: c,
    tokenizer: null,
    quantization: { method: "synthetic", bits, groupSize },
    tensors,
  });
  let seed = 1;
  for (const t of tensors) {
    if (t.dtype === "Q") {
      const [N, K] = t.shape;
      const qweight = new Uint32Array(N * bits * paddedK(K) / 32);
      for (let i = 0; i < qweight.length; i++) qweight[i] = (Math.random() * 2 ** 32) >>> 0;
      const sz = new Uint32Array(N * nGroups(K, groupSize));
      const s = new Float16Array(2);
      for (let i = 0; i < sz.length; i++) {
        s[0] = (0.5 + Math.random()) / Math.sqrt(K) / 2 ** bits; // scale
        s[1] = -s[0] * 2 ** (bits - 1); // zero: centred codes
        sz[i] = new Uint32Array(s.buffer)[0];
      }
      await w.writeTensor(t.name, { qweight, sz });
    } else if (t.shape.length === 1) {
      await w.writeTensor(t.name, new Float32Array(t.shape[0]).fill(1));
    } else {
      const data = new Float32Array(t.shape[0] * t.shape[1]);
      let o = 0;
      for (const ch of syntheticTensorChunks(t.name, t.shape, seed++)) {
        data.set(ch, o);
        o += ch.length;
      }
      await w.writeTensor(t.name, data);
    }
  }
  await w.close();
}
