"""Multi-head attention core shared by the text encoder, the VAE and the U-Net, and token merging (ToMe)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
    if _explicit_backward(q, k):
        out = _explicit_attention(q, k, v, mask, causal and mask is None)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(batch, n, width)  # [B, H, N, D] -> [B, N, H*D]


# Training on a CPU in bf16/fp16: PyTorch's CPU flash-attention backward is 4-5x slower than the plain
# softmax(q k^T / sqrt(d)) v written out, on the short sequences of small models (benchmarks/
# attention_speed.py: 64 images x 3 heads x 64 x 77 tokens, bf16, forward + backward 39 ms vs 8.6; the default
# model's U-Net training step 1.78 -> 1.13 s). Its forward is as fast or faster, so inference and fp32 keep
# it; the written-out form stores the [B, H, N, M] weights for the backward, so it is used only while
# those stay small (2**24 elements, 32 MiB in bf16; SD at 512 px has 4096 x 4096 per head: flash then).
EXPLICIT_BACKWARD_MAX_WEIGHTS = 2**24


def _explicit_backward(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        q.requires_grad
        and torch.is_grad_enabled()
        and q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= EXPLICIT_BACKWARD_MAX_WEIGHTS
    )


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, [B, H, N, D] x [B, H, M, D]; the mask as SDPA's (bool: True
    takes part; float: added), causal: token i sees tokens <= i."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1).to(v.dtype) @ v


# Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023, arXiv:2303.17604; reference
# implementation: the `tomesd` package, merge.py `bipartite_soft_matching_random2d`). Notation:
#   tokens of an h x w grid are split into dst (one per sy x sx cell: its top-left, or a random one with
#   use_rand) and src (the rest); each src token's most similar dst token (cosine similarity of the
#   block's input) is its partner; the r src tokens with the most similar partners are averaged into them.
#   merge: [B, N, C] -> [B, N - r, C] (unmerged src, then dst); unmerge copies each dst result back to the
#   src tokens merged into it. Self-attention then runs over N - r tokens.
Merge = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TokenMerging:
    """ToMe settings: merge `ratio` of the tokens in the self-attention of blocks whose latent is
    downsampled at most `max_downsample` times (1: the highest resolution only), dst stride (sx, sy)."""

    ratio: float = 0.0
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = False  # random dst in each cell, from the generator of the merge plan


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_merge(
    metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int, generator: torch.Generator | None = None
) -> tuple[Merge, Merge]:
    """(merge, unmerge) of r tokens of metric [B, N, C] on an h x w grid; random dst with a generator."""
    batch, n, _ = metric.shape
    if r <= 0:
        return _identity, _identity
    device = metric.device
    with torch.no_grad():
        cells_h, cells_w = h // sy, w // sx
        if generator is None:
            choice = torch.zeros(cells_h, cells_w, 1, dtype=torch.int64, device=device)
        else:
            choice = torch.randint(
                sy * sx, (cells_h, cells_w, 1), generator=generator, device=generator.device
            )
            choice = choice.to(device)
        # -1 marks each cell's dst, 0 every src token (also the rows/columns past the last whole cell)
        flags = torch.zeros(cells_h, cells_w, sy * sx, dtype=torch.int64, device=device)
        flags.scatter_(2, choice, -1)
        flags = flags.view(cells_h, cells_w, sy, sx).transpose(1, 2).reshape(cells_h * sy, cells_w * sx)
        grid = torch.zeros(h, w, dtype=torch.int64, device=device)
        grid[: cells_h * sy, : cells_w * sx] = flags
        order = grid.reshape(1, -1, 1).argsort(dim=1)  # [1, N, 1]: dst indices first, then src
        n_dst = cells_h * cells_w
        src_pos, dst_pos = order[:, n_dst:], order[:, :n_dst]

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = x.shape[-1]
            return x.gather(1, src_pos.expand(batch, n - n_dst, c)), x.gather(
                1, dst_pos.expand(batch, n_dst, c)
            )

        a, b = split(metric / metric.norm(dim=-1, keepdim=True))
        best, partner = (a @ b.transpose(-1, -2)).max(
            dim=-1
        )  # [B, N_src] similarity and index of the best dst
        r = min(r, a.shape[1])
        ranked = best.argsort(dim=-1, descending=True)[..., None]  # [B, N_src, 1]
        kept, merged = ranked[:, r:], ranked[:, :r]
        into = partner[..., None].gather(1, merged)  # [B, r, 1]: the dst each merged src joins

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        c = x.shape[-1]
        unmerged = src.gather(1, kept.expand(batch, kept.shape[1], c))
        dst = dst.scatter_reduce(
            1, into.expand(batch, r, c), src.gather(1, merged.expand(batch, r, c)), "mean"
        )
        return torch.cat([unmerged, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        unmerged, dst = x[:, : kept.shape[1]], x[:, kept.shape[1] :]
        out = x.new_zeros(batch, n, c)
        src_all = src_pos.expand(batch, -1, 1)
        out.scatter_(1, dst_pos.expand(batch, n_dst, c), dst)
        out.scatter_(1, src_all.gather(1, kept).expand(batch, kept.shape[1], c), unmerged)
        out.scatter_(
            1, src_all.gather(1, merged).expand(batch, r, c), dst.gather(1, into.expand(batch, r, c))
        )
        return out

    return merge, unmerge


@dataclass
class MergePlanner:
    """Per-U-Net ToMe state: the settings, the latent size of the current forward, the dst generator."""

    settings: TokenMerging
    size: tuple[int, int] = (0, 0)  # latent (h, w) of the current U-Net input
    generator: torch.Generator | None = None

    def plan(self, x: torch.Tensor) -> tuple[Merge, Merge]:
        """(merge, unmerge) for the tokens x [B, N, C] of one transformer block."""
        s = self.settings
        h0, w0 = self.size
        downsample = math.ceil(math.sqrt(h0 * w0 // x.shape[1]))
        if s.ratio <= 0 or downsample > s.max_downsample:
            return _identity, _identity
        w, h = math.ceil(w0 / downsample), math.ceil(h0 / downsample)
        # cond and uncond of one image must share a partition; an odd batch cannot hold both (tomesd)
        generator = self.generator if s.use_rand and x.shape[0] % 2 == 0 else None
        if s.use_rand and generator is None and x.shape[0] % 2 == 0:
            raise ValueError("ToMe use_rand needs a generator")
        return bipartite_merge(x, w, h, s.sx, s.sy, int(x.shape[1] * s.ratio), generator)
