"""`latentforge train clip CONFIG`: CLIP's contrastive pre-training (Radford et al. 2021, figure 3).

Per micro-batch of n (image, caption) pairs, with f_I, f_T the L2-normalised embeddings and
s = exp(logit_scale) the learned inverse temperature (clipped at 100):
    logits = s f_I f_T^T                                   [n, N]
    loss   = (CE(logits, labels) + CE(logits_T, labels)) / 2   (symmetric InfoNCE)
With `tag_positives`, labels are soft: image i's target is spread evenly over every caption in the
contrast whose tags are a subset of its own caption's (and caption j's over every such image).
Under DDP with `gather = true` (default), each rank contrasts its n pairs against all N = n x world_size
pairs of the current micro-step (open_clip's `local_loss` with `gather_with_grad`): the gather passes
gradients back to every rank's shard, so DDP's gradient average is the gradient of the global loss.
Contrast never spans gradient-accumulation micro-steps, so for CLIP "1 process x k accumulation steps"
sees k smaller contrastive batches than "k processes": the loop's equivalence holds with `gather = false`.
The export writes the whole CLIP and, next to it, the text tower alone for the U-Net task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latentforge.checkpoints.exports import (
    load_clip,
    save_clip,
    save_text_encoder,
    text_encoder_path,
)
from latentforge.errors import ConfigError
from latentforge.models.clip import (
    CLIPConfig,
    CLIPModel,
    VisionConfig,
    clip_config_from_dict,
    preprocess_images,
)
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.training.config import AT_LEAST_ONE, Range, RunConfig
from latentforge.training.tasks.common import (
    ExportDtype,
    ImageData,
    build_model,
    dtype_from_name,
    image_dataset,
    model_device,
    parse_options,
    unwrap,
)


@dataclass(frozen=True)
class CLIPTaskOptions(ImageData):
    """`task_options` of the CLIP task (all optional); the data fields come from `ImageData`."""

    clip: CLIPConfig | None = None  # tables [clip.text] and [clip.vision]; default: tiny, sized to resolution
    init: str | None = None  # start from a CLIP file (our export, or open_clip layout with `clip` given)
    gather: bool = True  # DDP: contrast against every rank's pairs (see the module docstring)
    shuffle_tags: bool = False  # caption augmentation: shuffle comma-separated tags ...
    keep_tags: int = 1  # ... after the first `keep_tags` (kohya's keep_tokens)
    # a caption whose tags are all among an image's caption's tags is a match of that image, not a negative
    # (a name-less caption describes every emoji of its subcategory and style; `contrastive_loss`)
    tag_positives: bool = False
    # image augmentation: each training image is cropped to a random square of side 1/z of its own, z drawn
    # uniformly in [1, zoom], at a random position, and resized back (`random_zoom`); 1 = off
    zoom: float = 1.0
    max_holdout_items: int | None = None  # retrieval is measured on the whole holdout split by default
    eval_batch_size: int = 64
    eval_train_items: int = 256  # also report retrieval and loss on this many training pairs (0 = off)
    retrieval_k: tuple[int, ...] = (1, 5)
    heatmap_items: int = 8
    export_dtype: ExportDtype | None = None  # "float16" halves the files; default: as trained

    RANGES: ClassVar[dict[str, Range]] = ImageData.RANGES | {
        "eval_batch_size": AT_LEAST_ONE,
        "retrieval_k": AT_LEAST_ONE,
        "zoom": Range(1.0, None, note="1 = off"),
    }


class CLIPTrainer(nn.Module):
    """The trainable module: `clip`, with a forward that returns what the contrastive loss needs."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(f_I [n, D], f_T [n, D]) L2-normalised, and s = exp(logit_scale) (clipped)."""
        image = self.clip.encode_image(pixels, normalize=True)
        text = self.clip.encode_text(input_ids, normalize=True)
        return image, text, self.clip.temperature_scale()


