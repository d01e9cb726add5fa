#!/usr/bin/env bash
# One short lease of a GPU machine, as one command: train the policy on a game's expert play (Breakout by
# default) on the GPU (the recipe of docs/policy.md's CPU runs with a larger batch; variants side by side), play each
# run closed-loop (one CPU process per episode, seeds 0..EPISODES-1), then measure training and
# labeling throughput (benchmarks/bench_train.py, bench_label.py --device cuda). Each stage has its
# own time limit, so a slow stage cuts the benchmarks, never the training.
#
#   OUT=out bash experiments/gpu_breakout.sh
#   OUT=out VARIANTS="plain context2" TRAIN_MINUTES=6 DEADLINE=560 SKIP_BENCH=1 bash experiments/gpu_breakout.sh
#   OUT=out VARIANTS=plain TRAIN_MINUTES=4 DAGGER_MINUTES=2 SKIP_BENCH=1 bash experiments/gpu_breakout.sh  # + DAgger
#   OUT=out VARIANTS=fused2 TRAIN_MINUTES=3 DAGGER_MINUTES=1 DAGGER_ROUNDS=3 PLAY_START= ... # 3 rounds, only the last played
#   OUT=out/pong GAME=Pong DATA=.devdata/pong_expert VARIANTS=fused2 EPISODES=0 SKIP_BENCH=1 bash experiments/gpu_breakout.sh
#     (EPISODES=0: train only, and play the runs elsewhere; two such calls with their own OUT can share a machine)
#
# Expects chunk stores in DATA (default .devdata/expert_breakout and .devdata/breakout_more, from
# `walkthrough record --game Breakout --player expert`, seeds 0 and 1000) and, where the machine's
# Python lacks them, $WHEELS (default .whl/) with wheels of av, gymnasium, ale-py and farama-notifications. Everything
# lands in $OUT: log.txt, play.json and per run its config, EMA weights and metrics. The settings
# below are environment variables; tests/test_experiments.py runs it on the test preset.
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
TRAIN_MINUTES=${TRAIN_MINUTES:-4}
PLAY_SECONDS=${PLAY_SECONDS:-180}
DEADLINE=${DEADLINE:-570}  # seconds from the start; later stages are skipped past it
LABEL_DEVICE=${LABEL_DEVICE-cuda}  # empty: skip the labeling benchmark
BENCH_TRAIN_ARGS=${BENCH_TRAIN_ARGS:-}
WORKERS=${WORKERS:-6}  # loader workers per training run
PRESET=${PRESET:-cpu}
GAME=${GAME:-Breakout}  # the game played
WHEELS=${WHEELS:-.whl}
BATCH=${BATCH:-256}
DATA=${DATA:-.devdata/expert_breakout .devdata/breakout_more}  # chunk stores to train on
EPISODES=${EPISODES:-10}  # played per run
SKIP_BENCH=${SKIP_BENCH:-}  # non-empty: no benchmarks
EVAL_EVERY=${EVAL_EVERY:-1000}
DAGGER_MINUTES=${DAGGER_MINUTES:-}  # non-empty: after play, DAgger rounds per run (play --relabel, then train on)
DAGGER_ROUNDS=${DAGGER_ROUNDS:-1}
ROUND_OVERHEAD=${ROUND_OVERHEAD:-90}  # seconds a DAgger round takes beyond its training: rollouts, loading, validation
PLAY_START=${PLAY_START-1}  # empty: the trained runs are not played before DAgger (only its last round's are)
ROLLOUTS=${ROLLOUTS:-16}  # episodes per run relabelled for DAgger
TMP=${WORK:-$(mktemp -d)}  # runs and plays
mkdir -p "$TMP"
# the CPU recipe; with augmentation; with the previous frame too (the ball's direction)
# the same with the frames stacked in each patch (early fusion);
# and "continue": the recipe from the weights in $INIT_FROM (an earlier lease's run: config.json + ema.safetensors)
declare -A VARIANT_ARGS=([plain]="--no-augment" [augment]="--augment" [context2]="--no-augment --context-frames 2"
                         [fused2]="--no-augment --context-frames 2 --fuse-frames"
                         [continue]="--no-augment --init-from ${INIT_FROM:-.devdata/init}")
