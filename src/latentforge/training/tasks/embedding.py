"""`latentforge train embedding CONFIG`: Textual Inversion (Gal et al. 2022), as A1111 trains it.

A new word `token` gets `num_vectors` vectors in the text encoder's token-embedding space, initialised from
the embeddings of `init_word` (cycled, as A1111's `create_embedding` does); everything else is frozen. The
word reaches the text encoder as ids past the vocabulary (a tokenizer wrapper), and hooks on the token
embedding put the vectors there, so the training step, the loss and the previews are the U-Net task's and
the real pipeline's. The export is the A1111 `.pt` and `.safetensors` layouts (`checkpoints/embeddings.py`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from torch.utils.hooks import RemovableHandle

from latentforge.checkpoints.embeddings import write_embedding
from latentforge.distributed import resolve_device
from latentforge.errors import ConfigError
from latentforge.training.config import AT_LEAST_ONE, Range, RunConfig
from latentforge.training.tasks.common import parse_options, unwrap
from latentforge.training.tasks.unet import UNetTask, UNetTaskOptions


@dataclass(frozen=True)
class EmbeddingTaskOptions(UNetTaskOptions):
    """`task_options` of the embedding task: the U-Net task's (data, noise, captions, `init`) plus these."""

    token: str = ""  # the new word, e.g. "lf-cat-emoji"; also the embedding's file name (what prompts use)
    init_word: str = "*"  # its vectors start as this word's token embeddings
    num_vectors: int = 1
    caption_template: str | None = "a photo of {token}"  # {caption}: the image's own caption
    caption_dropout: float = 0.0  # an empty caption teaches the token nothing

    RANGES: ClassVar[dict[str, Range]] = UNetTaskOptions.RANGES | {"num_vectors": AT_LEAST_ONE}


class PlaceholderTokenizer:
    """A tokenizer that spells `token` as the ids vocab_size ... vocab_size + n - 1; otherwise `base`."""

    def __init__(self, base: Any, token: str, count: int) -> None:
        self.base, self.token = base, token
        self.ids = [base.vocab_size + i for i in range(count)]

    def __getattr__(self, name: str) -> Any:  # bos/eos/pad ids, max_length, vocab, decode ...
        return getattr(self.base, name)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split(self.token)):
            if i:
                ids.extend(self.ids)
            if piece:
                ids.extend(self.base.encode(piece))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.base.pad(self.encode(text)) for text in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.base.max_length)


class EmbeddingVectors(nn.Module):
    """The trainable vectors [n, width]; `forward` runs the frozen U-Net (held outside the module tree)."""

    def __init__(self, vectors: torch.Tensor, unet: nn.Module) -> None:
        super().__init__()
        self.vectors = nn.Parameter(vectors.clone())
        self._unet = (unet,)

    def __deepcopy__(self, memo: dict) -> EmbeddingVectors:
        return EmbeddingVectors(copy.deepcopy(self.vectors.data, memo), self._unet[0])

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._unet[0](x, timesteps, context)


