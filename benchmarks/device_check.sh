#!/usr/bin/env bash
# Everything a GPU machine checks, in one script: versions, GPU tests, demo, training example,
# benchmarks, tile tables, tuning, profiles. Run from the repository root; logs go to $OUT.
# Wheels in .whl/ (jax-triton; tokamax and its pure-Python dependencies, to compare against it)
# are installed first when present.
#   bash benchmarks/device_check.sh tests            # all GPU tests but the gradient ones
#   bash benchmarks/device_check.sh grad-tests bench # ... stages run in the order given
# Stages: tests, grad-tests, families, demo, example, bench, bench-full, bench-families, train-bench,
# train-bench-full, tile-tables, tune, tune-backward, profile.
# bench and train-bench are the --quick grids (results/<gpu>-quick.*, <gpu>-train-quick.*);
# bench-full and train-bench-full write results/<gpu>.* and <gpu>-train.*.
# profile: per-kernel times under Nsight Compute for each ';'-separated argument list of
# benchmarks/kernel_profile.py in $PROFILE_CASES.
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
# GPU tests under tests/ (or the paths given first), with extra pytest arguments. With
# PYTEST_WORKERS=N (pytest-xdist, e.g. installed from .whl/) N processes share the GPU, none
# preallocating: compiling is most of the tests' time. Each worker holds its own arrays: use 4 on
# an 80 GB card and up to 6 on an H200 (8 ran the gradient and family tests out of memory there).
# Under a time limit, stop pytest with SIGINT (`timeout -s INT`): it still prints its summary.
pytest() {
  if [ -n "${PYTEST_WORKERS:-}" ]; then
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -p no:cacheprovider -m gpu -rfE -n "$PYTEST_WORKERS" "$@"
  else
    python3 -m pytest -q -p no:cacheprovider -m gpu -rfE -n 0 --durations=5 "$@"
  fi
}
for stage in "$@"; do
  echo "=== $stage"
  case $stage in
    tests) pytest tests -k "not gradients" --ignore tests/test_gpu_families.py 2>&1 | tee "$OUT/gpu-tests.log" ;;
    families) pytest tests/test_gpu_families.py 2>&1 | tee "$OUT/gpu-families.log" ;;
    grad-tests) pytest tests -k gradients --ignore tests/test_gpu_families.py 2>&1 | tee "$OUT/gpu-grad-tests.log" ;;
    demo) python3 -m jax_moe.demo 2>&1 | tee "$OUT/demo.log" ;;
    example) python3 examples/train_tiny_moe.py --backend triton 2>&1 | tee "$OUT/example.log" ;;
    bench) python3 benchmarks/moe_bench.py --quick 2>&1 | tee "$OUT/bench.log"; cp benchmarks/results/*-quick.* "$OUT/" ;;
    bench-full) python3 benchmarks/moe_bench.py 2>&1 | tee "$OUT/bench.log"
      newest=$(ls -t benchmarks/results/*.json | head -1); cp "${newest%.json}".* "$OUT/" ;;
    bench-families) python3 benchmarks/moe_bench.py --quick --models deepseek-v3 gpt-oss-120b qwen2-57b-a14b --tag families 2>&1 | tee "$OUT/bench-families.log"; cp benchmarks/results/*-families.* "$OUT/" ;;
    train-bench) python3 benchmarks/train_bench.py --quick 2>&1 | tee "$OUT/train-bench.log"; cp benchmarks/results/*-train-quick.* "$OUT/" ;;
    train-bench-full) python3 benchmarks/train_bench.py 2>&1 | tee "$OUT/train-bench.log"; cp benchmarks/results/*-train.* "$OUT/" ;;
    tile-tables) python3 benchmarks/tile_tables.py --tables default device 2>&1 | tee "$OUT/tile-tables.log" ;;
    tune) python3 -m jax_moe.tune --models ${TUNE_MODELS:-mixtral-8x7b} --tokens ${TUNE_TOKENS:-1 64 512 4096} 2>&1 | tee "$OUT/tune.log"; cp jax_moe/configs/nvidia-*.json "$OUT/" ;;
    tune-backward) python3 -m jax_moe.tune --models ${TUNE_MODELS:-mixtral-8x7b} --tokens ${TUNE_TOKENS:-8192} --backward --keep-forward 2>&1 | tee "$OUT/tune-backward.log"; cp jax_moe/configs/nvidia-*.json "$OUT/" ;;
    profile)
      IFS=';' read -ra cases <<< "${PROFILE_CASES:---model mixtral-8x7b --tokens 8192 --train}"
      for i in "${!cases[@]}"; do
        ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
          --log-file "$OUT/profile-$i.csv" python3 benchmarks/kernel_profile.py ${cases[$i]} > "$OUT/profile-$i.out" 2>&1
        { echo "## ${cases[$i]}"; python3 benchmarks/kernel_profile.py --report "$OUT/profile-$i.csv"; } 2>&1 | tee -a "$OUT/profile.log"
      done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
