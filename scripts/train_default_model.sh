#!/usr/bin/env bash
# Reproduce the embedded default model from nothing: emoji data from npm, then CLIP, VAE, U-Net and a
# decoder fine-tune of the VAE (encoder frozen, so the U-Net's latents stay valid).
# Every stage resumes from its last checkpoint when re-run, so run this again after an interruption.
#   bash scripts/train_default_model.sh [DATA_DIR] [RUNS_DIR]
# CLIP and VAE are independent and may run at the same time (one core each: OMP_NUM_THREADS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/emoji}
RUNS=${2:-runs/default}
PY=${PYTHON:-python}
[ -f "$DATA/dataset.json" ] || "$PY" -m latentforge data emoji "$DATA"
"$PY" -m latentforge train clip configs/default/clip.toml task_options.data="$DATA" run_dir="$RUNS/clip"
"$PY" -m latentforge train vae configs/default/vae.toml task_options.data="$DATA" run_dir="$RUNS/vae"
"$PY" -m latentforge train unet configs/default/unet.toml task_options.data="$DATA" run_dir="$RUNS/unet" \
  task_options.vae="$RUNS/vae/final.safetensors" \
  task_options.text_encoder="$RUNS/clip/final.text_encoder.safetensors" task_options.cache_dir="$RUNS/cache"
"$PY" -m latentforge train vae configs/default/vae_decoder.toml task_options.data="$DATA" \
  run_dir="$RUNS/vae_decoder" task_options.init="$RUNS/vae/final.safetensors"
"$PY" scripts/ship_default_model.py "$RUNS" --vae "$RUNS/vae_decoder/final.safetensors"  # into the package
