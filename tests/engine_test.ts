/**
 * Continuous batching in the Engine on the real stories260K model: concurrent jobs share decode
 * steps and each gives what it gives alone; aborted and abandoned jobs leave their slot; bursts
 * fill the queue and the slots; drain and abortAll (shutdown).
 */
import assert from "node:assert/strict";
import { Engine, EngineDrainingError, type Job, QueueFullError } from "../runtime/model/engine.ts";
import { generate } from "../runtime/model/generate.ts";
import { loadModel } from "../runtime/model/load.ts";
import { GREEDY } from "../runtime/model/model.ts";
import { collect, haveShared, sharedPath, testGpu } from "./helpers.ts";

const have = await haveShared("models/stories260K-hf");
const loaded = have
  ? await loadModel(sharedPath("models/stories260K-hf"), { gpu: await testGpu(), quiet: true })
  : null;

/** 16 jobs with different prompts, lengths and seeds; even ones greedy, odd ones sampled. */
function jobs(): Job[] {
  const { model, tokenizer } = loaded!;
  const texts = ["Once upon a time", "The little dog", "Lily saw a", "Tom and Sue", ""];
  return Array.from({ length: 16 }, (_, i) => ({
    prompt: tokenizer.encode(texts[i % 5] + (i > 4 ? " went" : ""), { bos: true }),
    maxTokens: 5 + ((i * 37) % 90),
    sampling: i % 2 === 0
      ? GREEDY
      : { temperature: 0.7 + 0.1 * (i % 4), topK: i % 3 === 0 ? 20 : 0, topP: 0.9, seed: 1000 + i },
    stopIds: i % 4 === 1 ? [] : model.config.eosIds,
  }));
}

Deno.test({
  name:
    "16 concurrent jobs (greedy and sampled) share decode steps and each gives its tokens alone",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const js = jobs();
    // alone: one at a time through an engine, and through generate()
    const solo = new Engine(model, tokenizer, "t", { slots: 1 });
    const alone: number[][] = [];
    for (const j of js) alone.push(await collect(solo.submit(j)));
    for (const [i, j] of js.entries()) {
      assert.deepEqual(await collect(generate(model, j)), alone[i], `generate, job ${i}`);
    }
    assert.ok(alone.some((a) => a.length > 50), "some job runs long");
    const steps: number[][] = [];
    const engine = new Engine(model, tokenizer, "t", {
      slots: 8,
      onStep: (ids) => steps.push(ids),
    });
    const together = await Promise.all(js.map((j) => collect(engine.submit(j))));
    for (const [i, a] of alone.entries()) assert.deepEqual(together[i], a, `job ${i}`);
    const shared = steps.filter((s) => s.length > 1).length;
    assert.ok(shared > 0 && Math.max(...steps.map((s) => s.length)) === 8, `${shared} shared`);
    // every job took part in steps; no step holds a job twice
    for (const s of steps) assert.equal(new Set(s).size, s.length);
    const seen = new Set(steps.flat());
    assert.ok(seen.size >= 15, `${seen.size} jobs in steps`); // a 1-token job needs no step
    assert.equal(engine.running, 0);
    assert.equal(engine.queueDepth, 0);
  },
});

Deno.test({
  name: "an aborted job stops and frees its slot while the others continue",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const prompt = tokenizer.encode("Once upon a time", { bos: true });
    const mk = (seed: number, signal?: AbortSignal): Job => ({
      prompt,
      maxTokens: 150,
      sampling: { temperature: 1, topK: 0, topP: 1, seed },
      stopIds: [],
      signal,
    });
    const solo = new Engine(model, tokenizer, "t", { slots: 1 });
    const aloneB = await collect(solo.submit(mk(2)));
    const aloneC = await collect(solo.submit(mk(3)));
    const steps: number[][] = [];
    const engine = new Engine(model, tokenizer, "t", {
      slots: 2,
      onStep: (ids) => steps.push(ids),
    });
    const ac = new AbortController();
    const a = engine.submit(mk(1, ac.signal));
    const gotA: number[] = [];
    gotA.push((await a.next()).value as number); // job 1 holds a slot
    const b = collect(engine.submit(mk(2))); // job 2 the other
    const c = collect(engine.submit(mk(3))); // job 3 waits for a slot
    while (gotA.length < 10) gotA.push((await a.next()).value as number);
    assert.equal(engine.running, 2);
    assert.ok(!steps.some((s) => s.includes(3)), "job 3 waited");
    ac.abort();
    const at = steps.length;
    const rest = await a.next();
    assert.equal(rest.done, true);
    assert.equal(rest.value.finishReason, "stop");
    assert.deepEqual(await b, aloneB);
    assert.deepEqual(await c, aloneC);
    assert.ok(steps.slice(at).every((s) => !s.includes(1)), "job 1 left at the next step");
    assert.ok(steps.some((s) => s.includes(2) && s.includes(3)), "job 3 took job 1's slot");
    assert.equal(engine.running, 0);
  },
});

