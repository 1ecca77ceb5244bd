/**
 * Total decode throughput of the serving engine on stories260K with 1, 4 and 8 concurrent greedy
 * sequences: `deno run -A bench/engine_throughput.ts [tokens per sequence]`.
 */
import { loadModel } from "../runtime/model/load.ts";
import { Engine } from "../runtime/model/engine.ts";
import { GREEDY } from "../runtime/model/model.ts";

const path = new URL("../../shared/models/stories260K-hf", import.meta.url).pathname;
const n = Number(Deno.args[0] ?? 200);
const { model, tokenizer } = await loadModel(path, { quiet: true, slots: 8 });
for (const conc of [1, 4, 8]) {
  const engine = new Engine(model, tokenizer, "bench", { slots: conc });
  let best = 0;
  for (let rep = 0; rep < 3; rep++) {
    const t0 = performance.now();
    const stats = await Promise.all(
      Array.from({ length: conc }, async (_, i) => {
        const it = engine.submit({
          prompt: tokenizer.encode(["Once upon a time", "The dog", "Lily"][i % 3], { bos: true }),
          maxTokens: n,
          sampling: GREEDY,
          stopIds: [],
        });
        let r = await it.next();
        while (!r.done) r = await it.next();
        return r.value;
      }),
    );
    const ms = performance.now() - t0;
    const tokens = stats.reduce((a, s) => a + s.generatedTokens, 0);
    best = Math.max(best, tokens / (ms / 1000));
  }
  console.log(`${conc} concurrent: ${best.toFixed(0)} tok/s total`);
}
