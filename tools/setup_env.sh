#!/usr/bin/env bash
# Create the project's virtual environment: CPU torch, DALI, the project, and pillow-simd last.
# pillow-simd installs the same `PIL` package as Pillow, so anything that depends on `pillow`
# (matplotlib here) overwrites it; we install everything first, then swap Pillow for pillow-simd.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
# A plain `torch` requirement can pull a multi-GB CUDA build; pin the CPU wheel unless one is present.
"$venv/bin/python" -c "import torch" 2>/dev/null || $pip install -q "torch==${TORCH_VERSION:-2.13.0}"
$pip install -q -e ".[${DALI_EXTRA:-dali-cuda130},dev]"
if "$venv/bin/python" - <<'PY'
import importlib.metadata as md, sys
names = {d.metadata["Name"].lower() for d in md.distributions()}
sys.exit(0 if "pillow-simd" in names and "pillow" not in names else 1)
PY
then
  echo "pillow-simd already installed"
else
  $pip uninstall -q -y pillow pillow-simd 2>/dev/null || true
  $pip install -q --no-deps --force-reinstall --no-binary pillow-simd "pillow-simd==12.1.1.post0"
fi
"$venv/bin/python" -c "import torch, PIL, nvidia.dali, img2dataset; print('env ok: torch', torch.__version__, 'PIL', PIL.__version__, 'dali', nvidia.dali.__version__)"
