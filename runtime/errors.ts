/**
 * One Error subclass per kind of failure. Messages name the file, tensor or value and,
 * where there is one, the fix.
 */

export { GpuError, ParameterError, ShapeError } from "../kernels/errors.ts";

/** A model file or checkpoint that cannot be read: truncated, bad header, missing tensor. */
export class ModelFormatError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ModelFormatError";
  }
}

/** A model whose architecture, dtype or configuration lowbit does not support. */
export class UnsupportedModelError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "UnsupportedModelError";
  }
}

/** A numerical failure: a matrix that is not positive definite, or a NaN/Inf result. */
export class NumericalError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NumericalError";
  }
}

/** A tokenizer file that cannot be found or read, or a tokenizer feature the model lacks. */
export class TokenizerError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "TokenizerError";
  }
}
