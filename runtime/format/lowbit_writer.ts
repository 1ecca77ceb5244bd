/**
 * Streaming `.lowbit` writer: every offset follows from the shapes and quant settings, so the
 * header is written first and tensors are then written one at a time, in any order, without
 * holding the model in memory.
 *
 * @example
 *   const w = await createLowbitWriter("model.lowbit", { config, tokenizer, quantization, tensors });
 *   for (const t of tensors) await w.writeTensor(t.name, await produce(t));
 *   await w.close();
 */
import { Packr } from "msgpackr";
import type { PackedTensor } from "../checkpoint/checkpoint.ts";
import { expectedTensors } from "../checkpoint/config.ts";
import { firstNonFinite } from "../checkpoint/finite.ts";
import { ParameterError, ShapeError } from "../errors.ts";
import {
  align,
  checkConfig,
  elementCount,
  LOWBIT_MAGIC,
  LOWBIT_VERSION,
  type LowbitHeader,
  type LowbitQuantization,
  type LowbitTensorEntry,
  type LowbitTensorSpec,
  PREAMBLE_BYTES,
  tensorByteSizes,
  tensorProblem,
} from "./lowbit_file.ts";
import type { TokenizerData } from "../tokenizer/tokenizer.ts";
import type { ModelConfig } from "../checkpoint/config.ts";

export interface LowbitSpec {
  config: ModelConfig;
  tokenizer: TokenizerData | null;
  quantization: LowbitQuantization;
  /** Every tensor the config requires (see `expectedShapes`), in file order. */
  tensors: LowbitTensorSpec[];
}

export interface LowbitWriter {
  /** The header as written (offsets included). */
  readonly header: LowbitHeader;
  /** Writes one tensor: Float32Array for F32/F16 (F16 rounded to nearest), PackedTensor for Q. */
  writeTensor(name: string, data: Float32Array | PackedTensor): Promise<void>;
  /** Closes the file; throws (and deletes the file) unless every tensor was written. */
  close(): Promise<void>;
  /** Closes the file as it is, incomplete, for a later writer to resume (after an error). */
  abandon(): Promise<void>;
}

/** Plain msgpack maps (no msgpackr record extension), so any msgpack library reads them. */
const packr = new Packr({ useRecords: false, variableMapSize: true });

/** Values converted per chunk when rounding to fp16. */
const F16_CHUNK = 1 << 20;

/** Drops `undefined` map entries (msgpack has no undefined); keeps byte arrays as they are. */
function clean(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(clean);
  if (v instanceof Uint8Array || typeof v !== "object" || v === null) return v;
  return Object.fromEntries(
    Object.entries(v).filter(([, x]) => x !== undefined).map(([k, x]) => [k, clean(x)]),
  );
}

/** Validates the spec against the config; returns the tensor table with offsets from dataStart. */
function layout(spec: LowbitSpec, dataStart: number): LowbitTensorEntry[] {
  let cursor = dataStart;
  return spec.tensors.map((t) => {
    const e: LowbitTensorEntry = {
      name: t.name,
      shape: t.shape,
      dtype: t.dtype,
      offset: 0,
      bytes: 0,
    };
    if (t.dtype === "Q") {
      e.bits = t.quant?.bits;
      e.groupSize = t.quant?.groupSize;
    }
    const sizes = tensorByteSizes(e);
    e.offset = align(cursor);
    e.bytes = sizes.data;
    cursor = e.offset + e.bytes;
    if (t.dtype === "Q") {
      e.szOffset = align(cursor);
      e.szBytes = sizes.sz;
      cursor = e.szOffset + e.szBytes;
    }
    return e;
  });
}