declare -A RUNS
for name in ${VARIANTS:-plain augment}; do RUNS[$name]=${VARIANT_ARGS[$name]}; done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if [ -d "$WHEELS" ] && [ -z "${SKIP_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
export PY
wt() { exec $PY -c 'import sys; sys.argv[0] = "walkthrough"; from walkthrough.cli import main; main()' "$@"; }
export -f wt
left() { echo $((DEADLINE - SECONDS)); }

{
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
echo "cpus $(nproc)"
$PY -c "import torch, transformers, av, ale_py, gymnasium; print('torch', torch.__version__, 'transformers', transformers.__version__, 'av', av.__version__, 'ale_py', ale_py.__version__, 'cuda', torch.cuda.is_available())"
$PY - <<'PYTHON'  # the policy's batched SigLIP 2 path against transformers' own forward, on this machine's versions
import torch
from walkthrough.policy import PRESETS, Policy, PolicyConfig, patchify
device = "cuda" if torch.cuda.is_available() else "cpu"
for size in (128, 160):
    policy = Policy(PolicyConfig(**{**PRESETS["cpu"], "image_size": size})).to(device)
    patches = patchify(torch.rand(4, 3, size, size, device=device) * 2 - 1, 16)
    side = torch.tensor([[size // 16] * 2] * 4, device=device)
    theirs = policy.vision(pixel_values=patches, pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long,
                           device=device), spatial_shapes=side).last_hidden_state
    print(f"vision_tokens at {size} px: max |ours - transformers| = "
          f"{(policy.vision_tokens(patches, size // 16) - theirs).abs().max().item():.2e}")
PYTHON

echo "== train: runs ${!RUNS[*]} side by side, $TRAIN_MINUTES min of training time each"
for name in "${!RUNS[@]}"; do
    timeout $(( $(left) - 90 )) bash -c "wt train-policy $(printf -- '--data %s ' $DATA) --out $TMP/$name --preset $PRESET --batch-size $BATCH --lr 1e-3 --no-bf16 \
        --steps 100000 --budget-minutes $TRAIN_MINUTES --eval-every $EVAL_EVERY --ckpt-every $EVAL_EVERY --log-every 100 \
        --num-workers $WORKERS ${RUNS[$name]}" > $TMP/$name.log 2>&1 &
done
wait
# collect RUN: its config, EMA weights and metrics into $OUT/RUN, and its validation into the log
collect() {
    echo "-- $1, done at ${SECONDS}s"; tail -n 5 $TMP/$1.log; grep '"val"' $TMP/$1/metrics.jsonl
    mkdir -p "$OUT/$1"; cp $TMP/$1/config.json $TMP/$1/ema.safetensors $TMP/$1/metrics.jsonl "$OUT/$1/"
}
for name in "${!RUNS[@]}"; do collect $name; done

# play_runs FIRST_SEED COUNT RELABEL RUN...: each run plays COUNT $GAME episodes, one single-threaded
# process each, into $TMP/play_RUN; RELABEL=1: rollouts instead, into $TMP/rollouts_RUN, and their
# screens labelled by the scripted expert into the chunk store $TMP/dagger_RUN
play_runs() {
    local first=$1 count=$2 relabel=$3 extra folder; shift 3
    for name in "$@"; do
        extra=""; folder=$TMP/play_$name
        [ "$relabel" = 1 ] && extra="--relabel $TMP/dagger_$name" && folder=$TMP/rollouts_$name
        for i in $(seq 0 $((count - 1))); do
            OMP_NUM_THREADS=1 timeout $(( $(left) - 40 )) bash -c "wt play --ckpt $TMP/$name --game $GAME --episodes 1 \
                --seed $((first + i)) --sample-steps 4 --max-seconds $PLAY_SECONDS --videos 0 $extra \
                --out $folder/s$((first + i))" > $folder.$i.log 2>&1 &
        done
    done
    wait
}
# summarise KIND RUN...: the scores of their plays (KIND play) or rollouts (KIND rollouts), merged into
# $OUT/play.json under RUN resp. "RUN rollouts"
summarise() {
$PY - "$TMP" "$OUT/play.json" "$GAME" "$@" <<'PYTHON'
import json, sys
from pathlib import Path
import numpy as np
out, kind = Path(sys.argv[2]), sys.argv[4]
summary = json.loads(out.read_text()) if out.exists() else {}
for name in sys.argv[5:]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1], f"{kind}_{name}").glob("s*/scores.json"))]
    episodes = [e for r in runs for e in r["episodes"]]
    scores = np.array([e["score"] for e in episodes])
    agreement = [r["expert_agreement"] for r in runs if r.get("expert_agreement") is not None]
    key = name if kind == "play" else f"{name} {kind}"
    summary[key] = {"episodes": episodes, "mean": float(scores.mean()) if len(scores) else None,
                    "std": float(scores.std()) if len(scores) else None,
                    "expert_agreement": float(np.mean(agreement)) if agreement else None,
                    "chunk_latency_ms": [r["chunk_latency_ms"] for r in runs]}
    print(f"{key}: {sys.argv[3]} {summary[key]['mean']} +- {summary[key]['std']} over {len(scores)} episodes, "
          f"agreement with the expert {summary[key]['expert_agreement']}")
out.write_text(json.dumps(summary, indent=1))
PYTHON
}

