/**
 * Safetensors reading: header parsing with validation, streamed row reads (seek + read, never
 * the whole file) converted to float32, and the sharded layout (`model.safetensors.index.json`).
 *
 * File layout: u64 little-endian header length N, N bytes of JSON header
 * `{name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?}`, then the data area;
 * offsets are relative to the start of the data area (byte 8 + N).
 */
import type { DType } from "./checkpoint.ts";
import { ModelFormatError, ParameterError, UnsupportedModelError } from "../errors.ts";
import { checkFinite } from "./finite.ts";

/** Bytes per element of the dtypes the safetensors format defines (sub-byte ones omitted). */
const dtypeBytes: Record<string, number> = Object.fromEntries([
  ...["F64", "I64", "U64"].map((d) => [d, 8]),
  ...["F32", "I32", "U32"].map((d) => [d, 4]),
  ...["F16", "BF16", "I16", "U16"].map((d) => [d, 2]),
  ...["I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0"].map((d) => [d, 1]),
]);

/** `dir/name` (forward slashes work on every platform Deno runs on). */
export function joinPath(dir: string, name: string): string {
  return dir.endsWith("/") || dir.endsWith("\\") ? dir + name : `${dir}/${name}`;
}

/** The spec's limit on the JSON header (100 MB). */
const MAX_HEADER_BYTES = 100_000_000;

/** The dtypes lowbit converts to float32. */
export const supportedDtypes: readonly DType[] = ["F32", "F16", "BF16"];

/** One tensor of a safetensors file, with absolute byte offsets in that file. */
export interface SafetensorsTensor {
  name: string;
  /** As written in the header; may be one lowbit cannot convert (checked on read). */
  dtype: string;
  shape: number[];
  /** Absolute byte range `[begin, end)` of the data in the file. */
  begin: number;
  end: number;
  /** File the tensor lives in, for messages and for sharded sets. */
  path: string;
}

/** Whether `dtype` is one `readRows` converts. */
export function isSupportedDtype(dtype: string): dtype is DType {
  return (supportedDtypes as readonly string[]).includes(dtype);
}

/** Rows of a tensor as `readRows` counts them: a 1-D tensor has one row per element. */
export function rowGeometry(shape: number[]): { rows: number; rowElems: number } {
  if (shape.length <= 1) return { rows: shape[0] ?? 1, rowElems: 1 };
  return { rows: shape[0], rowElems: shape.slice(1).reduce((a, b) => a * b, 1) };
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Parses and validates a header. `json` is the header text, `dataStart` = 8 + header length,
 * `fileSize` the file's length in bytes. Throws ModelFormatError naming the file and tensor.
 */
export function parseSafetensorsHeader(
  path: string,
  json: string,
  dataStart: number,
  fileSize: number,
): Map<string, SafetensorsTensor> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch (e) {
    throw new ModelFormatError(
      `${path}: header is not valid JSON (${(e as Error).message}); not a safetensors file?`,
      { cause: e },
    );
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw new ModelFormatError(`${path}: header is not a JSON object`);
  }
  const dataSize = fileSize - dataStart;
  const tensors = new Map<string, SafetensorsTensor>();
  for (const [name, entry] of Object.entries(parsed as Record<string, unknown>)) {
    if (name === "__metadata__") continue;
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e !== "object" || e === null || typeof e.dtype !== "string") {
      throw new ModelFormatError(`${path}: tensor ${name} has no dtype in the header`);
    }
    if (!Array.isArray(e.shape) || !e.shape.every(isNonNegInt)) {
      throw new ModelFormatError(
        `${path}: tensor ${name} has invalid shape ${JSON.stringify(e.shape)}`,
      );
    }
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every(isNonNegInt) || off[0] > off[1]) {
      throw new ModelFormatError(
        `${path}: tensor ${name} has invalid data_offsets ${JSON.stringify(off)}`,
      );
    }
    const [b, en] = off as number[];
    if (en > dataSize) {
      throw new ModelFormatError(
        `${path}: tensor ${name} data_offsets [${b}, ${en}] run past the end of the data area ` +
          `(${dataSize} bytes; file is ${fileSize} bytes): file truncated or corrupt`,
      );
    }
    const shape = e.shape as number[];
    const elemBytes = dtypeBytes[e.dtype];
    const elems = shape.reduce((a, x) => a * x, 1);
    if (elemBytes !== undefined && (en - b) !== elems * elemBytes) {
      throw new ModelFormatError(
        `${path}: tensor ${name} data_offsets [${b}, ${en}] span ${en - b} bytes but shape ` +
          `[${shape}] of ${e.dtype} needs ${elems * elemBytes}`,
      );
    }
    const entryOut = { name, dtype: e.dtype, shape, begin: dataStart + b, end: dataStart + en };
    tensors.set(name, { ...entryOut, path });
  }
  checkCoverage(path, [...tensors.values()], dataStart, dataSize);
  return tensors;
}

