/**
 * The playground page (`GET /`) in a real browser: headless Chromium, driven over the DevTools
 * protocol (tests/cdp.ts), against real servers on 127.0.0.1 serving stories260K. The page's
 * streamed text must equal the same request made through the API; Stop must end the request on
 * the server; a missing or wrong API key and a model without a chat template show the server's
 * message. Screenshots of both modes go to a temporary directory, and to docs/ with
 * LOWBIT_UPDATE_SCREENSHOTS=1. Without Chromium the browser test fails, saying how to install it.
 */
import assert from "node:assert/strict";
import { type RunningServer, type ServeOptions, startServer } from "../server.ts";
import { Engine, type Job } from "../runtime/model/engine.ts";
import { loadModel } from "../runtime/model/load.ts";
import { HfTokenizer } from "../runtime/tokenizer/tokenizer_hf.ts";
import type { Tokenizer } from "../runtime/tokenizer/tokenizer.ts";
import { Browser, type Page } from "./cdp.ts";
import { haveShared, sharedPath, testGpu, withTempDir } from "./helpers.ts";

const BIN_REL = "models/stories260K/stories260K.bin";
const HF_REL = "models/stories260K-hf";
const have = await haveShared(BIN_REL, `${HF_REL}/tokenizer.json`);
const ID = "stories260K";
const PROMPT = "Once upon a time";
const KEY = "playground-test-key";

/** A chat template written for the test (the model has none): BOS text, "role: content" lines. */
const TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n" +
  "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/**
 * An Engine whose jobs can be paced (`delayMs` before each token reaches the HTTP layer), so that
 * Stop lands mid-stream however fast the adapter is, and that counts the jobs the HTTP layer
 * still holds (`active`: it drops when the request ends on the server).
 */
class PacedEngine extends Engine {
  delayMs = 0;
  active = 0;
  override async *submit(job: Job): ReturnType<Engine["submit"]> {
    this.active++;
    const it = super.submit(job);
    try {
      for (;;) {
        const r = await it.next();
        if (r.done) return r.value;
        if (this.delayMs > 0) await new Promise((ok) => setTimeout(ok, this.delayMs));
        yield r.value;
      }
    } finally {
      this.active--;
      await it.return(undefined as never);
    }
  }
}

/** stories260K from the llama2.c `.bin` (no chat template). */
async function binEngine(): Promise<PacedEngine> {
  const { model, tokenizer } = await loadModel(sharedPath(BIN_REL), {
    gpu: await testGpu(),
    quiet: true,
  });
  return new PacedEngine(model, tokenizer, ID, { slots: 2 });
}

/** stories260K from the Hugging Face directory, with the test's chat template. */
async function chatEngine(): Promise<Engine> {
  const dir = sharedPath(HF_REL);
  const { model } = await loadModel(dir, { gpu: await testGpu(), quiet: true });
  const config = JSON.parse(await Deno.readTextFile(`${dir}/tokenizer_config.json`));
  const tokenizer: Tokenizer = new HfTokenizer(
    await Deno.readTextFile(`${dir}/tokenizer.json`),
    JSON.stringify({ ...config, chat_template: TEMPLATE }),
  );
  return new Engine(model, tokenizer, ID, { slots: 2 });
}

async function withServer(
  engine: Engine,
  options: ServeOptions,
  fn: (s: RunningServer) => Promise<void>,
): Promise<void> {
  const ac = new AbortController();
  const s = startServer(engine, { ...options, port: 0, quiet: true, signal: ac.signal });
  try {
    await fn(s);
  } finally {
    ac.abort();
    await s.server.finished;
  }
}

async function postJson(s: RunningServer, path: string, body: unknown, key?: string) {
  const res = await fetch(`${s.url}${path}`, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      ...(key ? { Authorization: `Bearer ${key}` } : {}),
    },
    body: JSON.stringify(body),
  });
  return { status: res.status, json: await res.json() };
}

