#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (the `device` tool of this
# workplace, or any CUDA machine with this repository checked out and the wheels of what its
# image lacks in .whl/). Writes everything to $OUT (default ./gpu-check) and prints figures:
#   1. tests/test_gpu_runs.py: forked runs initialise CUDA after the fork; consecutive runs of one
#      zygote leave nothing on the device; a gold on CUDA passes alike forked and cold.
#   2. tests/test_warm_start.py on that machine's kernel (the per-run isolation of forked runs).
#   3. benchmarks/harness_bench.py on CUDA, warm start on, then off: child start and harness share.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True PYTHONUNBUFFERED=1 DIFFBENCH_ZOO_DIR=/tmp/diffbench-zoo
PY=${PYTHON:-python3}
started=$(date +%s)
stamp() { echo "== $(( $(date +%s) - started )) s: $*"; }
if compgen -G ".whl/*.whl" > /dev/null; then
  stamp "installing the carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-cache-dir .whl/setuptools-*.whl || exit 3
  $PY -m pip install -q --no-index --no-deps --no-cache-dir $(ls .whl/*.whl | grep -v setuptools) || exit 3
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . || exit 3
fi
nvidia-smi -L
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
stamp "building the tiny zoo"
$PY -c "from pathlib import Path; from pytest_diffbench.zoo.zoo import ensure_tiny_zoo; ensure_tiny_zoo(Path('$DIFFBENCH_ZOO_DIR'))" || exit 4
stamp "tests/test_gpu_runs.py"
timeout 300 $PY -m pytest tests/test_gpu_runs.py -p no:cacheprovider -rA -s -q --junitxml="$OUT/gpu-runs.xml" 2>&1 | tee "$OUT/gpu-runs.log" | tail -40
gpu_rc=$?
for warm in on off; do
  stamp "harness_bench on cuda, warm start $warm"
  timeout ${BENCH_S:-120} $PY benchmarks/harness_bench.py --device cuda --speed wall --warm-start $warm --repeats ${REPEATS:-3} --samples 2 \
      --tasks L1-sd15-t2i-0001 L1-dit-c2i-0005 2>&1 | tee "$OUT/bench-$warm.log" | grep -v "^  " | tail -14
done
stamp "tests/test_warm_start.py"
timeout ${WARM_TESTS_S:-150} $PY -m pytest tests/test_warm_start.py -p no:cacheprovider -q -rfE --junitxml="$OUT/warm-start.xml" 2>&1 | tee "$OUT/warm-start.log" | tail -15
stamp "done"
exit $gpu_rc