/**
 * The spec's rule for the data area: "entirely indexed, and cannot contain holes" (as the
 * reference implementation checks: sorted by offset, each tensor starts where the previous
 * one ends, and the last ends at the end of the file). So no two tensors share bytes.
 */
function checkCoverage(
  path: string,
  tensors: SafetensorsTensor[],
  dataStart: number,
  dataSize: number,
): void {
  const sorted = tensors.toSorted((a, b) => a.begin - b.begin || a.end - b.end);
  const at = (t: SafetensorsTensor) => `${t.name} [${t.begin - dataStart}, ${t.end - dataStart}]`;
  let end = dataStart, prev: SafetensorsTensor | null = null;
  for (const t of sorted) {
    if (t.begin < end) {
      throw new ModelFormatError(
        `${path}: tensors ${at(prev!)} and ${at(t)} overlap (data_offsets): corrupt file`,
      );
    }
    if (t.begin > end) {
      throw new ModelFormatError(
        `${path}: bytes [${end - dataStart}, ${t.begin - dataStart}) of the data area, before ` +
          `tensor ${at(t)}, belong to no tensor; the format allows no holes: corrupt file`,
      );
    }
    end = t.end;
    prev = t;
  }
  if (end !== dataStart + dataSize) {
    throw new ModelFormatError(
      `${path}: the data area has ${dataSize} bytes but its tensors cover ${end - dataStart}; ` +
        `the format allows no trailing bytes: corrupt file`,
    );
  }
}

/** Reads exactly `buf.length` bytes at `offset` of an open file, or throws naming the file. */
export async function readExact(file: Deno.FsFile, path: string, offset: number, buf: Uint8Array) {
  await file.seek(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < buf.length) {
    const n = await file.read(buf.subarray(done));
    if (n === null) {
      throw new ModelFormatError(
        `${path}: unexpected end of file reading ${buf.length} bytes at offset ${offset}`,
      );
    }
    done += n;
  }
}

/** Converts little-endian F32/F16/BF16 bytes to float32. `bytes` must start 4-byte aligned. */
export function decodeToF32(dtype: DType, bytes: Uint8Array): Float32Array {
  const { buffer, byteOffset, byteLength } = bytes;
  if (dtype === "F32") return new Float32Array(buffer, byteOffset, byteLength / 4);
  const n = byteLength / 2;
  if (dtype === "F16") return Float32Array.from(new Float16Array(buffer, byteOffset, n));
  // BF16 is the top half of a float32: shift into place.
  const src = new Uint16Array(buffer, byteOffset, n);
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = src[i] << 16;
  return new Float32Array(out.buffer);
}

