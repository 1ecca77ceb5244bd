/** Web Worker running decoupleQ on one slice of a layer's rows (see decoupleq_parallel.ts). */
import { runSlice, type SliceTask } from "./decoupleq_parallel.ts";

const scope = self as unknown as {
  onmessage: (e: MessageEvent<SliceTask>) => void;
  postMessage(data: unknown, opts?: { transfer: ArrayBuffer[] }): void;
};

scope.onmessage = (e) => {
  try {
    const r = runSlice(e.data);
    const transfer = [r.q.buffer, r.scale.buffer, r.zero.buffer, r.rows.buffer] as ArrayBuffer[];
    scope.postMessage(r, { transfer });
  } catch (err) {
    scope.postMessage({ error: err instanceof Error ? err.message : String(err) });
  }
};
