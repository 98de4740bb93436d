"""The metadata keys of the `.safetensors` files latentforge writes (each value is JSON or a name)."""

METADATA_FAMILY = "latentforge.family"  # a whole SD model: the ModelFamily
METADATA_VAE_CONFIG = "latentforge.vae_config"
METADATA_CLIP_CONFIG = "latentforge.clip_config"
METADATA_TEXT_CONFIG = "latentforge.text_encoder_config"
METADATA_COMPONENT = "latentforge.component"  # "vae", "clip" or "text_encoder"
# A CLIP file without its text transformer names the SD single file beside it that holds that transformer
# (the embedded default model and its CLIP share one text tower; storing it once saves 32 MB).
METADATA_TEXT_TOWER_FROM = "latentforge.text_tower_from"
