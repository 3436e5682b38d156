#!/usr/bin/env bash
# Everything a lent GPU machine (the `device` tool) runs, in ONE call, after the onnxruntime-gpu parts
# reached /tmp/ortgpu (benchmarks/NOTES.md, "GPU run"):
#   1. onnxruntime-gpu into /tmp/site (../shared/device/ort-gpu-install.sh, carried as .ortgpu/install.sh);
#      the serving extras that machine lacks, from wheels carried in .whl/ (starlette, uvicorn, fastapi, ...);
#   2. python -m benchmarks.gpu: FP16 check against the FP32 reference, PyTorch FP16 vs ours, profile;
#   3. python -m benchmarks.gpu_shapes: what a batch shape's first run costs, per arena/warm-up choice;
#   4. python -m benchmarks.serve --device cuda on the artifact step 2 kept: runtime.serve against the naive
#      FastAPI servers (sentence-transformers FP16; runtime.Embedder FP16), open loop, with the time left.
# Usage there:  bash benchmarks/gpu_session.sh "$OUT" [CALL_SECONDS]   (CALL_SECONDS: the run's timeout_s)
# Never drive the export from standard input (`python3 - <<EOF`): its large-model steps run in spawned
# children, which re-import the main module; a session lost its GPU time that way (now an error, not a hang).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT [CALL_SECONDS]}
budget=${2:-540}
mkdir -p "$out"
exec > >(tee -a "$out/log") 2>&1
if [ -f .ortgpu/part-04 ] && [ ! -f /tmp/ortgpu/part-04 ]; then cp .ortgpu/part-04 /tmp/ortgpu/; fi
bash /tmp/ortgpu/install.sh || { echo "onnxruntime-gpu install failed"; exit 3; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-serve .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
fi
export PYTHONPATH=/tmp/site:/tmp/site-serve:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, transformers, onnxruntime as o; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ort', o.__version__)"

timeout $((budget - SECONDS - 150)) python3 -m benchmarks.gpu --out "$out" --keep /tmp/gpu-work
echo "benchmarks.gpu exit $? at ${SECONDS}s"

if [ -d /tmp/gpu-work/artifact ]; then
  timeout 90 python3 -m benchmarks.gpu_shapes --artifact /tmp/gpu-work/artifact --shapes 30 --out "$out"
  echo "benchmarks.gpu_shapes exit $? at ${SECONDS}s"
fi

left=$((budget - SECONDS - 15))
if [ -d /tmp/gpu-work/artifact ] && [ "$left" -gt 90 ]; then
  timeout "$left" python3 -m benchmarks.serve --device cuda --artifact /tmp/gpu-work/artifact \
    --checkpoint /tmp/gpu-work/checkpoint --model-arch bge-large-zh --mix query --servers ours,naive-st-torch,naive-ours \
    --threads 4 --slo-ms 100 --start-rate 50 --duration 10 --max-steps 7 --drain 1 --out "$out"
  echo "benchmarks.serve exit $? at ${SECONDS}s"
else
  echo "no time left for the serving run (${left}s)"
fi
# at most 8 files come back: the shape probe and the servers' logs travel as one archive
tar czf "$out/extra.tgz" -C "$PWD/benchmarks/results/cache" serve-logs -C "$out" $(cd "$out" && ls gpu-shapes.* 2>/dev/null) \
  && rm -f "$out"/gpu-shapes.* || true
