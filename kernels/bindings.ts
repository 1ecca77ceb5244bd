/**
 * Binding declarations shared by the matrix kernel generators (dense texture, packed): the step
 * uniform of prefill kernels, the input vector x and the fused norm's weight g, then, after the
 * kernel's own weight bindings, the epilogue's.
 */
import { STEP_WGSL } from "./common.ts";
import { type Epilogue, epilogueWgsl } from "./epilogue.ts";

/** What the shared declarations depend on. */
export interface KernelInputs {
  K: number;
  batch: number;
  norm: unknown | null;
  epilogue: Epilogue;
  /** Prefill: the kernel binds the step uniform first (the epilogue's own is dropped). */
  dynamicTokens: boolean;
  /** Bind x and g as uniform buffers (a broadcast load on CPU adapters). */
  xUniform: boolean;
}

/** Hands out binding numbers in declaration order. */
export class BindingCounter {
  next = 0;
  decl(s: string): string {
    return `@group(0) @binding(${this.next++}) ${s};`;
  }
}

/** The step uniform (prefill kernels), x and, with a fused norm, g: the first bindings. */
export function inputDecls(c: KernelInputs, bind: BindingCounter): string {
  const K4 = c.K / 4;
  const ownStep = c.epilogue.kind !== "qkv";
  const step = c.dynamicTokens
    ? `${ownStep ? STEP_WGSL : ""}\n${bind.decl("var<uniform> step: Step")}`
    : "";
  const x = c.xUniform
    ? bind.decl(`var<uniform> x: array<vec4<f32>, ${K4 * c.batch}>`)
    : bind.decl("var<storage, read> x: array<vec4<f32>>");
  const g = !c.norm
    ? ""
    : c.xUniform
    ? bind.decl(`var<uniform> g: array<vec4<f32>, ${K4}>`)
    : bind.decl("var<storage, read> g: array<vec4<f32>>");
  return [step, x, g].join("\n");
}

/** The epilogue's declarations and functions, numbered after the bindings declared so far. */
export function epilogueDecls(c: KernelInputs, bind: BindingCounter, rows: number): string {
  if (!c.dynamicTokens) return epilogueWgsl(c.epilogue, bind.next, rows);
  // the qkv epilogue declares the step itself: drop that, the kernel bound it first
  const first = c.epilogue.kind !== "qkv" ? bind.next : bind.next - 1;
  return epilogueWgsl(c.epilogue, first, rows)
    .replace(/@group\(0\) @binding\(\d+\) var<uniform> step: Step;/, "");
}
