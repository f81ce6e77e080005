#!/usr/bin/env bash
# The reference speedrun on 8 GPUs: PRX part 2's baseline recipe (REFERENCE section 3) at 256 px on Flux latents.
# Not yet run on GPUs: no time or FID is claimed for it. The clock is train.py's training
# time; data preparation and the reference statistics happen once, before it.
set -euo pipefail
DATA=${DATA:-data/mj}
RUN=${RUN:-runs/speedrun-$(date +%Y%m%d-%H%M%S)}

[ -f "$DATA/index.json" ] || torchrun --nproc_per_node=8 prepare.py --out "$DATA"  # Flux VAE + T5Gemma, once
[ -f "$DATA/ref.npz" ] || torchrun --nproc_per_node=8 eval.py ref --data "$DATA" --num-samples 10000 --out "$DATA/ref.npz"
[ -f "$DATA/ref-2k.npz" ] || torchrun --nproc_per_node=8 eval.py ref --data "$DATA" --num-samples 2048 --metrics fid \
    --out "$DATA/ref-2k.npz"

torchrun --nproc_per_node=8 train.py --data "$DATA" --model small --resolution 256 --batch-size 256 --micro-batch 32 \
    --compile --max-steps 100000 --eval-every 10000 --eval-samples 2048 --eval-ref "$DATA/ref-2k.npz" --out "$RUN" "$@"
torchrun --nproc_per_node=8 eval.py --ckpt "$RUN" --ref "$DATA/ref.npz" --num-samples 10000 --steps 50 --cfg-scale 3.5
