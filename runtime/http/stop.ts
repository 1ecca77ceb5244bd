/**
 * Stop strings over streamed text: passes text through, holding back any tail that could be the
 * start of a stop string, and cuts the text before the first stop string once one appears.
 */
export class StopFilter {
  readonly #stops: string[];
  readonly #maxHold: number;
  #held = "";

  constructor(stops: string[]) {
    this.#stops = stops.filter((s) => s.length > 0);
    this.#maxHold = Math.max(0, ...this.#stops.map((s) => s.length - 1));
  }

  /** Adds generated text; returns what may be shown now and whether a stop string was hit. */
  push(text: string): { text: string; stopped: boolean } {
    const buf = this.#held + text;
    let cut = -1;
    for (const s of this.#stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (cut < 0 || i < cut)) cut = i;
    }
    if (cut >= 0) {
      this.#held = "";
      return { text: buf.slice(0, cut), stopped: true };
    }
    const hold = this.#holdLength(buf);
    this.#held = buf.slice(buf.length - hold);
    return { text: buf.slice(0, buf.length - hold), stopped: false };
  }

  /** The held-back tail, at the end of generation (it turned out not to start a stop string). */
  flush(): string {
    const t = this.#held;
    this.#held = "";
    return t;
  }

  /** Length of the longest tail of `buf` that is a proper prefix of a stop string. */
  #holdLength(buf: string): number {
    for (let k = Math.min(buf.length, this.#maxHold); k > 0; k--) {
      const tail = buf.slice(buf.length - k);
      if (this.#stops.some((s) => s.startsWith(tail))) return k;
    }
    return 0;
  }
}
