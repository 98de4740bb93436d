"""Peak-RSS growth of one self-attention call at SD1.5's level 0 for a given image size (bf16, batch 1):
shows whether the attention materialises the [tokens x tokens] scores (it does not on the CPU).

    python benchmarks/attention_memory.py --size 1024
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from latentforge.models.attention import multi_head_attention


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = (args.size // 8) ** 2
    q = torch.randn(1, tokens, args.heads * args.head_dim, dtype=torch.bfloat16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.inference_mode():
        multi_head_attention(q, q, q, args.heads)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    scores = tokens * tokens * args.heads * 2 / 2**20
    print(
        f"{tokens} tokens: {time.perf_counter() - start:.1f} s, peak RSS grew {grew:.0f} MiB; materialised "
        f"bf16 scores would take {scores:.0f} MiB"
    )


if __name__ == "__main__":
    main()
