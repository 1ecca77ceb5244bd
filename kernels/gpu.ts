/** The WebGPU device, its limits and features, and the pipeline cache every kernel uses. */
import { GpuError } from "./errors.ts";
import { restrictToAdapter } from "./adapter.ts";
import type { TunedShape } from "./tune_key.ts";
import type { AttentionShape } from "./attention.ts";
import { loadTunedShapes } from "./tune_cache.ts";

export interface GpuOptions {
  /** Use `shader-f16` for f16 weights when the adapter has it (default true). */
  allowShaderF16?: boolean;
  /**
   * The adapter to use: a Vulkan driver's index or name (kernels/adapter.ts); default
   * `$LOWBIT_ADAPTER`, else the one WebGPU prefers.
   */
  adapter?: string;
}

/** What to do when an adapter cannot run the kernels. */
const ADAPTER_FIX = "without a GPU, install the CPU Vulkan driver (apt-get install -y " +
  "mesa-vulkan-drivers); with one, install its Vulkan driver (or set VK_DRIVER_FILES to its " +
  "ICD manifest); choose among installed drivers with --adapter NAME|INDEX or LOWBIT_ADAPTER";

/** A device plus what the kernels need to know about it. */
export class Gpu {
  readonly pipelines = new Map<string, GPUComputePipeline>();
  /** The first WebGPU error no scope caught (the device's `uncapturederror`), if any. */
  failure: string | null = null;
  /**
   * Thread shapes the tuner chose for this adapter by matrix kernel key (quantized:
   * kernels/tune_key.ts; dense: kernels/dense_key.ts), which the forward plan uses as they are:
   * read from the tune cache by createGpu, empty for a Gpu made by hand.
   */
  tuned = new Map<string, TunedShape>();
  /**
   * The attention kernel's shapes the tuner chose for this adapter, by attention key
   * (kernels/attention_key.ts), read from the same cache; empty for a Gpu made by hand.
   */
  tunedAttention = new Map<string, AttentionShape>();
  /**
   * The tune cache `tuned` was read from, where a first run on a GPU writes what it tunes
   * (runtime/model/tune_plan.ts); null for a Gpu made by hand, which is never auto-tuned.
   */
  tuneCache: string | null = null;
  /** The adapter's vendor, device and architecture ids (part of its tune cache entry). */
  driver = "";
  constructor(
    readonly device: GPUDevice,
    readonly adapterName: string,
    /** f16 weights are read as native `f16` (else as packed pairs through unpack2x16float). */
    readonly shaderF16: boolean,
    readonly timestamps: boolean,
    /** True for CPU adapters (lavapipe): kernels pick instruction-lean shapes there. */
    readonly isCpu: boolean,
  ) {}

  get maxBinding(): number {
    return this.device.limits.maxStorageBufferBindingSize;
  }

  /** Returns the cached pipeline for `key`, compiling `code()` on a miss. */
  pipeline(key: string, code: () => string): GPUComputePipeline {
    let p = this.pipelines.get(key);
    if (!p) {
      const module = this.device.createShaderModule({ label: key, code: code() });
      p = this.device.createComputePipeline({
        label: key,
        layout: "auto",
        compute: { module, entryPoint: "main" },
      });
      this.pipelines.set(key, p);
    }
    return p;
  }

  /**
   * Runs `fn` (creating buffers, textures, pipelines, or a first dispatch) inside validation and
   * out-of-memory error scopes: an adapter that cannot run the kernels becomes one GpuError that
   * names the adapter, what failed and the fix, instead of a stream of WebGPU errors and
   * silently wrong output.
   */
  async validated<T>(what: string, fn: () => T | Promise<T>): Promise<T> {
    const { device } = this;
    device.pushErrorScope("out-of-memory");
    device.pushErrorScope("validation");
    let result: T | undefined, thrown: unknown = null;
    try {
      result = await fn();
    } catch (e) {
      thrown = e;
    }
    const invalid = await device.popErrorScope();
    const oom = await device.popErrorScope();
    const err = invalid ?? oom;
    // the adapter's own error explains a failure better than whatever it led to
    if (err) throw this.cannotRun(what, err.message);
    if (thrown !== null) throw thrown;
    return result as T;
  }

  /** Throws the first error that escaped every scope since the device was created. */
  check(what: string): void {
    if (this.failure !== null) throw this.cannotRun(what, this.failure);
  }

