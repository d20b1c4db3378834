#!/usr/bin/env python3
"""Writes a random-weight Llama GGUF of a chosen shape, with the default model's tokenizer.

Throughput does not depend on weight values, so such a file stands in for the bigger
models people serve when measuring speed (issue 13: "a 1B-shape model"). The default
shape is Llama-3.2-1B's: hidden 2048, 16 layers, 32 query / 8 key-value heads, ffn 8192.
Projections are Q4_1 and the tied embedding Q8_0, the default model's mix; weights are
random blocks of a realistic spread (standard deviation ~0.02), norms are ones.

    .venv/bin/pip install gguf==0.19.0 numpy
    scripts/random-gguf.py [--out models/cache/random-llama-1b-shape.Q4_1.gguf]

Then `chorus --model models/cache/random-llama-1b-shape.Q4_1.gguf` (and the same file
for `llama-server -m`). Answers are noise; only speed means anything.
"""

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QK = 32


def q4_1_blocks(rng, rows, cols, std):
    """Random Q4_1 bytes for a [rows, cols] weight: per block f16 d, f16 m, 16 bytes."""
    blocks = rows * cols // QK
    # Uniform 4-bit codes have a spread of 15 d / sqrt(12) ≈ 4.33 d around m + 7.5 d.
    d = (std / 4.33) * rng.uniform(0.8, 1.2, blocks)
    out = np.empty((blocks, 20), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(blocks, 2)
    out[:, 2:4] = (-7.5 * d).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    out[:, 4:] = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
    return out.reshape(rows, cols // QK * 20)


def q8_0_blocks(rng, rows, cols, std):
    """Random Q8_0 bytes for a [rows, cols] weight: per block f16 d, 32 signed bytes."""
    blocks = rows * cols // QK
    d = (std / 73.0) * rng.uniform(0.8, 1.2, blocks)  # uniform -127..127 has spread ~73
    out = np.empty((blocks, 34), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(blocks, 2)
    out[:, 2:] = rng.integers(-127, 128, (blocks, 32), dtype=np.int8).view(np.uint8)
    return out.reshape(rows, cols // QK * 34)


def copy_tokenizer(reader, writer):
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-from", type=Path,
                    default=ROOT / "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="GGUF whose tokenizer (and vocabulary size) to reuse")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "models/cache/random-llama-1b-shape.Q4_1.gguf")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.hidden % args.heads or args.heads % args.kv_heads:
        ap.error("--hidden must divide by --heads, and --heads by --kv-heads")
    if args.hidden % QK or args.ffn % QK:
        ap.error(f"--hidden and --ffn must be multiples of {QK}")
    if not args.tokenizer_from.exists():
        sys.exit(f"{args.tokenizer_from}: not found (run `cargo run --release -- --download-only`)")

    reader = gguf.GGUFReader(args.tokenizer_from)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    head_dim = args.hidden // args.heads
    rng = np.random.default_rng(args.seed)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(args.out), "llama")
    w.add_name(f"random llama {args.hidden}x{args.layers}")
    w.add_block_count(args.layers)
    w.add_context_length(args.context)
    w.add_embedding_length(args.hidden)
    w.add_feed_forward_length(args.ffn)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    copy_tokenizer(reader, w)

    Q4, Q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    ones = np.ones(args.hidden, dtype=np.float32)
    w.add_tensor("token_embd.weight", q8_0_blocks(rng, vocab, args.hidden, 0.02), raw_dtype=Q8)
    w.add_tensor("output_norm.weight", ones)
    kv = args.kv_heads * head_dim
    for i in range(args.layers):
        print(f"layer {i + 1}/{args.layers}", file=sys.stderr, flush=True)
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones)
        w.add_tensor(b + "ffn_norm.weight", ones)
        for name, rows, cols in [
            ("attn_q", args.hidden, args.hidden),
            ("attn_k", kv, args.hidden),
            ("attn_v", kv, args.hidden),
            ("attn_output", args.hidden, args.hidden),
            ("ffn_gate", args.ffn, args.hidden),
            ("ffn_up", args.ffn, args.hidden),
            ("ffn_down", args.hidden, args.ffn),
        ]:
            w.add_tensor(b + name + ".weight", q4_1_blocks(rng, rows, cols, 0.02), raw_dtype=Q4)
    print(f"writing {args.out}", file=sys.stderr, flush=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    print(args.out)


if __name__ == "__main__":
    main()
