/**
 * The command-line plumbing: one-line errors from the real CLIs (spawned), negative option
 * values, parseArgs' own errors, the progress line, a closed stdout, GPTQ on non-finite inputs.
 */
import assert from "node:assert/strict";
import { parseCli, progress, type ProgressSink } from "../runtime/cli/cli.ts";
import { NumericalError, ParameterError } from "../runtime/errors.ts";
import { gptqQuantize } from "../quantize/gptq.ts";
import { haveShared, rng, sharedPath, withTempDir } from "./helpers.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const MODEL = sharedPath("models/stories260K-hf");
const TEXT = sharedPath("data/tinystories/TinyStories-valid-sample.txt");
const have = await haveShared("models/stories260K-hf", "data/tinystories");

interface Run {
  code: number;
  stdout: string;
  /** stderr's non-empty lines. */
  lines: string[];
}

/** Runs `deno run -A script ...args` in the project root. */
async function cli(script: string, ...args: string[]): Promise<Run> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--no-check", script, ...args],
    cwd: ROOT,
    env: { XDG_RUNTIME_DIR: "/tmp" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  const lines = dec.decode(out.stderr).split("\n").map((l) => l.trimEnd()).filter((l) => l);
  return { code: out.code, stdout: dec.decode(out.stdout), lines };
}

/** Exit 1 with exactly one stderr line, `error: ...` matching `re`, and no stack frame. */
function assertOneLineError(r: Run, re: RegExp): void {
  const all = r.lines.join("\n");
  assert.equal(r.code, 1, all);
  assert.equal(r.lines.length, 1, all);
  assert.match(r.lines[0], /^error: /);
  assert.match(r.lines[0], re);
  assert.ok(!all.includes("    at "), all);
}

/** Runs `code` (TypeScript) as a script in the project root. */
function evalScript(code: string): Promise<Run> {
  return withTempDir(async (dir) => {
    const path = `${dir}/main.ts`;
    await Deno.writeTextFile(path, code.replaceAll("@/", `${ROOT}`));
    return await cli(path);
  });
}

const GENERATE = "runtime/cli/generate_cmd.ts", QUANTIZE = "quantize/quantize_cmd.ts";
const INSPECT = "runtime/cli/inspect_cmd.ts", EVAL = "runtime/cli/eval_cmd.ts";

Deno.test("parseCli: negative numbers are values of options that take one", () => {
  const options = {
    temperature: { type: "string" as const },
    seed: { type: "string" as const, short: "s" },
    chat: { type: "boolean" as const, default: false },
  };
  const { values, positionals } = parseCli({
    args: ["--temperature", "-1", "-s", "-2.5e-3", "--", "--temperature", "-3"],
    options,
    allowPositionals: true,
  });
  assert.equal(values.temperature, "-1");
  assert.equal(values.seed, "-2.5e-3");
  assert.deepEqual(positionals, ["--temperature", "-3"]); // after "--": left alone
  assert.equal(parseCli({ args: ["--temperature=-.5"], options }).values.temperature, "-.5");
  // a boolean takes no value: -1 stays an (unknown) option
  assert.throws(() => parseCli({ args: ["--chat", "-1"], options }), ParameterError);
});

