#!/usr/bin/env bash
# Reproduce the embedded default model from nothing: emoji data from npm, then CLIP, VAE, U-Net and a
# decoder fine-tune of the VAE (encoder frozen, so the U-Net's latents stay valid).
# Every stage resumes from its last checkpoint when re-run, so run this again after an interruption.
#   bash scripts/train_default_model.sh [DATA_DIR] [RUNS_DIR]        the first edition (v1, 2026-12-03)
#   bash scripts/train_default_model.sh v2 [DATA_DIR] [RUNS_DIR]     the second edition (U-Net step 11000,
#                                                                    then a 3000-step cool-down: v2.1;
#                                                                    then increments from the shipped file)
#   bash scripts/train_default_model.sh v3 [DATA_DIR] [RUNS_DIR]     the third edition, in progress: v2's
#                                                                    first stage, CLIP v3 (tag positives,
#                                                                    free-form captions), stage 3 from step 0
#                                                                    with dropout on its text tower, or from
#                                                                    the step a session committed
# v1: CLIP and VAE are independent and may run at the same time (one core each: OMP_NUM_THREADS=1).
# v2 runs for many CPU-hours on one core, a session at a time: start it as
#   OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 setsid nohup nice -n 5 bash scripts/train_default_model.sh v2 \
#     DATA RUNS >> RUNS/recipe.log 2>&1 &
# and start the same command again in the next session; each stage continues exactly where it stopped
# (keep DATA and RUNS the same strings: they are part of what a resume checks). The ledger in
# docs/default-model.md records each session's steps and held-out numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=v1
if [ "${1:-}" = v2 ] || [ "${1:-}" = v3 ]; then RECIPE=$1; shift; fi
DATA=${1:-data/emoji}
RUNS=${2:-runs/default}
PY=${PYTHON:-python}
[ -f "$DATA/dataset.json" ] || "$PY" -m latentforge data emoji "$DATA"

if [ "$RECIPE" = v1 ]; then
  "$PY" -m latentforge train clip configs/default/clip.toml task_options.data="$DATA" run_dir="$RUNS/clip"
  "$PY" -m latentforge train vae configs/default/vae.toml task_options.data="$DATA" run_dir="$RUNS/vae"
  "$PY" -m latentforge train unet configs/default/unet.toml task_options.data="$DATA" run_dir="$RUNS/unet" \
    task_options.vae="$RUNS/vae/final.safetensors" \
    task_options.text_encoder="$RUNS/clip/final.text_encoder.safetensors" task_options.cache_dir="$RUNS/cache"
  "$PY" -m latentforge train vae configs/default/vae_decoder.toml task_options.data="$DATA" \
    run_dir="$RUNS/vae_decoder" task_options.init="$RUNS/vae/final.safetensors"
  "$PY" scripts/ship_default_model.py "$RUNS" --vae "$RUNS/vae_decoder/final.safetensors"  # into the package
  exit 0
fi

# A session's machine does not always keep RUNS: each finished stage's result is committed under
# artefacts/default-v2/STAGE/ (artefacts/default-v3/ for the third edition's) and copied back instead of
# training the stage again.
ART=artefacts/default-v2
restore() {  # restore STAGE FILE...: true (and RUNS/STAGE filled) when every FILE is in RUNS or ART
  local stage=$1 f; shift
  for f in "$@"; do [ -f "$RUNS/$stage/$f" ] || [ -f "$ART/$stage/$f" ] || return 1; done
  mkdir -p "$RUNS/$stage"
  for f in "$@"; do [ -f "$RUNS/$stage/$f" ] || cp "$ART/$stage/$f" "$RUNS/$stage/$f"; done
}
write_text_encoder() {  # write_text_encoder STAGE: RUNS/STAGE's text tower (fp32) from its whole CLIP file
  [ -f "$RUNS/$1/final.text_encoder.safetensors" ] || "$PY" -c "import sys, torch
from latentforge.checkpoints.exports import load_clip, save_text_encoder as save
save(load_clip(sys.argv[1]).text, sys.argv[2], dtype=torch.float32)" "$RUNS/$1/final.safetensors" \
    "$RUNS/$1/final.text_encoder.safetensors"
}

# v2, stage 1: the first stage, f = 4 with 8 latent channels (fixes the U-Net's latent space).
restore vae final.safetensors ||
  "$PY" -m latentforge train vae configs/default/vae_v2.toml task_options.data="$DATA" run_dir="$RUNS/vae"
