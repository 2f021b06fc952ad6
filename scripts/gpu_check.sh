#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, sized to finish in about 11 minutes on one H100:
#   1. the `gpu`-marked tests (Triton kernel vs reference, ANN backends on CUDA tensors, ...)
#   2. the FAST-AR rollout benchmark with the default model for 3000 frames (the paper's protocol)
#   3. the same benchmark with a model shaped like Wan2.1-1.3B (configs/wan_1_3b_shape.yaml, random weights:
#      speed and memory only) for as many frames as fit; `dense` runs out of memory first, and bench.json /
#      bench.md then say at which frame it stopped.
#   4. the serving benchmark: 1 and then 8 simulated realtime players against `worldserve serve` on the GPU.
#   5. `worldserve train` on the GPU with configs/train_gpu.yaml's batch sizes for 100 + 200 steps: the speed of
#      both phases (train/log.jsonl) and a run that completes.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default: $OUT when set, else gpu_results/)
# Uses .venv/bin/python when it exists, else python3 (which must have torch with CUDA, triton, pydantic, pyyaml,
# safetensors, pillow, numpy, matplotlib, scikit-image, pytest and the server's packages: fastapi, uvicorn,
# websockets, msgpack, pydantic-settings, simplejpeg, prometheus-client).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
status=0

"$python" - <<'PY' || exit 1
import importlib, sys
import torch
modules = ("triton", "pydantic", "yaml", "safetensors", "PIL", "matplotlib", "skimage", "pytest", "fastapi",
           "uvicorn", "websockets", "msgpack", "pydantic_settings", "simplejpeg", "prometheus_client")
missing = [m for m in modules if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch")
print(f"gpu_check: torch {torch.__version__} on {torch.cuda.get_device_name()}")
PY

echo "== 1/5 gpu tests"
timeout 60 "$python" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.txt" || status=1

echo "== 2/5 rollout benchmark, default model, 3000 frames"
timeout 270 "$python" -m server.cli bench rollout --config configs/default.yaml --frames 3000 \
    --out "$out/default" || status=1

echo "== 3/5 rollout benchmark, Wan2.1-1.3B-shaped model (random weights)"
timeout 150 "$python" -m server.cli bench rollout --config configs/wan_1_3b_shape.yaml --frames 240 \
    --measure-frames 8 --out "$out/wan_1_3b_shape" || status=1

echo "== 4/5 serving benchmark, default model on cuda, 1 and 8 sessions"
for sessions in 1 8; do
    timeout 45 "$python" -m server.cli bench serve --sessions "$sessions" --seconds 8 --warmup 2 \
        --set runtime.device=cuda --out "$out/serve_$sessions" || status=1
done

echo "== 5/5 training on cuda: configs/train_gpu.yaml's batches, 100 autoencoder and 200 DiT steps"
sed -e 's/^pool_episodes: .*/pool_episodes: 64/' -e 's/^  steps: 20000$/  steps: 200/' \
    -e '0,/^  steps: 200$/s//  steps: 100/' configs/train_gpu.yaml > "$out/train_smoke.yaml"
timeout 150 "$python" -m server.cli train --config configs/default.yaml --train-config "$out/train_smoke.yaml" \
    --device cuda --out "$out/train" || status=1

echo "gpu_check: results in $out (exit $status)"
exit $status