/** One open safetensors file. Reads are serialized, so concurrent calls are safe. */
export class SafetensorsFile {
  #file: Deno.FsFile;
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly path: string,
    readonly tensors: Map<string, SafetensorsTensor>,
    file: Deno.FsFile,
  ) {
    this.#file = file;
  }

  /** Opens `path` and parses its header; the data is read on demand. */
  static async open(path: string): Promise<SafetensorsFile> {
    const file = await Deno.open(path, { read: true });
    try {
      const fileSize = (await file.stat()).size;
      if (fileSize < 8) {
        throw new ModelFormatError(
          `${path}: file is ${fileSize} bytes, too short for a safetensors header`,
        );
      }
      const lenBuf = new Uint8Array(8);
      await readExact(file, path, 0, lenBuf);
      const headerLen = new DataView(lenBuf.buffer).getBigUint64(0, true);
      if (headerLen > BigInt(fileSize - 8) || headerLen > BigInt(MAX_HEADER_BYTES)) {
        throw new ModelFormatError(
          `${path}: header length ${headerLen} exceeds the file (${fileSize} bytes) or the ` +
            `100 MB limit: truncated or not a safetensors file`,
        );
      }
      const headerBuf = new Uint8Array(Number(headerLen));
      await readExact(file, path, 8, headerBuf);
      let json: string;
      try {
        json = new TextDecoder("utf-8", { fatal: true }).decode(headerBuf);
      } catch (e) {
        throw new ModelFormatError(`${path}: header is not valid UTF-8`, { cause: e });
      }
      const tensors = parseSafetensorsHeader(path, json, 8 + headerBuf.length, fileSize);
      return new SafetensorsFile(path, tensors, file);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  #info(name: string): SafetensorsTensor {
    const t = this.tensors.get(name);
    if (!t) throw new ParameterError(`${this.path}: no tensor named ${name}`);
    return t;
  }

  /**
   * Raw little-endian bytes of rows `[rowStart, rowEnd)` (all rows by default); float data is
   * checked for NaN/±Inf (ModelFormatError naming the tensor).
   */
  async readRowsRaw(name: string, rowStart?: number, rowEnd?: number): Promise<Uint8Array> {
    const t = this.#info(name);
    const elemBytes = dtypeBytes[t.dtype];
    if (elemBytes === undefined) {
      throw new UnsupportedModelError(`${t.path}: tensor ${name} has unknown dtype ${t.dtype}`);
    }
    const { rows, rowElems } = rowGeometry(t.shape);
    const r0 = rowStart ?? 0, r1 = rowEnd ?? rows;
    if (!Number.isInteger(r0) || !Number.isInteger(r1) || r0 < 0 || r1 > rows || r0 > r1) {
      throw new ParameterError(
        `${t.path}: tensor ${name} rows [${r0}, ${r1}) outside its ${rows} rows`,
      );
    }
    const rowBytes = rowElems * elemBytes;
    // Allocate a fresh buffer (4-byte aligned) so F32 data can be viewed in place.
    const buf = new Uint8Array((r1 - r0) * rowBytes);
    const job = this.#queue.then(() => readExact(this.#file, t.path, t.begin + r0 * rowBytes, buf));
    this.#queue = job.catch(() => {});
    await job;
    if (isSupportedDtype(t.dtype)) checkFinite(t.path, name, t.shape, t.dtype, buf, r0 * rowElems);
    return buf;
  }

  /** Rows `[rowStart, rowEnd)` converted to float32 (a 1-D tensor has one row per element). */
  async readRows(name: string, rowStart?: number, rowEnd?: number): Promise<Float32Array> {
    const t = this.#info(name);
    if (!isSupportedDtype(t.dtype)) {
      throw new UnsupportedModelError(
        `${t.path}: tensor ${name} has dtype ${t.dtype}; supported: ${supportedDtypes.join(", ")}`,
      );
    }
    return decodeToF32(t.dtype, await this.readRowsRaw(name, rowStart, rowEnd));
  }

  close(): void {
    this.#file.close();
  }
}

/** File names of a checkpoint directory. */
export const SINGLE_FILE = "model.safetensors";
export const INDEX_FILE = "model.safetensors.index.json";

