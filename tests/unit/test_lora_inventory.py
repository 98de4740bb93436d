"""Every module a real kohya SD1.5/SD2 LoRA (and LoCon) names lands on a parameter of our full-size model.

Names come from diffusers' `UNet2DConditionModel` and a transformers `CLIPTextModel` built on `meta` (the
modules kohya's `networks/lora.py` walks: `Transformer2DModel` Linear and 1x1 conv layers, plus
`ResnetBlock2D`/`Downsample2D`/`Upsample2D` for LoCon), not from our key map, so the test is independent.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from latentforge.checkpoints.keymap_unet import diffusers_config
from latentforge.checkpoints.lora import UNET, _lookup_tables, _split_key
from latentforge.model import StableDiffusion
from latentforge.models.families import SD1, SD2
from references import transformers_text_config


def _kohya_names(family):  # noqa: ANN001, ANN202
    """(kohya module name, weight shape) for U-Net attention, LoCon and text-encoder modules."""
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_config(family.unet))
        text = CLIPTextModel(transformers_text_config(family.text_encoder))
    attention, locon, te = {}, {}, {}
    for owner, module in unet.named_modules():
        kind = type(module).__name__
        if kind not in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            continue
        for child, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                name = "lora_unet_" + f"{owner}.{child}".replace(".", "_")
                (attention if kind == "Transformer2DModel" else locon)[name] = layer.weight.shape
    for name, layer in text.named_modules():
        if isinstance(layer, torch.nn.Linear) and ".layers." in name:
            te["lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")] = (
                layer.weight.shape
            )
    return attention, locon, te


@pytest.mark.parametrize("family", [SD1, SD2], ids=lambda f: f.name)
def test_every_kohya_module_maps_to_our_parameter(family):
    model = StableDiffusion.from_family(family, device="meta")
    attention, locon, te = _kohya_names(family)
    if family is SD1:  # the counts sd-scripts prints for an SD1.5 LoRA ("create LoRA for U-Net: 192 modules")
        assert (len(attention), len(te)) == (192, 72)
    tables = _lookup_tables(family, {n.rsplit(".", 1)[0] for n, _ in model.text_encoder.named_parameters()})
    params = {
        UNET: dict(model.unet.named_parameters()),
        "text_encoder": dict(model.text_encoder.named_parameters()),
    }
    for name, shape in {**attention, **locon, **te}.items():
        component, source, factor = _split_key(f"{name}.lora_down.weight")
        assert factor == "lora_down.weight"
        ours = tables[component].get(source)
        assert ours is not None, name
        weight = params[component][f"{ours}.weight"]
        assert weight.numel() == shape.numel() and weight.shape[0] == shape[0], (name, weight.shape, shape)
