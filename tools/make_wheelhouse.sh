#!/usr/bin/env bash
# Gather every wheel this project needs into one folder, for machines without internet access
# (cluster compute nodes that run the same image as a login node). Install from it with
#   tools/setup_env.sh --wheelhouse DIR
# Run it with the target machines' Python on Linux x86-64: pip resolves for the interpreter it runs
# under, so the wheels match that Python version, ABI and platform, and packages published only as
# source are built into wheels here (the compute nodes then need no compiler and no index).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/make_wheelhouse.sh DIR [--cuda 13|12] [--torch-cpu] [--skip torch,dali,ray]

  DIR          new or empty folder that receives the wheels and MANIFEST.txt
  --cuda N     CUDA major version of the DALI wheel: 13 (nvidia-dali-cuda130, default) or 12
  --torch-cpu  take torch's CPU wheel (TORCH_VERSION+cpu) instead of PyPI's CUDA build; that wheel
               lives on PyTorch's own index, so it must be reachable (PIP_EXTRA_INDEX_URL or a mirror),
               otherwise the script says so and takes PyPI's build
  --skip LIST  leave out torch, dali and/or ray (comma-separated): torch and dali e.g. when the target's
               system Python already provides them (tools/setup_env.sh --system-site-packages); ray
               (a 76 MiB wheel) when no build will run on a cluster (--distributor ray is then unavailable)

environment: PYTHON (interpreter, default python3), TORCH_VERSION (default 2.13.0),
             PILLOW_SIMD_VERSION (default 12.1.1.post0)
EOF
}

die() { echo "make_wheelhouse: $*" >&2; exit 2; }

out="" cuda=13 torch_cpu=0 skip=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) [ $# -ge 2 ] || die "--cuda needs a value"; cuda=$2; shift 2 ;;
    --cuda=*) cuda=${1#*=}; shift ;;
    --torch-cpu) torch_cpu=1; shift ;;
    --skip) [ $# -ge 2 ] || die "--skip needs a value"; skip=$2; shift 2 ;;
    --skip=*) skip=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [ -z "$out" ] || die "one DIR only"; out=$1; shift ;;
  esac
done
[ -n "$out" ] || { usage >&2; exit 2; }
case "$cuda" in 13|12) ;; *) die "--cuda must be 13 or 12, not '$cuda'" ;; esac
skip_torch=0 skip_dali=0 skip_ray=0
for s in ${skip//,/ }; do
  case "$s" in torch) skip_torch=1 ;; dali) skip_dali=1 ;; ray) skip_ray=1 ;;
    *) die "--skip takes torch, dali and/or ray, not '$s'" ;; esac
done

