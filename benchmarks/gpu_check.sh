#!/usr/bin/env bash
# The CUDA check, run on a GPU machine (see README "GPU"): installs onnxruntime-gpu from
# wheels or an unpacked tree, runs the CUDA test and the GPU benchmark.
#   ORT_TREE=/tmp/ort WHEELS=.whl benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-/tmp/gpu-check}
mkdir -p "$out" /tmp/site
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
fi
if [ -n "${ORT_TREE:-}" ]; then
  cp -r "$ORT_TREE"/. /tmp/site/
fi
export PYTHONPATH=/tmp/site:$PWD
# CUDA 13 / cuDNN 9 libraries from the machine's nvidia-* Python packages
libs=$(python3 - <<'PY'
import glob, os, site, sys
dirs = set()
for base in site.getsitepackages() + [p for p in sys.path if p.endswith("site-packages")]:
    dirs.update(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
    dirs.update(glob.glob(os.path.join(base, "nvidia", "cu13", "lib")))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$out/gpu.txt"
export AUTOEMBED_CACHE_DIR=/tmp/ae-cache AUTOEMBED_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pytest tests/test_cuda.py -q -rs -s -p no:cacheprovider -o addopts="" 2>&1 | tail -15 | tee "$out/pytest.txt"
python3 benchmarks/bench_engine.py --device cuda --texts 2000 --json "$out/bench.json" 2>&1 | grep -v -i warn | tee "$out/bench.txt"
