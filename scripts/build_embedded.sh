#!/usr/bin/env bash
# Rebuild every shipped artefact of the embedded model from scratch on a 2-core CPU (about four hours): the model
# weights, the recordings of the 100 predictor-training prompts and of 100 validation prompts at 20, 28 and 50 steps,
# the schedule-free LESA predictor, and the acceptance benchmark. Run from the repository root inside the project's
# venv. The format-1 predictors shipped until 2026-12-07 (n7, n10 and their seed-1 pairs) came from
# `git show 6db00e2:scripts/build_embedded.sh`.
set -euo pipefail
export HF_HUB_OFFLINE=1

# 1. the text-to-image model: one run of train_model's defaults from scratch (6,400 steps, 125.5 min on 2 cores with
#    --bf16; resumable). The weights shipped until 2026-11-28 came from a chain of four runs (5.5 h):
#    `git show d696207:scripts/build_embedded.sh`.
#    Writes the EMA weights into the package's model folder (`--ship`'s default).
python -m lesa.embedded.train_model --out runs/embedded-2h --bf16

# 2. trajectories of the 100 predictor-training prompts (disjoint from training captions and evaluation prompts) at
#    three step counts: a closed-loop rollout at 20 steps is scored against the 20-step sampler's own result, which a
#    50-step recording does not hold (`python benchmarks/schedule_free.py --discretisation runs/rec-20 runs/rec-28
#    runs/rec-50`: 39.4 dB final-latent PSNR between 20 and 50 steps, the size of the errors being trained away)
for steps in 20 28 50; do
  lesa record --model embedded --prompts src/lesa/embedded/prompts/predictor_train.txt --out runs/rec-$steps --steps $steps
done

# 2b. the validation prompts: each of the 20 held-out scenes of lesa train's split (--set val_fraction=0.2 of the 100
#     prompts), captioned afresh 5 times (seed i for line i), none verbatim a recorded prompt; and their
#     trajectories at the same step counts, which lesa train validates on (about 5 min)
python benchmarks/validation_prompts.py --out runs/val_prompts.txt --per-prompt 5
for steps in 20 28 50; do
  lesa record --model embedded --prompts runs/val_prompts.txt --out runs/val-$steps --steps $steps
done

# 3. the schedule-free predictor (format 2): one predictor for every step count and budget, trained over the three
#    recordings x budgets 2.5, 4, 5, 6.25 (at least 4 full steps) x placements, selected on 20 validation
#    trajectories per cell; seed 0 ships, seed 1 is the bench's second seed (12 closed-loop epochs: about 70 min each,
#    the two seeds side by side on 2 cores; the first shipped pair had 6, `--set epochs_clar=6`)
for seed in 0 1; do
  OMP_NUM_THREADS=1 lesa train --model embedded --recipe schedule-free --data runs/rec-20 --data runs/rec-28 \
    --data runs/rec-50 --val-data runs/val-20 --val-data runs/val-28 --val-data runs/val-50 --set val_fraction=0.2 \
    --batch-size 10 --set val_limit=20 --set seed=$seed --out runs/sf-seed$seed
done
mkdir -p src/lesa/embedded/predictors/schedule-free
cp runs/sf-seed0/{config.json,model.safetensors,README.md,training_log.json} src/lesa/embedded/predictors/schedule-free/

# 4. the acceptance benchmark (BENCHMARKS.md): every steps x speed-up cell on the 200 evaluation prompts (about 1.2 h
#    at 20 steps, 1.4 h at 28 and 2.6 h at 50 on one thread beside another; the committed files are two halves of 100)
for steps in 20 28 50; do
  OMP_NUM_THREADS=1 lesa bench --model embedded --prompts src/lesa/embedded/prompts/eval.txt \
    --steps $steps --speedups 2.5,4,5,6.25 --predictor runs/sf-seed0 --predictor runs/sf-seed1 \
    --methods lesa,fora,fora-corrected,taylorseer-damped,taylorseer-damped-corrected,linear \
    --fit-data runs/rec-$steps --timing-prompts 1 --repeats 1 --out runs/bench-sf-$steps
done
python benchmarks/schedule_free.py runs/bench-sf-{20,28,50}/results.json --v1 5=40.80 --v1 6.25=34.12
