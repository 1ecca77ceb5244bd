/**
 * NaN/±Inf detection in raw tensor data, one vectorised pass over the bits: a float is not
 * finite exactly when its exponent bits are all ones. Every reader runs it on every tensor it
 * reads (`checkFinite`), so a corrupt file fails at load, naming the tensor, instead of
 * generating empty text; the writer runs it so it never writes such a file.
 */
import type { DType } from "./checkpoint.ts";
import { ModelFormatError } from "../errors.ts";

/** Scans u32 words for a 16-bit float whose exponent (`mask`, per half) is all ones. */
function firstBadHalf(words: Uint32Array, mask: number): number {
  // (w & mask) + lowest exponent bit carries into each half's sign bit iff that half's exponent
  // is all ones (a half's sum is at most 0x8000, so it never carries into the next half).
  const both = mask | (mask << 16), carry = (mask & -mask) * 0x10001;
  for (let i = 0; i < words.length; i++) {
    const w = words[i];
    if ((((w & both) + carry) & 0x80008000) !== 0) {
      return 2 * i + ((w & mask) === mask ? 0 : 1);
    }
  }
  return -1;
}

/** `bytes` as whole u32 words (a trailing 2-byte half left out), copied when misaligned. */
function words(bytes: Uint8Array): Uint32Array {
  const b = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
  return new Uint32Array(b.buffer, b.byteOffset, b.byteLength >> 2);
}

/** Index of the first NaN or ±Inf element of little-endian F32/F16/BF16 data, or −1. */
export function firstNonFinite(dtype: DType, bytes: Uint8Array): number {
  if (dtype === "F32") {
    const w = words(bytes);
    for (let i = 0; i < w.length; i++) if ((w[i] & 0x7f800000) === 0x7f800000) return i;
    return -1;
  }
  const mask = dtype === "F16" ? 0x7c00 : 0x7f80;
  const found = firstBadHalf(words(bytes), mask), n = bytes.byteLength >> 1;
  if (found >= 0 || n % 2 === 0) return found;
  const last = bytes[2 * n - 2] | (bytes[2 * n - 1] << 8); // the odd element out
  return (last & mask) === mask ? n - 1 : -1;
}

/** "NaN", "+Inf" or "-Inf": element `i` of data `firstNonFinite` flagged. */
function describe(dtype: DType, bytes: Uint8Array, i: number): string {
  const size = dtype === "F32" ? 4 : 2;
  const b = bytes.subarray(i * size, (i + 1) * size);
  const bits = size === 4
    ? new DataView(b.buffer, b.byteOffset).getUint32(0, true)
    : (b[0] | (b[1] << 8)) << (dtype === "BF16" ? 16 : 0) >>> 0;
  const mantissa = dtype === "F16" ? bits & 0x3ff : bits & 0x7fffff;
  const negative = dtype === "F16" ? (bits & 0x8000) !== 0 : bits >>> 31 === 1;
  return mantissa !== 0 ? "NaN" : negative ? "-Inf" : "+Inf";
}

/** `[r, c]` of flat index `i` in a row-major `shape` (as many indices as dimensions). */
function position(shape: number[], i: number): string {
  const idx = shape.map(() => 0);
  for (let d = shape.length - 1; d >= 0; d--) {
    idx[d] = i % shape[d];
    i = Math.floor(i / shape[d]);
  }
  return `[${idx.join(", ")}]`;
}

/**
 * Throws ModelFormatError naming the file, the tensor, the value and its position when `bytes`
 * (the tensor's elements from flat index `first` on) hold a NaN or ±Inf.
 */
export function checkFinite(
  path: string,
  name: string,
  shape: number[],
  dtype: DType,
  bytes: Uint8Array,
  first = 0,
): void {
  const i = firstNonFinite(dtype, bytes);
  if (i < 0) return;
  throw new ModelFormatError(
    `${path}: tensor ${name} holds ${describe(dtype, bytes, i)} at ${
      position(shape, first + i)
    } (${dtype}): the file is corrupt`,
  );
}

/**
 * The packed form's check: `sz` holds (s, z) fp16 pairs, rows of `groups` words starting at row
 * `firstRow` of tensor `name`; throws ModelFormatError naming the tensor, the row and group,
 * and whether the scale or the offset is not finite.
 */
export function checkFiniteSz(
  path: string,
  name: string,
  sz: Uint32Array,
  groups: number,
  firstRow = 0,
): void {
  const bytes = new Uint8Array(sz.buffer, sz.byteOffset, sz.byteLength);
  const i = firstNonFinite("F16", bytes);
  if (i < 0) return;
  const word = i >> 1, row = firstRow + Math.floor(word / groups), group = word % groups;
  throw new ModelFormatError(
    `${path}: tensor ${name} holds ${describe("F16", bytes, i)} in its ${
      i % 2 === 0 ? "scale s" : "offset z"
    } of row ${row}, group ${group}: the file is corrupt`,
  );
}
