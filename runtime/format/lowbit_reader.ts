/**
 * `.lowbit` reader: validates the preamble, the header and the tensor table against the file's
 * size and the config, then reads tensors on demand (seek + read, never the whole file). Packed
 * tensors come back as they are stored (`readPacked`) or dequantized to float32 (`read`), so the
 * CPU reference runs a quantized model too.
 */
import { Unpackr } from "msgpackr";
import type { Checkpoint, PackedTensor, TensorInfo } from "../checkpoint/checkpoint.ts";
import { expectedTensors } from "../checkpoint/config.ts";
import { checkFinite, checkFiniteSz } from "../checkpoint/finite.ts";
import { ModelFormatError, ParameterError } from "../errors.ts";
import {
  checkConfig,
  LOWBIT_ALIGN,
  LOWBIT_MAGIC,
  LOWBIT_VERSION,
  type LowbitHeader,
  type LowbitTensorEntry,
  PREAMBLE_BYTES,
  tensorByteSizes,
  tensorProblem,
} from "./lowbit_file.ts";
import { decodeToF32, readExact, rowGeometry } from "../checkpoint/safetensors.ts";
import { unpackQ } from "./pack.ts";
import { dequantize } from "./qtensor.ts";

export interface LowbitCheckpoint extends Checkpoint {
  header: LowbitHeader;
  /** Format version of the file (≤ LOWBIT_VERSION). */
  version: number;
  /** Size of the file in bytes. */
  fileSize: number;
  readPacked(name: string): Promise<PackedTensor>;
}

const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true });

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
}

/** Nesting deeper than any valid header (config.ropeScaling is 3 levels down). */
const MAX_DEPTH = 32;

/**
 * `v` with its 64-bit integers (msgpackr decodes uint64/int64 as BigInt) as numbers; throws
 * ModelFormatError naming the field (`tensors[3].offset`) when one is beyond ±(2^53 − 1),
 * where a number no longer holds every integer exactly.
 */
function toSafeNumbers(path: string, v: unknown, at: string, depth = 0): unknown {
  if (depth > MAX_DEPTH) {
    throw new ModelFormatError(`${path}: the header nests deeper than ${MAX_DEPTH} at ${at}`);
  }
  if (typeof v === "bigint") {
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new ModelFormatError(
        `${path}: header ${at} is ${v}, beyond the integers a reader represents exactly ` +
          `(±2^53 − 1)`,
      );
    }
    return Number(v);
  }
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) v[i] = toSafeNumbers(path, v[i], `${at}[${i}]`, depth + 1);
  } else if (isRecord(v)) {
    for (const k of Object.keys(v)) {
      v[k] = toSafeNumbers(path, v[k], at ? `${at}.${k}` : k, depth + 1);
    }
  }
  return v;
}