Deno.test("parseCli: parseArgs' errors are one-line ParameterErrors pointing to --help", () => {
  const options = { model: { type: "string" as const }, chat: { type: "boolean" as const } };
  const cases: [string[], RegExp][] = [
    [["--bogus"], /^unknown option --bogus; see --help$/],
    [["--model"], /^--model needs a value; see --help$/],
    [["--model", "--chat"], /^--model needs a value \(one that starts with "-" is written/],
    [["--model", "-x"], /--model=VALUE/],
    [["--chat=yes"], /^--chat takes no value; see --help$/],
    [["extra"], /^unexpected argument "extra"; see --help$/],
  ];
  for (const [args, re] of cases) {
    assert.throws(
      () => parseCli({ args, options }),
      (e: Error) => e instanceof ParameterError && re.test(e.message) && !e.message.includes("\n"),
      args.join(" "),
    );
  }
});

/** A sink that records what progress() writes, with a clock the test moves. */
function recorder(tty: boolean): ProgressSink & { text: string; t: number } {
  const s = { tty, text: "", t: 0, write: (x: string) => void (s.text += x), now: () => s.t };
  return s;
}

const percents = (text: string) => [...text.matchAll(/\((\d+)%\)/g)].map((m) => Number(m[1]));

Deno.test("progress: one line at the end when not a terminal, never above 100%", () => {
  // a total that turns out low (as packed weights' estimate did): 130 of 100 done
  const s = recorder(false), p = progress("loading m", { untilEnd: true, sink: s });
  for (let done = 10; done <= 130; done += 10) {
    p(done * 1e4, 100e4);
    s.t += 300;
  }
  assert.equal(s.text, "", "nothing before the end");
  p.end();
  p.end();
  assert.equal(s.text, "loading m: 1.3 / 1.3 MB (100%)\n");

  // an exact total (downloads): complete at done = total, once; end() adds nothing
  const d = recorder(false), q = progress("downloading f", { sink: d });
  for (let done = 0; done <= 100; done += 25) q(done, 100);
  q(100, 100);
  q.end();
  assert.equal(d.text.split("\n").length - 1, 1, d.text);
  assert.match(d.text, /\(100%\)\n$/);
});

Deno.test("progress: on a terminal, rewritten in place, one newline, at most 100%", () => {
  const s = recorder(true), p = progress("loading m", { untilEnd: true, sink: s });
  for (let done = 10; done <= 150; done += 10) {
    p(done, 100);
    s.t += 300;
  }
  p.end();
  const pct = percents(s.text);
  assert.ok(pct.length > 2 && pct.every((x) => x <= 100), s.text);
  assert.equal(pct[pct.length - 1], 100);
  assert.equal(s.text.indexOf("\n"), s.text.length - 1, "one newline, at the end");
  assert.ok(!s.text.slice(0, -20).includes("(100%)\n"));

  // throttled: calls within 250 ms of the last line print nothing, except the final one
  const t = recorder(true), q = progress("x", { sink: t });
  q(1, 10);
  q(2, 10);
  q(10, 10);
  assert.deepEqual(percents(t.text), [10, 100]);
});

Deno.test("gptq: non-finite weights or Hessian name the layer, and do not ask for damping", () => {
  const N = 8, K = 16, r = rng(3);
  const W = Float64Array.from({ length: N * K }, r);
  const H = new Float64Array(K * K);
  for (let k = 0; k < K; k++) H[k * K + k] = 1 + k / K;
  const opts = { bits: 4 as const, groupSize: 0, layer: "model.layers.2.self_attn.q_proj.weight" };
  assert.ok(gptqQuantize(W, N, K, H, opts).q.length === N * K);
  const bad = (re: RegExp) => (e: Error) =>
    e instanceof NumericalError && re.test(e.message) && e.message.includes(opts.layer) &&
    !/increase|add damping|percdamp/.test(e.message);
  const Wn = W.slice();
  Wn[3 * K + 5] = NaN;
  assert.throws(() => gptqQuantize(Wn, N, K, H, opts), bad(/non-finite weights \(W\[3, 5\] = NaN/));
  const Hi = H.slice();
  Hi[2 * K + 7] = Hi[7 * K + 2] = Infinity;
  assert.throws(() => gptqQuantize(W, N, K, Hi, opts), bad(/non-finite calibration .*H\[2, 7\]/));
  const Wf = Float32Array.from(W);
  Wf[0] = -Infinity;
  assert.throws(() => gptqQuantize(Wf, N, K, H, { ...opts, layer: undefined }), /\(8×16\)/);
});

Deno.test("runMain: errors thrown on purpose are one line; a bug keeps its trace", async () => {
  const run = (body: string) =>
    evalScript(
      `import { runMain } from "@/runtime/cli/cli.ts";\n` +
        `import { NumericalError } from "@/runtime/errors.ts";\n` +
        `runMain(async () => { ${body} });\n`,
    );
  assertOneLineError(await run(`throw new NumericalError("layer 3 is NaN");`), /layer 3 is NaN/);
  assertOneLineError(await run(`await Deno.readFile("/no/such/file");`), /no\/such\/file/);
  const bug = await run(`throw new TypeError("x is undefined");`);
  assert.equal(bug.code, 1);
  assert.ok(bug.lines.some((l) => l.startsWith("    at ")), bug.lines.join("\n"));
});

Deno.test("cli: bad options give the real reason in one line", async () => {
  assertOneLineError(await cli(GENERATE, "--model", MODEL, "--bogus"), /unknown option --bogus/);
  assertOneLineError(await cli(GENERATE, "--model"), /--model needs a value; see --help/);
  const temp = await cli(GENERATE, "--model", MODEL, "--temperature", "-1");
  assertOneLineError(temp, /temperature.*-1/);
  assert.ok(!temp.lines[0].includes("ambiguous"));
  assertOneLineError(await cli(EVAL, "--model", MODEL, "--text", TEXT, "--ctx", "-3"), /--ctx.*-3/);
  assertOneLineError(
    await cli(QUANTIZE, "--model", MODEL, "--out", "/tmp/x.lowbit", "--e2e-epochs", "-2"),
    /--e2e-epochs must be ≥ 0; got -2/,
  );
});

Deno.test("cli: inspect on a directory or a missing file, eval on a directory", async () => {
  await withTempDir(async (dir) => {
    assertOneLineError(await cli(INSPECT, dir), /is a directory/);
    assertOneLineError(await cli(INSPECT, `${dir}/none.lowbit`), /none\.lowbit: no such file/);
    assertOneLineError(await cli(EVAL, "--model", MODEL, "--text", dir), /--text .*a directory/);
  });
});

Deno.test({
  name: "cli: quantize checks --calib and --out before any work",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const out = `${dir}/m.lowbit`;
      const calib = await cli(
        QUANTIZE,
        ...["--model", MODEL, "--method", "gptq", "--calib", `${dir}/none.txt`, "--out", out],
      );
      assertOneLineError(calib, /--calib .*none\.txt: no such file/);
      const outDir = await cli(
        QUANTIZE,
        "--model",
        MODEL,
        "--method",
        "rtn",
        "--out",
        `${dir}/a/m`,
      );
      assertOneLineError(outDir, /--out .*: directory .*\/a does not exist/);
      assertOneLineError(
        await cli(QUANTIZE, "--model", MODEL, "--method", "rtn", "--out", dir),
        /--out .*: is a directory/,
      );
      assert.deepEqual([...Deno.readDirSync(dir)], [], "nothing written");
    }),
});

