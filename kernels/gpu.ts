/** The WebGPU device, its limits and features, and the pipeline cache every kernel uses. */
import { GpuError } from "./errors.ts";

export interface GpuOptions {
  /** Use `shader-f16` for f16 weights when the adapter has it (default true). */
  allowShaderF16?: boolean;
}

/** A device plus what the kernels need to know about it. */
export class Gpu {
  readonly pipelines = new Map<string, GPUComputePipeline>();
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
  device.addEventListener("uncapturederror", (e) => {
    console.error(`WebGPU error: ${(e as GPUUncapturedErrorEvent).error.message}`);
  });
  const info = adapter.info;
  const name = info.description || `${info.vendor} ${info.device}`.trim() || "unknown adapter";
  const isCpu = info.isFallbackAdapter || /llvmpipe|lavapipe|swiftshader/i.test(name);
  return new Gpu(
    device,
    name,
    requiredFeatures.includes("shader-f16"),
    requiredFeatures.includes("timestamp-query"),
    isCpu,
  );
}
