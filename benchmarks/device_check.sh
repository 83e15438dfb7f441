#!/usr/bin/env bash
# Everything a device session checks, in one call: versions, the GPU tests, the demo's timings.
# Run from the repository root on the GPU machine, with the jax-triton wheel in .whl/
# (`bash ../shared/device-setup.sh` puts it there); logs go to $OUT (default: ./device-logs).
set -uo pipefail
OUT=${OUT:-device-logs}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, triton, jax_triton, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__, 'jax-triton', jax_triton.__version__, 'flax', flax.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests -rfE --durations=10 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu-tests.log"
python3 -m jax_moe.demo 2>&1 | tee "$OUT/demo.log"
