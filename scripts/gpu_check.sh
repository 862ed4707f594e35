#!/bin/bash
# One prepared CUDA/bf16 check of record -> train -> generate (and bench) on tiny pipelines of the real classes.
# Needs lesa installed (pip install -e .) and a CUDA build of torch; writes its images to $OUT (default ./gpu-check).
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
W=/tmp/w; mkdir -p $W
for i in $(seq 0 11); do echo "a test prompt number $i"; done > $W/p.txt
printf 'an evaluation prompt\nanother evaluation prompt\n' > $W/e.txt
step() { local name=$1; shift; local t0=$SECONDS; "$@" > $W/$name.log 2>&1; local rc=$?;
  printf '%-24s rc=%d %4ds | %s\n' "$name" $rc $((SECONDS - t0)) "$(tail -n 1 $W/$name.log | cut -c1-230)"; }
L="python3 -m lesa"
G="--device cuda --dtype bfloat16"
step flux-record $L record --model tiny-random-flux $G --prompts $W/p.txt --out $W/rec --steps 50 --height 64 --width 64
step flux-train $L train $G --data $W/rec --out $W/pred --set epochs_gt=2 --set epochs_clar=2 --batch-size 4 --set kan_hidden=32,32
for c in none fora taylorseer lesa; do
  step flux-gen-$c $L generate --model tiny-random-flux $G --prompt x --out $OUT/flux-$c.png --cache $c --predictor $W/pred --height 64 --width 64 --json
done
step flux-gen-lesa-offload $L generate --model tiny-random-flux $G --cpu-offload --prompt x --out $W/o.png --cache lesa --predictor $W/pred --height 64 --width 64 --json
Q="--height 32 --width 32 --negative-prompt blurry --true-cfg-scale 4"
step qwen-record $L record --model tiny-random-qwenimage $G --prompts $W/p.txt --out $W/recq --steps 20 $Q
step qwen-train $L train $G --data $W/recq --out $W/predq --interval 4 --warmup 2 --set epochs_gt=1 --set epochs_clar=1 --batch-size 4 --set kan_hidden=8
step qwen-gen $L generate --model tiny-random-qwenimage $G --prompt "a cat" --out $W/q.png --predictor $W/predq --steps 20 $Q --json
V="--height 16 --width 16 --num-frames 5"
step hv-record $L record --model tiny-random-hunyuanvideo $G --prompts $W/p.txt --out $W/rech --steps 10 $V
step hv-train $L train $G --data $W/rech --out $W/predh --interval 3 --warmup 1 --set epochs_gt=1 --set epochs_clar=1 --batch-size 4 --set kan_hidden=8
step hv-gen-gif $L generate --model tiny-random-hunyuanvideo $G --prompt "a cat" --out $OUT/hv.gif --predictor $W/predh --steps 10 $V --json
step hv-gen-mp4 $L generate --model tiny-random-hunyuanvideo $G --prompt "a cat" --out $W/hv.mp4 --predictor $W/predh --steps 10 $V --json
step flux-bench $L bench --model tiny-random-flux $G --prompts $W/e.txt --out $W/bench --predictor $W/pred --fit-data $W/rec --height 64 --width 64 --search-prompts 2 --search-iterations 6 --repeats 2 --timing-prompts 2
cp $W/bench/results.md $OUT/bench-results.md 2>/dev/null
python3 -c "import json; print(json.load(open('$W/pred/training_log.json'))['config'])" 2>&1 | cut -c1-300