/**
 * All safetensors files of a checkpoint directory, one file or sharded through
 * `model.safetensors.index.json` (`weight_map`: tensor name → shard file name).
 */
export class SafetensorsSet {
  private constructor(
    /** Tensor name → its entry (with `path` = the shard holding it). */
    readonly tensors: Map<string, SafetensorsTensor>,
    readonly files: Map<string, SafetensorsFile>,
  ) {}

  /** Opens `dir`'s index and shards, or its single `model.safetensors`. */
  static async open(dir: string): Promise<SafetensorsSet> {
    const indexPath = joinPath(dir, INDEX_FILE);
    let indexText: string | null = null;
    try {
      indexText = await Deno.readTextFile(indexPath);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    if (indexText === null) {
      const path = joinPath(dir, SINGLE_FILE);
      try {
        await Deno.stat(path);
      } catch (e) {
        if (!(e instanceof Deno.errors.NotFound)) throw e;
        throw new ModelFormatError(`${dir}: neither ${SINGLE_FILE} nor ${INDEX_FILE} found`);
      }
      const file = await SafetensorsFile.open(path);
      return new SafetensorsSet(new Map(file.tensors), new Map([[path, file]]));
    }
    const weightMap = parseIndex(indexPath, indexText);
    const files = new Map<string, SafetensorsFile>();
    try {
      const tensors = new Map<string, SafetensorsTensor>();
      for (const [name, shard] of weightMap) {
        const path = joinPath(dir, shard);
        let file = files.get(path);
        if (!file) {
          try {
            file = await SafetensorsFile.open(path);
          } catch (e) {
            if (!(e instanceof Deno.errors.NotFound)) throw e;
            throw new ModelFormatError(
              `${indexPath}: tensor ${name} maps to ${shard}, which does not exist`,
            );
          }
          files.set(path, file);
        }
        const t = file.tensors.get(name);
        if (!t) {
          throw new ModelFormatError(
            `${indexPath}: tensor ${name} maps to ${shard}, which has no such tensor`,
          );
        }
        tensors.set(name, t);
      }
      return new SafetensorsSet(tensors, files);
    } catch (e) {
      for (const f of files.values()) f.close();
      throw e;
    }
  }

  #file(name: string): SafetensorsFile {
    const t = this.tensors.get(name);
    if (!t) throw new ParameterError(`no tensor named ${name} in ${[...this.files.keys()]}`);
    return this.files.get(t.path)!;
  }

  /** Raw bytes of rows `[rowStart, rowEnd)`; see `SafetensorsFile.readRowsRaw`. */
  readRowsRaw(name: string, rowStart?: number, rowEnd?: number): Promise<Uint8Array> {
    return this.#file(name).readRowsRaw(name, rowStart, rowEnd);
  }

  /** Rows `[rowStart, rowEnd)` as float32; see `SafetensorsFile.readRows`. */
  readRows(name: string, rowStart?: number, rowEnd?: number): Promise<Float32Array> {
    return this.#file(name).readRows(name, rowStart, rowEnd);
  }

  close(): void {
    for (const f of this.files.values()) f.close();
  }
}

/** `weight_map` of an index file, validated. */
function parseIndex(indexPath: string, text: string): Map<string, string> {
  let parsed: { weight_map?: unknown };
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new ModelFormatError(`${indexPath}: not valid JSON (${(e as Error).message})`, {
      cause: e,
    });
  }
  const wm = parsed?.weight_map;
  if (typeof wm !== "object" || wm === null || Array.isArray(wm)) {
    throw new ModelFormatError(`${indexPath}: no "weight_map" object`);
  }
  const out = new Map<string, string>();
  for (const [name, shard] of Object.entries(wm)) {
    if (typeof shard !== "string" || shard.includes("/") || shard.includes("\\")) {
      throw new ModelFormatError(
        `${indexPath}: tensor ${name} maps to ${JSON.stringify(shard)}, not a file name`,
      );
    }
    out.set(name, shard);
  }
  return out;
}
