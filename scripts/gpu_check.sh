#!/usr/bin/env bash
# Every GPU check of the project in one run that ends within BUDGET_SECONDS (default 520 s, so that it fits the
# 10-minute calls of a lent GPU machine with room for its start):
#   1. the `gpu`-marked tests (Triton kernel vs reference at Wan shape, ANN backends on CUDA tensors), in the
#      background beside 2 (they check results, not speed)
#   2. fine-tunes of the shipped model on the GPU, side by side, one per training schedule named in RUNS (default:
#      train_predicted_passes_gpu and train_predicted_context_gpu, the recipes against long-rollout drift that only
#      ran at CPU scale, docs/training.md; train_previous_frame_gpu is the shipped weights' recipe;
#      configs/NAME.yaml). A short probe of each
#      (PROBE_STEPS, default 240) measures the step rate, and each run's dit.steps is then set so that it ends in
#      about TRAIN_SECONDS (default 300 s): its schedule (warm-up, cosine decay) is the config's, over those
#      steps. Weights: NAME/model.safetensors
#   3. the FAST-AR rollout benchmark of the default model on the GPU, ROLLOUT_FRAMES frames (default 1000)
#   4. the serving benchmark on the GPU: 1 and then 8 simulated realtime players against `worldserve serve`
#   5. the rollout benchmark of a model shaped like Wan2.1-1.3B (configs/wan_1_3b_shape.yaml, random weights: speed
#      and memory only) in the time that is left
# Each step runs under its own time limit; a step that fails is reported and the others still run.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default: gpu_results/)
# DEVICE=cpu (with small PROBE_STEPS, TRAIN_SECONDS, ROLLOUT_FRAMES, BUDGET_SECONDS) runs the same steps on a CPU:
# a dry run of this script, not a measurement.
# Uses .venv/bin/python when it exists, else python3 (which must have torch with CUDA, triton, pydantic, pyyaml,
# safetensors, pillow, numpy, matplotlib, scikit-image, tqdm, pytest, pytest-asyncio, pytest-timeout and the
# server's packages: fastapi with its opentelemetry-api, uvicorn, websockets, msgpack, pydantic-settings,
# simplejpeg, prometheus-client).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${BUDGET_SECONDS:-520}))
train_seconds=${TRAIN_SECONDS:-300}
probe_steps=${PROBE_STEPS:-240}
device=${DEVICE:-cuda}
export TRAIN_SECONDS=$train_seconds PROBE_STEPS=$probe_steps
runs=${RUNS:-train_predicted_passes_gpu train_predicted_context_gpu}
mkdir -p "$out"
status=0

left() { echo $((deadline - SECONDS)); }

"$python" - <<'PY' || exit 1
import importlib, sys
import torch
modules = ("triton", "pydantic", "yaml", "safetensors", "PIL", "matplotlib", "skimage", "tqdm", "pytest",
           "pytest_asyncio", "pytest_timeout", "fastapi", "uvicorn", "websockets", "msgpack", "pydantic_settings",
           "simplejpeg", "prometheus_client", "opentelemetry")
