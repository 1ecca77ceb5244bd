/** Web Worker running CVXQ's trial quantizations, one format per message (trial_parallel.ts). */
import { runTrial, type TrialReply, type TrialTask } from "./trial_parallel.ts";

const scope = self as unknown as {
  onmessage: (e: MessageEvent<TrialTask>) => void;
  postMessage(data: TrialReply): void;
};

scope.onmessage = (e) => {
  const id = e.data.id;
  try {
    scope.postMessage({ id, D: runTrial(e.data) });
  } catch (err) {
    const { name, message } = err instanceof Error ? err : { name: "Error", message: String(err) };
    scope.postMessage({ id, error: { name, message } });
  }
};
