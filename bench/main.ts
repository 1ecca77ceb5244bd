/**
 * `deno task bench NAME [options]`: runs one benchmark, prints its figures and records them in
 * bench/RESULTS.md.
 */
import { runMain } from "../runtime/cli/cli.ts";
import { ParameterError } from "../runtime/errors.ts";
import { benchDecode } from "./decode.ts";
import { benchKernels } from "./kernels.ts";
import { benchLoad } from "./load.ts";
import { benchProfile } from "./profile.ts";
import { benchQuality } from "./quality.ts";
import { benchBlocks } from "./quality_blocks.ts";
import { benchQuantize1b } from "./quantize_1b.ts";
import { benchLatency } from "./latency.ts";
import { benchServe } from "./serve.ts";

const BENCHES: Record<string, (args: string[]) => Promise<void>> = {
  decode: benchDecode,
  kernels: benchKernels,
  load: benchLoad,
  quality: benchQuality,
  blocks: benchBlocks,
  "quantize-1b": benchQuantize1b,
  latency: benchLatency,
  serve: benchServe,
  profile: benchProfile,
};

runMain(async () => {
  const [name, ...rest] = Deno.args;
  const bench = BENCHES[name];
  if (!bench) {
    throw new ParameterError(
      `usage: deno task bench <${Object.keys(BENCHES).join("|")}> [options]`,
    );
  }
  await bench(rest);
});
