/**
 * The sampling parameters of the OpenAI-style endpoints: logit_bias, the penalties and min_p
 * parsed and checked as OpenAI and vLLM do, the parameters this server does not implement
 * rejected by name, unknown fields ignored, the generate CLI's options checked with the same
 * rules; and, on the real stories260K model, logit_bias and the penalties reaching the sampler.
 */
import assert from "node:assert/strict";
import { parseGenParams, UNSUPPORTED } from "../runtime/http/params.ts";
import { ApiError } from "../runtime/http/errors.ts";
import { SAMPLING_RANGES, type SamplingName } from "../runtime/model/sampling.ts";
import { samplingOption } from "../runtime/cli/generate_cmd.ts";
import { createApp } from "../server.ts";
import { Engine } from "../runtime/model/engine.ts";
import { loadModel } from "../runtime/model/load.ts";
import { generate } from "../runtime/model/generate.ts";
import { GREEDY, type SamplingParams } from "../runtime/model/model.ts";
import { StreamDecoder } from "../runtime/tokenizer/stream_decoder.ts";
import { haveShared, sharedPath, testGpu } from "./helpers.ts";

const VOCAB = 512;
const parse = (body: Record<string, unknown>) => parseGenParams(body, 64, VOCAB);

/** The ApiError parseGenParams throws for `body`. */
function rejection(body: Record<string, unknown>): ApiError {
  try {
    parse(body);
  } catch (e) {
    assert.ok(e instanceof ApiError, `not an ApiError: ${e}`);
    assert.equal(e.status, 400);
    return e;
  }
  assert.fail(`accepted ${JSON.stringify(body)}`);
}

Deno.test("logit_bias: token ids to biases in [−100, 100], at most 300", () => {
  const bias =
    parse({ logit_bias: { "5": 10, "0": -100, "511": 100, "7": 0.5 } }).sampling.logitBias;
  assert.deepEqual([...bias!], [[0, -100], [5, 10], [7, 0.5], [511, 100]]);
  assert.equal(parse({ logit_bias: {} }).sampling.logitBias, undefined);
  assert.equal(parse({ logit_bias: null }).sampling.logitBias, undefined);
  assert.equal(parse({}).sampling.logitBias, undefined);
  const full = Object.fromEntries(Array.from({ length: 300 }, (_, i) => [String(i), 1]));
  assert.equal(parse({ logit_bias: full }).sampling.logitBias!.size, 300);
  const cases: [unknown, string, string][] = [
    ["5", "logit_bias", "invalid_type"],
    [[1, 2], "logit_bias", "invalid_type"],
    [7, "logit_bias", "invalid_type"],
    [{ ...full, "300": 1 }, "logit_bias", "invalid_value"],
    [{ abc: 1 }, "logit_bias.abc", "invalid_token"],
    [{ "512": 1 }, "logit_bias.512", "invalid_token"],
    [{ "-1": 1 }, "logit_bias.-1", "invalid_token"],
    [{ "1.5": 1 }, "logit_bias.1.5", "invalid_token"],
    [{ "": 1 }, "logit_bias.", "invalid_token"],
    [{ "99999999999999999999": 1 }, "logit_bias.99999999999999999999", "invalid_token"],
    [{ "5": 101 }, "logit_bias.5", "invalid_value"],
    [{ "5": -100.5 }, "logit_bias.5", "invalid_value"],
    [{ "5": "1" }, "logit_bias.5", "invalid_type"],
    [{ "5": null }, "logit_bias.5", "invalid_type"],
    [{ "5": [1] }, "logit_bias.5", "invalid_type"],
    [{ "5": 1, "05": 2 }, "logit_bias.05", "invalid_value"],
  ];
  for (const [v, param, code] of cases) {
    const e = rejection({ logit_bias: v });
    assert.equal(e.param, param, JSON.stringify(v));
    assert.equal(e.code, code, JSON.stringify(v));
    assert.ok(e.message.startsWith("logit_bias"), e.message);
  }
  assert.match(rejection({ logit_bias: { "5": 101 } }).message, /≥ -100 and ≤ 100; got 101/);
  assert.match(rejection({ logit_bias: { "512": 1 } }).message, /token ids in \[0, 512\)/);
});

