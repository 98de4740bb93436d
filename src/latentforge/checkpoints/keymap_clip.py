"""A whole open_clip / OpenAI CLIP state dict <-> our `CLIPModel` keys.

The image tower keeps open_clip's names (`visual.*`), so only the text tower is renamed, through
`keymap_text`; `logit_scale` is a scalar in both.
"""

from __future__ import annotations

from latentforge.checkpoints import keymap_text
from latentforge.checkpoints.reading import StateDict
from latentforge.models.clip import CLIPConfig


def openclip_to_ours(state_dict: StateDict, config: CLIPConfig) -> StateDict:
    """open_clip's `CLIP` layout (`visual.*`, text keys, `logit_scale`) -> CLIPModel keys."""
    visual = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    text = {k: v for k, v in state_dict.items() if not k.startswith("visual.") and k != "logit_scale"}
    if "logit_scale" not in state_dict:
        raise KeyError("openclip_to_ours: missing key 'logit_scale'")
    out = dict(visual)
    out.update({f"text.{k}": v for k, v in keymap_text.openclip_to_ours(text, config.text).items()})
    out["logit_scale"] = state_dict["logit_scale"].reshape(())
    return out


def ours_to_openclip(state_dict: StateDict, config: CLIPConfig) -> StateDict:
    """CLIPModel keys -> open_clip's `CLIP` layout (the inverse of `openclip_to_ours`)."""
    text = {k.removeprefix("text."): v for k, v in state_dict.items() if k.startswith("text.")}
    out = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    out.update(keymap_text.ours_to_openclip(text, config.text, logit_scale=None))
    out["logit_scale"] = state_dict["logit_scale"]
    return out
