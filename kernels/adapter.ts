/**
 * Choosing the WebGPU adapter. WebGPU has no way to list adapters, and Deno's `requestAdapter`
 * gives the one it prefers (a discrete GPU over a CPU one). On Linux every adapter Deno can use
 * comes from a Vulkan driver, installed as an ICD manifest (`/usr/share/vulkan/icd.d/*.json`), so
 * `--adapter NAME|INDEX` (or `LOWBIT_ADAPTER`) picks among the manifests and restricts the Vulkan
 * loader to the chosen one (`VK_DRIVER_FILES`) before the first adapter request of the process.
 */
import { basename, join } from "node:path";
import { GpuError } from "./errors.ts";

/** An installed Vulkan driver. */
export interface VulkanDriver {
  /** The ICD manifest's path. */
  manifest: string;
  /** The driver library it names (`library_path`). */
  library: string;
}

/** Where the Vulkan loader looks for ICD manifests when VK_DRIVER_FILES is not set. */
const ICD_DIRS = [
  "/usr/local/share/vulkan/icd.d",
  "/usr/share/vulkan/icd.d",
  "/etc/vulkan/icd.d",
];

/** Short names that mean a driver whose manifest or library has another name. */
const ALIASES: Record<string, string> = { lavapipe: "lvp", cpu: "lvp", llvmpipe: "lvp" };

/** The manifests of VK_DRIVER_FILES / VK_ICD_FILENAMES (files or folders) and the usual folders. */
export function vulkanDrivers(env = Deno.env.toObject()): VulkanDriver[] {
  const given = (env.VK_DRIVER_FILES ?? env.VK_ICD_FILENAMES ?? "").split(":").filter(Boolean);
  const files: string[] = [];
  for (const p of [...given, ...ICD_DIRS]) {
    let info: Deno.FileInfo;
    try {
      info = Deno.statSync(p);
    } catch {
      continue;
    }
    if (info.isFile) files.push(p);
    else if (info.isDirectory) {
      const names = [...Deno.readDirSync(p)].filter((e) => e.name.endsWith(".json"));
      files.push(...names.map((e) => join(p, e.name)).sort());
    }
  }
  const out: VulkanDriver[] = [];
  for (const manifest of new Set(files)) {
    try {
      const library = JSON.parse(Deno.readTextFileSync(manifest))?.ICD?.library_path;
      if (typeof library === "string") out.push({ manifest, library });
    } catch {
      // not a readable ICD manifest: the loader skips it too
    }
  }
  return out;
}

/** One line per driver, numbered as `--adapter INDEX` counts them. */
export function describeDrivers(drivers: VulkanDriver[]): string {
  if (!drivers.length) {
    return "no Vulkan drivers installed (apt-get install -y mesa-vulkan-drivers)";
  }
  return drivers.map((d, i) => `  ${i}: ${basename(d.manifest)} (${d.library})`).join("\n");
}

/**
 * The drivers `spec` names: an index into {@link vulkanDrivers}, or a case-insensitive part of a
 * manifest's file name or library (`nvidia`, `lvp`, `lavapipe`, `radeon`, `intel`).
 */
export function pickDrivers(spec: string, drivers: VulkanDriver[]): VulkanDriver[] {
  const s = spec.trim().toLowerCase();
  if (/^\d+$/.test(s)) {
    const d = drivers[Number(s)];
    if (!d) {
      throw new GpuError(
        `adapter "${spec}" (--adapter, LOWBIT_ADAPTER): there are ${drivers.length} Vulkan drivers, numbered from 0:\n` +
          describeDrivers(drivers),
      );
    }
    return [d];
  }
  const want = ALIASES[s] ?? s;
  const hits = drivers.filter((d) =>
    `${basename(d.manifest)} ${basename(d.library)}`.toLowerCase().includes(want)
  );
  if (!hits.length) {
    throw new GpuError(
      `adapter "${spec}" (--adapter, LOWBIT_ADAPTER): no installed Vulkan driver matches "${spec}"; the drivers are:\n` +
        describeDrivers(drivers),
    );
  }
  return hits;
}

/**
 * Restricts the Vulkan loader to the drivers `spec` names. Must run before the process's first
 * `navigator.gpu.requestAdapter`, which creates the Vulkan instance.
 */
export function restrictToAdapter(spec: string): VulkanDriver[] {
  const picked = pickDrivers(spec, vulkanDrivers());
  const files = picked.map((d) => d.manifest).join(":");
  Deno.env.set("VK_DRIVER_FILES", files);
  Deno.env.set("VK_ICD_FILENAMES", files);
  return picked;
}
