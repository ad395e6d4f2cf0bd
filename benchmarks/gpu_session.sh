#!/usr/bin/env bash
# One GPU session for issue #5, run from the repository root: the GPU numbers
# (benchmarks/gpu_check.py), the benchmark command on both presets, and the tests
# that run on any platform, on the GPU. Results go to $OUT (default gpu_out/).
#
# Packages the machine lacks (grain, ml-collections, tensorflow-datasets and their
# needs) may be placed as wheels in .whl/; they are installed into /tmp/site.
# Knobs: GPU_CHECK_BUDGET (s, default 240), GPU_CHECK_ONLY (names, comma-separated),
# GPU_TESTS (test files), SKIP_TESTS=1.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# A second run on the same machine reuses the compiled programs.
export JAX_COMPILATION_CACHE_DIR=$PWD/.cache/jax-gpu
python3 -c 'import jax, flax, optax, orbax.checkpoint, chex, grain, ml_collections
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' || exit 1

budget=${GPU_CHECK_BUDGET:-240}
timeout $((budget + 90)) python3 benchmarks/gpu_check.py --out="$OUT" --budget_seconds="$budget" \
  ${GPU_CHECK_ONLY:+--only=$GPU_CHECK_ONLY} 2> "$OUT/gpu_check.stderr"
echo "gpu_check rc=$?"
tail -c 20000 "$OUT/gpu_check.stderr" > "$OUT/gpu_check.stderr.tail" && mv "$OUT/gpu_check.stderr.tail" "$OUT/gpu_check.stderr"

# The benchmark command itself on both presets (its programs are in the cache by now).
{
  timeout 90 python3 -m imbal_jax.benchmark --config=configs/stage1.py:isic2019 \
    --config.dtype=bfloat16 --batch_size=256 --steps=20
  echo "isic2019 rc=$?"
  timeout 60 python3 -m imbal_jax.benchmark --config=configs/stage1.py:cifar10_lt --steps=20
  echo "cifar10_lt rc=$?"
} > "$OUT/benchmark_cli.txt" 2>&1
grep -v '^[WI][0-9]' "$OUT/benchmark_cli.txt" | cut -c1-700

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # Tests that need no forced CPU devices, on the GPU (float32 at full precision: the
  # references are float64 NumPy).
  JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout 100 python3 -m pytest -q -n 4 -p no:cacheprovider ${GPU_TESTS:-tests/test_losses.py \
    tests/test_metric_losses.py tests/test_objectives.py tests/test_models.py tests/test_metrics.py \
    tests/test_precision.py tests/test_benchmark.py} > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest rc=$?"
  tail -25 "$OUT/pytest_gpu.txt"
fi
python3 - "$OUT/gpu_results.jsonl" << 'EOF'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  if 'images_per_sec' in r:
    print(f"{r['name']:45s} {r.get('images_per_sec') or 0:9.1f} img/s  "
          f"step {r.get('step_seconds_median') or 0:.4f}s  mfu {r.get('mfu')}  "
          f"compile {r.get('compile_seconds') or 0:.1f}s")
  elif r['name'].startswith('precision'):
    print(r['name'], r.get('relative_difference'), r.get('within_1e-2'))
  elif 'error' in r or 'skipped' in r:
    print(r['name'], r.get('skipped') or r.get('error'))
EOF