Deno.test("presence, frequency and repetition penalties and min_p: parsed in range", () => {
  const s = parse({
    presence_penalty: -2,
    frequency_penalty: 1.5,
    repetition_penalty: 1.2,
    min_p: 0.05,
  }).sampling;
  assert.equal(s.presencePenalty, -2);
  assert.equal(s.frequencyPenalty, 1.5);
  assert.equal(s.repetitionPenalty, 1.2);
  assert.equal(s.minP, 0.05);
  // absent or null: off
  const d = parse({ presence_penalty: null, min_p: null }).sampling;
  assert.equal(d.presencePenalty ?? 0, 0);
  assert.equal(d.frequencyPenalty ?? 0, 0);
  assert.equal(d.repetitionPenalty ?? 1, 1);
  assert.equal(d.minP ?? 0, 0);
  const bad: [string, unknown, string][] = [
    ["presence_penalty", 2.5, "presence_penalty must be a number ≥ -2 and ≤ 2; got 2.5"],
    ["presence_penalty", "1", 'presence_penalty must be a number ≥ -2 and ≤ 2; got the string "1"'],
    ["frequency_penalty", -2.01, "frequency_penalty must be a number ≥ -2 and ≤ 2; got -2.01"],
    ["repetition_penalty", 0, "repetition_penalty must be a number ≥ 0.01 and ≤ 100; got 0"],
    ["repetition_penalty", -1, "repetition_penalty must be a number ≥ 0.01 and ≤ 100; got -1"],
    [
      "repetition_penalty",
      1e9,
      "repetition_penalty must be a number ≥ 0.01 and ≤ 100; got 1000000000",
    ],
    ["min_p", 1.5, "min_p must be a number ≥ 0 and ≤ 1; got 1.5"],
    ["min_p", -0.1, "min_p must be a number ≥ 0 and ≤ 1; got -0.1"],
    ["min_p", true, "min_p must be a number ≥ 0 and ≤ 1; got true"],
  ];
  for (const [name, v, message] of bad) {
    const e = rejection({ [name]: v });
    assert.equal(e.param, name);
    assert.equal(e.message, message);
  }
});

/** For every parameter in UNSUPPORTED: values that ask for nothing, and one that asks for more. */
const UNSUPPORTED_CASES: Record<string, { ok: unknown[]; bad: unknown }> = {
  echo: { ok: [false], bad: true },
  best_of: { ok: [1], bad: 2 },
  logprobs: { ok: [false, 0], bad: true },
  top_logprobs: { ok: [0], bad: 2 },
  suffix: { ok: [""], bad: " end" },
  tools: { ok: [[]], bad: [{ type: "function", function: { name: "f" } }] },
  tool_choice: { ok: ["none", "auto"], bad: "required" },
  functions: { ok: [[]], bad: [{ name: "f" }] },
  function_call: { ok: ["none", "auto"], bad: { name: "f" } },
  parallel_tool_calls: { ok: [true], bad: false },
  response_format: { ok: [{ type: "text" }], bad: { type: "json_object" } },
  audio: { ok: [], bad: { voice: "alloy", format: "wav" } },
  modalities: { ok: [["text"]], bad: ["text", "audio"] },
  prediction: { ok: [], bad: { type: "content", content: "x" } },
  reasoning_effort: { ok: [], bad: "low" },
  web_search_options: { ok: [], bad: {} },
  store: { ok: [false], bad: true },
  use_beam_search: { ok: [false], bad: true },
  length_penalty: { ok: [1], bad: 0.5 },
  prompt_logprobs: { ok: [], bad: 1 },
  guided_json: { ok: [], bad: { type: "object" } },
  guided_regex: { ok: [], bad: "[a-z]+" },
  guided_choice: { ok: [], bad: ["yes", "no"] },
  guided_grammar: { ok: [], bad: "root ::= x" },
  structured_outputs: { ok: [], bad: { json: {} } },
  logits_processors: { ok: [[]], bad: ["my.processor"] },
  allowed_token_ids: { ok: [], bad: [1, 2] },
  bad_words: { ok: [[]], bad: ["dog"] },
  stop_token_ids: { ok: [[]], bad: [2] },
  ignore_eos: { ok: [false], bad: true },
  min_tokens: { ok: [0], bad: 5 },
  include_stop_str_in_output: { ok: [false], bad: true },
  truncate_prompt_tokens: { ok: [], bad: 10 },
  return_tokens_as_token_ids: { ok: [false], bad: true },
  add_generation_prompt: { ok: [true], bad: false },
  continue_final_message: { ok: [false], bad: true },
  chat_template: { ok: [], bad: "{{ messages }}" },
  chat_template_kwargs: { ok: [{}], bad: { enable_thinking: true } },
  documents: { ok: [], bad: [{ title: "t", text: "x" }] },
};

