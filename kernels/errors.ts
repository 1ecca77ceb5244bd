/**
 * The errors the kernels throw (re-exported by runtime/errors.ts with the rest), so that kernels/
 * imports nothing from the layers above it.
 */

/** A tensor whose shape contradicts the model configuration or a kernel's contract. */
export class ShapeError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ShapeError";
  }
}

/** A user-supplied option or request parameter that is out of range or malformed. */
export class ParameterError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ParameterError";
  }
}

/** No usable WebGPU adapter, or the adapter lacks a limit or feature the model needs. */
export class GpuError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "GpuError";
  }
}