missing = [m for m in modules if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
cuda = __import__("os").environ.get("DEVICE", "cuda") == "cuda"
if cuda and not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch")
name = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
print(f"gpu_check: torch {torch.__version__} on {name}, {torch.get_num_threads()} threads")
PY

echo "== 1/5 gpu tests (background; faiss-gpu is not installed here, so its case is left out)"
timeout 200 "$python" -m pytest -m gpu -q -p no:cacheprovider -k "not faiss" \
    tests/engine/test_ann.py tests/engine/kernels/test_block_sparse.py > "$out/gpu_tests.txt" 2>&1 &
tests=$!

echo "== 2/5 fine-tuning the shipped model on $device: probe, then ${train_seconds} s runs of $runs"
# One thread per training process on a GPU: its CPU work is the sampling loop; the episode workers take the other cores.
[ "$device" = cuda ] && export OMP_NUM_THREADS=1
pids=()
for run in $runs; do
    sed -e 's/^pool_episodes: .*/pool_episodes: 32/' -e "s/^log_every: .*/log_every: $((probe_steps / 6))/" \
        "configs/$run.yaml" > "$out/probe_$run.yaml"
    timeout 150 "$python" -m server.cli train --device "$device" --init-from models/default.safetensors \
        --train-config "$out/probe_$run.yaml" --max-steps "$probe_steps" --out "$out/probe_$run" \
        > "$out/probe_$run.txt" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
steps=$("$python" - "$out" $runs <<'PY'
import json, os, sys
out, runs = sys.argv[1], sys.argv[2:]
seconds, total = float(os.environ["TRAIN_SECONDS"]), int(os.environ["PROBE_STEPS"])
rates = []
for run in runs:
    log = {e["step"]: e["minutes"] for e in map(json.loads, open(f"{out}/probe_{run}/log.jsonl")) if "loss" in e}
    first = total // 3  # the steps before it warm up kernels and caches
    rates.append((total - first) / (60 * (log[total] - log[first])))
    print(f"probe {run}: {rates[-1]:.2f} steps/s", file=sys.stderr)
# 40 s of each run go to start-up and the pool; 5 % margin for checkpoints and the sampling loop's jitter
print(int(min(rates) * (seconds - 40) * 0.95))
PY
) || { echo "gpu_check: the training probe failed (see $out/probe_*.txt)"; tail -n 20 "$out"/probe_*.txt; status=1; }
if [ -n "${steps:-}" ]; then
    echo "dit.steps = $steps for each run"
    pids=()
    for run in $runs; do
        "$python" -c "import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); c['dit']['steps'] = int(sys.argv[2]); \
yaml.safe_dump(c, open(sys.argv[3], 'w'), sort_keys=False)" "configs/$run.yaml" "$steps" "$out/$run.yaml"
        timeout $((train_seconds + 60)) "$python" -m server.cli train --device "$device" \
            --init-from models/default.safetensors --train-config "$out/$run.yaml" \
            --max-minutes "$(awk "BEGIN { print ($train_seconds + 20) / 60 }")" --out "$out/$run" > "$out/$run.txt" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    for run in $runs; do
        tail -n 3 "$out/$run.txt"
        tail -n 1 "$out/$run/log.jsonl" || status=1
    done
fi
unset OMP_NUM_THREADS
wait "$tests" || status=1
tail -n 5 "$out/gpu_tests.txt"

echo "== 3/5 rollout benchmark, default model on $device, ${ROLLOUT_FRAMES:-1000} frames ($(left) s left)"
timeout "$(( $(left) < 100 ? $(left) : 100 ))" "$python" -m server.cli bench rollout --config configs/default.yaml \
    --frames "${ROLLOUT_FRAMES:-1000}" --set runtime.device="$device" --out "$out/rollout_default" || status=1

echo "== 4/5 serving benchmark, default model on $device, 1 and 8 sessions ($(left) s left)"
for sessions in 1 8; do
    [ "$(left)" -gt 30 ] || { echo "skipped: out of time"; status=1; break; }
    timeout 40 "$python" -m server.cli bench serve --sessions "$sessions" --seconds 8 --warmup 2 \
        --set runtime.device="$device" --out "$out/serve_$sessions" || status=1
done

echo "== 5/5 rollout benchmark, Wan2.1-1.3B-shaped model (random weights) ($(left) s left)"
if [ "$(left)" -gt 45 ]; then
    timeout "$(( $(left) - 5 ))" "$python" -m server.cli bench rollout --config configs/wan_1_3b_shape.yaml \
        --frames 240 --measure-frames 8 --set runtime.device="$device" --out "$out/wan_1_3b_shape" || status=1
else
    echo "skipped: out of time"
fi

echo "gpu_check: results in $out (exit $status)"
exit $status
