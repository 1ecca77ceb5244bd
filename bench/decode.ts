/**
 * `deno task bench decode`: greedy decode throughput of stories260K (and any --model given) with
 * the pipelined generation loop, against a loop that waits on the GPU after every token.
 */
import { parseArgs } from "node:util";
import { loadModel } from "../runtime/model/load.ts";
import { generate } from "../runtime/model/generate.ts";
import { GREEDY } from "../runtime/model/model.ts";
import { recordResults, table, today } from "./results.ts";

const STORIES =
  new URL("../../shared/models/stories260K/stories260K.bin", import.meta.url).pathname;

export async function benchDecode(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: { model: { type: "string" }, tokens: { type: "string", default: "500" } },
  });
  const path = values.model ?? STORIES;
  const n = Number(values.tokens);
  const { model, gpu } = await loadModel(path, { quiet: true });
  const rows: (string | number)[][] = [];
  const run = async (label: string, batch: number, inflight: number) => {
    const best = [];
    for (let rep = 0; rep < 3; rep++) {
      const it = generate(model, {
        prompt: [model.config.bosId],
        maxTokens: n,
        sampling: GREEDY,
        stopIds: [],
      }, { batch, inflight });
      let r = await it.next();
      while (!r.done) r = await it.next();
      best.push((r.value.generatedTokens - 1) / (r.value.decodeMs / 1000));
    }
    const tps = Math.max(...best);
    console.log(`${label}: ${tps.toFixed(1)} tok/s`);
    rows.push([label, tps.toFixed(1)]);
  };
  await run("pipelined (8 steps per read-back, 3 read-backs in flight)", 8, 3);
  await run("wait on the GPU after every token", 1, 1);
  const name = path.split("/").slice(-2).join("/");
  await recordResults(
    `decode ${name}`,
    gpu.adapterName,
    `${today()}, ${n} greedy tokens from BOS, best of 3, weights ${model.weights.format}.\n\n` +
      table(["loop", "decode tok/s"], rows),
  );
}
