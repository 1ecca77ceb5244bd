/**
 * `server.ts` as a child process, for tests and `bench serve` that need a real listening server
 * and real signals: starts it, waits for the URL it prints ("serving ... on URL"), keeps its
 * stderr.
 */
const ROOT = new URL("..", import.meta.url).pathname;

export interface ServerProcess {
  child: Deno.ChildProcess;
  /** e.g. http://127.0.0.1:40123 */
  url: string;
  /** Everything the server wrote to stderr so far. */
  log(): string;
  /** The exit status, once stderr is closed. */
  status: Promise<Deno.CommandStatus>;
}

function command(args: string[], env: Record<string, string>, stderr: "piped" | "null") {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "server.ts", ...args],
    cwd: ROOT,
    env: { XDG_RUNTIME_DIR: "/tmp", ...env },
    stdin: "null",
    stdout: "null",
    stderr,
  });
}

/** Starts `deno run -A server.ts ARGS` and resolves once it listens (rejects if it exits). */
export async function spawnServer(
  args: string[],
  env: Record<string, string> = {},
  timeoutMs = 120_000,
): Promise<ServerProcess> {
  const child = command(args, env, "piped").spawn();
  let text = "", wake = () => {};
  const pump = (async () => {
    const dec = new TextDecoder();
    for await (const chunk of child.stderr) {
      text += dec.decode(chunk, { stream: true });
      wake();
    }
  })();
  const status = Promise.all([child.status, pump]).then(([s]) => s);
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const url = await new Promise<string>((resolve, reject) => {
      wake = () => {
        const m = /serving .* on (http:\/\/\S+)/.exec(text);
        if (m) resolve(m[1]);
      };
      wake();
      status.then((s) => reject(new Error(`the server exited (${s.code}) first:\n${text}`)));
      timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`the server did not listen within ${timeoutMs} ms:\n${text}`));
      }, timeoutMs);
    });
    return { child, url, log: () => text, status };
  } finally {
    clearTimeout(timer);
    wake = () => {};
  }
}

/** Runs `deno run -A server.ts ARGS` to its end (for options it must reject before serving). */
export async function runServer(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stderr: string }> {
  const out = await command(args, env, "piped").output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

/** The `data:` payloads of an SSE body. */
export function sseData(body: string): string[] {
  return body.split("\n\n").filter((e) => e.startsWith("data: ")).map((e) => e.slice(6));
}

/** Resident set size of process `pid` (VmRSS), in bytes. */
export function rssOf(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? NaN) * 1024;
}