/** Printable form of the first bytes, for the wrong-magic message: "GGUF\x03\x00..." */
function showBytes(b: Uint8Array): string {
  const printable = (c: number) => c >= 0x20 && c < 0x7f && c !== 0x22 && c !== 0x5c;
  const text = [...b].map((c) =>
    printable(c) ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, "0")}`
  );
  return `"${text.join("")}"`;
}

/** Validates the tokenizer entry's shape (its kind is checked when it is loaded). */
function checkTokenizer(path: string, t: unknown): LowbitHeader["tokenizer"] {
  if (t === null || t === undefined) return null;
  if (!isRecord(t) || typeof t.kind !== "string") {
    throw new ModelFormatError(`${path}: header "tokenizer" is not a map with a "kind"`);
  }
  if (t.kind === "llama2c") {
    if (!(t.bytes instanceof Uint8Array)) {
      throw new ModelFormatError(`${path}: header tokenizer.bytes is not a byte string`);
    }
    return { ...t, bytes: new Uint8Array(t.bytes) } as LowbitHeader["tokenizer"];
  }
  if (t.kind === "hf" && typeof t.tokenizerJson !== "string") {
    throw new ModelFormatError(`${path}: header tokenizer.tokenizerJson is not a string`);
  }
  return t as LowbitHeader["tokenizer"];
}

/** Validates one tensor entry's fields, sizes and placement in [dataStart, fileSize). */
function checkEntry(
  path: string,
  raw: unknown,
  dataStart: number,
  fileSize: number,
): LowbitTensorEntry {
  if (!isRecord(raw) || typeof raw.name !== "string") {
    throw new ModelFormatError(`${path}: a tensor table entry has no name`);
  }
  const name = raw.name;
  const problem = tensorProblem(raw);
  if (problem) throw new ModelFormatError(`${path}: tensor ${name} ${problem}`);
  const e = raw as unknown as LowbitTensorEntry;
  const want = tensorByteSizes(e);
  const ranges: [string, unknown, unknown, number][] = [["data", e.offset, e.bytes, want.data]];
  if (e.dtype === "Q") ranges.push(["sz", e.szOffset, e.szBytes, want.sz]);
  for (const [what, offset, bytes, needed] of ranges) {
    const where = e.dtype === "Q" ? `${what === "data" ? "qweight" : "sz"} ` : "";
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes)) {
      throw new ModelFormatError(`${path}: tensor ${name} has no valid ${where}offset/bytes`);
    }
    const o = offset as number, b = bytes as number;
    if (b !== needed) {
      const quant = e.dtype === "Q" ? ` at ${e.bits} bits, group size ${e.groupSize}` : "";
      throw new ModelFormatError(
        `${path}: tensor ${name} ${where}spans ${b} bytes, but shape [${e.shape}] of ` +
          `${e.dtype}${quant} needs ${needed}`,
      );
    }
    if (o < dataStart || o % LOWBIT_ALIGN !== 0) {
      throw new ModelFormatError(
        `${path}: tensor ${name} ${where}offset ${o} is ${
          o < dataStart ? `inside the header (data starts at ${dataStart})` : "not 64-byte aligned"
        }`,
      );
    }
    if (o + b > fileSize) {
      throw new ModelFormatError(
        `${path}: tensor ${name} ${where}bytes [${o}, ${o + b}) run past the end of the file ` +
          `(${fileSize} bytes): truncated or corrupt`,
      );
    }
  }
  return e;
}

/** Rejects overlapping byte ranges. */
function checkOverlaps(path: string, entries: LowbitTensorEntry[]): void {
  const ranges = entries.flatMap((e) => {
    const r = [{ name: e.name, begin: e.offset, end: e.offset + e.bytes }];
    if (e.dtype === "Q") {
      r.push({ name: `${e.name} (sz)`, begin: e.szOffset!, end: e.szOffset! + e.szBytes! });
    }
    return r;
  }).sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < ranges.length; i++) {
    const a = ranges[i - 1], b = ranges[i];
    if (b.begin < a.end) {
      throw new ModelFormatError(
        `${path}: tensors ${a.name} [${a.begin}, ${a.end}) and ${b.name} [${b.begin}, ${b.end}) ` +
          `overlap`,
      );
    }
  }
}

/** Reads and validates the preamble and header of an open file. */
async function readHeader(path: string, file: Deno.FsFile, fileSize: number) {
  if (fileSize < PREAMBLE_BYTES) {
    throw new ModelFormatError(
      `${path}: file is ${fileSize} bytes, too short for the ${PREAMBLE_BYTES}-byte .lowbit ` +
        `preamble: truncated or not a .lowbit file`,
    );
  }
  const pre = new Uint8Array(PREAMBLE_BYTES);
  await readExact(file, path, 0, pre);
  if (!LOWBIT_MAGIC.every((b, i) => pre[i] === b)) {
    throw new ModelFormatError(
      `${path}: not a .lowbit file: it starts with ${showBytes(pre.subarray(0, 8))}, not the ` +
        `magic "LOWBIT\\x00\\x00"`,
    );
  }
  const dv = new DataView(pre.buffer);
  const version = dv.getUint32(8, true), headerLen = dv.getUint32(12, true);
  if (version > LOWBIT_VERSION) {
    throw new ModelFormatError(
      `${path}: written by a newer lowbit: format version ${version}, this reader understands ` +
        `up to ${LOWBIT_VERSION}; update lowbit to read it`,
    );
  }
  if (version < 1) throw new ModelFormatError(`${path}: invalid format version ${version}`);
  if (PREAMBLE_BYTES + headerLen > fileSize) {
    throw new ModelFormatError(
      `${path}: truncated: the header of ${headerLen} bytes runs past the end of the file ` +
        `(${fileSize} bytes)`,
    );
  }
  const body = new Uint8Array(headerLen);
  await readExact(file, path, PREAMBLE_BYTES, body);
  let raw: unknown;
  try {
    raw = unpackr.unpack(body);
  } catch (e) {
    throw new ModelFormatError(
      `${path}: the header is not valid MessagePack (${(e as Error).message})`,
      { cause: e },
    );
  }
  raw = toSafeNumbers(path, raw, "");
  if (!isRecord(raw)) throw new ModelFormatError(`${path}: the header is not a map`);
  const config = checkConfig(path, raw.config);
  const tokenizer = checkTokenizer(path, raw.tokenizer);
  if (!isRecord(raw.quantization) || typeof raw.quantization.method !== "string") {
    throw new ModelFormatError(`${path}: header "quantization" is not a map with a "method"`);
  }
  if (!Array.isArray(raw.tensors)) {
    throw new ModelFormatError(`${path}: header "tensors" is not an array`);
  }
  const dataStart = PREAMBLE_BYTES + headerLen;
  const tensors = raw.tensors.map((t) => checkEntry(path, t, dataStart, fileSize));
  checkOverlaps(path, tensors);
  const header: LowbitHeader = {
    config,
    tokenizer,
    quantization: raw.quantization as LowbitHeader["quantization"],
    tensors,
  };
  return { header, version };
}

/** The layer index in a canonical per-layer tensor name, or −1. */
function layerOf(name: string): number {
  const m = /^model\.layers\.(\d+)\./.exec(name);
  return m ? Number(m[1]) : -1;
}

/**
 * TensorInfo map, checking that the table and the config agree: every tensor the config
 * requires is present with its shape, and no tensor belongs to a layer beyond config.nLayers.
 * The config's tensors are checked one at a time against the table, so a config claiming more
 * layers than the table holds fails at the first missing layer, without building anything per
 * claimed layer.
 */
function tensorInfos(path: string, header: LowbitHeader): Map<string, TensorInfo> {
  const { nLayers } = header.config;
  const infos = new Map<string, TensorInfo>();
  const layers = new Set<number>();
  for (const e of header.tensors) {
    if (infos.has(e.name)) throw new ModelFormatError(`${path}: tensor ${e.name} listed twice`);
    const layer = layerOf(e.name);
    if (layer >= nLayers) {
      throw new ModelFormatError(
        `${path}: tensor ${e.name} belongs to layer ${layer}, but header config.nLayers is ` +
          `${nLayers} (layers 0 to ${nLayers - 1})`,
      );
    }
    if (layer >= 0) layers.add(layer);
    const info: TensorInfo = { name: e.name, dtype: e.dtype, shape: e.shape };
    if (e.dtype === "Q") info.quant = { bits: e.bits!, groupSize: e.groupSize! };
    infos.set(e.name, info);
  }
  for (const [name, shape] of expectedTensors(header.config)) {
    const t = infos.get(name);
    const layer = layerOf(name);
    if (!t && layer >= 0 && !layers.has(layer)) {
      throw new ModelFormatError(
        `${path}: header config.nLayers is ${nLayers}, but the tensor table has no tensor of ` +
          `layer ${layer} (it has tensors of ${layers.size} layers)`,
      );
    }
    if (!t) {
      throw new ModelFormatError(
        `${path}: tensor ${name} is missing; the header's config requires it with shape ` +
          `[${shape}]`,
      );
    }
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new ModelFormatError(
        `${path}: tensor ${name} has shape [${t.shape}]; the header's config implies [${shape}]`,
      );
    }
  }
  return infos;
}

