"""Attention on the CPU: PyTorch's fused SDPA (its flash kernel) vs the written-out softmax(q k^T/sqrt(d)) v
that bf16/fp16 training takes (`models/attention.py`), forward and forward + backward, CPU ms per call.
Shapes [batch, heads, queries, keys, head dim]: the default model's U-Net at inference (batch 2) and in
training (batch 64), and SD1.5's levels at 512 px (forward only: training SD on a CPU is not the case).

    OMP_NUM_THREADS=1 python benchmarks/attention_speed.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from latentforge.models.attention import _explicit_attention

SHAPES = [  # (B, H, N, M, D), backward timed too
    ((2, 3, 64, 77, 32), False),  # default model, inference, cross-attention at 8x8
    ((64, 3, 64, 64, 32), True),  # default model, training: self-attention at 8x8
    ((64, 3, 64, 77, 32), True),  # cross-attention at 8x8
    ((64, 6, 16, 77, 32), True),  # cross-attention at 4x4
    ((2, 8, 256, 256, 80), False),  # SD1.5 at 512 px, level 2
    ((2, 8, 1024, 1024, 40), False),  # level 1
    ((2, 8, 4096, 77, 40), False),  # level 0 cross-attention
]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IMPLEMENTATIONS: dict[str, Attention] = {
    "fused": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "written-out": lambda q, k, v: _explicit_attention(q, k, v, None, False),
}


def cpu_ms(attend: Attention, shape: tuple[int, ...], dtype: torch.dtype, backward: bool) -> float:
    b, h, n, m, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=dtype).requires_grad_(backward) for s in (n, m, m))
    reps = max(2, int(2e8 / (b * h * n * m * d)))

    def once() -> None:
        out = attend(q, k, v)
        if backward:
            out.float().sum().backward()

    once()
    start = time.process_time()
    for _ in range(reps):
        once()
    return (time.process_time() - start) / reps * 1e3


def main() -> None:
    torch.set_num_threads(1)
    print("shape B,H,N,M,D | dtype | pass | fused ms | written-out ms | written-out / fused")
    for shape, with_backward in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True) if with_backward else (False,):
                ms = {name: cpu_ms(f, shape, dtype, backward) for name, f in IMPLEMENTATIONS.items()}
                print(
                    f"{shape} | {str(dtype)[6:]} | {'fwd+bwd' if backward else 'fwd'} | {ms['fused']:.2f} | "
                    f"{ms['written-out']:.2f} | {ms['written-out'] / ms['fused']:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