py=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
pillow_simd_version=${PILLOW_SIMD_VERSION:-12.1.1.post0}
dali_extra=dali-cuda${cuda}0
root=$(cd "$(dirname "$0")/.." && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=("$py" -m pip)

"$py" -c 'import platform, sys; sys.exit(sys.platform != "linux" or platform.machine() != "x86_64")' \
  || die "run this on Linux x86-64 with the target machines' Python (wheels are resolved for the running interpreter)"
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Mixing two runs (say CUDA 13 and 12) would leave two DALI builds for pip to choose between.
if compgen -G "$out/*.whl" >/dev/null; then die "$out already holds wheels: give a new or empty folder"; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "make_wheelhouse: $("$py" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])') linux x86_64 -> $out"

# The project's own wheel (for installs without a checkout); its metadata is the dependency list.
# Built from a copy of the checkout's files (git's view: no venvs or caches) because setuptools
# builds in the source tree and would package leftovers of an old build/ folder.
src=$root
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  src=$tmp/src
  mkdir "$src"
  (cd "$root" && git ls-files -co --exclude-standard -z \
     | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
     | xargs -0 cp --parents -t "$src")
fi
# setuptools' build log is long and only matters when the build fails.
"${pip[@]}" wheel -q --no-deps -w "$out" "$src" 2>"$tmp/project.log" || { cat "$tmp/project.log" >&2; exit 1; }

# Torch: PyPI's Linux wheels are CUDA builds that pull the CUDA toolkit wheels (several GB).
torch_req="torch==$torch_version"
if [ "$torch_cpu" = 1 ] && [ "$skip_torch" = 0 ]; then
  if "${pip[@]}" download -q --no-deps -d "$out" "torch==$torch_version+cpu" 2>"$tmp/torch_cpu.log"; then
    torch_req="torch==$torch_version+cpu"
  else
    echo "make_wheelhouse: no CPU wheel torch==$torch_version+cpu is reachable from the configured indexes;" >&2
    echo "  it is published on PyTorch's index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)." >&2
    echo "  Falling back to torch==$torch_version from the index, which on PyPI is the CUDA build." >&2
  fi
fi

# Requirements: the project's dependencies with the chosen DALI extra and dev tools, minus what is
# skipped, plus the build tools that an offline editable install (or any source build) needs.
"$py" - "$out" "$root/pyproject.toml" "$dali_extra" "$torch_req" "$skip_torch" "$skip_dali" "$skip_ray" \
  >"$tmp/requirements.txt" <<'PY'
import email, glob, re, sys, zipfile

out, pyproject, dali_extra, torch_req, skip_torch, skip_dali, skip_ray = sys.argv[1:]
try:
    import tomllib
except ImportError:  # Python 3.10: pip ships the same parser
    from pip._vendor import tomli as tomllib

def name_of(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

(wheel,) = glob.glob(f"{out}/slipstream-*.whl")
with zipfile.ZipFile(wheel) as zf:
    meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(zf.read(meta_name))
wanted_extras = {dali_extra, "dev"} | ({"ray"} if skip_ray == "0" else set())
reqs = []
for line in meta.get_all("Requires-Dist") or []:
    req, _, marker = line.partition(";")
    extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
    if extra and extra.group(1) not in wanted_extras:
        continue
    name = name_of(req)
    if name == "torch":
        if skip_torch == "1":
            continue
        req = torch_req  # pinned, like tools/setup_env.sh does
    if name.startswith("nvidia-dali") and skip_dali == "1":
        continue
    reqs.append(req.strip())
with open(pyproject, "rb") as f:
    reqs += tomllib.load(f)["build-system"]["requires"]
reqs += ["wheel", "pip"]
print("\n".join(reqs))
PY
echo "make_wheelhouse: resolving $(wc -l <"$tmp/requirements.txt") requirements (wheels where published, local builds otherwise)"
"${pip[@]}" wheel -q -w "$out" --find-links "$out" -r "$tmp/requirements.txt"

# pillow-simd publishes no wheels: build one here (gcc, libjpeg and zlib headers). It links against
# the system's libjpeg/zlib, which the compute nodes have when they run the same image.
"${pip[@]}" wheel -q --no-deps --no-binary pillow-simd -w "$out" "pillow-simd==$pillow_simd_version"

"$py" - "$out" <<'PY'
import os, sys

out = sys.argv[1]
wheels = sorted((f, os.path.getsize(os.path.join(out, f))) for f in os.listdir(out) if f.endswith(".whl"))
total = sum(size for _, size in wheels)
with open(os.path.join(out, "MANIFEST.txt"), "w") as f:
    f.write("# size_bytes  wheel\n")
    f.writelines(f"{size:>12}  {name}\n" for name, size in wheels)
    f.write(f"{total:>12}  total ({len(wheels)} wheels)\n")
largest = sorted(wheels, key=lambda w: -w[1])[:5]
print("make_wheelhouse: largest: " + ", ".join(f"{n.split('-')[0]} {s / 2**20:.0f} MiB" for n, s in largest))
print(f"make_wheelhouse: {len(wheels)} wheels, {total / 2**20:.0f} MiB in {out} (list: MANIFEST.txt)")
PY
