"""Offline install end to end: tools/make_wheelhouse.sh gathers the wheels (from the configured index),
then tools/setup_env.sh --wheelhouse installs them into a fresh venv with every index unreachable.

To keep it small the wheelhouse leaves out torch and DALI, and the venv takes those two, with their
dependencies, from the interpreter running the tests: what `--system-site-packages` gives on a cluster
whose system Python carries them. `python -m venv --system-site-packages` cannot do that here, since
from inside a venv it exposes the base interpreter's site-packages, not the venv's, and exposing the
whole of this interpreter's site-packages would satisfy every requirement without the wheelhouse. So
the new venv gets a .pth line naming a folder of links to exactly those distributions' files."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FROM_HOST = ("torch", "nvidia-dali-cuda130")
# Installed by setup_env.sh into the venv itself: each must come from the wheelhouse.
FROM_WHEELHOUSE = ("slipstream", "img2dataset", "webdataset", "matplotlib", "pyarrow", "ftfy", "regex",
                   "pytest", "pillow-simd")


def closure(names) -> dict[str, md.Distribution]:
    """These installed distributions and everything they require here (extras included), by name."""
    found: dict[str, md.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        dist = found.setdefault(name, md.distribution(name))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return found


def link_files(dists, target: Path) -> None:
    """Mirror each distribution's installed files into target as symlinks (files, not folders,
    so namespace packages such as `nvidia` shared by several distributions merge)."""
    for dist in dists:
        for rel in dist.files or []:
            if rel.parts[0] == "..":   # console scripts outside site-packages
                continue
            src = Path(dist.locate_file(rel))
            if src.exists():
                dst = target / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    dst.symlink_to(src)


def offline_env() -> dict[str, str]:
    """No pip configuration, no index, no proxy that works: any download attempt fails."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "NO_PROXY", "no_proxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in dropped}
    dead = "http://127.0.0.1:9"
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_INDEX_URL=f"{dead}/simple",
               PIP_NO_CACHE_DIR="1", HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead,
               PIP_NO_COMPILE="1")  # byte-compiling the installed packages only costs time here
    return env


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(["bash", str(ROOT / "tools/make_wheelhouse.sh"), str(out), "--skip", "torch,dali,ray"],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    return out


@pytest.fixture(scope="module")
def offline_venv(wheelhouse, tmp_path_factory) -> Path:
    try:
        host = closure(FROM_HOST)
    except md.PackageNotFoundError as e:
        pytest.fail(f"the test interpreter lacks {e}: the project's install is incomplete")
    tmp = tmp_path_factory.mktemp("offline")
    host_site = tmp / "host_site"
    link_files(host.values(), host_site)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=offline_env())
    (site_packages(venv) / "host_site.pth").write_text(f"{host_site}\n")
    proc = subprocess.run(["bash", str(ROOT / "tools/setup_env.sh"), str(venv), "--wheelhouse", str(wheelhouse)],
                          cwd=tmp, env=offline_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "env ok" in proc.stdout
    return venv


def site_packages(venv: Path) -> Path:
    (sp,) = venv.glob("lib/python3*/site-packages")
    return sp


def test_manifest_lists_every_wheel_with_its_size(wheelhouse):
    lines = (wheelhouse / "MANIFEST.txt").read_text().splitlines()
    rows = [line.split() for line in lines if not line.startswith("#")]
    listed = {name: int(size) for size, name in rows[:-1]}
    wheels = {p.name: p.stat().st_size for p in wheelhouse.glob("*.whl")}
    assert listed == wheels
    assert int(rows[-1][0]) == sum(wheels.values()) and rows[-1][1] == "total"
    names = {canonicalize_name(w.split("-")[0]) for w in wheels}
    assert {"slipstream", "pillow-simd", "pillow", "setuptools", "wheel", "pip", "img2dataset"} <= names
    assert not names & {"torch", "nvidia-dali-cuda130", "ray"}, "skipped giants leaked into the wheelhouse"
    # pillow-simd publishes no wheels, so its wheel is a local build
    (simd,) = [w for w in wheels if w.startswith("pillow_simd-")]
    assert simd.endswith("linux_x86_64.whl") and "manylinux" not in simd


def test_offline_venv_imports_the_project_with_pillow_simd(offline_venv):
    probe = """
import importlib.metadata as md, json, re
import demokit, pipeline, trainer, PIL, torch, nvidia.dali
def canonical(d): return re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()
names = {canonical(d) for d in md.distributions()}
print(json.dumps({
    "modules": [m.__file__ for m in (pipeline, trainer, demokit)],
    "pillow_simd": "pillow-simd" in names, "pillow": "pillow" in names,
    "pil_version": PIL.__version__, "pillow_simd_version": md.version("pillow-simd"),
    "locations": {canonical(d): str(d.locate_file("")) for d in md.distributions()},
}))
"""
    proc = subprocess.run([str(offline_venv / "bin/python"), "-c", probe], cwd=offline_venv.parent,
                          env=offline_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # editable install of this checkout
    assert all(Path(f).resolve().is_relative_to(ROOT) for f in got["modules"]), got["modules"]
    assert got["pillow_simd"] and not got["pillow"], "Pillow overwrote pillow-simd's PIL"
    assert got["pil_version"] == got["pillow_simd_version"]
    own = str(site_packages(offline_venv))
    host_site = str(offline_venv.parent / "host_site")
    in_venv = {name for name, loc in got["locations"].items() if loc.startswith(own)}
    from_host = {name for name, loc in got["locations"].items() if loc.startswith(host_site)}
    host = set(closure(FROM_HOST))
    assert set(FROM_WHEELHOUSE) <= in_venv
    assert set(FROM_HOST) <= from_host <= host
    assert set(got["locations"]) - host <= in_venv, "only torch, DALI and their dependencies may come from the host"