function checkSpec(path: string, spec: LowbitSpec): void {
  checkConfig(path, spec.config); // what the reader will check of it
  const names = new Set<string>();
  for (const t of spec.tensors) {
    if (names.has(t.name)) throw new ParameterError(`${path}: tensor ${t.name} listed twice`);
    names.add(t.name);
    const problem = tensorProblem({ ...t, bits: t.quant?.bits, groupSize: t.quant?.groupSize });
    if (problem) throw new ParameterError(`${path}: tensor ${t.name} ${problem}`);
  }
  for (const [name, shape] of expectedTensors(spec.config)) {
    const t = spec.tensors.find((x) => x.name === name);
    if (!t) {
      throw new ParameterError(
        `${path}: tensor ${name} is missing; the config requires it with shape [${shape}]`,
      );
    }
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new ShapeError(
        `${path}: tensor ${name} has shape [${t.shape}]; the config implies [${shape}]`,
      );
    }
  }
}

/** The header bytes and the tensor table; the data area starts at a 64-byte boundary. */
function encodeHeader(spec: LowbitSpec): { bytes: Uint8Array; header: LowbitHeader } {
  // Offsets are absolute, so the header's size depends on them: grow the data start until the
  // header fits in front of it (it only grows, so this ends).
  let dataStart = align(PREAMBLE_BYTES);
  for (;;) {
    const header: LowbitHeader = {
      config: spec.config,
      tokenizer: spec.tokenizer,
      quantization: spec.quantization,
      tensors: layout(spec, dataStart),
    };
    const body = packr.pack(clean(header));
    if (PREAMBLE_BYTES + body.length <= dataStart) {
      const bytes = new Uint8Array(dataStart); // zero padding up to the data
      bytes.set(LOWBIT_MAGIC, 0);
      const dv = new DataView(bytes.buffer);
      dv.setUint32(8, LOWBIT_VERSION, true);
      dv.setUint32(12, body.length, true);
      bytes.set(body, PREAMBLE_BYTES);
      return { bytes, header };
    }
    dataStart = align(PREAMBLE_BYTES + body.length);
  }
}

async function writeAt(file: Deno.FsFile, offset: number, bytes: Uint8Array): Promise<void> {
  await file.seek(offset, Deno.SeekMode.Start);
  for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
}