  private cannotRun(what: string, message: string): GpuError {
    const first = message.split("\n").find((l) => l.trim()) ?? message;
    return new GpuError(
      `the WebGPU adapter "${this.adapterName}" cannot run lowbit's kernels: ${what} failed ` +
        `(${first.trim()}); ${ADAPTER_FIX}`,
    );
  }

  buffer(label: string, size: number, usage: number): GPUBuffer {
    return this.device.createBuffer({ label, size: Math.max(16, align(size, 16)), usage });
  }

  /** queue.writeBuffer of a typed array (any view over any buffer). */
  write(buffer: GPUBuffer, offset: number, data: ArrayBufferView): void {
    this.device.queue.writeBuffer(
      buffer,
      offset,
      data.buffer as ArrayBuffer,
      data.byteOffset,
      data.byteLength,
    );
  }

  /** A storage buffer holding `data` (padded to 16 bytes). */
  upload(label: string, data: ArrayBufferView, extraUsage = 0): GPUBuffer {
    const buf = this.buffer(label, data.byteLength, STORAGE | GPUBufferUsage.COPY_DST | extraUsage);
    this.device.queue.writeBuffer(
      buf,
      0,
      data.buffer as ArrayBuffer,
      data.byteOffset,
      data.byteLength,
    );
    return buf;
  }

  /**
   * A bind group of `resources` in binding order: whole buffers, buffer ranges
   * (`{ buffer, offset?, size? }`, e.g. a uniform binding of a buffer's first bytes), textures
   * (bound through a default view) or texture views.
   */
  bindGroup(pipeline: GPUComputePipeline, resources: Bindable[], label?: string): GPUBindGroup {
    return this.device.createBindGroup({
      label,
      layout: pipeline.getBindGroupLayout(0),
      entries: resources.map((r, binding) => ({ binding, resource: bindingResource(r) })),
    });
  }
}

/** What {@link Gpu.bindGroup} accepts for one binding. */
export type Bindable = GPUBuffer | GPUTexture | GPUTextureView | GPUBufferBinding;

/** The GPUBindingResource of a {@link Bindable}. */
export function bindingResource(r: Bindable): GPUBindingResource {
  if (r instanceof GPUBuffer) return { buffer: r };
  if (r instanceof GPUTexture) return r.createView();
  return r;
}

export const STORAGE = GPUBufferUsage.STORAGE;

export function align(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** Requests the adapter and a device with the largest buffer limits it offers. */
export async function createGpu(options: GpuOptions = {}): Promise<Gpu> {
  if (!("gpu" in navigator)) throw new GpuError("WebGPU is not available in this Deno build");
  const spec = options.adapter ?? Deno.env.get("LOWBIT_ADAPTER");
  if (spec) restrictToAdapter(spec);
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    throw new GpuError(
      "no WebGPU adapter found: install a Vulkan driver (apt-get install mesa-vulkan-drivers " +
        "gives the CPU adapter lavapipe) or set VK_DRIVER_FILES to your GPU's ICD",
    );
  }
  const requiredFeatures: GPUFeatureName[] = [];
  const wantF16 = options.allowShaderF16 ?? true;
  if (wantF16 && adapter.features.has("shader-f16")) requiredFeatures.push("shader-f16");
  if (adapter.features.has("timestamp-query")) requiredFeatures.push("timestamp-query");
  const l = adapter.limits;
  const device = await adapter.requestDevice({
    requiredFeatures,
    requiredLimits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
      maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
      maxTextureDimension2D: l.maxTextureDimension2D,
      maxUniformBufferBindingSize: l.maxUniformBufferBindingSize,
    },
  });
  const info = adapter.info;
  const name = info.description || `${info.vendor} ${info.device}`.trim() || "unknown adapter";
  const isCpu = info.isFallbackAdapter || /llvmpipe|lavapipe|swiftshader/i.test(name);
  const gpu = new Gpu(
    device,
    name,
    requiredFeatures.includes("shader-f16"),
    requiredFeatures.includes("timestamp-query"),
    isCpu,
  );
  gpu.driver = [info.vendor, info.device, info.architecture].filter((s) => s).join(":");
  loadTunedShapes(gpu);
  // errors outside every scope: the first is kept for `check` and printed once, not per call
  device.addEventListener("uncapturederror", (e) => {
    if (gpu.failure !== null) return;
    gpu.failure = (e as GPUUncapturedErrorEvent).error.message;
    console.error(`WebGPU error on "${name}": ${gpu.failure}`);
  });
  return gpu;
}