Deno.test("parameters the server does not implement: their default passes, anything else is a 400 naming them", () => {
  assert.deepEqual(Object.keys(UNSUPPORTED).sort(), Object.keys(UNSUPPORTED_CASES).sort());
  for (const [name, { ok, bad }] of Object.entries(UNSUPPORTED_CASES)) {
    for (const v of [...ok, null]) parse({ [name]: v });
    const e = rejection({ [name]: bad });
    assert.equal(e.param, name);
    assert.equal(e.code, "unsupported");
    assert.equal(e.message, `${name} is not supported by this server; leave it out`);
  }
  // n and max_tokens keep their own checks
  assert.equal(rejection({ n: 2 }).param, "n");
});

Deno.test("fields neither OpenAI nor vLLM define are ignored, as are informational ones", () => {
  const p = parse({
    user: "someone",
    metadata: { a: "b" },
    service_tier: "auto",
    request_id: "r1",
    x_custom_field: [1, { deep: true }],
    priority_hint: "high",
    temperature: 0,
  });
  assert.equal(p.sampling.temperature, 0);
});

Deno.test("generate's sampling options follow the server's rules, with the same words", () => {
  const flag = (name: SamplingName) => name.replaceAll("_", "-");
  const outside: Record<SamplingName, number[]> = {
    temperature: [-1, 2.5],
    top_p: [0, 1.5],
    top_k: [-2, 2.5],
    min_p: [-0.5, 1.5],
    presence_penalty: [-3, 2.5],
    frequency_penalty: [-2.5, 3],
    repetition_penalty: [0, 101],
    seed: [0.5],
  };
  for (const name of Object.keys(SAMPLING_RANGES) as SamplingName[]) {
    for (const v of outside[name]) {
      const server = rejection({ [name]: v }).message;
      assert.throws(() => samplingOption(name, String(v)), (e: Error) => {
        assert.equal(e.name, "ParameterError");
        assert.equal(
          e.message,
          `--${server.replace(`; got ${v}`, `; got "${v}"`)}`.replace(name, flag(name)),
        );
        return true;
      });
    }
    assert.throws(() => samplingOption(name, "x"), {
      message: new RegExp(`^--${flag(name)} must be`),
    });
  }
  assert.throws(() => samplingOption("top_p", "1.5"), {
    message: '--top-p must be a number > 0 and ≤ 1; got "1.5"',
  });
  assert.equal(samplingOption("presence_penalty", "-1.5"), -1.5);
  assert.equal(samplingOption("min_p", "0.1"), 0.1);
});

Deno.test("generate rejects an out-of-range sampling option in one line, before loading", async () => {
  const run = async (...args: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "runtime/cli/generate_cmd.ts", "--model", "/nonexistent", ...args],
      env: { XDG_RUNTIME_DIR: "/tmp" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    return { code: out.code, err: new TextDecoder().decode(out.stderr).trim() };
  };
  const cases: [string[], string][] = [
    [["--top-p", "1.5"], 'error: --top-p must be a number > 0 and ≤ 1; got "1.5"'],
    [["--min-p", "2"], 'error: --min-p must be a number ≥ 0 and ≤ 1; got "2"'],
    [
      ["--repetition-penalty", "0"],
      'error: --repetition-penalty must be a number ≥ 0.01 and ≤ 100; got "0"',
    ],
    [
      ["--presence-penalty", "-3"],
      'error: --presence-penalty must be a number ≥ -2 and ≤ 2; got "-3"',
    ],
  ];
  for (const [args, want] of cases) {
    const { code, err } = await run(...args);
    assert.equal(code, 1, args.join(" "));
    assert.equal(err, want);
  }
});

// ---- on the real model ----

const have = await haveShared("models/stories260K-hf/tokenizer.json");
const loaded = have
  ? await loadModel(sharedPath("models/stories260K-hf"), { gpu: await testGpu(), quiet: true })
  : null;
const app = loaded
  ? createApp(new Engine(loaded.model, loaded.tokenizer, "stories260K"), { maxTokensLimit: 400 })
  : null;

