#!/usr/bin/env bash
# A second GPU call, after a change to the server: rebuild bge-large (fp32 + fp16), measure what a batch
# shape's first run costs (benchmarks.gpu_shapes), then benchmarks.serve --device cuda with ours beside the
# naive FastAPI + runtime.Embedder fp16 server. The onnxruntime-gpu parts must be in /tmp/ortgpu (NOTES.md).
# Usage there:  bash benchmarks/gpu_serve_session.sh "$OUT" [CALL_SECONDS]
set -uo pipefail
out=${1:?usage: gpu_serve_session.sh OUT [CALL_SECONDS]}
budget=${2:-370}
mkdir -p "$out"
exec > >(tee -a "$out/log") 2>&1
if [ -f .ortgpu/part-04 ] && [ ! -f /tmp/ortgpu/part-04 ]; then cp .ortgpu/part-04 /tmp/ortgpu/; fi
bash /tmp/ortgpu/install.sh || { echo "onnxruntime-gpu install failed"; exit 3; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-serve .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
fi
export PYTHONPATH=/tmp/site:/tmp/site-serve:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
w=/tmp/gpu-work
python3 - <<PY || { echo "build/export failed"; exit 4; }
from pathlib import Path
from benchmarks.gpu import INSTRUCTION
from export.architectures import materialise
from export.cli import main
ckpt = materialise("bge-large-zh", Path("$w/checkpoint"), seed=0)
raise SystemExit(main(["--model", str(ckpt), "--out", "$w/artifact", "--precision", "fp32,fp16",
                       "--query-instruction", INSTRUCTION]))
PY
echo "exported at ${SECONDS}s"
timeout 90 python3 -m benchmarks.gpu_shapes --artifact $w/artifact --shapes 30 --out "$out"
echo "gpu_shapes exit $? at ${SECONDS}s"
left=$((budget - SECONDS - 10))
timeout "$left" python3 -m benchmarks.serve --device cuda --artifact $w/artifact --checkpoint $w/checkpoint \
  --model-arch bge-large-zh --mix query --servers ours,naive-ours --threads 4 --slo-ms 100 --start-rate 40 \
  --duration 10 --max-steps 6 --drain 1 --out "$out"
echo "benchmarks.serve exit $? at ${SECONDS}s"
tar czf "$out/serve-logs.tgz" -C benchmarks/results/cache serve-logs 2>/dev/null || true
