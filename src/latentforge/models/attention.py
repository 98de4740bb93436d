"""Multi-head attention core shared by the text encoder, the VAE and the U-Net."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention over `heads` heads: [B, N, H*D] x [B, M, H*D] -> [B, N, H*D]."""
    batch, n, width = q.shape
    # [B, N, H*D] -> [B, H, N, D]
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(batch, n, width)  # [B, H, N, D] -> [B, N, H*D]
