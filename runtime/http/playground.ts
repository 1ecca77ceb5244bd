/**
 * `GET /` and `GET /playground/{file}`: the playground page, static files in
 * runtime/http/playground/ (no build step, nothing from another origin). They are read once, when
 * the app is built, and served with an ETag and `Cache-Control: no-cache`, so a browser keeps
 * them and revalidates (304) instead of running a stale page after an upgrade. The page itself
 * is open; the routes it calls (`/v1/*`) carry the API key the user enters.
 */
import type { Context } from "hono";
import { createHash } from "node:crypto";
import { notFound } from "./errors.ts";

const FILES = ["index.html", "playground.js", "playground.css"];

const TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  css: "text/css; charset=utf-8",
};

/**
 * The page talks only to its own origin: no CDN, no external fonts, no inline script (a stray
 * reference to another origin fails loudly in the browser console).
 */
const CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; " +
  "frame-ancestors 'none'";

interface Asset {
  body: Uint8Array<ArrayBuffer>;
  type: string;
  etag: string;
}

/** The playground's files, read from beside this module. Throws naming a missing file. */
function readAssets(): Map<string, Asset> {
  const assets = new Map<string, Asset>();
  for (const name of FILES) {
    const url = new URL(`./playground/${name}`, import.meta.url);
    let body: Uint8Array<ArrayBuffer>;
    try {
      body = Deno.readFileSync(url);
    } catch (e) {
      throw new Error(
        `the playground page's file ${name} could not be read from ${url}: ${(e as Error).message}`,
      );
    }
    const hash = createHash("sha256").update(body).digest("base64url").slice(0, 22);
    assets.set(name, {
      body,
      type: TYPES[name.slice(name.lastIndexOf(".") + 1)],
      etag: `"${hash}"`,
    });
  }
  return assets;
}

function serve(c: Context, asset: Asset): Response {
  const headers: Record<string, string> = {
    "Cache-Control": "no-cache",
    ETag: asset.etag,
    "X-Content-Type-Options": "nosniff",
  };
  if (asset.type.startsWith("text/html")) headers["Content-Security-Policy"] = CSP;
  const match = c.req.header("If-None-Match");
  if (match?.split(",").some((t) => t.trim().replace(/^W\//, "") === asset.etag)) {
    return new Response(null, { status: 304, headers });
  }
  return new Response(asset.body, { headers: { ...headers, "Content-Type": asset.type } });
}

/** The playground's two handlers: `page` for `GET /`, `asset` for `GET /playground/:file`. */
export function playground(): {
  page: (c: Context) => Response;
  asset: (c: Context) => Response;
} {
  const assets = readAssets();
  const index = assets.get("index.html")!;
  return {
    page: (c) => serve(c, index),
    asset: (c) => {
      const file = assets.get(c.req.param("file") ?? "");
      return file && file !== index ? serve(c, file) : notFound(c);
    },
  };
}