async function complete(body: Record<string, unknown>) {
  const res = await app!.request("/v1/completions", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt: "", temperature: 0, ...body }),
  });
  const json = await res.json();
  assert.equal(res.status, 200, JSON.stringify(json));
  return {
    text: json.choices[0].text as string,
    finish: json.choices[0].finish_reason as string,
    tokens: json.usage.completion_tokens as number,
  };
}

/** The text generate() gives for `prompt` with `sampling`, decoded as the server does, and its ids. */
async function local(prompt: string, sampling: SamplingParams, maxTokens: number) {
  const { model, tokenizer } = loaded!;
  const ids = tokenizer.encode(prompt, { bos: true }), out: number[] = [];
  const it = generate(model, { prompt: ids, maxTokens, sampling, stopIds: model.config.eosIds });
  for await (const id of it) out.push(id);
  const dec = new StreamDecoder(tokenizer, ids);
  return { ids: out, text: out.map((id) => dec.push(id)).join("") + dec.flush() };
}

Deno.test({
  name: "logit_bias reaches the sampler: −100 bans, +100 forces, +100 on EOS stops at once",
  ignore: !have,
  fn: async () => {
    const prompt = "Once upon a time", eos = loaded!.model.config.eosIds[0];
    const plain = await local(prompt, GREEDY, 12);
    const banned = new Map(plain.ids.slice(0, 3).map((id) => [id, -100]));
    const forced = new Map([[300, 100]]);
    for (const bias of [banned, forced]) {
      const got = await complete({ prompt, max_tokens: 12, logit_bias: Object.fromEntries(bias) });
      const want = await local(prompt, { ...GREEDY, logitBias: bias }, 12);
      assert.equal(got.text, want.text);
      assert.notEqual(got.text, plain.text);
      if (bias === forced) assert.deepEqual(want.ids, Array(12).fill(300));
      else assert.ok(!want.ids.some((id) => bias.has(id)));
    }
    const sampled = { prompt, max_tokens: 12, temperature: 1, seed: 4, logit_bias: { 300: 100 } };
    assert.equal(
      (await complete(sampled)).text,
      (await local(prompt, { ...GREEDY, logitBias: forced }, 12)).text,
    );
    const stop = await complete({ prompt, max_tokens: 40, logit_bias: { [eos]: 100 } });
    assert.deepEqual(stop, { text: "", finish: "stop", tokens: 0 });
  },
});

Deno.test({
  name: "penalties and min_p reach the sampler: outputs change, deterministically",
  ignore: !have,
  fn: async () => {
    const base = { prompt: "Once upon a time", max_tokens: 60 };
    const plain = await complete(base);
    for (
      const extra of [
        { repetition_penalty: 1.5 },
        { presence_penalty: 1.5 },
        { frequency_penalty: 1 },
        { frequency_penalty: -2, presence_penalty: -2 },
      ]
    ) {
      const a = await complete({ ...base, ...extra }), b = await complete({ ...base, ...extra });
      assert.deepEqual(a, b, JSON.stringify(extra));
      assert.notEqual(a.text, plain.text, JSON.stringify(extra));
    }
    // min_p 1 keeps only the top token: sampling at any temperature is greedy
    const sampled = await complete({ ...base, temperature: 1.5, min_p: 1, seed: 3 });
    assert.equal(sampled.text, plain.text);
    const loose = await complete({ ...base, temperature: 1.5, seed: 3 });
    assert.notEqual(loose.text, plain.text);
  },
});

Deno.test({
  name: "both endpoints answer a bad logit_bias and an unsupported parameter with a 400 naming it",
  ignore: !have,
  fn: async () => {
    const bodies = {
      "/v1/completions": { prompt: "Hi", max_tokens: 2 },
      "/v1/chat/completions": { messages: [{ role: "user", content: "Hi" }], max_tokens: 2 },
    };
    for (const [path, body] of Object.entries(bodies)) {
      for (
        const [extra, param] of [
          [{ logit_bias: { "9999": 1 } }, "logit_bias.9999"],
          [{ logit_bias: "none" }, "logit_bias"],
          [{ tools: [{ type: "function", function: { name: "f" } }] }, "tools"],
          [{ guided_json: { type: "object" } }, "guided_json"],
          [{ min_p: 2 }, "min_p"],
        ] as const
      ) {
        const res = await app!.request(path, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ ...body, ...extra }),
        });
        const e = (await res.json()).error;
        assert.equal(res.status, 400, `${path} ${JSON.stringify(extra)}`);
        assert.equal(e.param, param);
        assert.equal(e.type, "invalid_request_error");
      }
    }
  },
});
