/**
 * A small Chrome DevTools Protocol client for tests: starts headless Chromium (Debian's
 * `chromium`, or `$LOWBIT_CHROMIUM`), speaks CDP over the WebSocket it prints, and drives pages
 * as a user would (real mouse clicks and typed text) through flattened target sessions.
 */

/** Why Chromium could not be used, with what to do about it. */
export class BrowserError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BrowserError";
  }
}

const INSTALL_HINT = "install it (apt-get install -y chromium; .ci/run does) or set " +
  "LOWBIT_CHROMIUM to a Chromium or Chrome binary";

type Params = Record<string, unknown>;
type Listener = (params: Params, sessionId?: string) => void;

/** Waits for `promise`, failing with `what` after `ms`. */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new BrowserError(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A headless Chromium and one CDP connection to it. */
export class Browser {
  #nextId = 1;
  readonly #pending = new Map<
    number,
    { resolve: (v: Params) => void; reject: (e: Error) => void; method: string }
  >();
  readonly #listeners = new Set<{ method: string; fn: Listener }>();

  private constructor(
    private readonly child: Deno.ChildProcess,
    private readonly stderr: { tail: () => string; done: Promise<void>; cancel: () => void },
    private readonly ws: WebSocket,
    private readonly dir: string,
  ) {
    ws.onmessage = (e) => this.#receive(JSON.parse(e.data as string));
    ws.onclose = () => {
      for (const p of this.#pending.values()) {
        p.reject(new BrowserError(`the browser closed the connection during ${p.method}`));
      }
      this.#pending.clear();
    };
  }

  /** Starts Chromium; throws a BrowserError saying how to install it when it cannot start. */
  static async launch(): Promise<Browser> {
    const bin = Deno.env.get("LOWBIT_CHROMIUM") || "chromium";
    const dir = await Deno.makeTempDir({ prefix: "lowbit_chromium_" });
    let child: Deno.ChildProcess;
    try {
      child = new Deno.Command(bin, {
        args: [
          "--headless=new",
          "--no-sandbox",
          "--disable-gpu",
          "--disable-dev-shm-usage",
          "--no-first-run",
          "--no-default-browser-check",
          "--disable-extensions",
          "--disable-background-networking",
          "--disable-component-update",
          "--remote-debugging-port=0",
          `--user-data-dir=${dir}`,
          "about:blank",
        ],
        stdin: "null",
        stdout: "null",
        stderr: "piped",
      }).spawn();
    } catch (e) {
      await Deno.remove(dir, { recursive: true });
      const why = e instanceof Deno.errors.NotFound ? "not found" : (e as Error).message;
      throw new BrowserError(`cannot start Chromium: \`${bin}\`: ${why}; ${INSTALL_HINT}`);
    }
    const stderr = readStderr(child);
    let browser: Browser | null = null;
    try {
      const url = await within(
        Promise.race([
          stderr.url,
          child.status.then((s) => {
            throw new BrowserError(`Chromium exited with code ${s.code} before it listened`);
          }),
        ]),
        30_000,
        "Chromium printing its DevTools address",
      );
      const ws = new WebSocket(url);
      await within(
        new Promise<void>((resolve, reject) => {
          ws.onopen = () => resolve();
          ws.onerror = () => reject(new BrowserError(`cannot connect to Chromium at ${url}`));
        }),
        10_000,
        `connecting to ${url}`,
      );
      browser = new Browser(child, stderr, ws, dir);
      return browser;
    } catch (e) {
      await stopProcess(child, stderr, dir);
      const message = e instanceof Error ? e.message : String(e);
      throw new BrowserError(
        `cannot start Chromium (\`${bin}\`): ${message}; ${INSTALL_HINT}\n` +
          `its stderr ended with:\n${stderr.tail() || "(nothing)"}`,
      );
    }
  }

  #receive(msg: { id?: number; method?: string; params?: Params; sessionId?: string } & Params) {
    if (msg.id !== undefined) {
      const p = this.#pending.get(msg.id);
      if (!p) return;
      this.#pending.delete(msg.id);
      const error = msg.error as { message: string } | undefined;
      if (error) p.reject(new BrowserError(`${p.method}: ${error.message}`));
      else p.resolve((msg.result ?? {}) as Params);
      return;
    }
    for (const l of this.#listeners) {
      if (l.method === msg.method) l.fn(msg.params ?? {}, msg.sessionId);
    }
  }

  /** Sends one CDP command (to a page's session when `sessionId` is given). */
  send(method: string, params: Params = {}, sessionId?: string): Promise<Params> {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, method });
      this.ws.send(JSON.stringify({ id, method, params, sessionId }));
    });
  }

  /** Calls `fn` for every `method` event; returns the unsubscribe function. */
  on(method: string, fn: Listener): () => void {
    const l = { method, fn };
    this.#listeners.add(l);
    return () => this.#listeners.delete(l);
  }

  /** A new tab of `width` × `height` CSS pixels. */
  async newPage(width = 1200, height = 800): Promise<Page> {
    const { targetId } = await this.send("Target.createTarget", { url: "about:blank" });
    const { sessionId } = await this.send("Target.attachToTarget", { targetId, flatten: true });
    const page = new Page(this, sessionId as string);
    await page.send("Page.enable");
    await page.send("Runtime.enable");
    await page.send("Network.enable");
    await page.send("Emulation.setDeviceMetricsOverride", {
      width,
      height,
      deviceScaleFactor: 1,
      mobile: false,
    });
    return page;
  }

  /** Closes the browser and removes its profile directory. */
  async close(): Promise<void> {
    await within(this.send("Browser.close"), 5_000, "Browser.close").catch(() => {});
    this.ws.close();
    await stopProcess(this.child, this.stderr, this.dir);
  }
}

