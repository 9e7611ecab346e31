#!/usr/bin/env bash
# Installs the toolkit's requirements into the current Python environment.
#   bash scripts/install.sh
# Also `pip install -e .` (no dependencies): the longsft package and patch/ importable from this checkout.
# torch: an installed torch is kept (a CUDA build on a GPU box stays as it is). With no torch installed,
# TORCH_SPEC (default torch==2.13.0) is installed first, so the `torch` range in requirements.txt
# is already met and pip never pulls a second, CUDA-sized torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] no torch found: installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -r requirements.txt
# the package importable from this checkout (tools/, bench/ and the tests import it); no dependencies pulled here
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" - <<'PY'
import torch, transformers, deepspeed, peft, datasets
print(f"[install] torch {torch.__version__} (cuda {torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"deepspeed {deepspeed.__version__}, peft {peft.__version__}, datasets {datasets.__version__}")
PY
