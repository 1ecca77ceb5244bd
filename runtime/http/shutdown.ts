/**
 * Graceful shutdown. On SIGTERM or SIGINT the server stops taking requests (503
 * `server_draining`; `/health` answers 503 "draining", so a load balancer stops routing), lets
 * the queued and running jobs finish for up to the drain timeout, then aborts the rest: open
 * streams end with a chunk whose finish_reason is "abort" and `data: [DONE]`, waiting requests
 * get a 503. Then it closes the server. A second signal exits at once.
 */
import type { Context, MiddlewareHandler } from "hono";
import type { Engine } from "../model/engine.ts";
import { serverDraining, toResponse } from "./errors.ts";

/** Middleware answering 503 `server_draining` while the engine drains; `open` paths still run. */
export function refuseWhileDraining(engine: Engine, open: string[]): MiddlewareHandler {
  const free = new Set(open);
  return async (c: Context, next) => {
    if (!engine.draining || free.has(c.req.path)) return await next();
    return toResponse(c, serverDraining("the server is shutting down; retry on another instance"));
  };
}

/** How a drain went. */
export interface DrainReport {
  /** Jobs still queued or running at the drain timeout, ended with "abort". */
  aborted: number;
  /** Whether the server closed within the grace time after the engine went idle. */
  closed: boolean;
}

const delay = (ms: number) => {
  let id: ReturnType<typeof setTimeout> | undefined;
  const p = new Promise<"timeout">((r) => (id = setTimeout(() => r("timeout"), ms)));
  return { p, cancel: () => clearTimeout(id) };
};

/**
 * Drains `engine` (new jobs are refused), waits up to `timeoutMs` for its jobs to finish, aborts
 * those left, then shuts `server` down, waiting up to `graceMs` for the responses to be written.
 */
export async function drainAndClose(
  engine: Engine,
  server: Deno.HttpServer,
  timeoutMs: number,
  graceMs = 5000,
): Promise<DrainReport> {
  const idle = engine.drain();
  const wait = delay(timeoutMs);
  let aborted = 0;
  if (await Promise.race([idle, wait.p]) === "timeout") {
    aborted = engine.abortAll();
    await idle;
  }
  wait.cancel();
  const grace = delay(graceMs);
  const closed = await Promise.race([server.shutdown().then(() => true), grace.p]) === true;
  grace.cancel();
  return { aborted, closed };
}

const SIGNALS = { SIGINT: 2, SIGTERM: 15 } as const;

/**
 * Resolves once a SIGTERM or SIGINT has drained and closed the server (see `drainAndClose`). A
 * second signal exits the process at once with status 128 + its number (130, 143).
 */
export function shutdownOnSignals(
  engine: Engine,
  server: Deno.HttpServer,
  drainTimeoutS: number,
  log: (line: string) => void = console.error,
): Promise<DrainReport> {
  return new Promise((resolve, reject) => {
    let started = false;
    const on = (name: keyof typeof SIGNALS) => () => {
      if (started) {
        log(`${name} again: exiting now`);
        Deno.exit(128 + SIGNALS[name]);
      }
      started = true;
      log(
        `${name}: draining (${engine.running} running, ${engine.queueDepth} queued; up to ` +
          `${drainTimeoutS} s); new requests get 503`,
      );
      drainAndClose(engine, server, drainTimeoutS * 1000).then((r) => {
        const how = r.aborted
          ? `drain timeout: aborted ${r.aborted} request(s)`
          : "drained: every request finished";
        const unsent = r.closed ? "" : " (responses still unsent after the grace time were cut)";
        log(`${how}; stopped${unsent}`);
        resolve(r);
      }, reject);
    };
    for (const name of Object.keys(SIGNALS) as (keyof typeof SIGNALS)[]) {
      Deno.addSignalListener(name, on(name));
    }
  });
}
