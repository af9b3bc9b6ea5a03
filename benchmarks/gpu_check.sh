#!/usr/bin/env bash
# The GPU check: what a machine with one CUDA GPU measures and tests, in one command (the default
# sections take about 10 minutes on one H100 or H200; the last one is cut at DEADLINE).
#
#   bash benchmarks/gpu_check.sh --wheels          # on a machine with network access, once: fills .whl/
#   bash benchmarks/gpu_check.sh [SECTION ...]     # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run [...]   # setup and checks only: prints what each section would run
#
# Setup: the wheels in .whl/ (if any) are installed into $SITE (default /tmp/medgen-site) and
# PYTHONPATH becomes src:$SITE, so nothing needs `pip install -e .`; without .whl/ the current
# environment must already import medgen's dependencies. --wheels downloads, for Python 3.12, the
# versions installed in the environment of $PYTHON (default .venv/bin/python) of the packages a
# plain PyTorch image lacks: MONAI, Hydra (+ omegaconf, antlr4), nibabel, ema-pytorch, nilearn, and
# for the tests diffusers (+ importlib-metadata). Carry .whl/ to the GPU machine with the tree.
#
# Sections (default: tests train train3d sample attention variants), each under its own time limit (seconds, overridable):
#   tests   MEDGEN_TEST_CUDA=1 pytest -m cuda: the tests that run on the GPU (compiled training
#           step and sample grid, the step never waiting on the GPU)          T_TESTS=150
#   train   bench_train.py's CUDA table: medgen's step eager/compiled at batch 16, 64, 128, the
#           MONAI-tutorial loop (fp32+TF32, bf16) at 64, MFU; TRAIN_ARGS replaces those
#           options                                                           T_TRAIN=300
#   train3d bench_train.py --3d: the same table on volumes of the GPU profile (128 x 128 x 64, the
#           specification's network): medgen's step compiled at 2 volumes, with
#           training.gradient_checkpointing at 2, the MONAI-tutorial loop (bf16) at 2, and the
#           configuration training=default trains with (16 volumes; out of memory is a row
#           saying so): volumes/s, MFU and peak GiB per row (TRAIN3D_ARGS). Three compilations:
#           after a full train section it may be cut by DEADLINE; `gpu_check.sh train3d` runs it alone
#                                                                             T_TRAIN3D=300
#   sample  bench_sample.py --cuda-only --cuda-pairs 0: compiled vs eager generation forward, and
#           compiled with CUDA graphs (SAMPLE_ARGS replaces those options; --cuda-pairs 1024 adds
#           the generation pipeline's pairs/s, a few minutes more)           T_SAMPLE=120
#   attention bench_attention.py: the SDPA kernels that take the network's attention at head size 256
#           (the specification) and 64, their forward+backward times at batch 64 (ATTENTION_ARGS)
#                                                                             T_ATTENTION=90
#   variants bench_train.py rows for the candidate settings, compiled at batch 64, beside the
#           default configuration in the same process: base, CUDA graphs
#           (compile_mode=reduce-overhead), channels_last, heads of 64 (VARIANT_ARGS replaces those
#           options; --variants also takes channels_last+cudagraphs, autotune). Last by default: it
#           gets the time left (about 4 minutes for all four; a row is logged as soon as it is
#           measured, so rows done before the cut are in gpu_check.log); `gpu_check.sh variants`
#           runs it alone.
#                                                                             T_VARIANTS=300
#   suite   the whole default test suite, which pins itself to the CPU (tests/conftest.py), as it
#           runs on a machine without a GPU: several minutes, so not a default section  T_SUITE=540
# No section runs past DEADLINE=580 seconds from the start (under a 10-minute command limit).
#
# Output, in $OUT (default /tmp/medgen-gpu-check): gpu_check.log (everything), tests.log, suite.log,
# bench_train.json, bench_train_3d.json, bench_sample.json, bench_attention.json, bench_variants.json (one JSON line
# each); a summary is printed at the end.
# Environment: PYTHON (the interpreter; default python3, or .venv/bin/python where it exists),
# SITE, OUT, T_*, TRAIN_ARGS, TRAIN3D_ARGS, SAMPLE_ARGS.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SITE=${SITE:-/tmp/medgen-site}
OUT=${OUT:-/tmp/medgen-gpu-check}
T_TESTS=${T_TESTS:-150} T_TRAIN=${T_TRAIN:-300} T_SAMPLE=${T_SAMPLE:-120} T_SUITE=${T_SUITE:-540}
T_VARIANTS=${T_VARIANTS:-300} T_ATTENTION=${T_ATTENTION:-90} T_TRAIN3D=${T_TRAIN3D:-300}
DEADLINE=${DEADLINE:-580}
TRAIN_ARGS=${TRAIN_ARGS:---batches 16,64,128 --reference-batches 64 --steps 10}
TRAIN3D_ARGS=${TRAIN3D_ARGS:---3d --batches 2 --compile true --reference-batches 2 --reference-precision bf16 --variants checkpointing --variant-batch 2 --steps 5 --warmup 2}
SAMPLE_ARGS=${SAMPLE_ARGS:---cuda-only --cuda-batch 64 --cuda-pairs 0}
ATTENTION_ARGS=${ATTENTION_ARGS:---batch 64}
VARIANT_ARGS=${VARIANT_ARGS:---batches none --reference-batches none --variants base,cudagraphs,channels_last,heads64 --steps 10}
export PYTHONUNBUFFERED=1

die() { echo "gpu_check: $*" >&2; exit 1; }

