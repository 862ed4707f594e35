#!/usr/bin/env bash
# Rebuild every shipped artefact of the embedded model from scratch on a 2-core CPU (about six and a half hours):
# the model weights, the recordings of the 100 predictor-training prompts, the LESA predictors for N = 7 and 10,
# and the quality figures of the model cards. Run from the repository root inside the project's venv.
set -euo pipefail
export HF_HUB_OFFLINE=1

# 1. the shipped text-to-image model, in four runs (5.5 h on 2 cores in all; each run is resumable). train_model's
#    defaults are now one shorter run that scores higher (125.5 min, docs/embedded-one-run/), not shipped yet:
#      python -m lesa.embedded.train_model --out runs/embedded-2h --ship runs/embedded-2h/model --check-every 800 --bf16
#    a. 2,400 steps from scratch: logit-normal noise levels for the first 800 steps, then (resumed from that
#       checkpoint) uniform ones, which fixed layout; both runs share one lr schedule (102 min)
first=(--out runs/embedded --ship runs/embedded/model --steps 2400 --lr-min 1e-4 --object-weight 1 --check-every 400)
python -m lesa.embedded.train_model "${first[@]}" --timesteps logit-normal --stop-at 800
python -m lesa.embedded.train_model "${first[@]}" --timesteps uniform
#    b. 1,400 steps fine-tuning at a lower lr (68 min)
python -m lesa.embedded.train_model --init runs/embedded/model --out runs/embedded-ft --ship runs/embedded-ft/model \
  --steps 1400 --lr 3e-4 --lr-min 5e-5 --warmup 50 --object-weight 1 --check-every 350
#    c. 400 steps with the shape's pixels weighted 4x, bfloat16 autocast, constant lr (12 min)
python -m lesa.embedded.train_model --init runs/embedded-ft/model --out runs/embedded-shape --ship runs/embedded-shape/model \
  --steps 400 --lr 3e-4 --lr-min 3e-4 --warmup 20 --bf16 --object-weight 4 --check-every 100000
#    d. 4,000 steps the same way, cosine lr to 3e-5; writes the shipped weights (149 min)
python -m lesa.embedded.train_model --init runs/embedded-shape/model --out runs/embedded-long --steps 4000 --lr 3e-4 \
  --lr-min 3e-5 --warmup 50 --bf16 --object-weight 4 --check-every 500

# 2. trajectories of the 100 predictor-training prompts (disjoint from training captions and evaluation prompts)
lesa record --model embedded --prompts src/lesa/embedded/prompts/predictor_train.txt --out runs/rec-embedded --steps 50

# 3. one predictor per schedule (50 steps, E = 3): N = 7 -> 10 full steps (5.00x), N = 10 -> 8 full steps (6.25x),
#    with lesa train's default `calibrated` recipe (its schedule plan trains seed 0 on the uniform placement and on
#    one found by dynamic programming, and kept the latter at both N: 0-3, 7, 13, 21, 31, 38, 46 and 0-3, 9, 17, 29,
#    40; 15-20 min each on one thread); seed 0 is the default predictor, seed 1 the bench's second seed. N = 7 trains
#    at a lower closed-loop lr (3e-4: steadier across seeds on the held-out split, BENCHMARKS.md); the shipped N = 7
#    predictors were trained given the placement that the recipe's plan had kept at lr 1e-3 (the same one)
for n in 7 10; do
  lr=(); [ "$n" = 7 ] && lr=(--lr-clar 3e-4)
  for seed in 0 1; do
    name="n$n"; [ "$seed" = 1 ] && name="n$n-seed1"
    if [ "$seed" = 1 ]; then  # the same schedule settings: train on seed 0's kept placement only
      mkdir -p "runs/pred-$name" && cp "runs/pred-n$n/schedule.json" "runs/pred-$name/"
    fi
    lesa train --model embedded --data runs/rec-embedded --out "runs/pred-$name" --interval "$n" --warmup 3 \
      --batch-size 10 --seed "$seed" "${lr[@]}"
    mkdir -p "src/lesa/embedded/predictors/$name"
    cp "runs/pred-$name"/{config.json,model.safetensors,README.md,training_log.json} "src/lesa/embedded/predictors/$name/"
  done
done

# 4. prompt-following and PSNR against full compute on the 200 evaluation prompts
python benchmarks/embedded_quality.py --prompts src/lesa/embedded/prompts/eval.txt --baselines \
  --predictor src/lesa/embedded/predictors/n7 --predictor src/lesa/embedded/predictors/n10 --out runs/quality.json
