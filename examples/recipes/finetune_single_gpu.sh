#!/usr/bin/env bash
# Diverse-ViT fine-tuning on one GPU: facebook/deit-small-patch16-224 (ImageNet-1k pretrained, a plain ViT
# checkpoint) fine-tuned on the `beans` Hub dataset (3 leaf-disease classes, ~1,000 training images, ~130
# validation images, ~180 MB download) with every Diverse-ViT regularizer at its released coefficient.
#
# Reproduces: nothing from the paper (which trains from scratch on ImageNet); this is the small, quick recipe to
#   check a set-up end to end and the template for fine-tuning on your own data (swap --dataset_name for another
#   Hub image dataset, or use --train_dir/--validation_dir for a local image folder). No accuracy is claimed here.
# Hardware: one CUDA GPU (fp16 autocast, as DeiT); batch 64 at 224 px needs a few GB.
# Time: a few minutes for 10 epochs (~170 optimizer steps) on a recent GPU (estimate, not measured).
#
# Recipe: lr 5e-5 (no --scale_lr: fine-tuning), weight decay 0.05, DeiT's schedule shape (cosine_warmup_with_min_lr:
#   1 warm-up epoch from 1e-6 = 0.02 x 5e-5, floor 1e-5, DeiT main.py's --warmup-lr / --min-lr), no gradient
#   clipping, label smoothing 0.1, Mixup/CutMix on (run_diverse.py defaults), DeiT's timm augmentation, no
#   stochastic depth, fp16 autocast (DeiT's precision). The classifier is re-initialised for the dataset's classes
#   (--ignore_mismatched_sizes, the default).
#
# Environment overrides (defaults in brackets):
#   MODEL [facebook/deit-small-patch16-224], DATASET [beans], OUTPUT_DIR [outputs/deit-small-beans-diverse],
#   ACCELERATE_CONFIG [examples/recipes/accelerate/single_gpu.yaml]. Pick the GPU with CUDA_VISIBLE_DEVICES.
# Extra arguments are passed on to run_diverse.py (e.g. --num_train_epochs 3, --push_to_hub).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # repository root

MODEL="${MODEL:-facebook/deit-small-patch16-224}"
DATASET="${DATASET:-beans}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/deit-small-beans-diverse}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-examples/recipes/accelerate/single_gpu.yaml}"

accelerate launch --config_file "$ACCELERATE_CONFIG" examples/run_diverse.py \
    --model_name_or_path "$MODEL" \
    --dataset_name "$DATASET" \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 10 \
    --per_device_train_batch_size 64 \
    --per_device_eval_batch_size 128 \
    --learning_rate 5e-5 \
    --weight_decay 0.05 \
    --lr_scheduler_type cosine_warmup_with_min_lr \
    --lr_scheduler_kwargs '{"min_lr": 1e-5, "warmup_lr_rate": 0.02}' \
    --warmup_epochs 1 \
    --max_grad_norm 0 \
    --label_smoothing_factor 0.1 \
    --augmentation deit \
    --patch_cosine_coef 0.5 \
    --patch_contrastive_coef 0.5 \
    --attention_cosine_coef 1e-4 \
    --weight_condition_coef 5e-4 \
    --fp16 \
    --eval_strategy epoch \
    --save_strategy epoch \
    --save_total_limit 2 \
    --logging_steps 10 \
    --dataloader_num_workers 4 \
    --report_to tensorboard \
    --seed 42 \
    "$@"