fetch_wheels() {
  mkdir -p .whl
  rm -f .whl/*.whl  # one version of each: two of one package stop the install
  local name version
  for name in monai hydra-core omegaconf nibabel ema-pytorch nilearn diffusers importlib-metadata; do
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))") \
      || die "$name is not installed in $PYTHON's environment (make install first)"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .whl "$name==$version" || die "could not download $name==$version"
  done
  # antlr4 (Hydra's parser runtime) is published as a source archive only: a pure-Python wheel built here
  version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))") || exit 1
  "$PYTHON" -m pip wheel -q --no-deps "antlr4-python3-runtime==$version" -w .whl || die "could not build antlr4"
  ls -1 .whl
}

DRY=0
SECTIONS=()
for arg in "$@"; do
  case $arg in
    --wheels) fetch_wheels; exit 0 ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    tests|train|train3d|sample|attention|variants|suite) SECTIONS+=("$arg") ;;
    *) die "unknown argument '$arg' (sections: tests train train3d sample attention variants suite; options: --dry-run --wheels)" ;;
  esac
done
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(tests train train3d sample attention variants)

mkdir -p "$OUT" || die "cannot create $OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE=$!

# ------------------------------------------------------------------------------------------- setup
echo "== setup ($(date -u +%FT%TZ)): python $PYTHON, sections: ${SECTIONS[*]}, output in $OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || die "installing .whl/*.whl into $SITE failed"
  export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
  echo "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
else
  export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
  echo "no .whl/: using the packages $PYTHON already has"
fi
"$PYTHON" - <<'EOF' || die "medgen or a dependency does not import (see above); run --wheels and carry .whl/"
import importlib
import torch
for name in ("medgen", "monai", "hydra", "omegaconf", "nibabel", "ema_pytorch", "nilearn"):
    importlib.import_module(name)
import medgen
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: {gpu}, medgen from {medgen.__file__}")
EOF
HAVE_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
HAVE_DIFFUSERS=$("$PYTHON" -c "import importlib.util as u; print(int(u.find_spec('diffusers') is not None))")
IGNORE=()
if [ "$HAVE_DIFFUSERS" = 0 ]; then
  IGNORE=(--ignore=tests/unit/test_samplers.py)
  echo "diffusers is missing: tests/unit/test_samplers.py (reference numbers from diffusers) is left out"
fi
command -v nvidia-smi > /dev/null && nvidia-smi -L

# ---------------------------------------------------------------------------------------- sections
RESULTS=()
section() {  # section NAME LIMIT OUTFILE COMMAND...: run COMMAND with stdout to OUTFILE
  local name=$1 limit=$2 outfile=$3 t0=$SECONDS rc
  shift 3
  # never past DEADLINE seconds from the start, so that the summary is always printed
  [ $((DEADLINE - SECONDS - 10)) -lt "$limit" ] && limit=$((DEADLINE - SECONDS - 10))
  echo "== $name (limit ${limit} s): $*"
  if [ $DRY = 1 ]; then RESULTS+=("$name: dry run"); return; fi
  if [ "$name" != tests ] && [ "$name" != suite ] && [ "$HAVE_CUDA" != 1 ]; then
    echo "no CUDA GPU: $name measures the GPU; skipped"
    RESULTS+=("$name: skipped (no CUDA GPU)")
    return
  fi
  if [ "$limit" -lt 30 ]; then
    echo "$name: skipped, less than 30 s left before DEADLINE=$DEADLINE"
    RESULTS+=("$name: skipped (no time left)")
    return
  fi
  timeout --kill-after=15 "$limit" "$@" | tee "$outfile"
  rc=${PIPESTATUS[0]}
  [ $rc = 124 ] && echo "$name: stopped at its limit of $limit s"
  RESULTS+=("$name: exit $rc in $((SECONDS - t0)) s")
}

for s in "${SECTIONS[@]}"; do
  case $s in
    tests) section tests "$T_TESTS" "$OUT/tests.log" \
             env MEDGEN_TEST_CUDA=1 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rA "${IGNORE[@]}" tests/unit tests/integration ;;
    # shellcheck disable=SC2086  # the *_ARGS are lists of options
    train) section train "$T_TRAIN" "$OUT/bench_train.json" "$PYTHON" benchmarks/bench_train.py $TRAIN_ARGS ;;
    # shellcheck disable=SC2086
    train3d) section train3d "$T_TRAIN3D" "$OUT/bench_train_3d.json" "$PYTHON" benchmarks/bench_train.py $TRAIN3D_ARGS ;;
    # shellcheck disable=SC2086
    sample) section sample "$T_SAMPLE" "$OUT/bench_sample.json" "$PYTHON" benchmarks/bench_sample.py $SAMPLE_ARGS ;;
    # shellcheck disable=SC2086
    attention) section attention "$T_ATTENTION" "$OUT/bench_attention.json" "$PYTHON" benchmarks/bench_attention.py $ATTENTION_ARGS ;;
    # shellcheck disable=SC2086
    variants) section variants "$T_VARIANTS" "$OUT/bench_variants.json" "$PYTHON" benchmarks/bench_train.py $VARIANT_ARGS ;;
    suite) section suite "$T_SUITE" "$OUT/suite.log" \
             "$PYTHON" -m pytest -q -p no:cacheprovider "${IGNORE[@]}" tests/unit tests/integration ;;
  esac
done

echo "== summary"
printf '%s\n' "${RESULTS[@]}"
for f in bench_train.json bench_train_3d.json bench_sample.json bench_attention.json bench_variants.json; do
  [ -s "$OUT/$f" ] && { echo "-- $f"; tail -n 1 "$OUT/$f"; }
done
for f in tests.log suite.log; do
  [ -s "$OUT/$f" ] && { echo "-- $f"; tail -n 3 "$OUT/$f"; }
done
exec > /dev/null 2>&1
wait "$TEE" 2> /dev/null  # the log is complete when the script returns
exit 0