# Stage 2: CLIP on the training images with extra captions (name-less, short names); holdout unchanged.
[ -d "$DATA-clip/train" ] || "$PY" -c "import sys; from latentforge.data.emoji import write_caption_variants as w
print(w(sys.argv[1], sys.argv[2]))" "$DATA" "$DATA-clip"
# (committed as fp16 with both towers; the text tower the U-Net stage reads is written from it)
restore clip final.safetensors ||
  "$PY" -m latentforge train clip configs/default/clip_v2.toml task_options.train_data="$DATA-clip/train" \
    task_options.holdout_data="$DATA/holdout" run_dir="$RUNS/clip"
write_text_encoder clip
free_form_data() {  # DATA-free: DATA-clip's captions plus the free-form ones ("apple", "apple, google style")
  [ -d "$DATA-free/train" ] || "$PY" -c "import sys; from latentforge.data.emoji import write_caption_variants as w
print(w(sys.argv[1], sys.argv[2], free_form=True))" "$DATA" "$DATA-free"
}
SHIPPED=src/latentforge/assets/latentforge-emoji.safetensors
if [ "$RECIPE" = v3 ]; then
  # The third edition's CLIP: clip_v2.toml with tag positives, trained on the free-form captions as well
  # (its config says why), committed as fp16 with both towers like v2's.
  free_form_data
  ART=artefacts/default-v3 restore clip_v3 final.safetensors ||
    "$PY" -m latentforge train clip configs/default/clip_v3.toml task_options.train_data="$DATA-free/train" \
      task_options.holdout_data="$DATA/holdout" run_dir="$RUNS/clip_v3"
  write_text_encoder clip_v3
  # Stage 3 of the third edition: stage 3's config with dropout 0.1 in every ResBlock, from step 0 on CLIP
  # v3's text tower and the same captions (40000 steps planned at a constant LR after warm-up: every
  # checkpoint is a usable model). Nothing of it ships yet (docs/default-model.md, "Third edition").
  # Sessions' machines do not keep RUNS, so a session ends by committing the step it reached, the run's own
  # export (U-Net EMA, its VAE, CLIP v3's text tower; fp16), as the one file of $INC_ART/ named by the
  # total step (step-NNNNNNN.safetensors). Without RUNS/unet_v3 the next machine continues from that file
  # (unet_v3_free_form.toml: fresh optimizer, 100 warm-up steps, EMA from the initial weights) in a run
  # named by the file's hash, seeded by its step so the data order differs; its step s is total step
  # NNNNNNN + s. Only the first session trains from step 0.
  INC_ART=artefacts/default-v3/unet_v3
  FROM=$(ls "$INC_ART"/step-*.safetensors 2>/dev/null | sort | tail -n 1 || true)
  if [ -d "$RUNS/unet_v3" ] || [ -z "$FROM" ]; then
    RUN="$RUNS/unet_v3"
    "$PY" -m latentforge train unet configs/default/unet_v2.toml task_options.dropout=0.1 \
      task_options.train_data="$DATA-free/train" task_options.holdout_data="$DATA/holdout" \
      run_dir="$RUN" task_options.vae="$RUNS/vae/final.safetensors" \
      task_options.text_encoder="$RUNS/clip_v3/final.text_encoder.safetensors" task_options.cache_dir="$RUNS/cache"
  else
    TOTAL=$(basename "$FROM" .safetensors); TOTAL=$((10#${TOTAL#step-}))
    RUN="$RUNS/unet_v3_from_$(sha256sum "$FROM" | cut -c1-8)"
    "$PY" -m latentforge train unet configs/default/unet_v3_free_form.toml task_options.init="$FROM" \
      seed="$TOTAL" task_options.train_data="$DATA-free/train" task_options.holdout_data="$DATA/holdout" \
      run_dir="$RUN" task_options.cache_dir="$RUNS/cache"
  fi
  echo "measure a step N while it trains: $PY scripts/export_checkpoint.py $RUN --step N --vae $SHIPPED --out EXPORT"
  echo "  then $PY scripts/default_model_card.py --model EXPORT --data $DATA --out CARD_DIR"
  echo "carry step N to the next machine: git rm $INC_ART/step-*.safetensors; $PY scripts/export_checkpoint.py \\"
  echo "  $RUN --step N --out $INC_ART/step-TOTAL.safetensors  (TOTAL: N plus the step it started from, 7 digits)"
  exit 0
fi
# Stage 3: the U-Net on the same caption variants, from step 0 at a constant LR (40000 steps planned);
# `python scripts/export_checkpoint.py RUNS/unet --eval` exports and measures the newest checkpoint while
# it runs. The v2 U-Net is its step 11000 (held-out error turns up after it). It runs when RUNS/unet
# exists (a surviving run resumes) or FROM_SCRATCH=1 is set (reproducing v2 from nothing), unless
# INCREMENT names an increment config (below).
if [ -z "${INCREMENT:-}" ] && { [ -d "$RUNS/unet" ] || [ "${FROM_SCRATCH:-0}" = 1 ]; }; then
  "$PY" -m latentforge train unet configs/default/unet_v2.toml task_options.train_data="$DATA-clip/train" \
    task_options.holdout_data="$DATA/holdout" run_dir="$RUNS/unet" \
    task_options.vae="$RUNS/vae/final.safetensors" \
    task_options.text_encoder="$RUNS/clip/final.text_encoder.safetensors" task_options.cache_dir="$RUNS/cache"
else
  # Stage 3, increment: on a machine without that run, continue from the shipped weights instead of
  # step 0 (a warm restart, cosine to zero, one session on one core). The run is named after the config
  # and the shipped file's hash: it resumes while that file is shipped; shipping its result (the card
  # decides) makes the next increment start from there. INCREMENT=unet_v2_increment made v2.1 from v2
  # (ship step 11000 with stage 4's decoder as printed at the end, then run this with it); the default,
  # unet_v2_free_form, trains the shipped model on the captions a person types too ("apple").
  INCREMENT=${INCREMENT:-unet_v2_free_form}
  TRAIN="$DATA-clip/train"
  if [ "$INCREMENT" = unet_v2_free_form ]; then
    TRAIN="$DATA-free/train"
    free_form_data
  fi
  INC="$RUNS/${INCREMENT}_$(sha256sum "$SHIPPED" | cut -c1-8)"
  "$PY" -m latentforge train unet "configs/default/$INCREMENT.toml" \
    task_options.init="$SHIPPED" task_options.train_data="$TRAIN" \
    task_options.holdout_data="$DATA/holdout" run_dir="$INC" task_options.cache_dir="$RUNS/cache"
  echo "increment done: $INC/final.safetensors is a whole model (U-Net, shipped VAE and text tower); compare:"
  echo "  $PY scripts/default_model_card.py --model $INC/final.safetensors --data $DATA --out CARD_DIR"
  echo "  then $PY scripts/ship_default_model.py $RUNS --unet $INC/final.safetensors  (it has the shipped VAE)"
  exit 0
fi
# Stage 4: decoder fine-tune (encoder frozen: the U-Net's latents stay valid).
"$PY" -m latentforge train vae configs/default/vae_decoder_v2.toml task_options.data="$DATA" \
  run_dir="$RUNS/vae_decoder" task_options.init="$RUNS/vae/final.safetensors"
# (Stage 4b, the same with latent-noise augmentation, was measured and not shipped: its config says why.)
# Shipping replaces the package's model: only after the card's held-out table shows the new one ahead.
echo "v2 trained; compare with scripts/default_model_card.py, then:"
echo "  $PY scripts/ship_default_model.py $RUNS --vae $RUNS/vae_decoder/final.safetensors"
echo "  (an earlier step: --unet EXPORT, from scripts/export_checkpoint.py $RUNS/unet --step N --out EXPORT)"
# The shipped tiny decoder (previews, --fast-decode) is distilled from the shipped VAE decoder (a model with
# another decoder does not attach it and warns at every load), and the canny ControlNet is trained against
# the shipped U-Net: shipping a new decoder or U-Net step includes retraining both from the shipped file
# (a ControlNet ships only if `scripts/controlnet_demo.py evaluate` scores it above the shipped one: v2's
# stayed with v2.1, docs/controlnet.md).
echo "and its tiny decoder (src/latentforge/assets/latentforge-emoji.safetensors is then the new one):"
echo "  $PY -m latentforge train taesd configs/perf/taesd.toml task_options.data=$DATA run_dir=$RUNS/taesd"
echo "  $PY scripts/ship_taesd.py $RUNS/taesd/final.safetensors"
echo "and its canny ControlNet (docs/controlnet.md; it copies the U-Net's encoder):"
echo "  $PY -m latentforge train controlnet configs/controlnet/emoji-canny.toml task_options.data=$DATA run_dir=$RUNS/cn"
echo "  $PY scripts/controlnet_demo.py ship $RUNS/cn/final.safetensors"
