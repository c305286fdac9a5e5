"""A non-editable install ships every package, subpackage and data file the entry points need.

The project is built from a clean copy of the checkout (its git-tracked and new, not ignored, files)
and installed with pip into a fresh virtual environment; nothing is downloaded. Third-party
packages (torch, numpy, DALI, setuptools ...) come from the interpreter running the tests: a `.pth`
file in the fresh environment appends that interpreter's site-packages to `sys.path`. A directory
appended that way is not itself scanned for `.pth` files, so the editable install of this project
there stays inactive and every project module must come from the fresh environment's own copy.
A package missing from pyproject.toml then fails to import here instead of on a user's machine.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "trainer", "demokit")
ENTRY_POINTS = ("tools/build_yfcc15m.py", "trainer/run.py", "tools/evaluate.py", "tools/demo.py",
                "tools/preview_augmentations.py", "tools/plot_metrics.py", "tools/gpu_report.py",
                "tools/verify_shards.py", "tools/convert_checkpoint.py", "tools/finetune.py")


def _source_files() -> list[str]:
    """The checkout's files as a fresh clone plus uncommitted work would have them (no build outputs)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:   # the suite runs in a git clone (.ci/run, README)
        pytest.fail(f"not a git checkout, so source files cannot be told from build outputs: {e}")
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def _modules(src: Path) -> list[str]:
    """Every importable module and package under the project's top-level packages, by dotted name."""
    names = []
    for pkg in PACKAGES:
        for path in sorted((src / pkg).rglob("*.py")):
            rel = path.relative_to(src).with_suffix("")
            if not all((src / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts))):
                continue        # a script in a data folder, not part of a package
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.append(".".join(parts))
    return names


def _clean_env() -> dict[str, str]:
    """The environment minus anything that would put the checkout (or another tree) on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(fresh venv directory, its python, the built source copy)."""
    pytest.importorskip("setuptools", reason="building the project offline needs setuptools here")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=_clean_env())
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_test_parent_site_packages.pth").write_text("".join(f"{p}\n" for p in ours))

    # pip of this interpreter installs into the fresh site-packages; --target never uninstalls anything
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)],
                          cwd=tmp, capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv, python, src


# One interpreter start for every check (torch is imported once): run each entry point as
# `python SCRIPT --help` would (its folder first on sys.path), import every project module, read the
# package data, and report where each project module came from, as one JSON object.
PROBE = """
import importlib, json, runpy, sys, traceback
from importlib import resources
from pathlib import Path
spec = json.loads(sys.argv[1])
packages, out = tuple(spec["packages"]), {"scripts": {}}

def project_modules():
    return {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] in packages}

saved_path = list(sys.path)
for script in spec["scripts"]:
    # a tool may put its checkout on sys.path (gpu_report does, for bare GPU machines): undo it after
    sys.path[:] = saved_path
    sys.argv, sys.path[0] = [script, "--help"], script.rsplit("/", 1)[0]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception:
        code = traceback.format_exc()
    out["scripts"][script] = {"code": code, "loaded": project_modules()}
sys.path[:] = saved_path

out["modules"] = {}
for name in spec["modules"]:
    try:
        out["modules"][name] = importlib.import_module(name).__file__
    except Exception as e:
        out["modules"][name] = f"not importable: {e!r}"

from pipeline.tokenizer import Tokenizer, vocab_path
out["vocab"] = str(vocab_path())
out["vocab_found"] = vocab_path().is_file()
out["row"] = Tokenizer()("a photo of a red circle", context_length=8)[0].tolist()
out["configs"] = sorted(p.name for p in (resources.files("trainer") / "configs").iterdir() if p.name.endswith(".yaml"))
out["classnames"] = (resources.files("trainer") / "data" / "imagenet_classnames.json").is_file()
configs = Path(str(resources.files("trainer"))) / "configs"
out["eval_lists"] = sorted(str(p.relative_to(configs)) for p in (configs / "eval" / "lists").rglob("*.txt"))
from trainer.evaluation.suite import load_suite, subset_names     # a shipped suite resolves its lists
try:
    ood = load_suite(configs / "eval" / "imagenet_ood.yaml")
    out["ood_sizes"] = [len(subset_names(d.labels)[0]) for d in ood.datasets]
except Exception as e:
    out["ood_sizes"] = repr(e)
sys.stdout.flush()
print("\\n" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(installed) -> dict:
    venv, python, src = installed
    spec = {"packages": PACKAGES, "scripts": [str(src / s) for s in ENTRY_POINTS], "modules": _modules(src)}
    proc = subprocess.run([str(python), "-c", PROBE, json.dumps(spec)], cwd=venv, capture_output=True, text=True,
                          env=_clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inside(path: str | None, venv: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(venv.resolve())


def test_every_module_imports_from_the_install(installed, probe):
    venv, python, src = installed
    assert {"pipeline", "trainer", "demokit", "demokit.data", "demokit.http_server",
            "pipeline.tokenizer", "trainer.checkpoint"} <= set(probe["modules"])
    outside = {name: f for name, f in probe["modules"].items() if not _inside(f, venv)}
    assert not outside, f"imported from outside the fresh install: {outside}"


def test_package_data_comes_with_the_install(installed, probe):
    venv, python, src = installed
    assert probe["vocab_found"] and _inside(probe["vocab"], venv), probe["vocab"]
    assert probe["row"][0] == 49406 and 49407 in probe["row"]              # SOT ... EOT from the shipped vocab
    assert probe["configs"] == sorted(p.name for p in (src / "trainer" / "configs").glob("*.yaml"))
    assert probe["classnames"]
    configs = src / "trainer" / "configs"
    lists = sorted(str(p.relative_to(configs)) for p in (configs / "eval" / "lists").rglob("*.txt"))
    assert probe["eval_lists"] == lists and len(lists) > 4
    assert probe["ood_sizes"] == [1000, 1000, 200, 200]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_point_help_runs_on_the_install(installed, probe, script):
    venv, python, src = installed
    got = probe["scripts"][str(src / script)]
    assert got["code"] == 0, got["code"]
    outside = {name: f for name, f in got["loaded"].items() if not _inside(f, venv)}
    assert not outside, f"{script} imported project modules from outside the fresh install: {outside}"
