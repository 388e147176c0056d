#!/usr/bin/env bash
# Train one parameter-equal preset of the sigma-MoE paper's settings (docs/methods.md §4) with fairseq-train.
#   configs/fairseq/train_preset.sh SETTING KIND DATA_BIN SAVE_DIR [more fairseq-train flags]
# SETTING: wt103_small | wt103_big | enwik8 | ptb_tiny      KIND: dense | fff | sigma_moe | pkm
# DATA_BIN: from `fff-moe prepare-ptb --out DIR --train ... --valid ... --test ... [--tokenizer sentencepiece]`.
# Optimiser as in the paper: AdamW, lr 2.5e-4, cosine decay over 100k updates. On GPUs add
# `--distributed-world-size N` (fairseq spawns one process per GPU); on CPUs use `fff-moe cpu-ranks -n N -- ...`
# with these flags minus --cpu.
set -euo pipefail
setting=$1 kind=$2 data=$3 save=$4
shift 4
case "$setting" in
  wt103_small) context=256 ;;
  wt103_big|enwik8) context=512 ;;
  ptb_tiny) context=128 ;;
  *) echo "unknown setting $setting: wt103_small | wt103_big | enwik8 | ptb_tiny" >&2; exit 2 ;;
esac
case "$kind" in dense|fff|sigma_moe|pkm) ;; *) echo "unknown kind $kind: dense | fff | sigma_moe | pkm" >&2; exit 2 ;; esac
cpu=(); python -c "import torch, sys; sys.exit(torch.cuda.is_available())" && cpu=(--cpu)
exec fairseq-train "$data" --user-dir "$(fff-moe user-dir)" --task language_modeling \
  --arch "transformer_lm_${kind}_${setting}" --criterion cross_entropy_fff \
  --tokens-per-sample "$context" --sample-break-mode none --max-tokens 8192 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --weight-decay 0.01 --lr 2.5e-4 \
  --lr-scheduler cosine --warmup-updates 4000 --max-update 100000 --clip-norm 0.25 \
  --save-dir "$save" --save-interval-updates 2000 --keep-interval-updates 2 "${cpu[@]}" "$@"
