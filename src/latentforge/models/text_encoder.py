"""CLIP text transformer (causal, pre-LayerNorm): OpenAI ViT-L/14 in SD 1.x, OpenCLIP ViT-H/14 in SD 2.x.

Attribute names follow the SD 1.x checkpoint keys under `cond_stage_model.transformer.` (the transformers
layout); SD 2.x's OpenCLIP layout is converted by `latentforge.checkpoints.keymap_text`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.attention import multi_head_attention
from latentforge.models.configs import TextEncoderConfig

EOS_TOKEN = 49407  # <|endoftext|>: the pooled output is read at its first occurrence
LAYER_NORM_EPS = 1e-5


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.activation = quick_gelu if config.activation == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_length, config.width)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding(positions)  # [B, T, width]


class CLIPTextTransformer(nn.Module):
    """The `text_model` container: embeddings, encoder layers, final LayerNorm."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)


class CLIPTextModel(nn.Module):
    """CLIP text encoder returning per-token hidden states (with clip skip) and the pooled EOS state."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection: nn.Linear | None = None
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        clip_skip: int = 1,
        token_embeds: torch.Tensor | None = None,
        final_norm: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids [B, T] (T <= max_length); `token_embeds` [B, T, width] replaces their token
        embeddings (textual inversion), the ids still locate the EOS.

        Returns (hidden [B, T, width], pooled [B, projection_dim or width]). `clip_skip` N (A1111's
        convention) takes the output of the layer N-1 before the last, then the final LayerNorm unless
        `final_norm` is False (SDXL's `hidden_states[-N]`); the pooled output always comes from the last
        layer, normed, read at the first EOS token.
        """
        num_layers = self.config.layers
        if not 1 <= clip_skip <= num_layers:
            raise ValueError(f"clip_skip must be in [1, {num_layers}] for this text encoder, got {clip_skip}")
        tm = self.text_model
        x = tm.embeddings(input_ids, token_embeds)
        skipped = x
        for index, layer in enumerate(tm.encoder.layers):
            x = layer(x)
            if index == num_layers - clip_skip:
                skipped = x
        hidden = tm.final_layer_norm(skipped) if final_norm else skipped
        last = hidden if clip_skip == 1 and final_norm else tm.final_layer_norm(x)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_positions(input_ids)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled


def eos_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first EOS token per row [B]; a row without one falls back to its largest id (as CLIP)."""
    is_eos = input_ids == EOS_TOKEN
    first_eos = is_eos.int().argmax(dim=-1)
    return torch.where(is_eos.any(dim=-1), first_eos, input_ids.argmax(dim=-1))
