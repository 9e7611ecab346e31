#!/usr/bin/env bash
# The GPU check: one command that proves the CUDA path and measures it on one GPU (written for one H200).
#
#   bash scripts/gpu_check.sh                       # on the GPU machine; report in $OUT or bench/RESULTS.md
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh      # anywhere (CPU): the same steps at tiny sizes, ~1 minute
#   GPU_CHECK_PYTEST=0 GPU_CHECK_BENCH_ARGS="--attn_backend sdpa" bash scripts/gpu_check.sh   # a rerun: bench only,
#                                                   # extra bench_gpu.py arguments (e.g. another attention backend)
#
# On this workplace's device machine, one call of the device tool's `run` from the repository root:
#   command: bash scripts/gpu_check.sh      timeout_s: 500      (carry: [".whl"] only if .whl/ exists)
# Parts, in order; each has its own time limit, and a part that fails or times out does not stop the next:
#   1. python packages: `.whl/*.whl`, if that folder exists, installed into /tmp/site (PYTHONPATH)  <= 45 s
#   2. python3 -m pytest -m gpu on the test files holding gpu tests (tests/patch/test_models_gpu.py): every packed-
#      attention backend vs per-sample SDPA in bf16, packed vs unpacked gradients, the chunked loss on CUDA (and,
#      with bitsandbytes, tests/train/test_quantization.py: a 4/8-bit LoRA step, packed vs unpacked)
#      (GPU_CHECK_PYTEST_S, default 120 s; expected ~40 s: CUDA start-up, then small tensors)
#   3. python3 bench/bench_gpu.py --profile --out DIR/RESULTS.md (GPU_CHECK_BENCH_S, default 300 s; expected
#      ~2-3 min: matmul 15 s, data 5 s, Llama-1.2B naive / sort / pack 45-90 s, profile 10 s, loss memory
#      10 s, GLM-4-1.4B pack 20 s; see its docstring), also when part 2 failed
#   4. the report printed again (the end of the output holds it) and one status line per part
# Worst case 45 + 120 + 300 s = 7 min 45 s; expected 3-4 minutes. Exit status 0 only when parts 2 and 3 passed.
# Files: DIR = $GPU_CHECK_OUT, else $OUT (the device tool brings that folder back), else bench/ (tiny: a temp
# folder): RESULTS.md (the markdown report), RESULTS.json (the figures), pytest.log, bench.log (logs: not in bench/).
#
# Python packages. The H200 image (/work/.library/device/KINDS.md) has torch 2.11 + CUDA 13, transformers 5.17,
# numpy, tqdm, pytest, peft, tiktoken, accelerate: all this check needs (only the files with gpu tests are
# collected). It lacks deepspeed (the DeepSpeed tests and launches need it, this check does not). To carry it,
# build the wheels here once, from the repository root, and name .whl in `carry` (~5 MB; /.whl/ is ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
#   python3 -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # PyPI has no deepspeed wheel
# bitsandbytes (the QLoRA gpu tests in tests/train/test_quantization.py; skipped without it) is not in the image
# either: python3 -m pip download --no-deps -d .whl bitsandbytes==0.50.2   (43 MB: one wheel for CUDA and CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's longsft for tools/ and bench/ (no install needed)

TINY=${GPU_CHECK_TINY:-0}
PYTHON=${PYTHON:-python3}
RUN_PYTEST=${GPU_CHECK_PYTEST:-1}
PYTEST_S=${GPU_CHECK_PYTEST_S:-120}
BENCH_S=${GPU_CHECK_BENCH_S:-300}
DIR=${GPU_CHECK_OUT:-${OUT:-}}
if [[ -z "$DIR" ]]; then
  if [[ "$TINY" == 1 ]]; then DIR=$(mktemp -d /tmp/gpu_check.XXXXXX); else DIR=bench; fi
fi
mkdir -p "$DIR"
LOGS=$DIR
[[ "$DIR" == bench ]] && LOGS=$(mktemp -d /tmp/gpu_check_logs.XXXXXX)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
say() { echo "[gpu_check $((SECONDS - START))s] $*"; }

# ---- 1. carried wheels -------------------------------------------------------------------------------------
WHEELS="none carried"
if compgen -G ".whl/*.whl" >/dev/null; then
  if timeout 45 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    WHEELS="installed: $(ls .whl/*.whl | wc -l) wheels"
  else
    WHEELS="install FAILED (continuing with the image's packages)"
  fi
fi
say "wheels: $WHEELS"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
  || say "nvidia-smi: not available (no NVIDIA GPU here)"
"$PYTHON" - <<'EOF' || true
import platform, torch, transformers
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, available: {cuda}), "
      f"transformers {transformers.__version__}" + (f", GPU {torch.cuda.get_device_name()}" if cuda else ""))
EOF

# ---- 2. pytest -m gpu --------------------------------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' "mark.gpu" tests | sort)
PYTEST_RC=0 PYTEST_STATUS="skipped (GPU_CHECK_PYTEST=0)" PYTEST_SUMMARY=""
if [[ "$RUN_PYTEST" == 1 ]]; then
  say "pytest -m gpu ${GPU_TESTS[*]} (limit ${PYTEST_S}s)"
  timeout --kill-after=10 "$PYTEST_S" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 \
    | tee "$LOGS/pytest.log"
  PYTEST_RC=${PIPESTATUS[0]}
  case $PYTEST_RC in
    0) PYTEST_STATUS="passed" ;;
    124|137) PYTEST_STATUS="TIMED OUT after ${PYTEST_S}s" ;;
    *) PYTEST_STATUS="FAILED (exit $PYTEST_RC)" ;;
  esac
  PYTEST_SUMMARY="-- $(grep -E "(passed|failed|error|skipped|deselected)" "$LOGS/pytest.log" | tail -1)"
fi

# ---- 3. the benchmark --------------------------------------------------------------------------------------
read -r -a EXTRA <<< "${GPU_CHECK_BENCH_ARGS:-}"
BENCH_ARGS=(--out "$DIR/RESULTS.md" --profile "${EXTRA[@]}")
[[ "$TINY" == 1 ]] && BENCH_ARGS+=(--tiny)
say "python bench/bench_gpu.py ${BENCH_ARGS[*]} (limit ${BENCH_S}s)"
rm -f "$DIR/RESULTS.md" "$DIR/RESULTS.json"
timeout --kill-after=10 "$BENCH_S" "$PYTHON" bench/bench_gpu.py "${BENCH_ARGS[@]}" 2>&1 | tee "$LOGS/bench.log"
BENCH_RC=${PIPESTATUS[0]}
case $BENCH_RC in
  0) BENCH_STATUS="done" ;;
  124|137) BENCH_STATUS="TIMED OUT after ${BENCH_S}s (the report holds the parts that finished)" ;;
  *) BENCH_STATUS="FAILED (exit $BENCH_RC; see bench.log)" ;;
esac

# ---- 4. summary: the report again, then one line per part ---------------------------------------------------
echo
echo "==================================== $DIR/RESULTS.md ===================================="
cat "$DIR/RESULTS.md" 2>/dev/null || echo "(no report written)"
echo "=========================================================================================="
say "wheels: $WHEELS"
say "pytest -m gpu: $PYTEST_STATUS $PYTEST_SUMMARY"
say "bench_gpu.py: $BENCH_STATUS"
say "files: $(cd "$DIR" && ls RESULTS.md RESULTS.json 2>/dev/null | tr '\n' ' ')in $DIR; logs in $LOGS"
[[ $PYTEST_RC == 0 && $BENCH_RC == 0 ]]
