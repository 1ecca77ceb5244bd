/**
 * Tests of the adapter checks: choosing a Vulkan driver (kernels/adapter.ts), the validation
 * scopes that turn an adapter which cannot run the kernels into one named error
 * (kernels/gpu.ts), and the first-run path of `generate` on such an adapter.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { pickDrivers, vulkanDrivers } from "../kernels/adapter.ts";
import { GpuError } from "../kernels/errors.ts";
import { haveShared, sharedPath, testGpu, withTempDir } from "./helpers.ts";

const drivers = [
  { manifest: "/usr/share/vulkan/icd.d/intel_icd.x86_64.json", library: "libvulkan_intel.so" },
  { manifest: "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json", library: "libvulkan_lvp.so" },
  { manifest: "/opt/nvidia/nvidia_icd.json", library: "libGLX_nvidia.so.0" },
];

Deno.test("--adapter picks drivers by index, name or alias; an unknown one lists them", () => {
  assert.deepEqual(pickDrivers("1", drivers), [drivers[1]]);
  assert.deepEqual(pickDrivers("NVIDIA", drivers), [drivers[2]]);
  assert.deepEqual(pickDrivers("lavapipe", drivers), [drivers[1]]);
  assert.deepEqual(pickDrivers("cpu", drivers), [drivers[1]]);
  assert.throws(() => pickDrivers("radeon", drivers), (e: Error) => {
    assert(e instanceof GpuError);
    assert.match(e.message, /no installed Vulkan driver matches "radeon"/);
    assert.match(e.message, /2: nvidia_icd\.json/);
    return true;
  });
  assert.throws(() => pickDrivers("3", drivers), /there are 3 Vulkan drivers/);
});

Deno.test("Vulkan drivers are read from VK_DRIVER_FILES folders; unreadable manifests skipped", async () => {
  await withTempDir(async (dir) => {
    const icd = (lib: string) =>
      JSON.stringify({ file_format_version: "1.0.0", ICD: { library_path: lib } });
    await Deno.writeTextFile(join(dir, "b_icd.json"), icd("/lib/libb.so"));
    await Deno.writeTextFile(join(dir, "a_icd.json"), icd("/lib/liba.so"));
    await Deno.writeTextFile(join(dir, "broken.json"), "{ not json");
    await Deno.writeTextFile(join(dir, "notes.txt"), "ignored");
    const found = vulkanDrivers({ VK_DRIVER_FILES: `${dir}:/nonexistent.json` })
      .filter((d) => d.manifest.startsWith(dir));
    assert.deepEqual(found.map((d) => d.library), ["/lib/liba.so", "/lib/libb.so"]);
  });
});

Deno.test("a kernel the adapter rejects is one GpuError naming the adapter, the step and the fix", async () => {
  const gpu = await testGpu();
  const ok = await gpu.validated("a valid kernel", () =>
    gpu.pipeline(
      "adapter_test_ok",
      () => "@compute @workgroup_size(1) fn main() {}",
    ));
  assert(ok instanceof GPUComputePipeline);
  const bad = "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }";
  await assert.rejects(
    () =>
      gpu.validated(
        "compiling adapter_test_bad",
        () => gpu.pipeline("adapter_test_bad", () => bad),
      ),
    (e: Error) => {
      assert(e instanceof GpuError);
      assert(e.message.includes(`"${gpu.adapterName}"`), e.message);
      assert.match(e.message, /compiling adapter_test_bad failed/);
      assert.match(e.message, /apt-get install -y mesa-vulkan-drivers/);
      return true;
    },
  );
  assert.deepEqual(gpu.failure, null, "a scoped error must not count as an uncaught one");
});

Deno.test("generate on an adapter that cannot run the kernels exits 1 with one named error", async () => {
  if (!(await haveShared("models/stories260K/stories260K.bin"))) return;
  // No Vulkan driver: Deno falls back to its GL adapter, whose limits the kernels exceed (or,
  // where no GL adapter exists either, finds none at all). Both must be one line and exit 1.
  const env: Record<string, string> = {
    ...Deno.env.toObject(),
    VK_DRIVER_FILES: "/nonexistent.json",
  };
  delete env.LOWBIT_ADAPTER;
  delete env.VK_ICD_FILENAMES;
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "runtime/cli/generate_cmd.ts",
      "--model",
      sharedPath("models/stories260K/stories260K.bin"),
      "--temperature",
      "0",
      "--max-tokens",
      "8",
    ],
    cwd: new URL("..", import.meta.url).pathname,
    env,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.deepEqual(out.code, 1, stderr);
  assert.deepEqual(new TextDecoder().decode(out.stdout), "", "no text on an adapter that fails");
  const errors = stderr.split("\n").filter((l) => l.startsWith("error: "));
  assert.deepEqual(errors.length, 1, stderr);
  assert.match(errors[0], /cannot run lowbit's kernels|no WebGPU adapter found/);
  assert.match(errors[0], /mesa-vulkan-drivers/);
  assert(!stderr.includes("    at "), `no stack trace:\n${stderr}`);
  assert(!stderr.includes("WebGPU error"), `no stream of WebGPU errors:\n${stderr}`);
});

/** Runs `generate` with `args`; its exit code, stdout and stderr. */
async function generateCmd(args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "runtime/cli/generate_cmd.ts", ...args],
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test("--adapter list prints the drivers; an unknown --adapter fails before loading", async () => {
  const list = await generateCmd(["--adapter", "list"]);
  assert.equal(list.code, 0, list.stderr);
  const drivers = vulkanDrivers();
  assert.equal(list.stdout.trim().split("\n").length, Math.max(drivers.length, 1), list.stdout);
  if (drivers.some((d) => d.library.includes("lvp"))) assert.match(list.stdout, /lvp_icd/);
  const bad = await generateCmd(["--adapter", "no-such-gpu", "--model", "/nonexistent"]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^error: adapter "no-such-gpu" .*no installed Vulkan driver matches/m);
  assert(!bad.stderr.includes("    at "), bad.stderr);
});
