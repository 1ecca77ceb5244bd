/**
 * Server metrics in the Prometheus text format: requests by endpoint and status, prompt and
 * generated tokens, queue depth, and time-to-first-token and per-token latency histograms.
 */
import type { Context, MiddlewareHandler } from "hono";

const TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];

/** A cumulative histogram over fixed upper bounds (seconds). */
class Histogram {
  readonly counts: number[];
  sum = 0;
  count = 0;

  constructor(readonly bounds: number[]) {
    this.counts = bounds.map(() => 0);
  }

  observe(v: number): void {
    this.bounds.forEach((b, i) => {
      if (v <= b) this.counts[i]++;
    });
    this.sum += v;
    this.count++;
  }

  render(name: string, help: string): string[] {
    return [
      `# HELP ${name} ${help}`,
      `# TYPE ${name} histogram`,
      ...this.bounds.map((b, i) => `${name}_bucket{le="${b}"} ${this.counts[i]}`),
      `${name}_bucket{le="+Inf"} ${this.count}`,
      `${name}_sum ${this.sum}`,
      `${name}_count ${this.count}`,
    ];
  }
}

/** What one finished generation reports. */
export interface GenerationRecord {
  promptTokens: number;
  generatedTokens: number;
  /** Request arrival to first token, queueing included; null when none was generated. */
  ttftS: number | null;
  /** Mean seconds per token after the first; null with fewer than two tokens. */
  perTokenS: number | null;
  /** Seconds the engine spent on the job (not counting its wait in the queue). */
  serviceS: number;
}

export class Metrics {
  readonly #requests = new Map<string, number>();
  readonly #ttft = new Histogram(TTFT_BUCKETS);
  readonly #tpot = new Histogram(TPOT_BUCKETS);
  #promptTokens = 0;
  #generatedTokens = 0;
  #running = 0;
  #serviceS = 0;
  #jobs = 0;

  /** Counts a request; `endpoint` must be a bounded set of names (a route, or "other"). */
  countRequest(endpoint: string, status: number): void {
    const key = `endpoint="${endpoint}",status="${status}"`;
    this.#requests.set(key, (this.#requests.get(key) ?? 0) + 1);
  }

  /** A generation got its first token (for the running gauge); `finished` ends it. */
  started(): void {
    this.#running++;
  }

  finished(r: GenerationRecord): void {
    this.#running--;
    this.#promptTokens += r.promptTokens;
    this.#generatedTokens += r.generatedTokens;
    if (r.ttftS !== null) this.#ttft.observe(r.ttftS);
    if (r.perTokenS !== null) this.#tpot.observe(r.perTokenS);
    this.#serviceS += r.serviceS;
    this.#jobs++;
  }

  /** Seconds to wait before retrying with `depth` jobs queued: their expected service time. */
  retryAfter(depth: number): number {
    const mean = this.#jobs > 0 ? this.#serviceS / this.#jobs : 1;
    return Math.min(600, Math.max(1, Math.ceil((depth + 1) * mean)));
  }

  /** The Prometheus exposition text; `queueDepth` is read at scrape time. */
  render(queueDepth: number): string {
    const lines = [
      "# HELP lowbit_requests_total HTTP requests by endpoint and status.",
      "# TYPE lowbit_requests_total counter",
      ...[...this.#requests].map(([k, v]) => `lowbit_requests_total{${k}} ${v}`),
      "# HELP lowbit_prompt_tokens_total Prompt tokens of finished generations.",
      "# TYPE lowbit_prompt_tokens_total counter",
      `lowbit_prompt_tokens_total ${this.#promptTokens}`,
      "# HELP lowbit_generation_tokens_total Tokens generated.",
      "# TYPE lowbit_generation_tokens_total counter",
      `lowbit_generation_tokens_total ${this.#generatedTokens}`,
      "# HELP lowbit_queue_depth Jobs waiting for the engine.",
      "# TYPE lowbit_queue_depth gauge",
      `lowbit_queue_depth ${queueDepth}`,
      "# HELP lowbit_requests_running Generations past their first token and not yet finished.",
      "# TYPE lowbit_requests_running gauge",
      `lowbit_requests_running ${this.#running}`,
      ...this.#ttft.render(
        "lowbit_time_to_first_token_seconds",
        "Request arrival to first generated token, queueing included.",
      ),
      ...this.#tpot.render(
        "lowbit_time_per_output_token_seconds",
        "Mean time per generated token after the first, per request.",
      ),
    ];
    return lines.join("\n") + "\n";
  }
}

/**
 * Middleware counting every request by endpoint and status: the endpoint is the request path
 * when it is one of the app's fixed route paths (read from `routes` on first use), else "other",
 * so the label set stays bounded.
 */
export function countRequests(
  metrics: Metrics,
  routes: () => { path: string; method: string }[],
): MiddlewareHandler {
  let endpoints: Set<string> | null = null;
  return async (c: Context, next) => {
    await next();
    endpoints ??= new Set(
      routes().filter((r) => r.method !== "ALL" && !/[:*]/.test(r.path)).map((r) => r.path),
    );
    metrics.countRequest(endpoints.has(c.req.path) ? c.req.path : "other", c.res.status);
  };
}

/** `GET /metrics`. */
export function metricsHandler(metrics: Metrics, queueDepth: () => number) {
  return (c: Context): Response =>
    c.body(metrics.render(queueDepth()), 200, {
      "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
    });
}
