#!/usr/bin/env bash
# Create the project's virtual environment: CPU torch, DALI, the project, and pillow-simd last.
# pillow-simd installs the same `PIL` package as Pillow, so anything that depends on `pillow`
# (matplotlib here) overwrites it; we install everything first, then swap Pillow for pillow-simd.
#
#   tools/setup_env.sh [VENV] [--wheelhouse DIR] [--system-site-packages]
#
# VENV defaults to .venv. --wheelhouse DIR installs offline from a folder that
# tools/make_wheelhouse.sh filled: pip never contacts an index. --system-site-packages lets a new
# venv see the base interpreter's packages (a cluster's torch, say), which are then not reinstalled.
# Environment: PYTHON (interpreter for a new venv), TORCH_VERSION (CPU torch pin for online
# installs), DALI_EXTRA (dali-cuda130 or dali-cuda120; offline, taken from the wheelhouse if unset).
set -euo pipefail
venv="" wheelhouse="" venv_flags=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) [ $# -ge 2 ] || { echo "setup_env: --wheelhouse needs a folder" >&2; exit 2; }
                  wheelhouse=$2; shift 2 ;;
    --wheelhouse=*) wheelhouse=${1#*=}; shift ;;
    --system-site-packages) venv_flags=--system-site-packages; shift ;;
    -*) echo "setup_env: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$venv" ] || { echo "setup_env: one VENV only" >&2; exit 2; }; venv=$1; shift ;;
  esac
done
venv=${venv:-.venv}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$venv/bin/python" ] || "$py" -m venv $venv_flags "$venv"
pip=("$venv/bin/python" -m pip)
if [ -n "$wheelhouse" ]; then
  wheelhouse=$(cd "$wheelhouse" && pwd)
  # --no-index: every wheel, and the build backend of the editable install, comes from the folder.
  pip_install=("${pip[@]}" install -q --no-index --find-links "$wheelhouse")
  if [ -z "${DALI_EXTRA:-}" ] && compgen -G "$wheelhouse/nvidia_dali_cuda120-*.whl" >/dev/null \
     && ! compgen -G "$wheelhouse/nvidia_dali_cuda130-*.whl" >/dev/null; then
    DALI_EXTRA=dali-cuda120
  fi
  if compgen -G "$wheelhouse/pip-*.whl" >/dev/null; then "${pip_install[@]}" --upgrade pip; fi
  # Torch comes from the wheelhouse with the rest (or from the system site with
  # --system-site-packages). The project is installed editable from this checkout, as online:
  # tools/ and tests/ run from the checkout anyway, and edits to it then reach every node without
  # rebuilding the wheelhouse. Its wheel in the folder, which carries the same version number
  # whatever the code, serves installs without a checkout.
  extras="${DALI_EXTRA:-dali-cuda130},dev"
  # Ray (the cluster download engine) when the wheelhouse has it (make_wheelhouse.sh --skip ray leaves it out)
  if compgen -G "$wheelhouse/ray-*.whl" >/dev/null; then extras+=",ray"
  else echo "setup_env: no ray wheel in $wheelhouse: --distributor ray will not be available"; fi
  "${pip_install[@]}" -e "$root[$extras]"
  pillow_simd=(pillow-simd)   # the wheel make_wheelhouse.sh built from source
else
  pip_install=("${pip[@]}" install -q)
  "${pip_install[@]}" --upgrade pip
  # A plain `torch` requirement can pull a multi-GB CUDA build; pin the CPU wheel unless one is present.
  "$venv/bin/python" -c "import torch" 2>/dev/null || "${pip_install[@]}" "torch==${TORCH_VERSION:-2.13.0}"
  "${pip_install[@]}" -e "$root[${DALI_EXTRA:-dali-cuda130},dev,ray]"
  pillow_simd=(--no-binary pillow-simd "pillow-simd==12.1.1.post0")   # no wheels on PyPI
fi
if "$venv/bin/python" - <<'PY'
import importlib.metadata as md, sys
names = {d.metadata["Name"].lower() for d in md.distributions()}
sys.exit(0 if "pillow-simd" in names and "pillow" not in names else 1)
PY
then
  echo "pillow-simd already installed"
else
  "${pip[@]}" uninstall -q -y pillow pillow-simd 2>/dev/null || true
  "${pip_install[@]}" --no-deps --force-reinstall "${pillow_simd[@]}"
fi
"$venv/bin/python" -c "import torch, PIL, nvidia.dali, img2dataset; print('env ok: torch', torch.__version__, 'PIL', PIL.__version__, 'dali', nvidia.dali.__version__)"
