"""Contract tests of the U-Net on tiny configs: shapes, original key names, determinism, gradients,
strict save/load, reduced precision, gradient checkpointing, and full size on `meta`.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentforge.models import unet as unet_module
from latentforge.models.configs import UNetConfig
from latentforge.models.families import SD1_UNET, SD2_UNET
from latentforge.models.unet import UNetModel, timestep_embedding

CONFIG = UNetConfig(channel_mult=(1, 2, 2), attention_levels=(0, 2), num_heads=2, context_dim=24)
LINEAR = UNetConfig(num_heads=None, head_dim=16, use_linear_proj=True, transformer_depth=2, norm_groups=8)


def _inputs(config: UNetConfig, height: int = 8, width: int = 12, batch: int = 2):
    x = torch.randn(batch, config.in_channels, height, width)
    timesteps = torch.linspace(999.0, 1.5, batch)
    return x, timesteps, torch.randn(batch, 5, config.context_dim)


@pytest.mark.parametrize("size", [(4, 4), (8, 12), (20, 8)])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(size, batch):
    model = UNetModel(CONFIG).eval()
    x, timesteps, context = _inputs(CONFIG, *size, batch=batch)
    with torch.no_grad():
        assert model(x, timesteps, context).shape == (batch, CONFIG.out_channels, *size)


def test_original_checkpoint_key_names():
    with torch.device("meta"):
        keys = set(UNetModel(SD1_UNET).state_dict())
    for key in (
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.bias",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "middle_block.2.out_layers.0.bias",
        "output_blocks.2.1.conv.weight",  # no attention at the deepest level: Upsample at index 1
        "output_blocks.5.2.conv.weight",
        "out.0.weight",
        "out.2.bias",
    ):
        assert key in keys, key
    assert len(keys) == 686  # the U-Net tensor count of an SD 1.5 checkpoint
    assert "input_blocks.1.0.skip_connection.weight" not in keys  # 320 -> 320: Identity


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        sd1, sd2 = UNetModel(SD1_UNET), UNetModel(SD2_UNET)
    assert sum(p.numel() for p in sd1.parameters()) == 859_520_964
    assert sum(p.numel() for p in sd2.parameters()) == 865_910_724
    assert sd2.input_blocks[1][1].proj_in.weight.shape == (320, 320)  # SD 2.x: Linear projection
    assert sd2.middle_block[1].transformer_blocks[0].attn1.heads == 20  # head width 64 at 1280


def test_meta_forward_infers_shapes():
    with torch.device("meta"):
        model = UNetModel(SD1_UNET)
        out = model(torch.empty(2, 4, 64, 96), torch.empty(2), torch.empty(2, 77, 768))
    assert out.shape == (2, 4, 64, 96) and out.is_meta


@pytest.mark.parametrize("size", [(8, 10), (9, 7), (5, 5)])
def test_any_latent_size(size):
    model = UNetModel(CONFIG).eval()
    x, timesteps, context = _inputs(CONFIG, *size)
    with torch.no_grad():
        assert model(x, timesteps, context).shape == x.shape


def test_deterministic_and_scalar_timestep():
    model = UNetModel(CONFIG).eval()
    x, _, context = _inputs(CONFIG)
    with torch.no_grad():
        first = model(x, 500.5, context)
        assert torch.equal(first, model(x, torch.tensor([500.5, 500.5]), context))
        assert torch.equal(first, model(x, torch.tensor(500.5), context))
        assert not torch.allclose(first, model(x, 500.0, context))  # fractional t matters


def test_timestep_embedding_is_cos_then_sin():
    embedding = timestep_embedding(torch.tensor([0.0, 3.0]), 6)
    assert torch.equal(embedding[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert torch.allclose(embedding[1, 0], torch.cos(torch.tensor(3.0)))
    assert torch.allclose(embedding[1, 3], torch.sin(torch.tensor(3.0)))


@pytest.mark.parametrize("config", [CONFIG, LINEAR], ids=["conv-proj", "linear-proj"])
def test_gradients_reach_every_parameter(config):
    model = UNetModel(config)
    x, timesteps, context = _inputs(config)
    model(x, timesteps, context).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_inference_path_equals_autograd_path(monkeypatch):
    """No-grad forward (chunked, in-place feed-forward) computes the same function as the autograd one."""
    monkeypatch.setattr(unet_module, "FF_CHUNK_ROWS", 5)
    model = UNetModel(LINEAR)
    x, timesteps, context = _inputs(LINEAR)
    with torch.no_grad():
        fast = model(x, timesteps, context)
    reference = model(x, timesteps, context)
    assert reference.requires_grad
    assert torch.allclose(fast, reference, atol=1e-5 * reference.abs().max().item())


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    model = UNetModel(LINEAR)
    x, timesteps, context = _inputs(LINEAR)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        xi = x.clone().requires_grad_()
        model(xi, timesteps, context).square().mean().backward()
        grads.append([xi.grad, *(p.grad.clone() for p in model.parameters())])
    for plain, checkpointed in zip(*grads, strict=True):
        assert torch.allclose(plain, checkpointed, atol=1e-6, rtol=1e-5)
    blocks = len(model.input_blocks) + 1 + len(model.output_blocks)
    assert len(calls) == blocks and all(not kwargs["use_reentrant"] for kwargs in calls)


def test_strict_save_load_round_trip(tmp_path):
    model = UNetModel(CONFIG).eval()
    path = tmp_path / "unet.safetensors"
    save_file(model.state_dict(), path)
    torch.manual_seed(1)
    loaded = UNetModel(CONFIG).eval()
    loaded.load_state_dict(load_file(path), strict=True)
    x, timesteps, context = _inputs(CONFIG)
    with torch.no_grad():
        assert torch.equal(model(x, timesteps, context), loaded(x, timesteps, context))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_forward(dtype):
    model = UNetModel(CONFIG).eval()
    x, timesteps, context = _inputs(CONFIG)
    with torch.no_grad():
        expected = model(x, timesteps, context)
        out = model.to(dtype)(x.to(dtype), timesteps, context.to(dtype))
    assert out.dtype == dtype and out.isfinite().all()
    assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_timestep_count_must_match_the_batch():
    model = UNetModel(CONFIG)
    x, _, context = _inputs(CONFIG, batch=3)
    with pytest.raises(ValueError, match="2 timesteps for a batch of 3"):
        model(x, torch.tensor([1.0, 2.0]), context)