/**
 * Opens a `.lowbit` file: the header is read and validated now (ModelFormatError naming the file
 * and the problem), tensor data on demand.
 */
export async function openLowbit(path: string): Promise<LowbitCheckpoint> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new ModelFormatError(`${path}: no such file`, { cause: e });
    }
    throw e;
  }
  let queue: Promise<unknown> = Promise.resolve();
  try {
    const fileSize = (await file.stat()).size;
    const { header, version } = await readHeader(path, file, fileSize);
    const tensors = tensorInfos(path, header);
    const entries = new Map(header.tensors.map((e) => [e.name, e]));

    const entry = (name: string) => {
      const e = entries.get(name);
      if (!e) throw new ParameterError(`${path}: the file has no tensor ${name}`);
      return e;
    };
    /** Reads `bytes` at `offset` into a fresh (4-byte-aligned) buffer; reads are serialized. */
    const readBytes = async (offset: number, bytes: number) => {
      const buf = new Uint8Array(bytes);
      const job = queue.then(() => readExact(file, path, offset, buf));
      queue = job.catch(() => {});
      await job;
      return buf;
    };
    const rowRange = (e: LowbitTensorEntry, r0?: number, r1?: number) => {
      const { rows, rowElems } = rowGeometry(e.shape);
      const a = r0 ?? 0, b = r1 ?? rows;
      if (!Number.isInteger(a) || !Number.isInteger(b) || a < 0 || b > rows || a > b) {
        throw new ParameterError(
          `${path}: tensor ${e.name} rows [${a}, ${b}) outside its ${rows} rows`,
        );
      }
      return { a, b, rows, rowElems };
    };

    return {
      path,
      config: header.config,
      tensors,
      header,
      version,
      fileSize,
      async read(name, rowStart, rowEnd) {
        const e = entry(name);
        const { a, b, rows, rowElems } = rowRange(e, rowStart, rowEnd);
        if (e.dtype !== "Q") {
          const eb = e.dtype === "F32" ? 4 : 2;
          const bytes = await readBytes(e.offset + a * rowElems * eb, (b - a) * rowElems * eb);
          checkFinite(path, name, e.shape, e.dtype, bytes, a * rowElems);
          return decodeToF32(e.dtype, bytes);
        }
        // Packed rows are independent: read rows [a, b) of qweight and sz, then dequantize.
        const qRow = e.bytes / rows, szRow = e.szBytes! / rows;
        const q = await readBytes(e.offset + a * qRow, (b - a) * qRow);
        const sz = await readBytes(e.szOffset! + a * szRow, (b - a) * szRow);
        const packed = { qweight: new Uint32Array(q.buffer), sz: new Uint32Array(sz.buffer) };
        checkFiniteSz(path, name, packed.sz, szRow / 4, a);
        return dequantize(unpackQ(packed, b - a, e.shape[1], e.bits!, e.groupSize!));
      },
      async readPacked(name) {
        const e = entry(name);
        if (e.dtype !== "Q") {
          throw new ParameterError(`${path}: tensor ${name} is ${e.dtype}, not packed ("Q")`);
        }
        const q = await readBytes(e.offset, e.bytes);
        const sz = new Uint32Array((await readBytes(e.szOffset!, e.szBytes!)).buffer);
        checkFiniteSz(path, name, sz, sz.length / e.shape[0]);
        return { qweight: new Uint32Array(q.buffer), sz };
      },
      close: () => file.close(),
    };
  } catch (e) {
    file.close();
    throw e;
  }
}