Deno.test({
  name: "cli: rtn with --calib says the clip search uses the calibration data",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      const args = ["--model", MODEL, "--method", "rtn", "--bits", "4", "--group-size", "32"];
      const r = await cli(
        QUANTIZE,
        ...args,
        ...["--calib", TEXT, "--calib-samples", "4", "--out", `${dir}/m.lowbit`],
      );
      assert.equal(r.code, 0, r.lines.join("\n"));
      assert.equal(r.lines.filter((l) => /rtn with --calib: .*clipping/.test(l)).length, 1);
      const plain = await cli(QUANTIZE, ...args, "--out", `${dir}/p.lowbit`);
      assert.equal(plain.code, 0, plain.lines.join("\n"));
      assert.ok(!plain.lines.some((l) => l.includes("--calib")), plain.lines.join("\n"));
    }),
});

/** stories260K-hf in `dir` with one NaN in layer 0's q_proj weight. */
async function nanCheckpoint(dir: string): Promise<void> {
  for (const f of ["config.json", "tokenizer.json", "tokenizer_config.json"]) {
    await Deno.copyFile(`${MODEL}/${f}`, `${dir}/${f}`);
  }
  const bytes = await Deno.readFile(`${MODEL}/model.safetensors`);
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const t = header["model.layers.0.self_attn.q_proj.weight"];
  assert.equal(t.dtype, "F32");
  new DataView(bytes.buffer).setFloat32(8 + n + t.data_offsets[0] + 4 * 70, NaN, true);
  await Deno.writeFile(`${dir}/model.safetensors`, bytes);
}

Deno.test({
  name: "cli: gptq on weights holding NaN fails in one line about non-finite values",
  ignore: !have,
  fn: () =>
    withTempDir(async (dir) => {
      await nanCheckpoint(dir);
      const r = await cli(
        QUANTIZE,
        ...["--model", dir, "--method", "gptq", "--calib", TEXT, "--calib-samples", "4"],
        ...["--no-compare", "--out", `${dir}/m.lowbit`],
      );
      const all = r.lines.join("\n");
      assert.equal(r.code, 1, all);
      const errors = r.lines.filter((l) => l.startsWith("error: "));
      assert.equal(errors.length, 1, all);
      assert.equal(errors[0], r.lines[r.lines.length - 1]);
      assert.match(errors[0], /non-finite|NaN/i);
      assert.match(errors[0], /q_proj/);
      assert.ok(!/damp/i.test(errors[0]), errors[0]);
      assert.ok(!all.includes("    at "), all);
    }),
});

Deno.test({
  name: "cli: generate whose stdout is closed early (| head) ends quietly, exit 0",
  ignore: !have,
  fn: async () => {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--no-check", GENERATE, "--model", MODEL, "--prompt", "Once upon"]
        .concat(["--max-tokens", "400", "--temperature", "0"]),
      cwd: ROOT,
      env: { XDG_RUNTIME_DIR: "/tmp" },
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const reader = child.stdout.getReader();
    const first = await reader.read();
    assert.ok(!first.done && first.value.length > 0);
    await reader.cancel();
    const [status, stderr] = await Promise.all([child.status, new Response(child.stderr).text()]);
    assert.equal(status.code, 0, stderr);
    assert.ok(!/error|BrokenPipe| {4}at /i.test(stderr), stderr);
    assert.ok(!stderr.includes("decode "), "stopped before the summary line");
  },
});
