"""Trainable LoRA layers: no-op at init, exact detach, targets, kohya names, dropouts only in training."""

import pytest
import torch

from latentforge.models.configs import TextEncoderConfig, UNetConfig
from latentforge.models.lora_layers import LoRANetwork, LoRASpec, text_targets, unet_targets
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.unet import UNetModel

CONFIG = UNetConfig(model_channels=16, norm_groups=8, context_dim=16, attention_levels=(1,), num_heads=2)


DEFAULT = LoRASpec()


def _network(spec: LoRASpec = DEFAULT, targets=("attention", "feed_forward", "conv")):
    unet = UNetModel(CONFIG).requires_grad_(False)
    text = CLIPTextModel(TextEncoderConfig(width=16, layers=1, heads=2, mlp_width=32)).requires_grad_(False)
    layers = unet_targets(unet, targets)
    return LoRANetwork(unet, text, layers, text_targets(text, ["text_attention", "text_mlp"]), spec), unet


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 16, generator=g)


def test_targets_and_kohya_names():
    network, unet = _network()
    names = set(network.adapters)
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_middle_block_1_proj_out" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # LoCon 3x3
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2" in names
    attention_only, _ = _network(targets=("attention",))
    assert not any("ff_net" in n or "in_layers" in n for n in attention_only.adapters)
    assert set(network.state_dict()) == {
        f"adapters.{n}.{k}" for n in names for k in ("lora_down.weight", "lora_up.weight", "alpha")
    }


def test_new_adapters_change_nothing_and_detach_is_exact():
    network, unet = _network(LoRASpec(rank=2, alpha=4))
    x, t, c = _inputs()
    network.detach()
    with torch.no_grad():
        base = unet(x, t, c)
    network.attach()
    with torch.no_grad():
        torch.testing.assert_close(network(x, t, c), base, rtol=0, atol=0)  # up = 0 at init
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_()
        changed = network(x, t, c)
        assert (changed - base).abs().max() > 1e-3  # every kind of hook, proj_out included, is live
        network.detach()
        torch.testing.assert_close(unet(x, t, c), base, rtol=0, atol=0)


def test_proj_out_hook_runs():
    network, unet = _network(targets=("attention",))
    x, t, c = _inputs()
    with torch.no_grad():
        base = network(x, t, c)
        for name, adapter in network.adapters.items():
            if name.endswith("proj_out"):
                adapter.lora_up.weight.normal_()
        assert (network(x, t, c) - base).abs().max() > 1e-3


def test_dropouts_act_in_training_only():
    network, _ = _network(LoRASpec(rank=4, alpha=4, rank_dropout=0.5, module_dropout=0.5, dropout=0.3))
    x, t, c = _inputs()
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_()
        network.eval()
        assert torch.equal(network(x, t, c), network(x, t, c))
        network.train()
        torch.manual_seed(0)
        a = network(x, t, c)
        torch.manual_seed(1)
        b = network(x, t, c)
        torch.manual_seed(0)
        assert not torch.equal(a, b) and torch.equal(a, network(x, t, c))  # random, but from the global RNG


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_rank_dropout_keeps_the_expected_update(p):
    """kohya scales by 1 / (1 - p), so the mean update over masks equals the undropped one."""
    network, _ = _network(LoRASpec(rank=64, alpha=64, rank_dropout=p), targets=("attention",))
    adapter = next(a for n, a in network.adapters.items() if n.endswith("attn1_to_q"))
    with torch.no_grad():
        adapter.lora_up.weight.normal_()
        x = torch.randn(512, 1, adapter.lora_down.in_features)
        adapter.eval()
        full = adapter.delta(x)
        adapter.train()
        dropped = adapter.delta(x)
    torch.testing.assert_close(dropped.mean(0), full.mean(0), rtol=0.2, atol=0.2 * float(full.abs().mean()))