def insert_vectors(embedding: nn.Embedding, vectors: Callable[[], torch.Tensor]) -> list[RemovableHandle]:
    """Hooks making id vocab_size + i look up row i of `vectors()` (ids past the vocabulary read row 0,
    then are replaced): the new word's rows for the training step and the previews alike."""
    vocab = embedding.num_embeddings
    placeholder: dict[str, torch.Tensor] = {}

    def before(_module: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        mask = ids >= vocab
        placeholder["mask"], placeholder["index"] = mask, (ids - vocab).masked_fill(~mask, 0)
        return (ids.masked_fill(mask, 0),)

    def after(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        mask, index = placeholder.pop("mask"), placeholder.pop("index")
        if not bool(mask.any()):
            return output
        rows = vectors().to(output.dtype)[index]  # [B, T, width]
        return torch.where(mask[..., None], rows, output)

    return [embedding.register_forward_pre_hook(before), embedding.register_forward_hook(after)]


class EmbeddingTask(UNetTask):
    """Textual Inversion on a frozen model; see the module docstring."""

    name = "embedding"

    def __init__(
        self,
        options: Mapping[str, Any] | EmbeddingTaskOptions | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = True,
        run: RunConfig | None = None,
    ) -> None:
        explicit = set(options or {}) if not isinstance(options, EmbeddingTaskOptions) else set()
        if not isinstance(options, EmbeddingTaskOptions):
            options = parse_options(EmbeddingTaskOptions, options or {}, self.name)
        _check_options(options)
        super().__init__(
            replace(options, train_text_encoder=False), seed, device, progress, explicit=explicit
        )
        self.ti, self.run = options, run
        self.unet.requires_grad_(False)
        self.tokenizer = PlaceholderTokenizer(self.tokenizer, options.token, options.num_vectors)  # type: ignore[assignment]
        self.vectors = EmbeddingVectors(self._initial_vectors(), self.unet)
        self._trainable = self.vectors
        self._active = self.vectors  # whose vectors the hooks insert (the trained ones or the EMA's)
        self.text_grad = True
        self._hook_token_embedding()

    def _initial_vectors(self) -> torch.Tensor:
        """`init_word`'s token embeddings, cycled to `num_vectors` rows (A1111's `create_embedding`)."""
        base = self.tokenizer.base  # type: ignore[attr-defined]
        ids = base.encode(self.ti.init_word) or [base.eos_token_id]
        table = self.text_encoder.text_model.embeddings.token_embedding.weight.detach()
        init = table[torch.tensor(ids)].float()
        return init[torch.arange(self.ti.num_vectors) % len(init)]

    def _hook_token_embedding(self) -> None:
        embedding = self.text_encoder.text_model.embeddings.token_embedding
        insert_vectors(embedding, lambda: self._active.vectors)

    def template_fields(self) -> dict[str, str]:
        return {"token": self.ti.token, "class_word": ""}

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        return self.unet, self.text_encoder

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(unwrap(model).parameters())}]

    @contextlib.contextmanager
    def live(self, model: nn.Module) -> Iterator[None]:
        """Let the hooks insert `model`'s vectors (the EMA copy's for evaluation, samples and export)."""
        previous, self._active = self._active, unwrap(model)  # type: ignore[assignment]
        try:
            yield
        finally:
            self._active = previous

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with self.live(model):
            return super().evaluate(model)

    def samples(self, model: nn.Module) -> Image.Image | None:
        with self.live(model):
            return super().samples(model)

    def _prompts(self) -> list[str]:
        if self.options.sample_prompts is not None:
            return list(self.options.sample_prompts)
        return [f"a photo of {self.ti.token}", self.ti.token]

    def export(self, model: nn.Module, path: Path) -> None:
        """`path` (.safetensors, `emb_params`) and `embeddings/<token>.pt|.safetensors` for A1111's folder."""
        trained = unwrap(model)
        assert isinstance(trained, EmbeddingVectors)
        vectors = trained.vectors.detach().float().cpu()
        run = self.run or RunConfig(task=self.name)
        init_name = Path(self.ti.init).name if self.ti.init else None
        folder = path.parent / "embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        for target in (path, folder / f"{self.ti.token}.safetensors", folder / f"{self.ti.token}.pt"):
            write_embedding(target, self.ti.token, vectors, step=run.max_steps, checkpoint_name=init_name)


def _check_options(options: EmbeddingTaskOptions) -> None:
    if options.init is None:
        raise ConfigError(
            "task_options.init is required for `train embedding`: the vectors are learnt for an existing "
            "model; set it to a checkpoint file or diffusers folder"
        )
    if not options.token.strip() or any(c in options.token for c in " ,()[]:<>"):
        raise ConfigError(
            f"task_options.token = {options.token!r}: give the new word, one piece without spaces, commas, "
            'brackets or colons (prompt syntax), e.g. token = "lf-cat-emoji"'
        )
    if options.caption_template is not None and "{token}" not in options.caption_template:
        raise ConfigError(
            f"task_options.caption_template = {options.caption_template!r} has no {{token}}: the vectors "
            'would never be used; e.g. "a photo of {token}" or "{caption}, {token}"'
        )
    if options.cache and options.cache_text == "hidden":
        raise ConfigError(
            'task_options.cache_text = "hidden" cannot train an embedding; set cache_text = "ids"'
        )


def make_embedding_task(config: RunConfig) -> EmbeddingTask:
    """The `TASKS["embedding"]` factory."""
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    return EmbeddingTask(config.task_options, seed=config.seed, device=device, run=config)
