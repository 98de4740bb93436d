"""The CLIP task: InfoNCE against a reference, retrieval accuracy, training progress, export, DDP gather."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from latentforge.checkpoints.exports import load_clip, load_text_encoder, text_encoder_path
from latentforge.checkpoints.reading import read_state_dict
from latentforge.models.clip import CLIPModel
from latentforge.models.configs import TextEncoderConfig
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.training.tasks.clip import (
    CLIPTask,
    contrastive_loss,
    make_clip_task,
    random_zoom,
    retrieval_accuracy,
    shuffle_tags,
    tag_matches,
    zoom_crop,
)

TINY_CLIP = {
    "text": {"max_length": 16, "width": 32, "layers": 1, "heads": 2, "mlp_width": 64, "projection_dim": 16},
    "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "projection_dim": 16},
}


def _task(**options) -> CLIPTask:
    base = {"resolution": 16, "synthetic_items": 16, "max_holdout_items": 8, "clip": TINY_CLIP}
    return CLIPTask({"eval_train_items": 8, "heatmap_items": 4, **base, **options}, seed=0)


def _batch(task: CLIPTask, n: int = 16) -> dict:
    items = [task.dataset("train")[i] for i in range(n)]
    return {"pixels": torch.stack([i["pixels"] for i in items]), "caption": [i["caption"] for i in items]}


def _reference_infonce(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP paper, figure 3, written out with explicit log-softmaxes."""
    logits = scale * image @ text.T
    n = len(image)
    image_to_text = -torch.stack([logits[i].log_softmax(0)[i] for i in range(n)]).mean()
    text_to_image = -torch.stack([logits[:, i].log_softmax(0)[i] for i in range(n)]).mean()
    return (image_to_text + text_to_image) / 2


def test_infonce_matches_a_written_out_reference():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    for scale in (1.0, 14.3, 100.0):
        expected = _reference_infonce(image, text, scale)
        torch.testing.assert_close(contrastive_loss(image, text, torch.tensor(scale)), expected)
    # perfectly aligned features and a high temperature: loss -> 0; identical features everywhere: log n
    assert contrastive_loss(torch.eye(4), torch.eye(4), torch.tensor(100.0)) < 1e-6
    same = torch.ones(5, 3) / 3**0.5
    assert contrastive_loss(same, same, torch.tensor(10.0)).item() == pytest.approx(
        torch.tensor(5.0).log().item()
    )