# --------------------------------------------------------------------------------------------------
# Loss and retrieval
# --------------------------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # [world_size * n, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # all_reduce, not reduce_scatter: gloo (CPU) has no reduce_scatter
        return grad.chunk(ctx.world_size)[ctx.rank]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: torch.Tensor,
    gather: bool = False,
    captions: Sequence[str] | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows of L2-normalised features [n, D], in float32.

    With `gather` under torch.distributed, the negatives are every rank's rows (equal n on all ranks);
    otherwise (and in a single process) only this batch's. Each row's target is its own pair; with
    `captions` (row i's caption), it is spread evenly over every pair whose caption's tags are all among
    those of row i's caption (`tag_matches`): a name-less "country-flag, google style" then counts as a
    match of every flag's image instead of a negative. Distinct tag sets give plain InfoNCE.
    """
    image, text, scale = image_features.float(), text_features.float(), scale.float()
    all_image, all_text, offset = image, text, 0
    everyone = list(captions) if captions is not None else None
    if gather and _distributed():
        all_image, all_text = _GatherWithGrad.apply(image), _GatherWithGrad.apply(text)
        offset = dist.get_rank() * len(image)
        if everyone is not None:
            parts: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, everyone)
            everyone = [caption for part in parts for caption in part]
    logits_per_image = scale * image @ all_text.T  # [n, N]
    logits_per_text = scale * text @ all_image.T  # [n, N]
    if captions is None or everyone is None:
        labels = torch.arange(len(image), device=image.device) + offset
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    image_targets = tag_matches(captions, everyone).to(image.device).float()  # [n, N]
    text_targets = tag_matches(everyone, captions).T.to(image.device).float()  # [n, N]
    return (
        F.cross_entropy(logits_per_image, image_targets / image_targets.sum(1, keepdim=True))
        + F.cross_entropy(logits_per_text, text_targets / text_targets.sum(1, keepdim=True))
    ) / 2


def caption_tags(caption: str) -> frozenset[str]:
    """The set of a caption's comma-separated tags, stripped."""
    return frozenset(tag.strip() for tag in caption.split(","))


def tag_matches(rows: Sequence[str], columns: Sequence[str]) -> torch.Tensor:
    """[len(rows), len(columns)] bool: every tag of caption `columns[j]` is a tag of caption `rows[i]`."""
    row_tags, column_tags = [caption_tags(c) for c in rows], [caption_tags(c) for c in columns]
    return torch.tensor([[column <= row for column in column_tags] for row in row_tags], dtype=torch.bool)


def retrieval_accuracy(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_of_image: torch.Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k retrieval accuracy both ways over unique captions.

    Args:
        image_features: [N_img, D]; text_features: [N_txt, D], one row per unique caption (cosine similarity).
        caption_of_image: [N_img] index of each image's caption row.
        ks: the k of top-k (clipped to the number of candidates).

    Returns:
        {"i2t_top{k}": fraction of images whose caption is among their k most similar captions,
         "t2i_top{k}": fraction of captions with one of their images among their k most similar images}.
    """
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    caption_of_image = caption_of_image.to(similarity.device)
    metrics = {}
    for k in ks:
        top_texts = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # [N_img, k]
        metrics[f"i2t_top{k}"] = (top_texts == caption_of_image[:, None]).any(1).float().mean().item()
        top_images = similarity.T.topk(min(k, similarity.shape[0]), dim=1).indices  # [N_txt, k]
        captions = torch.arange(similarity.shape[1], device=similarity.device)
        metrics[f"t2i_top{k}"] = (
            (caption_of_image[top_images] == captions[:, None]).any(1).float().mean().item()
        )
    return metrics


def shuffle_tags(caption: str, keep: int, generator: torch.Generator) -> str:
    """Shuffle the comma-separated tags of a caption after the first `keep` (kohya's shuffle_caption)."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=generator).tolist()
    return ", ".join(head + [tail[i] for i in order])


def zoom_crop(pixels: torch.Tensor, zoom: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Images [n, C, H, W] cropped to the square of side 1/zoom[i] centred at centre[i] (coordinates in
    [-1, 1], as `affine_grid`'s) and resized back to H x W, bilinearly at `F.interpolate`'s sampling points
    (which within half a source pixel of the crop's edge read on into the image instead of clamping)."""
    theta = torch.zeros(len(pixels), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_zoom(pixels: torch.Tensor, max_zoom: float, generator: torch.Generator) -> torch.Tensor:
    """`zoom_crop` at z ~ U[1, max_zoom] per image and a centre that keeps the crop inside the image."""
    n = len(pixels)
    zoom = 1 + (max_zoom - 1) * torch.rand(n, generator=generator)
    centre = (2 * torch.rand(n, 2, generator=generator) - 1) * (1 - 1 / zoom)[:, None]
    return zoom_crop(pixels, zoom, centre)


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class CLIPTask:
    """Trains a CLIPModel contrastively on (image, caption) pairs; see the module docstring."""

    name = "clip"

    def __init__(self, options: Mapping[str, Any] | CLIPTaskOptions | None = None, seed: int = 0) -> None:
        if not isinstance(options, CLIPTaskOptions):
            options = dict(options or {})
            if isinstance(options.get("clip"), Mapping):
                try:
                    options["clip"] = clip_config_from_dict(dict(options["clip"]))
                except (TypeError, ValueError) as error:
                    raise ConfigError(f"task_options.clip: {error}") from None
            options = parse_options(CLIPTaskOptions, options, "clip")
        self.options = options
        self.seed = seed
        torch.manual_seed(seed)
        config = options.clip or CLIPConfig(vision=VisionConfig(image_size=options.resolution))
        self.module = CLIPTrainer(
            load_clip(options.init, options.clip)
            if options.init
            else build_model("task_options.clip", CLIPModel, config)
        )
        self.tokenizer = CLIPTokenizer.for_config(self.module.clip.config.text)
        self._datasets: dict[str, Dataset] = {}

    def trainable(self) -> nn.Module:
        return self.module

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = image_dataset(self.options, split, seed=self.seed)
        return self._datasets[split]

    def _inputs(
        self, clip: CLIPModel, pixels: torch.Tensor, captions: Sequence[str]
    ) -> tuple[torch.Tensor, ...]:
        device = model_device(clip)
        image_input = preprocess_images(pixels.to(device), clip.config.vision.image_size)
        return image_input, self.tokenizer(list(captions)).to(device)

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        captions = list(batch["caption"])
        if self.options.shuffle_tags:
            captions = [shuffle_tags(c, self.options.keep_tags, generator) for c in captions]
        pixels = batch["pixels"]
        if self.options.zoom > 1:
            pixels = random_zoom(pixels, self.options.zoom, generator)
        clip: CLIPModel = unwrap(model).clip  # type: ignore[assignment]
        pixels, ids = self._inputs(clip, pixels, captions)
        image, text, scale = model(pixels, ids)
        loss = contrastive_loss(
            image,
            text,
            scale,
            gather=self.options.gather,
            captions=captions if self.options.tag_positives else None,
        )
        with torch.no_grad():
            accuracy = (image.float() @ text.float().T).argmax(1) == torch.arange(
                len(image), device=image.device
            )
        return loss, {
            "loss": loss.item(),
            "scale": scale.item(),
            "batch_i2t_top1": accuracy.float().mean().item(),
        }

    @torch.no_grad()
    def _encode(self, clip: CLIPModel, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Normalised image and caption features [N, D] of every item, and the captions."""
        images, texts, captions = [], [], []
        for batch in DataLoader(dataset, batch_size=self.options.eval_batch_size):
            pixels, ids = self._inputs(clip, batch["pixels"], batch["caption"])
            images.append(clip.encode_image(pixels, normalize=True).float())
            texts.append(clip.encode_text(ids, normalize=True).float())
            captions += list(batch["caption"])
        return torch.cat(images), torch.cat(texts), captions

    def _metrics(self, clip: CLIPModel, dataset: Dataset) -> dict[str, float]:
        image, text, captions = self._encode(clip, dataset)
        first_index: dict[str, int] = {}
        for index, caption in enumerate(captions):
            first_index.setdefault(caption, index)
        unique = list(first_index)
        row = {caption: i for i, caption in enumerate(unique)}
        first = torch.tensor(list(first_index.values()))  # a text row per unique caption
        caption_of_image = torch.tensor([row[c] for c in captions])
        metrics = retrieval_accuracy(image, text[first], caption_of_image, self.options.retrieval_k)
        metrics["loss"] = contrastive_loss(image, text, clip.temperature_scale()).item()  # all pairs at once
        metrics["captions"] = float(len(unique))
        return metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Holdout retrieval top-k (both ways, over unique captions) and loss; the same on training items."""
        clip: CLIPModel = unwrap(model).clip  # type: ignore[assignment]
        was_training = clip.training
        clip.eval()
        metrics = self._metrics(clip, self.dataset("holdout"))
        if self.options.eval_train_items:
            train = self.dataset("train")
            size = len(train)  # type: ignore[arg-type]
            spread = torch.linspace(0, size - 1, min(self.options.eval_train_items, size)).long().tolist()
            subset = torch.utils.data.Subset(train, spread)  # evenly over the (sorted) training set
            metrics |= {f"train_{k}": v for k, v in self._metrics(clip, subset).items()}
        clip.train(was_training)
        metrics["scale"] = clip.logit_scale.exp().item()
        return metrics

    def samples(self, model: nn.Module) -> Image.Image | None:
        """Images on top, captions' images down the left; cells: softmax over images per caption."""
        clip: CLIPModel = unwrap(model).clip  # type: ignore[assignment]
        dataset = self.dataset("holdout")
        count = min(self.options.heatmap_items, len(dataset))  # type: ignore[arg-type]
        if count == 0:
            return None
        items = [dataset[i] for i in range(count)]
        pixels = torch.stack([item["pixels"] for item in items]).float()
        was_training = clip.training
        clip.eval()
        with torch.no_grad():
            logits_per_image, _ = clip(*self._inputs(clip, pixels, [item["caption"] for item in items]))
        clip.train(was_training)
        return similarity_heatmap(pixels, logits_per_image.T.float().softmax(dim=1).cpu())

    def export(self, model: nn.Module, path: Path) -> None:
        """The whole CLIP at `path` and its text tower at `text_encoder_path(path)` (for the U-Net task)."""
        clip: CLIPModel = unwrap(model).clip  # type: ignore[assignment]
        dtype = dtype_from_name(self.options.export_dtype)
        save_clip(clip, path, dtype)
        save_text_encoder(clip.text, text_encoder_path(path), dtype)


def similarity_heatmap(pixels: torch.Tensor, probabilities: torch.Tensor) -> Image.Image:
    """An (n+1)^2 grid: images [n, 3, H, W] in [-1, 1] along the top and the left, cells in grey levels."""
    n, _, height, width = pixels.shape
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    canvas = np.full(((n + 1) * height, (n + 1) * width, 3), 255, dtype=np.uint8)
    for i in range(n):
        canvas[:height, (i + 1) * width : (i + 2) * width] = images[i]
        canvas[(i + 1) * height : (i + 2) * height, :width] = images[i]
        for j in range(n):  # row i: the caption of image i; column j: image j
            level = 255 - int(round(255 * float(probabilities[i, j])))
            canvas[(i + 1) * height : (i + 2) * height, (j + 1) * width : (j + 2) * width] = level
    return Image.fromarray(canvas)


def make_clip_task(config: RunConfig) -> CLIPTask:
    """The `TASKS["clip"]` factory: reads `config.task_options` and `config.seed`."""
    return CLIPTask(config.task_options, seed=config.seed)
