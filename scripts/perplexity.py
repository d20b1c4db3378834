#!/usr/bin/env python3
"""Perplexity of a text under a running chorus server, by llama.cpp's method.

The text is tokenized by the server (`POST /tokenize`), cut into windows of `--ctx`
tokens, and each window is scored with `/v1/completions` (`echo`, `logprobs`,
`max_tokens: 0`); as `llama-perplexity` does, only the second half of each window counts,
so every scored token has at least `ctx / 2` tokens of context. Prints progress per
window on stderr and the result on stdout (also as JSON with `--json`).

    scripts/perplexity.py --url http://127.0.0.1:8080 [--text benches/data/perplexity.txt]

Standard library only.
"""

import argparse
import json
import math
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "benches" / "data" / "perplexity.txt"


def post(url, body, timeout):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (llama.cpp's -c)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--json", type=Path, help="write the result here too")
    args = ap.parse_args()
    if args.ctx < 4:
        ap.error("--ctx must be at least 4")

    text = args.text.read_text(encoding="utf-8")
    tokens = post(f"{args.url}/tokenize", {"prompt": text}, args.timeout)["tokens"]
    windows = len(tokens) // args.ctx
    if windows == 0:
        sys.exit(f"{args.text}: {len(tokens)} tokens, fewer than one window of {args.ctx}")
    first = args.ctx // 2 + 1  # llama-perplexity scores logits from ctx/2: tokens ctx/2+1..
    nll, count, started = 0.0, 0, time.monotonic()
    for w in range(windows):
        window = tokens[w * args.ctx : (w + 1) * args.ctx]
        body = {"prompt": window, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        choice = post(f"{args.url}/v1/completions", body, args.timeout)["choices"][0]
        logprobs = choice["logprobs"]["token_logprobs"]
        if len(logprobs) != len(window):
            sys.exit(f"window {w}: {len(logprobs)} log-probabilities for {len(window)} tokens")
        for lp in logprobs[first:]:
            nll -= lp
            count += 1
        print(
            f"[{w + 1}/{windows}] ppl {math.exp(nll / count):.4f} "
            f"({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    ppl = math.exp(nll / count)
    result = {
        "text": str(args.text),
        "tokens": len(tokens),
        "ctx": args.ctx,
        "windows": windows,
        "scored": count,
        "perplexity": ppl,
    }
    print(f"perplexity {ppl:.4f} over {count} tokens ({windows} windows of {args.ctx})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