def test_tag_positives_spread_the_target_over_every_caption_an_image_fits():
    captions = [
        "grinning face, smiley, google style",
        "smiley, google style",  # name-less: fits images 0, 1 and 3
        "kiss mark, emotion, google style",
        "smiling face, google style, smiley",  # same tags in another order as nothing else: its own
    ]
    matches = tag_matches(captions, captions)
    assert matches.tolist() == [
        [True, True, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, True, False, True],
    ]
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    scale = 12.0
    logits = scale * image @ text.T
    # written out: each image's loss is the mean -log p over its matching captions, each caption's over the
    # images it fits (caption 1 fits images 0, 1, 3; the others only their own)
    image_to_text = [
        -(logits[0].log_softmax(0)[[0, 1]].mean()),
        -logits[1].log_softmax(0)[1],
        -logits[2].log_softmax(0)[2],
        -(logits[3].log_softmax(0)[[1, 3]].mean()),
    ]
    text_to_image = [
        -logits[:, 0].log_softmax(0)[0],
        -(logits[:, 1].log_softmax(0)[[0, 1, 3]].mean()),
        -logits[:, 2].log_softmax(0)[2],
        -logits[:, 3].log_softmax(0)[3],
    ]
    expected = (torch.stack(image_to_text).mean() + torch.stack(text_to_image).mean()) / 2
    loss = contrastive_loss(image, text, torch.tensor(scale), captions=captions)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, contrastive_loss(image, text, torch.tensor(scale)))
    # distinct tag sets: plain InfoNCE
    distinct = [captions[0], captions[2], "a, b", "c"]
    torch.testing.assert_close(
        contrastive_loss(image, text, torch.tensor(scale), captions=distinct),
        contrastive_loss(image, text, torch.tensor(scale)),
    )
    task = _task(tag_positives=True)
    loss, _ = task.loss(task.trainable(), _batch(task, 4), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_retrieval_is_perfect_on_separable_features_and_chance_on_random_ones():
    captions = torch.arange(20).repeat_interleave(2)  # two images per caption
    text = torch.eye(20, 32)
    image = text[captions] + 0.1 * torch.randn(40, 32)
    perfect = retrieval_accuracy(image, text, captions, ks=(1, 5))
    assert perfect == {"i2t_top1": 1.0, "i2t_top5": 1.0, "t2i_top1": 1.0, "t2i_top5": 1.0}

    generator = torch.Generator().manual_seed(0)
    n = 2000
    random = retrieval_accuracy(
        torch.randn(n, 16, generator=generator), torch.randn(n, 16, generator=generator), torch.arange(n)
    )
    assert random["i2t_top1"] < 5 / n and random["t2i_top1"] < 5 / n  # chance is 1/n
    assert random["i2t_top5"] < 15 / n and random["t2i_top5"] < 15 / n  # chance is 5/n


def test_retrieval_counts_a_hit_for_any_image_of_the_caption():
    captions = torch.tensor([0, 1, 1])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # image 1 looks more like caption 0
    metrics = retrieval_accuracy(image, text, captions, ks=(1, 2))
    assert metrics["i2t_top1"] == pytest.approx(2 / 3) and metrics["i2t_top2"] == 1.0
    assert metrics["t2i_top1"] == 1.0  # caption 1 finds image 2, not image 1: either of its images counts


def test_loss_decreases_and_retrieval_improves():
    task = _task(synthetic_items=16)
    model = task.trainable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch, generator = _batch(task), torch.Generator().manual_seed(0)
    before = task.evaluate(model)
    history = []
    for _ in range(25):
        loss, metrics = task.loss(model, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics["loss"])
    after = task.evaluate(model)
    # well below log(n), the loss of features that collapsed to one point (reached within a few steps)
    assert history[-1] < 0.6 * math.log(len(batch["caption"])), history
    assert after["train_loss"] < before["train_loss"]
    assert after["train_i2t_top1"] > before["train_i2t_top1"]
    expected = {"i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5", "loss", "captions"}
    assert expected | {f"train_{k}" for k in expected} | {"scale"} == set(after)


def test_shuffle_tags_keeps_the_first_tags_and_the_set():
    generator = torch.Generator().manual_seed(0)
    caption = "keycap 8, keycap, google style, digit, eight"
    shuffled = {shuffle_tags(caption, 1, generator) for _ in range(20)}
    assert all(s.startswith("keycap 8, ") for s in shuffled) and len(shuffled) > 1
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    task = _task(shuffle_tags=True)
    loss, _ = task.loss(task.trainable(), _batch(task, 4), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_zoom_crop_is_a_resized_crop():
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # zoom 2 centred on the top-left quadrant: that quadrant, upsampled as F.interpolate does (which
    # clamps at the crop's edges where zoom_crop reads on into the image: the outermost samples differ)
    quadrant = zoom_crop(pixels, torch.tensor([2.0, 2.0]), torch.tensor([[-0.5, -0.5], [-0.5, -0.5]]))
    expected = F.interpolate(pixels[..., :8, :8], size=16, mode="bilinear", align_corners=False)
    torch.testing.assert_close(quadrant[..., :-1, :-1], expected[..., :-1, :-1])
    assert not torch.allclose(quadrant[..., -1], expected[..., -1])
    # zoom 1 is the identity; zoom 4 at the right-middle shows only the last 4 columns and rows 6..9
    torch.testing.assert_close(zoom_crop(pixels, torch.ones(2), torch.zeros(2, 2)), pixels)
    right = zoom_crop(pixels, torch.full((2,), 4.0), torch.tensor([[0.75, 0.0]] * 2))
    expected = F.interpolate(pixels[..., 6:10, 12:], size=16, mode="bilinear", align_corners=False)
    torch.testing.assert_close(right[..., 2:-2, 2:], expected[..., 2:-2, 2:])


def test_random_zoom_stays_inside_the_image_and_follows_the_generator():
    ramp = torch.linspace(-1, 1, 32).expand(8, 3, 32, 32)  # x coordinate as the value
    a = random_zoom(ramp, 1.5, torch.Generator().manual_seed(1))
    b = random_zoom(ramp, 1.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, ramp)
    span = a[:, 0, 0, -1] - a[:, 0, 0, 0]  # a crop of side >= 1/1.5, inside [-1, 1]: no border clamping
    assert (span >= (ramp[0, 0, 0, -1] - ramp[0, 0, 0, 0]) / 1.5 - 1e-4).all() and (span < 2).all()
    task = _task(zoom=1.25)
    loss, _ = task.loss(task.trainable(), _batch(task, 4), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_options_are_checked():
    with pytest.raises(ValueError, match="valid options"):
        _task(temperature=0.1)
    with pytest.raises(ValueError, match="zoom"):
        _task(zoom=0.5)
    with pytest.raises(ValueError, match="projection_dim"):
        _task(clip={**TINY_CLIP, "vision": {**TINY_CLIP["vision"], "projection_dim": 8}})


def test_samples_heatmap():
    task = _task()
    image = task.samples(task.trainable())
    assert image.size == (5 * 16, 5 * 16)


def test_export_round_trip_is_bit_exact_and_text_tower_loads_strictly(tmp_path):
    task = _task()
    clip: CLIPModel = task.trainable().clip
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)
    path = tmp_path / "final.safetensors"
    task.export(task.trainable(), path)
    loaded = load_clip(path)
    assert loaded.config == clip.config
    state, loaded_state = clip.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)

    text_state, metadata = read_state_dict(text_encoder_path(path))
    assert metadata["latentforge.component"] == "text_encoder"
    assert all(k.startswith(("text_model.", "text_projection.")) for k in text_state)
    text_config = clip.config.text
    plain = CLIPTextModel(text_config)
    plain.load_state_dict(text_state, strict=True)
    for source in (text_encoder_path(path), path):  # the text file, or the text tower of the whole CLIP
        text = load_text_encoder(source)
        assert text.config == text_config
        assert all(torch.equal(v, clip.text.state_dict()[k]) for k, v in text.state_dict().items())
    ids = task.tokenizer(["a red circle on a blue background"])
    torch.testing.assert_close(text(ids)[1], clip.encode_text(ids))


def test_unet_task_reads_the_text_encoder_export(tmp_path):
    from latentforge.training.tasks.unet import load_text_encoder as unet_load_text_encoder

    task = _task()
    path = tmp_path / "final.safetensors"
    task.export(task.trainable(), path)
    text = unet_load_text_encoder(text_encoder_path(path))
    assert text.config == TextEncoderConfig(**TINY_CLIP["text"])


def test_runs_through_the_training_loop(tmp_path):
    from latentforge.training.config import RunConfig
    from latentforge.training.loop import train
    from latentforge.training.tasks import TASKS

    config = RunConfig(
        run_dir=str(tmp_path / "run"),
        task="clip",
        max_steps=3,
        batch_size=8,
        lr=1e-3,
        device="cpu",
        checkpoint_every=0,
        task_options={"resolution": 16, "synthetic_items": 8, "max_holdout_items": 4, "clip": TINY_CLIP},
    )
    assert TASKS["clip"](config).name == "clip"
    artefact = train(make_clip_task(config), config)
    assert load_clip(artefact).config.vision.image_size == 16
    assert text_encoder_path(artefact).is_file()


# ---------------------------------------------------------------------------- DDP gather


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.normalize(x @ weight, dim=-1), F.normalize(y @ weight.flip(0), dim=-1)


def _gather_worker(rank: int, world_size: int, port: int, x, y, weight, captions, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        weight = weight.clone().requires_grad_(True)
        share = len(x) // world_size
        local = slice(rank * share, (rank + 1) * share)
        image, text = _features(weight, x[local], y[local])
        mine = captions[local] if captions is not None else None
        contrastive_loss(image, text, torch.tensor(10.0), gather=True, captions=mine).backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # what DDP does: average the gradients over ranks
        queue.put((rank, (grad / world_size).numpy()))
    finally:
        dist.destroy_process_group()


# name-less captions on both ranks fit images on the other rank: the tag targets span the gather
GATHER_CAPTIONS = ["a, x", "b, x", "x", "c, y", "y", "d, y", "e, x", "x, f"]


@pytest.mark.parametrize("captions", [None, GATHER_CAPTIONS], ids=["pairs", "tag_positives"])
def test_gather_gives_the_global_batch_gradient(captions):
    """Two gloo processes with half a batch each get the gradient of the loss over the whole batch."""
    generator = torch.Generator().manual_seed(0)
    x, y, weight = (torch.randn(s, generator=generator) for s in ((8, 6), (8, 6), (6, 6)))
    reference = weight.clone().requires_grad_(True)
    contrastive_loss(*_features(reference, x, y), torch.tensor(10.0), captions=captions).backward()
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(
        _gather_worker,
        args=(2, _free_port(), x, y, weight, captions, queue),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    results = dict(queue.get() for _ in range(2))
    for rank in range(2):
        torch.testing.assert_close(torch.from_numpy(results[rank]), reference.grad, rtol=1e-5, atol=1e-6)


def test_load_clip_reads_the_open_clip_layout(tmp_path):
    from safetensors.torch import save_file

    from latentforge.checkpoints.keymap_clip import ours_to_openclip

    clip: CLIPModel = _task().trainable().clip
    path = tmp_path / "open_clip.safetensors"
    converted = ours_to_openclip(clip.state_dict(), clip.config)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(path))
    with pytest.raises(ValueError, match="CLIPConfig"):
        load_clip(path)
    loaded = load_clip(path, clip.config)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_clip_sharing_its_text_tower_with_an_sd_checkpoint(tmp_path):
    from dataclasses import replace

    from latentforge.checkpoints.exports import save_clip_sharing_text
    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.model import StableDiffusion
    from latentforge.models.families import TINY

    clip: CLIPModel = _task().trainable().clip
    family = replace(TINY, text_encoder=replace(clip.config.text, projection_dim=None))
    sd = StableDiffusion.from_family(TINY)
    text = {k: v for k, v in clip.text.state_dict().items() if not k.startswith("text_projection.")}
    checkpoint = tmp_path / "model.safetensors"
    save_single_file(checkpoint, sd.unet.state_dict(), sd.vae.state_dict(), text, family, dtype=torch.float16)

    path = tmp_path / "clip.safetensors"
    save_clip_sharing_text(clip, path, checkpoint, torch.float16)
    stored, metadata = read_state_dict(path)
    assert metadata["latentforge.text_tower_from"] == "model.safetensors"
    assert not any(k.startswith("text.text_model.") for k in stored)
    assert "text.text_projection.weight" in stored
    loaded = load_clip(path)
    expected = {k: v.half() for k, v in clip.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())

    other = CLIPModel(clip.config)  # a different text tower cannot be stored against this checkpoint
    with pytest.raises(ValueError, match="not this CLIP's text tower"):
        save_clip_sharing_text(other, tmp_path / "other.safetensors", checkpoint, torch.float16)
    checkpoint.unlink()
    with pytest.raises(Exception, match="model.safetensors"):
        load_clip(path)