Deno.test({
  name: "a consumer that stops reading frees its slot; the queue bound holds",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const prompt = tokenizer.encode("Lily saw a", { bos: true });
    const job: Job = { prompt, maxTokens: 100, sampling: GREEDY, stopIds: [] };
    const steps: number[][] = [];
    const engine = new Engine(model, tokenizer, "t", {
      slots: 1,
      maxQueue: 1,
      onStep: (ids) => steps.push(ids),
    });
    const a = engine.submit(job);
    await a.next();
    const b = engine.submit(job);
    const bFirst = b.next(); // queued behind a
    await new Promise((r) => setTimeout(r, 0));
    assert.equal(engine.queueDepth, 1);
    await assert.rejects(engine.submit(job).next(), QueueFullError);
    await a.return(undefined as never); // the consumer of a goes away
    assert.equal((await bFirst).done, false);
    const rest = await collect(b);
    assert.equal(rest.length, 99);
    assert.ok(steps.length < 100 + 100, `${steps.length} steps`);
    assert.equal(engine.running, 0);
  },
});

Deno.test({
  name: "a burst of maxQueue + slots jobs is admitted whole; one more gets QueueFullError",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const prompt = tokenizer.encode("Tom and Sue", { bos: true });
    const job: Job = { prompt, maxTokens: 20, sampling: GREEDY, stopIds: [] };
    const engine = new Engine(model, tokenizer, "t", { slots: 2, maxQueue: 3 });
    // all submitted in one turn: the scheduler moves none of them into a slot before the last
    const its = Array.from({ length: 6 }, () => engine.submit(job));
    const firsts = its.map((it) => it.next());
    await assert.rejects(firsts[5], QueueFullError);
    const done = await Promise.all(
      its.slice(0, 5).map(async (it, i) => [(await firsts[i]).value, ...await collect(it)]),
    );
    for (const ids of done) assert.equal(ids.length, 20);
    assert.deepEqual(new Set(done.map((d) => d.join())).size, 1);
  },
});

Deno.test({
  name: "drain refuses new jobs and resolves once the queued and running ones have finished",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const prompt = tokenizer.encode("Lily saw a", { bos: true });
    const job = (maxTokens: number): Job => ({ prompt, maxTokens, sampling: GREEDY, stopIds: [] });
    const engine = new Engine(model, tokenizer, "t", { slots: 1 });
    await engine.drain().then(() => assert.ok(engine.draining)); // idle: at once
    const fresh = new Engine(model, tokenizer, "t", { slots: 1 });
    const results = [30, 40, 50].map((n) => collect(fresh.submit(job(n))));
    let drained = false;
    const idle = fresh.drain().then(() => (drained = true));
    assert.ok(fresh.draining);
    await assert.rejects(fresh.submit(job(5)).next(), EngineDrainingError);
    const first = await results[0];
    assert.equal(first.length, 30);
    assert.ok(!drained, "drain resolved with jobs still queued");
    await idle;
    assert.deepEqual((await Promise.all(results)).map((r) => r.length), [30, 40, 50]);
    assert.equal(fresh.running + fresh.queueDepth, 0);
  },
});

Deno.test({
  name: "abortAll ends running and queued jobs with finish reason abort",
  ignore: !have,
  fn: async () => {
    const { model, tokenizer } = loaded!;
    const prompt = tokenizer.encode("The little dog", { bos: true });
    const job: Job = { prompt, maxTokens: 400, sampling: GREEDY, stopIds: [] };
    const engine = new Engine(model, tokenizer, "t", { slots: 1 });
    const a = engine.submit(job), b = engine.submit(job);
    const got: number[] = [];
    for (let i = 0; i < 5; i++) got.push((await a.next()).value as number);
    const bFirst = b.next(); // queued behind a
    assert.equal(engine.abortAll(), 2);
    let r = await a.next();
    while (!r.done) r = await a.next();
    assert.equal(r.value.finishReason, "abort");
    assert.ok(r.value.generatedTokens < 400, `${r.value.generatedTokens} tokens`);
    const rb = await bFirst;
    assert.equal(rb.done, true);
    assert.deepEqual(rb.value, { ...rb.value, finishReason: "abort", generatedTokens: 0 });
    await engine.drain();
    assert.equal(engine.running + engine.queueDepth, 0);
  },
});
