#!/usr/bin/env bash
# The accelerator numbers of docs/performance.md and docs/results.md (section 2), in one
# run on one NVIDIA GPU, from the repository root:
#
#   OUT=runs/accelerator GECO_DATA_DIR=../shared/data bash benchmarks/accelerator_run.sh
#
# 1. benchmarks.step_time with the accelerator presets, JAX (CUDA) beside the torch twins
#    on the same GPU (conv VAE and VAE+NVP, then ConvDraw, each in its own process, so a
#    slow ConvDraw compile cannot cost the others' numbers);
# 2. the Figure 5 analog with the conv VAE (experiments.information_plane --match_elbo),
#    with as many steps as the GPU does in about FIG5_TRAIN_S seconds per run
#    (from the conv VAE's steps/s in 1), written to $OUT/fig5.tar.gz.
#
# The GPU image this was written for has JAX, flax, optax, orbax, torch and tensorboard
# but no TensorFlow, clu or ml_collections: wheels of the last two in .whl/ (made beforehand
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux2014_x86_64 -d .whl ml_collections==1.1.0 clu==0.0.12`) are installed to
# /tmp/site, and everything runs through experiments.no_tensorflow. MNIST is read from
# $GECO_DATA_DIR (default gdata/, a git-ignored link to ../shared/data that travels as a
# copy). Each stage is bounded by `timeout`; their logs are under $OUT. TOTAL_S (500) bounds
# the whole; SKIP_BENCH=1 runs Figure 5 alone, FIG5_STEPS fixes its length, FIG5_ARGS adds
# flags to its runs (e.g. FIG5_ARGS=--config.data_on_device=True: batches gathered on the GPU),
# BENCH_ARGS to step_time's (e.g. BENCH_ARGS=--torch_compile: the twins under torch.compile
# too, whose compiles may need a longer BENCH_TIMEOUT_S than its default of 150 s per stage).
set -u
OUT=${OUT:-runs/accelerator}
FIG5_TRAIN_S=${FIG5_TRAIN_S:-90}
TMP=${TMPDIR:-/tmp}
START=$(date +%s)
DEADLINE=$((START + ${TOTAL_S:-500}))
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 GECO_DATA_DIR=${GECO_DATA_DIR:-gdata}
PY=${PY:-python3}
RUN="$PY -m experiments.no_tensorflow"
quiet() { grep -v '^[IW][0-9]\{4\} '; }   # absl's info / warning lines stay in the logs

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "
import jax, flax, optax, orbax.checkpoint as o, torch, numpy, platform
print('python', platform.python_version(), 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'orbax', o.__version__, 'torch', torch.__version__,
      'numpy', numpy.__version__)
print(jax.devices(), torch.cuda.get_device_name())"
  nproc
} 2>&1 | tee "$OUT/versions.txt"

if [ -z "${SKIP_BENCH:-}" ]; then
BENCH="benchmarks.step_time --size=accelerator --torch_device=cuda --noconfig_xla_flags
       --seconds=0.5 --rounds=5 --geco_rounds=10 --geco_seconds=0.3 --nolean ${BENCH_ARGS:-}"
echo "== step_time: conv VAE, VAE+NVP ($(date -u +%H:%M:%S))"
timeout -k 10 ${BENCH_TIMEOUT_S:-150} $RUN $BENCH --models=conv_vae,vae_nvp --sections=compare,pipeline \
    --json="$OUT/step_time_gpu.json" > "$OUT/step_time.log" 2>&1
echo "exit $?"; quiet < "$OUT/step_time.log" | tail -12
echo "== step_time: ConvDraw ($(date -u +%H:%M:%S))"
timeout -k 10 ${BENCH_TIMEOUT_S:-150} $RUN $BENCH --models=convdraw --sections=compare \
    --json="$OUT/step_time_gpu_convdraw.json" > "$OUT/step_time_convdraw.log" 2>&1
echo "exit $?"; quiet < "$OUT/step_time_convdraw.log" | tail -8
fi

RATE=$($PY -c "
import json
try: print(json.load(open('$OUT/step_time_gpu.json'))['compare']['conv_vae']['jax_steps_per_s'])
except Exception: print(500)")
LEFT=$((DEADLINE - $(date +%s) - 25))
# The trainer adds host work to every step (batches, metrics, logging): assume it runs at
# 35% of the bare step's rate, and that the two runs and their evaluations fit in LEFT.
STEPS=${FIG5_STEPS:-$($PY -c "
print(max(10000, min(200000, int(0.35 * $RATE * min($FIG5_TRAIN_S, ($LEFT - 50) / 2)) // 5000 * 5000)))")}
echo "== Figure 5: conv VAE, $STEPS steps per run (bare step $RATE steps/s), ${LEFT} s left ($(date -u +%H:%M:%S))"
timeout -k 15 "$LEFT" $RUN experiments.information_plane \
    --config configs/conv_vae_mnist.py --workdir "$TMP/fig5" \
    --tolerances= --match_elbo --variants=elbo,geco_matched --config.num_steps="$STEPS" \
    --config.checkpoint_every=$((STEPS / 4)) --config.eval_every="$STEPS" \
    --config.log_every=1000 --config.image_every="$STEPS" \
    --config.max_checkpoints_to_keep=1 ${FIG5_ARGS:-} > "$OUT/fig5.log" 2>&1
echo "exit $?"; quiet < "$OUT/fig5.log" | tail -8
tar czf "$OUT/fig5.tar.gz" -C "$TMP" --exclude=checkpoints --exclude='fig5/*/best_feasible' fig5
tar czf "$OUT/fig5_checkpoints.tar.gz" -C "$TMP" fig5/elbo/checkpoints fig5/geco_matched/checkpoints
ls -la "$OUT"
echo "done in $(( $(date +%s) - START )) s"
