"""Our trainable LoRA/LoCon adapters against PEFT's `LoraConfig` on a tiny U-Net: same init, forward,
backward and one AdamW step agree to 1e-5."""

import copy
import re

import pytest
import torch

from latentforge.models.configs import UNetConfig
from latentforge.models.lora_layers import LoRANetwork, LoRASpec, kohya_name, unet_targets
from latentforge.models.unet import UNetModel

peft = pytest.importorskip("peft")

CONFIG = UNetConfig(model_channels=16, norm_groups=8, context_dim=16, attention_levels=(1,), num_heads=2)
RANK, ALPHA = 4, 6.0


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 16, generator=g)


def test_lora_forward_backward_and_step_match_peft():
    torch.manual_seed(0)
    ours_unet = UNetModel(CONFIG).requires_grad_(False)
    theirs_unet = copy.deepcopy(ours_unet)
    # proj_out is read as a weight by our U-Net's fast path, so PEFT's module swap would not reach it there;
    # every other layer kind (Linear attention/FF, 3x3/1x1/strided convs) is compared.
    layers = {n: m for n, m in unet_targets(ours_unet, ["attention", "feed_forward", "conv"]).items()}
    layers = {n: m for n, m in layers.items() if not n.endswith("proj_out")}
    assert any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in layers.values())
    assert any(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in layers.values())
    network = LoRANetwork(ours_unet, None, layers, {}, LoRASpec(rank=RANK, alpha=ALPHA))
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules="^(" + "|".join(re.escape(n) for n in layers) + ")$",
        lora_dropout=0.0,
    )
    theirs = peft.inject_adapter_in_model(config, theirs_unet)
    # The same (non-zero) factors on both sides, so gradients reach down and up.
    g = torch.Generator().manual_seed(2)
    pairs = []
    for name in layers:
        adapter = network.adapters[kohya_name("unet", name)]
        with torch.no_grad():
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g) * 0.1)
        peft_layer = theirs.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(adapter.lora_down.weight)
            peft_layer.lora_B["default"].weight.copy_(adapter.lora_up.weight)
        pairs += [
            (adapter.lora_down.weight, peft_layer.lora_A["default"].weight),
            (adapter.lora_up.weight, peft_layer.lora_B["default"].weight),
        ]
    assert len(pairs) == 2 * len(layers)
    x, t, context = _inputs()
    ours_out, theirs_out = network(x, t, context), theirs(x, t, context)
    network.detach()
    with torch.no_grad():
        assert (ours_out - ours_unet(x, t, context)).abs().max() > 1e-3  # the adapters do change the output
    network.attach()
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)
    ours_out.square().mean().backward()
    theirs_out.square().mean().backward()
    for a, b in pairs:
        assert a.grad is not None and a.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    ours_opt = torch.optim.AdamW([a for a, _ in pairs], lr=1e-2)
    theirs_opt = torch.optim.AdamW([b for _, b in pairs], lr=1e-2)
    ours_opt.step()
    theirs_opt.step()
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(network(x, t, context), theirs(x, t, context), rtol=1e-5, atol=1e-5)
