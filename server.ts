/**
 * `deno task serve`: an OpenAI-compatible HTTP server over the Engine. The app is a route table;
 * handlers live in runtime/http/, and one error hook turns anything thrown into an OpenAI error.
 *
 * @example
 *   deno task serve --model ../shared/models/stories260K-hf --port 8080
 *   curl localhost:8080/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32}'
 */
import { basename } from "node:path";
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { methodNotAllowed } from "hono/method-not-allowed";
import { Engine } from "./runtime/model/engine.ts";
import { loadModel } from "./runtime/model/load.ts";
import { ParameterError } from "./runtime/errors.ts";
import { intOption, kvCacheOption, numberOption, parseCli, runMain } from "./runtime/cli/cli.ts";
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
import { playground } from "./runtime/http/playground.ts";
import { corsFor, parseCorsOrigins, requireApiKey, resolveApiKey } from "./runtime/http/access.ts";
import { refuseWhileDraining, shutdownOnSignals } from "./runtime/http/shutdown.ts";

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
  /** Requests need `Authorization: Bearer apiKey`, except /health (and /metrics if public). */
  apiKey?: string;
  /** /metrics without the API key. */
  metricsPublic?: boolean;
  /** Origins allowed to call the server from a browser (`*`: any); none by default. */
  cors?: string[];
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
  const ui = playground(); // the page is open (routed before the API key); it sends the key
  app.get("/", ui.page);
  app.get("/playground/:file", ui.asset);
  if (options.cors?.length) app.use(corsFor(options.cors));
  if (options.apiKey !== undefined) {
    app.use(requireApiKey(
      options.apiKey,
      options.metricsPublic ? ["/health", "/metrics"] : [
        "/health",
      ],
    ));
  }
  app.use(refuseWhileDraining(engine, ["/health", "/metrics"]));
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

/** The one-line error for failing to listen on `hostname:port`. */
function listenError(e: unknown, hostname: string, port: number): Error {
  const where = `port ${port} on ${hostname}`;
  if (e instanceof Deno.errors.AddrInUse) {
    return new ParameterError(
      `${where} is in use; stop the process listening there or pass another --port`,
    );
  }
  if (e instanceof Deno.errors.PermissionDenied) {
    return new ParameterError(
      `${where}: permission denied (ports below 1024 need privileges); pass another --port`,
    );
  }
  if (e instanceof Deno.errors.AddrNotAvailable) {
    return new ParameterError(`--host ${hostname} is not an address of this machine`);
  }
  const why = (e as Error).message;
  if (e instanceof URIError || /lookup address/.test(why)) {
    return new ParameterError(`--host "${hostname}" is not an IP address or known host name`);
  }
  return new ParameterError(`cannot listen on ${where}: ${why}; check --host and --port`);
}

/**
 * Throws a one-line ParameterError unless `hostname:port` can be listened on: a probe that
 * binds and closes, so a port in use or a bad --host is reported before the model loads.
 */
export function checkListen(hostname: string, port: number): void {
  let listener: Deno.Listener;
  try {
    listener = Deno.listen({ hostname, port });
  } catch (e) {
    throw listenError(e, hostname, port);
  }
  listener.close();
}

/** Serves `engine` over HTTP until `options.signal` aborts (or `server.shutdown()`). */
export function startServer(engine: Engine, options: ServeOptions = {}): RunningServer {
  const app = createApp(engine, options);
  const hostname = options.hostname ?? "127.0.0.1", port = options.port ?? 8080;
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve({ hostname, port, signal: options.signal, onListen: () => {} }, app.fetch);
  } catch (e) {
    throw listenError(e, hostname, port);
  }
  const url = `http://${server.addr.hostname}:${server.addr.port}`;
  if (!options.quiet) console.error(`serving ${engine.modelId} on ${url}`);
  return { server, url, port: server.addr.port };
}

const USAGE = `usage: deno task serve [options]
  --model PATH            model directory, llama2.c .bin or .lowbit file (default: download
                          ${DEFAULT_MODEL} into $LOWBIT_CACHE or ~/.cache/lowbit)
  --tokenizer PATH        tokenizer.json or tokenizer.bin (default: found beside the model)
  --model-id ID           the model name clients use (default: the path's basename)
  --host HOST             address to listen on (default 127.0.0.1)
  --port N                port (default 8080)
  --ctx N                 context length (default: the model's, at most 2048)
  --kv-cache f16|f32      KV cache element type (default f16 where the adapter has shader-f16)
  --max-tokens-limit N    largest max_tokens a request may ask for (default: the context)
  --max-queue N           requests allowed to wait; more get 429 (default 64)
  --slots N               requests decoded together, each with a KV cache of the context
                          (default 8)
  --drain-timeout S       on SIGTERM/SIGINT, seconds to let running and queued requests
                          finish before aborting them (default 30); a second signal exits now
  --api-key KEY           require Authorization: Bearer KEY (also $LOWBIT_API_KEY)
  --api-key-file PATH     the same, the key read from a file (trimmed)
  --metrics-public        serve /metrics without the API key (/health never needs it)
  --cors ORIGIN           allow browser pages of ORIGIN (repeatable, comma list, or *)
  --adapter NAME|N        Vulkan driver to use (\`--adapter list\` lists them)`;

async function main(args: string[]): Promise<void> {
  const { values: a } = parseCli({
    args,
    options: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      "model-id": { type: "string" },
      host: { type: "string", default: "127.0.0.1" },
      port: { type: "string", default: "8080" },
      ctx: { type: "string" },
      "kv-cache": { type: "string" },
      "max-tokens-limit": { type: "string" },
      "max-queue": { type: "string", default: "64" },
      slots: { type: "string", default: "8" },
      "drain-timeout": { type: "string", default: "30" },
      "api-key": { type: "string" },
      "api-key-file": { type: "string" },
      "metrics-public": { type: "boolean", default: false },
      cors: { type: "string", multiple: true },
      help: { type: "boolean", default: false },
    },
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  const port = intOption("port", a.port, 0)!;
  if (port > 65535) throw new ParameterError(`--port must be at most 65535; got ${port}`);
  const drainTimeoutS = numberOption(
    "drain-timeout",
    a["drain-timeout"]!,
    "a number of seconds ≥ 0",
    (n) => Number.isFinite(n) && n >= 0,
  );
  const apiKey = await resolveApiKey(
    a["api-key"],
    a["api-key-file"],
    Deno.env.get("LOWBIT_API_KEY"),
  );
  const cors = parseCorsOrigins(a.cors ?? []);
  const engineOptions = {
    maxQueue: intOption("max-queue", a["max-queue"], 0),
    slots: intOption("slots", a.slots, 1),
  };
  const maxTokensLimit = intOption("max-tokens-limit", a["max-tokens-limit"], 1);
  const kvType = kvCacheOption(a["kv-cache"]);
  checkListen(a.host!, port); // before the model loads: a port in use fails at once
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
    kvType,
  });
  const engine = new Engine(model, tokenizer, modelId, engineOptions);
  const { server } = startServer(engine, {
    hostname: a.host,
    port,
    maxTokensLimit,
    apiKey,
    metricsPublic: a["metrics-public"],
    cors,
  });
  const access = apiKey === undefined ? "no API key" : "API key required";
  console.error(`context ${engine.contextLength} tokens | ${gpu.adapterName} | ${access}`);
  await shutdownOnSignals(engine, server, drainTimeoutS);
}

if (import.meta.main) runMain(() => main(Deno.args));
