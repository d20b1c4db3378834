#!/usr/bin/env python3
"""Where a server's step time goes, from its per-step log.

Run chorus with `RUST_LOG=info,chorus::step=debug CHORUS_LOG_FORMAT=json` and give this
script the log. Every step line holds its duration, the forward pass's share (and of
that, on a device, the logits' copy back), its decode and prefill tokens and the
positions they attend to. The script prints:

- the step-time percentiles of steps that carried decoding streams (a reader waits for
  each of those), split by whether a prefill chunk ran beside the decoders;
- by the number of decoding rows, the median step split into the forward pass, the
  logits' copy back from a device within it, and the rest (sampling, streaming);
- a least-squares fit of step time on what a step holds, which says what a decode token,
  a prefill token and a thousand attended positions each cost.

    python3 scripts/step-profile.py chorus.log [--over 150]
"""

import argparse
import json
import sys


def steps(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if '"chorus::step"' not in line:
                continue
            try:
                yield json.loads(line)["fields"]
            except (ValueError, KeyError):
                continue


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def fit(rows, cols):
    """Least squares `ms = fixed + Σ coef·col` by the normal equations (no numpy)."""
    names = ["fixed"] + cols
    x = [[1.0] + [float(r[c]) for c in cols] for r in rows]
    y = [float(r["ms"]) for r in rows]
    n = len(names)
    a = [[sum(xi[i] * xi[j] for xi in x) for j in range(n)] for i in range(n)]
    b = [sum(xi[i] * yi for xi, yi in zip(x, y)) for i in range(n)]
    # Gaussian elimination with partial pivoting.
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(a[r][i]))
        a[i], a[p], b[i], b[p] = a[p], a[i], b[p], b[i]
        if abs(a[i][i]) < 1e-12:
            return None
        for r in range(i + 1, n):
            f = a[r][i] / a[i][i]
            a[r] = [u - f * v for u, v in zip(a[r], a[i])]
            b[r] -= f * b[i]
    coef = [0.0] * n
    for i in reversed(range(n)):
        coef[i] = (b[i] - sum(a[i][j] * coef[j] for j in range(i + 1, n))) / a[i][i]
    return dict(zip(names, coef))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--over", type=float, default=150.0, help="a long pause, in ms")
    args = ap.parse_args()
    rows = list(steps(args.log))
    if not rows:
        sys.exit(f"{args.log}: no chorus::step lines (RUST_LOG=chorus::step=debug, JSON logs)")
    for r in rows:
        r["kctx_prefill"] = r.get("prefill_context", 0) / 1000
        r["kctx_decode"] = r.get("decode_context", 0) / 1000
    with_decode = [r for r in rows if r["decode"] > 0]
    alone = [r for r in with_decode if r["prefill"] == 0]
    mixed = [r for r in with_decode if r["prefill"] > 0]
    print(f"{len(rows)} steps, {len(with_decode)} with decoding streams")
    print(f"{'steps with decoders':32} {'n':>5} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}  over {args.over:g} ms")
    for name, group in [("all", with_decode), ("decode only", alone), ("decode + prefill chunk", mixed)]:
        ms = [r["ms"] for r in group]
        over = sum(m > args.over for m in ms)
        print(
            f"{name:32} {len(ms):5} {pct(ms, 50):8.1f} {pct(ms, 90):8.1f} {pct(ms, 99):8.1f} "
            f"{max(ms, default=float('nan')):8.1f}  {over}"
        )
    slow = [r for r in with_decode if r["ms"] > args.over]
    if slow:
        share = sum(r["prefill"] > 0 for r in slow) / len(slow)
        print(f"of the {len(slow)} steps over {args.over:g} ms, {share:.0%} carried a prefill chunk;"
              f" their prefill tokens p50 {pct([r['prefill'] for r in slow], 50)},"
              f" attended positions p50 {pct([r['prefill_context'] for r in slow], 50)}")
        rest = [r["ms"] - r.get("forward_ms", r["ms"]) for r in slow]
        print(f"  outside the forward pass (sampling, streaming): p50 {pct(rest, 50):.1f} ms")
    # Where a step's time goes by its size: the forward pass (on a device, launching and
    # running it), the logits' way back (their copy; for greedy rows the argmax on the
    # device and the ids' copy), and the rest (sampling, streaming, bookkeeping).
    print(f"{'decoding rows':16} {'n':>5} {'step p50':>9} {'forward':>9} {'of it copy':>11} {'rest':>7}  (ms)")
    for lo, hi in [(1, 1), (2, 31), (32, 127), (128, 1 << 30)]:
        group = [r for r in with_decode if lo <= r["decode"] <= hi]
        if not group:
            continue
        name = f"{lo}" if lo == hi else f"{lo}+" if hi > 1 << 20 else f"{lo}-{hi}"
        print(
            f"{name:16} {len(group):5} {pct([r['ms'] for r in group], 50):9.2f} "
            f"{pct([r.get('forward_ms', r['ms']) for r in group], 50):9.2f} "
            f"{pct([r.get('copy_ms', 0.0) for r in group], 50):11.2f} "
            f"{pct([r['ms'] - r.get('forward_ms', r['ms']) for r in group], 50):7.2f}"
        )
    cols = ["decode", "kctx_decode", "prefill", "kctx_prefill"]
    coef = fit(rows, cols)
    if coef:
        print("step ms ≈ " + " + ".join(
            f"{coef[c]:.3g}·{c}" if c != "fixed" else f"{coef[c]:.3g}" for c in ["fixed"] + cols))
        print("  (decode/prefill: per token; kctx_*: per thousand attended positions)")


if __name__ == "__main__":
    main()