function asBytes(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/**
 * Throws ParameterError when `data` (elements from `first` on, as stored) holds a NaN or ±Inf,
 * which the reader would reject: the file is never written with one.
 */
function checkWritable(
  path: string,
  name: string,
  what: string,
  dtype: "F32" | "F16",
  data: ArrayBufferView,
  first = 0,
): void {
  const i = firstNonFinite(dtype, asBytes(data));
  if (i < 0) return;
  throw new ParameterError(
    `${path}: tensor ${name}${what} holds NaN or ±Inf${
      dtype === "F16" ? " (or a value beyond fp16's ±65504)" : ""
    } at element ${first + i}; not written`,
  );
}

/**
 * Creates `path` (replacing it) with the header for `spec`; returns the writer of the tensors.
 * With `resume`, continues a file an interrupted writer left: its header must be the one `spec`
 * gives, and the tensors named in `resume` count as written. Throws ParameterError/ShapeError
 * when the spec contradicts its config (or the file to resume).
 */
export async function createLowbitWriter(
  path: string,
  spec: LowbitSpec,
  opts: { resume?: string[] } = {},
): Promise<LowbitWriter> {
  checkSpec(path, spec);
  const { bytes, header } = encodeHeader(spec);
  const entries = new Map(header.tensors.map((e) => [e.name, e]));
  const last = header.tensors.at(-1);
  const fileSize = last ? (last.szOffset ?? last.offset) + (last.szBytes ?? last.bytes) : 0;
  const written = new Set<string>();
  let queue: Promise<unknown> = Promise.resolve();
  let closed = false;
  let file: Deno.FsFile;
  if (opts.resume) {
    for (const name of opts.resume) {
      if (!entries.has(name)) throw new ParameterError(`${path}: cannot resume: no tensor ${name}`);
      written.add(name);
    }
    file = await Deno.open(path, { read: true, write: true }).catch(() => {
      throw new ParameterError(`${path}: cannot resume: the file cannot be opened`);
    });
    const old = new Uint8Array(bytes.length);
    let got = 0;
    for (let n: number | null = 0; n !== null && got < old.length; got += n ?? 0) {
      n = await file.read(old.subarray(got));
    }
    const size = (await file.stat()).size;
    if (size !== Math.max(fileSize, bytes.length) || !bytes.every((b, i) => old[i] === b)) {
      file.close();
      throw new ParameterError(`${path}: cannot resume: the file has another header or size`);
    }
  } else {
    file = await Deno.open(path, { write: true, create: true, truncate: true });
    try {
      await writeAt(file, 0, bytes);
      await file.truncate(Math.max(fileSize, bytes.length)); // gaps between tensors read as zeros
    } catch (e) {
      file.close();
      throw e;
    }
  }

  async function write(name: string, data: Float32Array | PackedTensor): Promise<void> {
    const e = entries.get(name);
    if (!e) throw new ParameterError(`${path}: tensor ${name} is not in the file's header`);
    if (written.has(name)) throw new ParameterError(`${path}: tensor ${name} written twice`);
    if (e.dtype === "Q") {
      const p = data as PackedTensor;
      if (!(p.qweight instanceof Uint32Array) || !(p.sz instanceof Uint32Array)) {
        throw new ParameterError(`${path}: tensor ${name} is packed: pass { qweight, sz }`);
      }
      if (p.qweight.byteLength !== e.bytes || p.sz.byteLength !== e.szBytes) {
        throw new ShapeError(
          `${path}: tensor ${name} [${e.shape}] at ${e.bits} bits, group ${e.groupSize} needs ` +
            `${e.bytes / 4} qweight and ${e.szBytes! / 4} sz words; got ${p.qweight.length} and ` +
            `${p.sz.length}`,
        );
      }
      checkWritable(path, name, " (sz: its scales and offsets)", "F16", p.sz);
      await writeAt(file, e.offset, asBytes(p.qweight));
      await writeAt(file, e.szOffset!, asBytes(p.sz));
    } else {
      if (!(data instanceof Float32Array)) {
        throw new ParameterError(`${path}: tensor ${name} is ${e.dtype}: pass a Float32Array`);
      }
      if (data.length !== elementCount(e.shape)) {
        throw new ShapeError(
          `${path}: tensor ${name} [${e.shape}] has ${elementCount(e.shape)} values; got ` +
            `${data.length}`,
        );
      }
      if (e.dtype === "F32") {
        checkWritable(path, name, "", "F32", data);
        await writeAt(file, e.offset, asBytes(data));
      } else {
        for (let i = 0; i < data.length; i += F16_CHUNK) {
          const half = Float16Array.from(data.subarray(i, i + F16_CHUNK));
          checkWritable(path, name, "", "F16", half, i);
          await writeAt(file, e.offset + 2 * i, asBytes(half));
        }
      }
    }
    written.add(name);
  }

  return {
    header,
    writeTensor(name, data) {
      if (closed) return Promise.reject(new ParameterError(`${path}: writer already closed`));
      // Writes are serialized: each seeks and writes the shared file handle.
      const job = queue.then(() => write(name, data));
      queue = job.catch(() => {});
      return job;
    },
    async abandon() {
      if (closed) return;
      closed = true;
      await queue;
      file.close();
    },
    async close() {
      if (closed) return;
      closed = true;
      await queue;
      file.close();
      const missing = header.tensors.filter((e) => !written.has(e.name)).map((e) => e.name);
      if (missing.length > 0) {
        await Deno.remove(path).catch(() => {});
        throw new ParameterError(
          `${path}: closed with ${missing.length} of ${header.tensors.length} tensors never ` +
            `written (${missing.slice(0, 5).join(", ")}${missing.length > 5 ? ", ..." : ""}); ` +
            `the incomplete file was deleted`,
        );
      }
    },
  };
}