/** Ends Chromium (SIGKILL if it does not exit on its own), its stderr reader and its profile. */
async function stopProcess(
  child: Deno.ChildProcess,
  stderr: { done: Promise<void>; cancel: () => void },
  dir: string,
): Promise<void> {
  const exited = await within(child.status, 5_000, "Chromium exiting").then(
    () => true,
    () => false,
  );
  if (!exited) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
    await child.status;
  }
  // Chromium's helper processes may hold the pipe open a little longer: stop reading.
  await within(stderr.done, 2_000, "Chromium's stderr closing").catch(() => stderr.cancel());
  await stderr.done.catch(() => {});
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}

/** Reads Chromium's stderr to its end: the DevTools address, and a tail for error messages. */
function readStderr(child: Deno.ChildProcess) {
  const reader = child.stderr.getReader();
  const decoder = new TextDecoder();
  let text = "";
  let found: (url: string) => void = () => {};
  const url = new Promise<string>((resolve) => found = resolve);
  const done = (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text = (text + decoder.decode(value, { stream: true })).slice(-20_000);
        const m = /DevTools listening on (ws:\/\/\S+)/.exec(text);
        if (m) found(m[1]);
      }
    } catch {
      // cancelled
    } finally {
      reader.releaseLock();
    }
  })();
  return {
    url,
    done,
    tail: () => text.split("\n").slice(-15).join("\n"),
    cancel: () => void reader.cancel().catch(() => {}),
  };
}

/** One tab: evaluate script, click, type, wait, screenshot. */
export class Page {
  /** Uncaught exceptions of the page's scripts. */
  readonly errors: string[] = [];
  /** Every URL the page requested. */
  readonly requests: string[] = [];

  constructor(private readonly browser: Browser, private readonly sessionId: string) {
    browser.on("Runtime.exceptionThrown", (p, s) => {
      if (s !== sessionId) return;
      const d = p.exceptionDetails as { text: string; exception?: { description?: string } };
      this.errors.push(d.exception?.description ?? d.text);
    });
    browser.on("Network.requestWillBeSent", (p, s) => {
      if (s === sessionId) this.requests.push((p.request as { url: string }).url);
    });
  }

  send(method: string, params: Params = {}): Promise<Params> {
    return this.browser.send(method, params, this.sessionId);
  }

  /** Opens `url` and waits for its load event. */
  async goto(url: string): Promise<void> {
    let off = () => {};
    const loaded = new Promise<void>((resolve) => {
      off = this.browser.on("Page.loadEventFired", (_, s) => {
        if (s === this.sessionId) resolve();
      });
    });
    try {
      const r = await this.send("Page.navigate", { url });
      if (r.errorText) throw new BrowserError(`cannot open ${url}: ${r.errorText}`);
      await within(loaded, 15_000, `loading ${url}`);
    } finally {
      off();
    }
  }

  /** The value of a JavaScript expression (awaited when it is a promise). */
  async evaluate<T = unknown>(expression: string): Promise<T> {
    const r = await this.send("Runtime.evaluate", {
      expression,
      returnByValue: true,
      awaitPromise: true,
    });
    const ex = r.exceptionDetails as
      | { text: string; exception?: { description?: string } }
      | undefined;
    if (ex) {
      throw new BrowserError(`${expression}: ${ex.exception?.description ?? ex.text}`);
    }
    return (r.result as { value: T }).value;
  }

  /** Polls `expression` until it is truthy; on timeout, the error includes `describe()`. */
  async waitFor(
    expression: string,
    what: string,
    timeoutMs = 30_000,
    describe = "document.body.innerText",
  ): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (!(await this.evaluate<boolean>(`!!(${expression})`))) {
      if (Date.now() > end) {
        const state = await this.evaluate<string>(describe).catch((e) => String(e));
        throw new BrowserError(`timed out after ${timeoutMs} ms waiting for ${what}; ${state}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** A real left click at the centre of the element `selector` picks. */
  async click(selector: string): Promise<void> {
    const box = await this.evaluate<{ x: number; y: number } | null>(`(() => {
      const el = document.querySelector(${JSON.stringify(selector)});
      if (!el) return null;
      el.scrollIntoView({ block: "center" });
      const r = el.getBoundingClientRect();
      return { x: r.left + r.width / 2, y: r.top + r.height / 2 };
    })()`);
    if (!box) throw new BrowserError(`click: no element matches ${selector}`);
    const at = { x: box.x, y: box.y, button: "left", clickCount: 1 };
    await this.send("Input.dispatchMouseEvent", { type: "mouseMoved", x: box.x, y: box.y });
    await this.send("Input.dispatchMouseEvent", { type: "mousePressed", ...at });
    await this.send("Input.dispatchMouseEvent", { type: "mouseReleased", ...at });
  }

  /** Empties the field `selector` picks, focuses it and types `text` into it. */
  async fill(selector: string, text: string): Promise<void> {
    const ok = await this.evaluate<boolean>(`(() => {
      const el = document.querySelector(${JSON.stringify(selector)});
      if (!el) return false;
      el.value = "";
      el.focus();
      return true;
    })()`);
    if (!ok) throw new BrowserError(`fill: no element matches ${selector}`);
    await this.send("Input.insertText", { text });
  }

  /** Blurs the focused element (fires `change` on a field that was typed into). */
  async blur(): Promise<void> {
    await this.evaluate("document.activeElement?.blur()");
  }

  /** A PNG of the viewport. */
  async screenshot(): Promise<Uint8Array> {
    const { data } = await this.send("Page.captureScreenshot", { format: "png" });
    return Uint8Array.from(atob(data as string), (c) => c.charCodeAt(0));
  }
}