if [ "$EPISODES" -gt 0 ] && [ -n "$PLAY_START" ]; then
    echo "== play: $EPISODES $GAME episodes per run, one process each, K = 4, re-plan every 2 (play's default)"
    play_runs 0 "$EPISODES" 0 "${!RUNS[@]}"
    summarise play "${!RUNS[@]}"
    echo "play done at ${SECONDS}s"
fi

if [ -n "$DAGGER_MINUTES" ]; then
    echo "== DAgger: up to $DAGGER_ROUNDS rounds; each: $ROLLOUTS episodes per run relabelled by the expert, then" \
         "$DAGGER_MINUTES min more on DATA + every round's relabelled episodes; runs RUN-d1, RUN-d2, ..."
    declare -A CURRENT AGGREGATE  # per variant: its latest run, and the --data of every round's rollouts
    for name in "${!RUNS[@]}"; do CURRENT[$name]=$name; AGGREGATE[$name]=""; done
    for round in $(seq 1 $DAGGER_ROUNDS); do
        # a round whose training could not finish before the deadline would leave no weights: stop
        [ "$(left)" -lt "$($PY -c "print(int($DAGGER_MINUTES * 60 + $ROUND_OVERHEAD))")" ] && \
            echo "no time for round $round at ${SECONDS}s" && break
        play_runs $((100 + (round - 1) * ROLLOUTS)) "$ROLLOUTS" 1 "${CURRENT[@]}"
        summarise rollouts "${CURRENT[@]}"
        for name in "${!RUNS[@]}"; do
            from=${CURRENT[$name]}; AGGREGATE[$name]+=" --data $TMP/dagger_$from"
            timeout $(( $(left) - 30 )) bash -c "wt train-policy $(printf -- '--data %s ' $DATA) ${AGGREGATE[$name]} \
                --init-from $TMP/$from --out $TMP/$name-d$round --preset $PRESET --batch-size $BATCH --lr 3e-4 --warmup-steps 50 \
                --no-bf16 --steps 100000 --budget-minutes $DAGGER_MINUTES --eval-every $EVAL_EVERY --ckpt-every $EVAL_EVERY \
                --log-every 100 --num-workers $WORKERS ${RUNS[$name]%%--init-from*}" > $TMP/$name-d$round.log 2>&1 &
        done
        wait
        for name in "${!RUNS[@]}"; do CURRENT[$name]=$name-d$round; collect $name-d$round; done
    done
    if [ "$EPISODES" -gt 0 ]; then
        play_runs 0 "$EPISODES" 0 "${CURRENT[@]}"
        summarise play "${CURRENT[@]}"
    fi
    echo "DAgger done at ${SECONDS}s"
fi

echo "== bench_train"
[ -z "$SKIP_BENCH" ] && [ "$(left)" -gt 25 ] && timeout $(( $(left) - 15 )) $PY benchmarks/bench_train.py --steps 8 --rounds 2 $BENCH_TRAIN_ARGS
echo "== bench_train --compile (the small models, which a GPU runs launch-bound)"
[ -z "$SKIP_BENCH" ] && [ "$(left)" -gt 90 ] && timeout $(( $(left) - 60 )) $PY benchmarks/bench_train.py --compile \
    --steps 8 --rounds 2 --models policy-cpu,idm-cpu
echo "== bench_label (cpu-preset IDM on ${LABEL_DEVICE:-no device: skipped})"
[ -z "$SKIP_BENCH" ] && [ -n "$LABEL_DEVICE" ] && [ "$(left)" -gt 20 ] && timeout $(( $(left) - 5 )) $PY benchmarks/bench_label.py --device $LABEL_DEVICE --seconds 10 \
    --file-minutes 0.5 --minutes
echo "== done at ${SECONDS}s"
} 2>&1 | tee "$OUT/log.txt"
