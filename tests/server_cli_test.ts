/**
 * `deno task serve` refuses bad options with one line (`error: ...`, exit 1, no stack trace)
 * before it loads the model: a port in use, an invalid --host, API key and --cors mistakes.
 */
import assert from "node:assert/strict";
import { haveShared, sharedPath, withTempDir } from "./helpers.ts";
import { runServer } from "./server_process.ts";

const MODEL = "models/stories260K/stories260K.bin";
const have = await haveShared(MODEL);

/** Asserts a one-line error matching `re`, before any model loading. */
function assertOneLine(r: { code: number; stderr: string }, re: RegExp, what: string) {
  assert.equal(r.code, 1, `${what}: exit ${r.code}\n${r.stderr}`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `${what}: more than one line:\n${r.stderr}`);
  assert.match(lines[0], /^error: /, what);
  assert.match(lines[0], re, what);
  assert.doesNotMatch(r.stderr, /loading|\n\s+at /, what);
}

Deno.test({
  name: "serve: a port in use and an invalid --host are one line, before loading the model",
  ignore: !have,
  fn: async () => {
    const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (held.addr as Deno.NetAddr).port;
    try {
      const model = ["--model", sharedPath(MODEL)];
      assertOneLine(
        await runServer([...model, "--port", String(port)]),
        new RegExp(`port ${port} on 127\\.0\\.0\\.1 is in use`),
        "port in use",
      );
      for (const host of ["not a host!", "no-such-host.invalid"]) {
        assertOneLine(
          await runServer([...model, "--port", "0", "--host", host]),
          /--host ".*" is not an IP address or known host name/,
          host,
        );
      }
      assertOneLine(
        await runServer([...model, "--port", "0", "--host", "192.0.2.1"]),
        /--host 192\.0\.2\.1 is not an address of this machine/,
        "foreign address",
      );
    } finally {
      held.close();
    }
  },
});

Deno.test({
  name: "serve: API key, --cors, --drain-timeout and --slots mistakes are one line",
  ignore: !have,
  fn: async () => {
    await withTempDir(async (dir) => {
      await Deno.writeTextFile(`${dir}/empty`, "\n");
      const base = ["--model", sharedPath(MODEL), "--port", "0"];
      const cases: [string[], Record<string, string>, RegExp][] = [
        [["--api-key-file", `${dir}/nope`], {}, /--api-key-file .*nope: cannot read it/],
        [["--api-key-file", `${dir}/empty`], {}, /is empty/],
        [["--api-key", "k", "--api-key-file", `${dir}/empty`], {}, /not both/],
        [[], { LOWBIT_API_KEY: "" }, /LOWBIT_API_KEY is empty/],
        [["--cors", "example.com"], {}, /--cors must be \* or an origin/],
        [["--drain-timeout", "soon"], {}, /--drain-timeout must be a number of seconds/],
        [["--slots", "0"], {}, /--slots must be an integer ≥ 1/],
      ];
      for (const [args, env, re] of cases) {
        assertOneLine(await runServer([...base, ...args], env), re, args.join(" "));
      }
    });
  },
});
