/**
 * `deno task serve`: an OpenAI-compatible HTTP server over the Engine. The app is a route table;
 * handlers live in runtime/http/, and one error hook turns anything thrown into an OpenAI error.
 *
 * @example
 *   deno task serve --model ../shared/models/stories260K-hf --port 8080
 *   curl localhost:8080/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32}'
 */
import { parseArgs } from "node:util";
import { basename } from "node:path";
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { methodNotAllowed } from "hono/method-not-allowed";
import { Engine } from "./runtime/model/engine.ts";
import { loadModel } from "./runtime/model/load.ts";
import { ParameterError } from "./runtime/errors.ts";
import { intOption, runMain } from "./runtime/cli/cli.ts";
import {
  DEFAULT_MODEL,
  DownloadError,
  downloadModel,
  type DownloadOptions,
} from "./runtime/checkpoint/hub_download.ts";
import { quantizeModel } from "./quantize/quantize_model.ts";
import { ApiError, errorHook, methodNotAllowed as on405, notFound } from "./runtime/http/errors.ts";
import { countRequests, Metrics, metricsHandler } from "./runtime/http/metrics.ts";
import type { ServerContext } from "./runtime/http/context.ts";
import { completions } from "./runtime/http/completions.ts";
import { chatCompletions } from "./runtime/http/chat.ts";
import { getModel, health, listModels } from "./runtime/http/models.ts";
import { detokenize, tokenize } from "./runtime/http/tokenize.ts";

/**
 * The default model (or `repo`), downloaded once, then quantized once to W4 g128 (RTN: no
 * calibration text is known for an arbitrary model) beside the download; later calls reuse it.
 */
export async function defaultModelW4(
  repo = DEFAULT_MODEL,
  options: DownloadOptions = {},
): Promise<string> {
  const dir = await downloadModel(repo, options);
  const out = `${dir}/model-w4g128.lowbit`;
  if (!(await Deno.stat(out).then(() => true, () => false))) {
    if (!options.quiet) console.error(`quantizing ${repo} to W4 g128 (once): ${out}`);
    const tmp = `${out}.partial`;
    await quantizeModel({
      model: dir,
      out: tmp,
      method: "rtn",
      bits: 4,
      groupSize: 128,
      log: () => {},
    });
    await Deno.rename(tmp, out);
  }
  return out;
}

export interface AppOptions {
  /** Largest max_tokens a request may ask for (default: the context length). */
  maxTokensLimit?: number;
  /** Largest request body in bytes (default 1 MiB). */
  maxBodyBytes?: number;
  metrics?: Metrics;
}

/** The Hono app serving `engine`. */
export function createApp(engine: Engine, options: AppOptions = {}): Hono {
  const metrics = options.metrics ?? new Metrics();
  const ctx: ServerContext = {
    engine,
    metrics,
    maxTokensLimit: options.maxTokensLimit ?? engine.contextLength,
  };
  const maxSize = options.maxBodyBytes ?? 1 << 20;
  const tooLarge = () => {
    throw new ApiError(413, `the request body is larger than ${maxSize} bytes`, {
      code: "payload_too_large",
    });
  };
  const app = new Hono();
  app.onError(errorHook((depth) => metrics.retryAfter(depth)));
  app.notFound(notFound);
  app.use(countRequests(metrics, () => app.routes));
  app.use(methodNotAllowed({ app, onMethodNotAllowed: on405 }));
  app.use(bodyLimit({ maxSize, onError: tooLarge }));

  app.post("/v1/completions", completions(ctx));
  app.post("/v1/chat/completions", chatCompletions(ctx));
  app.get("/v1/models", listModels(ctx));
  app.get("/v1/models/:model{.+}", getModel(ctx));
  app.get("/health", health(ctx));
  app.get("/metrics", metricsHandler(metrics, () => engine.queueDepth));
  app.post("/tokenize", tokenize(ctx));
  app.post("/detokenize", detokenize(ctx));
  return app;
}

export interface ServeOptions extends AppOptions {
  /** Default 127.0.0.1. */
  hostname?: string;
  /** Default 8080; 0 picks a free port. */
  port?: number;
  /** Aborting it shuts the server down. */
  signal?: AbortSignal;
  quiet?: boolean;
}

export interface RunningServer {
  server: Deno.HttpServer<Deno.NetAddr>;
  /** e.g. http://127.0.0.1:8080 */
  url: string;
  port: number;
}

/** Serves `engine` over HTTP until `options.signal` aborts (or `server.shutdown()`). */
export function startServer(engine: Engine, options: ServeOptions = {}): RunningServer {
  const app = createApp(engine, options);
  const server = Deno.serve({
    hostname: options.hostname ?? "127.0.0.1",
    port: options.port ?? 8080,
    signal: options.signal,
    onListen: () => {},
  }, app.fetch);
  const { hostname, port } = server.addr;
  const url = `http://${hostname}:${port}`;
  if (!options.quiet) console.error(`serving ${engine.modelId} on ${url}`);
  return { server, url, port };
}

const USAGE = `usage: deno task serve [options]
  --model PATH            model directory, llama2.c .bin or .lowbit file (default: download
                          ${DEFAULT_MODEL} into $LOWBIT_CACHE or ~/.cache/lowbit)
  --tokenizer PATH        tokenizer.json or tokenizer.bin (default: found beside the model)
  --model-id ID           the model name clients use (default: the path's basename)
  --host HOST             address to listen on (default 127.0.0.1)
  --port N                port (default 8080)
  --ctx N                 context length (default: the model's, at most 2048)
  --max-tokens-limit N    largest max_tokens a request may ask for (default: the context)
  --max-queue N           requests allowed to wait; more get 429 (default 64)
  --slots N               requests decoded together, each with a KV cache of the context
                          (default 8)`;

async function main(args: string[]): Promise<void> {
  const { values: a } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      "model-id": { type: "string" },
      host: { type: "string", default: "127.0.0.1" },
      port: { type: "string", default: "8080" },
      ctx: { type: "string" },
      "max-tokens-limit": { type: "string" },
      "max-queue": { type: "string", default: "64" },
      slots: { type: "string", default: "8" },
      help: { type: "boolean", default: false },
    },
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  const port = intOption("port", a.port, 0)!;
  if (port > 65535) throw new ParameterError(`--port must be at most 65535; got ${port}`);
  const path = a.model ?? await defaultModelW4().catch((e) => {
    if (!(e instanceof DownloadError)) throw e;
    console.error(`error: ${e.message}; pass --model PATH to serve a local model`);
    Deno.exit(1);
  });
  const modelId = a["model-id"] ??
    (a.model === undefined ? DEFAULT_MODEL : basename(path.replace(/\/+$/, "")));
  const { model, tokenizer, gpu } = await loadModel(path, {
    tokenizer: a.tokenizer,
    ctx: intOption("ctx", a.ctx, 2),
  });
  const engine = new Engine(model, tokenizer, modelId, {
    maxQueue: intOption("max-queue", a["max-queue"], 0),
    slots: intOption("slots", a.slots, 1),
  });
  const shutdown = new AbortController();
  Deno.addSignalListener("SIGINT", () => shutdown.abort());
  const { server } = startServer(engine, {
    hostname: a.host,
    port,
    maxTokensLimit: intOption("max-tokens-limit", a["max-tokens-limit"], 1),
    signal: shutdown.signal,
  });
  console.error(`context ${engine.contextLength} tokens | ${gpu.adapterName}`);
  await server.finished;
}

if (import.meta.main) runMain(() => main(Deno.args));
