/**
 * Shutdown of a real listening server (server.ts in a child process, stories260K) under real
 * signals: SIGTERM and SIGINT drain (new requests get 503, /health says "draining", running and
 * queued requests finish, exit 0); past --drain-timeout open streams end with finish_reason
 * "abort" and [DONE] and waiting requests get a 503; a second signal exits at once.
 */
import assert from "node:assert/strict";
import { haveShared, sharedPath } from "./helpers.ts";
import { type ServerProcess, spawnServer, sseData } from "./server_process.ts";

const MODEL = "models/stories260K/stories260K.bin";
const have = await haveShared(MODEL);
const PROMPT = "Once upon a time";

interface Answer {
  status: number;
  headers: Headers;
  body: string;
}

/** A completion request; resolves with the whole answer. `started` resolves at its headers. */
function request(s: ServerProcess, body: Record<string, unknown>) {
  let onHeaders = () => {};
  const started = new Promise<void>((r) => (onHeaders = r));
  const answer = fetch(`${s.url}/v1/completions`, {
    method: "POST",
    body: JSON.stringify({ prompt: PROMPT, temperature: 0.8, ...body }),
  }).then(async (res): Promise<Answer> => {
    onHeaders();
    return { status: res.status, headers: res.headers, body: await res.text() };
  });
  return { started, answer };
}

async function health(s: ServerProcess) {
  const res = await fetch(`${s.url}/health`);
  return { status: res.status, json: await res.json() };
}

/** Polls /health until `ok` holds for it. */
async function until(s: ServerProcess, ok: (h: Awaited<ReturnType<typeof health>>) => boolean) {
  for (let i = 0; i < 2000; i++) {
    if (ok(await health(s))) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`/health never got there:\n${s.log()}`);
}

/** The chunks of a finished stream; asserts it ends with `data: [DONE]`. */
function chunks(a: Answer, what: string) {
  assert.equal(a.status, 200, `${what}: ${a.body}`);
  const data = sseData(a.body);
  assert.equal(data.at(-1), "[DONE]", `${what} does not end with [DONE]`);
  return data.slice(0, -1).map((d) => JSON.parse(d));
}

function assertDraining503(a: Answer, what: string) {
  assert.equal(a.status, 503, `${what}: ${a.status} ${a.body}`);
  assert.ok(Number(a.headers.get("retry-after")) >= 1, what);
  const e = JSON.parse(a.body).error;
  assert.equal(e.type, "server_error", what);
  assert.equal(e.code, "server_draining", what);
}

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test({
    name: `${signal} while streams run and more are queued: all finish, new requests get 503, ` +
      `exit 0`,
    ignore: !have,
    fn: async () => {
      const s = await spawnServer([
        "--model",
        sharedPath(MODEL),
        "--port",
        "0",
        "--slots",
        "2",
        "--drain-timeout",
        "600", // long enough for every request on a loaded machine
      ]);
      const reqs = [
        ...[0, 1, 2, 3].map((i) => request(s, { max_tokens: 150, stream: true, seed: i })),
        ...[4, 5].map((i) => request(s, { max_tokens: 150, seed: i })),
      ];
      await until(s, (h) => h.json.running + h.json.queue_depth === 6);
      s.child.kill(signal);
      await until(s, (h) => h.status === 503);
      const h = await health(s);
      assert.equal(h.json.status, "draining");
      const late = await request(s, { max_tokens: 4 }).answer;
      assertDraining503(late, "a request after the signal");
      const answers = await Promise.all(reqs.map((r) => r.answer));
      for (const [i, a] of answers.slice(0, 4).entries()) {
        const cs = chunks(a, `stream ${i}`);
        const finish = cs.at(-1).choices[0].finish_reason;
        assert.ok(finish === "length" || finish === "stop", `stream ${i}: ${finish}`);
        assert.ok(cs.length > 1, `stream ${i} has no text`);
      }
      for (const [i, a] of answers.slice(4).entries()) {
        assert.equal(a.status, 200, `request ${i}: ${a.body}`);
        const r = JSON.parse(a.body);
        assert.ok(["length", "stop"].includes(r.choices[0].finish_reason));
        assert.ok(r.usage.completion_tokens > 0);
      }
      const st = await s.status;
      assert.equal(st.code, 0, s.log());
      assert.match(s.log(), new RegExp(`${signal}: draining`));
      assert.match(s.log(), /drained: every request finished/);
    },
  });
}

Deno.test({
  name: "past --drain-timeout: streams end with finish_reason abort and [DONE], waiting " +
    "requests get 503, exit 0",
  ignore: !have,
  fn: async () => {
    const s = await spawnServer([
      "--model",
      sharedPath(MODEL),
      "--port",
      "0",
      "--slots",
      "2",
      "--drain-timeout",
      "0",
    ]);
    const long = { max_tokens: 500, stream: true, stream_options: { include_usage: true } };
    const running = [1, 2].map((seed) => request(s, { ...long, seed }));
    await Promise.all(running.map((r) => r.started)); // both hold a slot
    const waiting = [
      request(s, { ...long, seed: 3 }), // a stream still queued: no headers sent yet
      request(s, { max_tokens: 500, seed: 4 }),
      request(s, { max_tokens: 500, seed: 5 }),
    ];
    await until(s, (h) => h.json.queue_depth === 3);
    s.child.kill("SIGTERM");
    for (const [i, r] of running.entries()) {
      const cs = chunks(await r.answer, `running stream ${i}`);
      const last = cs.at(-2); // before the usage chunk
      assert.equal(last.choices[0].finish_reason, "abort", JSON.stringify(last));
      const usage = cs.at(-1).usage;
      assert.ok(usage.completion_tokens >= 1 && usage.completion_tokens < 500, `${usage}`);
      const text = cs.slice(0, -2).map((c) => c.choices[0].text).join("");
      assert.ok(text.length > 0);
    }
    for (const [i, r] of waiting.entries()) assertDraining503(await r.answer, `waiting ${i}`);
    const st = await s.status;
    assert.equal(st.code, 0, s.log());
    assert.match(s.log(), /drain timeout: aborted 5 request/);
  },
});

Deno.test({
  name: "a second signal exits at once (status 128 + signal number)",
  ignore: !have,
  fn: async () => {
    const s = await spawnServer(["--model", sharedPath(MODEL), "--port", "0", "--slots", "1"]);
    const reqs = [1, 2, 3].map((seed) => request(s, { max_tokens: 500, stream: true, seed }));
    const cut = reqs.map((r) => r.answer.catch(() => null)); // cut: errors or partial bodies
    await reqs[0].started;
    s.child.kill("SIGINT");
    await until(s, (h) => h.status === 503);
    s.child.kill("SIGINT");
    const st = await s.status;
    assert.equal(st.code, 130, s.log());
    assert.match(s.log(), /SIGINT again: exiting now/);
    await Promise.all(cut);
  },
});