Deno.test({
  name: "playground: GET / and its files: types, ETag and 304, no other origin, open with a key",
  ignore: !have,
  fn: async () => {
    const engine = await binEngine();
    await withServer(engine, { apiKey: KEY }, async (s) => {
      const page = await fetch(`${s.url}/`);
      assert.equal(page.status, 200, "GET / needs no API key");
      assert.equal(page.headers.get("content-type"), "text/html; charset=utf-8");
      assert.equal(page.headers.get("cache-control"), "no-cache");
      assert.match(page.headers.get("content-security-policy") ?? "", /default-src 'self'/);
      const html = await page.text();
      const refs = [...html.matchAll(/\b(?:src|href)="([^"]*)"/g)].map((m) => m[1]);
      assert.deepEqual(refs, ["data:,", "/playground/playground.css", "/playground/playground.js"]);

      const types: Record<string, string> = {
        "/playground/playground.js": "text/javascript; charset=utf-8",
        "/playground/playground.css": "text/css; charset=utf-8",
      };
      for (const [path, type] of Object.entries(types)) {
        const res = await fetch(`${s.url}${path}`);
        assert.equal(res.status, 200, path);
        assert.equal(res.headers.get("content-type"), type, path);
        const etag = res.headers.get("etag");
        assert.match(etag ?? "", /^"[\w-]{22}"$/, path);
        assert.ok((await res.text()).length > 1000, path);
        const again = await fetch(`${s.url}${path}`, { headers: { "If-None-Match": etag! } });
        assert.equal(again.status, 304, `${path} revalidated`);
        assert.equal(await again.text(), "");
        const changed = await fetch(`${s.url}${path}`, { headers: { "If-None-Match": '"x"' } });
        assert.equal(changed.status, 200);
        await changed.body?.cancel();
      }
      for (const path of ["/playground/index.html", "/playground/nope.js"]) {
        const res = await fetch(`${s.url}${path}`);
        assert.equal(res.status, 404, path);
        assert.match((await res.json()).error.message, /Invalid URL/, path);
      }
      const models = await fetch(`${s.url}/v1/models`);
      assert.equal(models.status, 401, "the API stays behind the key");
      await models.body?.cancel();
    });
  },
});

/** Opens the page at `s` and waits for it to have asked for the model. */
async function open(page: Page, s: RunningServer): Promise<void> {
  await page.goto(`${s.url}/`);
  await page.waitFor(`document.body.dataset.state !== "loading"`, "the page to start");
}

const text = (page: Page, selector: string) =>
  page.evaluate<string>(`document.querySelector(${JSON.stringify(selector)})?.textContent ?? ""`);

/** What the page shows of its state, for failure messages. */
const SHOWN = `JSON.stringify({ state: document.body.dataset.state,
  status: document.getElementById("state").textContent,
  error: document.getElementById("error").textContent })`;

async function setParams(page: Page, temperature: string, maxTokens: string): Promise<void> {
  await page.fill("#temperature", temperature);
  await page.fill("#max-tokens", maxTokens);
}

/** Types `prompt`, presses Send and waits for the page to finish (done, stopped or error). */
async function sendAndWait(page: Page, prompt: string, want = "done"): Promise<void> {
  await page.fill("#input", prompt);
  await page.click("#send");
  await page.waitFor(
    `["done", "stopped", "error"].includes(document.body.dataset.state)`,
    "the request to finish",
    60_000,
    SHOWN,
  );
  assert.equal(
    await page.evaluate(`document.body.dataset.state`),
    want,
    await page.evaluate(SHOWN),
  );
}

async function screenshot(page: Page, name: string, dir: string): Promise<void> {
  const png = await page.screenshot();
  assert.deepEqual([...png.slice(0, 4)], [0x89, 0x50, 0x4e, 0x47], "a PNG");
  await Deno.writeFile(`${dir}/${name}`, png);
  if (Deno.env.get("LOWBIT_UPDATE_SCREENSHOTS") === "1") {
    await Deno.writeFile(new URL(`../docs/${name}`, import.meta.url), png);
  }
}

