#!/usr/bin/env bash
# The CUDA check, run on a GPU machine (see README "GPU"): installs onnxruntime-gpu, runs
# the GPU benchmarks (the previous engine's first when BASELINE is given, then this one's,
# on the same machine in the same call) and the CUDA tests.
#
#   ORT_TREE=/tmp/ort | ORT_PARTS=/tmp/parts  WHEELS=.whl  BASELINE=.bench/baseline \
#     BENCH_ARGS=--skip-breakdown  benchmarks/gpu_check.sh OUT_DIR
#
# onnxruntime-gpu comes as an unpacked tree (ORT_TREE), as the parts of a split `tar | xz`
# of one (ORT_PARTS: part-aa, part-ab, ... and optionally SHA256 holding the archive's
# sha256), or as wheels in WHEELS with the small test dependencies (psycopg, tenacity,
# pytest-asyncio). BASELINE is a directory holding an earlier commit's worker/, benchmarks/
# and tests/data/ with an `autoembed -> worker` link (git archive COMMIT worker benchmarks
# tests | tar -x; ln -s worker autoembed).
set -uo pipefail
out=${1:-/tmp/gpu-check}
root=$PWD
mkdir -p "$out" /tmp/site /tmp/pkgs
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
fi
if [ -n "${ORT_TREE:-}" ]; then
  cp -r "$ORT_TREE"/. /tmp/site/
fi
if [ -n "${ORT_PARTS:-}" ]; then
  ls -l "$ORT_PARTS"
  if [ -f "$ORT_PARTS/SHA256" ]; then
    echo "$(cat "$ORT_PARTS/SHA256")  -" >/tmp/ort.sha256
    cat "$ORT_PARTS"/part-* | sha256sum -c /tmp/ort.sha256 || { echo "onnxruntime parts corrupt or missing"; exit 3; }
  fi
  cat "$ORT_PARTS"/part-* | xz -dc | tar -x -C /tmp/site || { echo "cannot unpack onnxruntime"; exit 3; }
fi
ln -sfn "$root/worker" /tmp/pkgs/autoembed  # the package lives in worker/, imports as autoembed
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
export AUTOEMBED_CACHE_DIR=/tmp/ae-cache AUTOEMBED_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o, sys; print('python', sys.version.split()[0], 'onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$out/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$out/gpu.txt"
if [ -n "${BASELINE:-}" ]; then
  echo "== before: $BASELINE, benchmarks/bench_engine.py --device cuda" | tee "$out/before.txt"
  (cd "$BASELINE" && PYTHONPATH=/tmp/site:$PWD timeout 300 python3 benchmarks/bench_engine.py \
     --device cuda --texts 2000 2>&1 | grep -v -i "warn\|No registered plugin EP" | tee -a "$out/before.txt")
fi
export PYTHONPATH=/tmp/site:/tmp/pkgs:$root
echo "== after: benchmarks/bench_gpu.py" | tee "$out/after.txt"
timeout 360 python3 benchmarks/bench_gpu.py --texts 2000 ${BENCH_ARGS:-} --json "$out/after.json" 2>&1 \
  | grep -v -i "warn\|No registered plugin EP" | tee -a "$out/after.txt"
timeout 240 python3 -m pytest tests/test_cuda.py -q -rs -s -p no:cacheprovider -o addopts="" 2>&1 \
  | grep -v "No registered plugin EP" | tail -15 | tee "$out/pytest.txt"
