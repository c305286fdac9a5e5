"""Every project module imports on its own, whichever is imported first (no import cycles).

A cycle only shows when a module of the cycle is the first one imported, so each module is imported
with the project's modules cleared from `sys.modules` before it (third-party modules stay cached).
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "trainer", "demokit")

PROBE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for k in [k for k in sys.modules if k.split('.')[0] in {PACKAGES!r}]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ': ' + traceback.format_exc(limit=-3))
print('\\n'.join(failed))
sys.exit(1 if failed else 0)
""".replace("{PACKAGES!r}", repr(set(PACKAGES)))


def project_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first():
    modules = project_modules()
    assert "trainer.checkpoint" in modules and "trainer.evaluation.runner" in modules
    proc = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


BARE = """
import sys
class Block:   # a bare GPU machine: no ftfy, regex, DALI or webdataset
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ftfy', 'regex', 'nvidia', 'webdataset'):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import pipeline.loader, trainer.batches, trainer.components, trainer.loop
print('ok')
"""


def test_the_training_path_imports_without_optional_libraries():
    """tools/gpu_report.py trains on machines without ftfy, regex, DALI or webdataset (pillow path,
    pre-tokenised captions): importing the training modules must not need them."""
    proc = subprocess.run([sys.executable, "-c", BARE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