Deno.test({
  name: "playground in headless Chromium: streamed text equals the API's, Stop, API key, chat",
  ignore: !have,
  fn: async (t) => {
    const engine = await binEngine();
    const chat = await chatEngine();
    // Fails (never skips) without Chromium: the error says to apt-get install chromium.
    const browser = await Browser.launch();
    try {
      await withTempDir(async (shots) => {
        const page = await browser.newPage(1200, 760);

        await withServer(engine, {}, async (s) => {
          await t.step("completion: the streamed greedy text equals /v1/completions", async () => {
            await open(page, s);
            assert.equal(await page.evaluate(`document.body.dataset.state`), "idle");
            assert.equal(await text(page, "#model"), ID, "the model's name from /v1/models");
            await page.click("#mode-completion");
            await setParams(page, "0", "160");
            await sendAndWait(page, PROMPT);
            const shown = await text(page, "#output");
            const api = await postJson(s, "/v1/completions", {
              prompt: PROMPT,
              temperature: 0,
              top_p: 0.9,
              max_tokens: 160,
            });
            assert.equal(api.status, 200);
            const [choice] = api.json.choices;
            assert.ok(choice.text.length > 0);
            assert.equal(shown, choice.text);
            assert.equal(await text(page, "#completion-prompt"), PROMPT);
            const why = choice.finish_reason === "length" ? "max tokens reached" : "stop";
            assert.equal(await text(page, "#state"), `done (${why})`);
            const n = api.json.usage.completion_tokens;
            assert.match(
              await text(page, "#stats"),
              new RegExp(`^${n} tokens · first token [\\d.]+ s · [\\d.]+ tok/s$`),
            );
            await screenshot(page, "playground-completion.png", shots);
          });

          await t.step(
            "Stop mid-stream: a strict prefix, and the request ends on the server",
            async () => {
              const full = await postJson(s, "/v1/completions", {
                prompt: PROMPT,
                temperature: 0,
                max_tokens: 400,
              });
              assert.equal(full.status, 200);
              const fullText: string = full.json.choices[0].text;
              const live = () => engine.active;
              engine.delayMs = 20;
              try {
                await setParams(page, "0", "400");
                await page.fill("#input", PROMPT);
                await page.click("#send");
                await page.waitFor(
                  `document.getElementById("output").textContent.length >= 40`,
                  "some streamed text",
                  30_000,
                  SHOWN,
                );
                assert.equal(await page.evaluate(`document.body.dataset.state`), "running");
                assert.equal(live(), 1, "the request runs on the server");
                await page.click("#stop");
                await page.waitFor(`document.body.dataset.state === "stopped"`, "stopped", 10_000);
              } finally {
                engine.delayMs = 0;
              }
              assert.equal(await text(page, "#state"), "stopped");
              const shown = await text(page, "#output");
              assert.ok(
                shown.length < fullText.length && fullText.startsWith(shown),
                `${JSON.stringify(shown)} is not a strict prefix of ${JSON.stringify(fullText)}`,
              );
              assert.match(await text(page, "#stats"), /^\d+ tokens/);
              const end = Date.now() + 10_000;
              let gauge = "";
              while (Date.now() < end) {
                const metrics = await (await fetch(`${s.url}/metrics`)).text();
                gauge = /^lowbit_requests_running (\d+)$/m.exec(metrics)?.[1] ?? "";
                if (live() === 0 && engine.running === 0 && gauge === "0") break;
                await new Promise((r) => setTimeout(r, 50));
              }
              assert.equal(live(), 0, "the server-side request ended");
              assert.equal(engine.running, 0, "no job holds a slot");
              assert.equal(gauge, "0", "/metrics: no request running");
            },
          );

          await t.step(
            "chat on a model without a template: the server's 400 is shown",
            async () => {
              await page.click("#mode-chat");
              await setParams(page, "0", "16");
              await sendAndWait(page, "Hello", "error");
              const api = await postJson(s, "/v1/chat/completions", {
                messages: [{ role: "user", content: "Hello" }],
              });
              assert.equal(api.status, 400);
              const banner = await text(page, "#error");
              assert.equal(banner, `Error 400: ${api.json.error.message}`);
              assert.equal(
                await page.evaluate(`document.querySelectorAll(".msg.user.failed").length`),
                1,
              );
              assert.equal(
                await page.evaluate(`document.querySelectorAll(".msg.assistant").length`),
                0,
              );
            },
          );
        });

        await withServer(engine, { apiKey: KEY }, async (s) => {
          await t.step("API key: a 401 asks for it; once entered it is sent and kept", async () => {
            await open(page, s);
            assert.equal(await page.evaluate(`document.body.dataset.state`), "error");
            const noKey = await fetch(`${s.url}/v1/models`);
            assert.equal(noKey.status, 401);
            const banner = await text(page, "#error");
            assert.ok(
              banner.startsWith(`Error 401: ${(await noKey.json()).error.message}\n`),
              banner,
            );
            assert.match(banner, /enter it in the API key field/);
            assert.equal(await text(page, "#model"), "model unknown");

            await page.fill("#api-key", "wrong");
            await page.blur();
            await page.waitFor(
              `/Incorrect API key/.test(document.getElementById("error").textContent)`,
              "the wrong key's 401",
              10_000,
              SHOWN,
            );

            await page.fill("#api-key", KEY);
            await page.blur();
            await page.waitFor(
              `document.body.dataset.state === "idle"`,
              "the key to be taken",
              10_000,
              SHOWN,
            );
            assert.equal(await text(page, "#model"), ID);
            assert.equal(await page.evaluate(`document.getElementById("error").hidden`), true);
            await open(page, s);
            assert.equal(await page.evaluate(`localStorage.getItem("lowbit.apiKey")`), KEY);
            assert.equal(await page.evaluate(`document.getElementById("api-key").value`), KEY);
            assert.equal(await text(page, "#model"), ID, "the kept key is sent");

            await page.click("#mode-completion");
            await setParams(page, "0", "12");
            await sendAndWait(page, PROMPT);
            const api = await postJson(s, "/v1/completions", {
              prompt: PROMPT,
              temperature: 0,
              max_tokens: 12,
            }, KEY);
            assert.equal(await text(page, "#output"), api.json.choices[0].text);
          });
        });

        await withServer(chat, {}, async (s) => {
          await t.step("chat: two turns streamed, each equal to /v1/chat/completions", async () => {
            await open(page, s);
            await page.click("#mode-chat");
            await setParams(page, "0", "60");
            await page.fill("#system", "You tell stories.");
            const messages: { role: string; content: string }[] = [
              { role: "system", content: "You tell stories." },
            ];
            for (
              const question of [
                "Tell me a story about a big red ball.",
                "What did Tom find in the park?",
              ]
            ) {
              await sendAndWait(page, question);
              messages.push({ role: "user", content: question });
              const api = await postJson(s, "/v1/chat/completions", {
                messages,
                temperature: 0,
                top_p: 0.9,
                max_tokens: 60,
              });
              assert.equal(api.status, 200, JSON.stringify(api.json));
              const answer: string = api.json.choices[0].message.content;
              assert.ok(answer.length > 0);
              const replies = await page.evaluate<string[]>(
                `[...document.querySelectorAll(".msg.assistant .content")].map((e) => e.textContent)`,
              );
              assert.equal(replies.at(-1), answer);
              messages.push({ role: "assistant", content: answer });
            }
            assert.equal(await page.evaluate(`document.querySelectorAll(".msg").length`), 4);
            await screenshot(page, "playground-chat.png", shots);
          });
        });

        assert.deepEqual(page.errors, [], "no uncaught errors in the page");
        const foreign = page.requests.filter((u) =>
          !u.startsWith("http://127.0.0.1:") && !u.startsWith("data:") && u !== "about:blank"
        );
        assert.deepEqual(foreign, [], "the page requests nothing from another origin");
      });
    } finally {
      await browser.close();
    }
  },
});
