/** A worker of the gemm pool (gemm_pool.ts): runs its slice of each product until told to stop. */
import { type PoolShared, runSlice } from "./gemm_pool.ts";

const scope = self as unknown as {
  onmessage: (e: MessageEvent<PoolShared>) => void;
  postMessage(data: unknown): void;
};

scope.onmessage = (e) => {
  const s = e.data, ctl = s.ctl;
  let gen = Atomics.load(ctl, 0); // before "ready": no job can start before the pool has it
  scope.postMessage("ready");
  for (;;) {
    Atomics.wait(ctl, 0, gen);
    gen = Atomics.load(ctl, 0);
    if (Atomics.load(ctl, 2)) return;
    try {
      runSlice(s, new Float64Array(s.arena));
    } catch (err) {
      console.error(`gemm worker ${s.index}:`, err);
      Atomics.store(ctl, 3, 1);
    }
    Atomics.add(ctl, 1, 1);
    Atomics.notify(ctl, 1);
  }
};
