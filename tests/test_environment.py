"""The environment the project's own set-up script (tools/setup_env.sh) promises: the project and its
declared dependencies installed at versions it accepts, a DALI build that runs on the CPU, and
pillow-simd, not Pillow, providing PIL."""
import importlib.metadata as md
import io
from importlib import resources

import numpy as np
import pytest
from packaging.requirements import Requirement

PROJECT = "slipstream"
SETUP_HINT = "run tools/setup_env.sh"


def _installed() -> set[str]:
    return {d.metadata["Name"].lower() for d in md.distributions()}


def test_pillow_simd_provides_pil():
    names = _installed()
    assert "pillow-simd" in names, "pillow-simd is not installed: run tools/setup_env.sh"
    assert "pillow" not in names, "Pillow is installed and has overwritten pillow-simd's PIL package"
    import PIL

    assert PIL.__version__ == md.version("pillow-simd")


def test_declared_dependencies_are_installed():
    """Every requirement of the installed project (runtime, the dev extra, one DALI extra) is met."""
    try:
        requires = md.requires(PROJECT) or []
    except md.PackageNotFoundError:
        pytest.fail(f"the project ({PROJECT}) is not installed: {SETUP_HINT}")
    unmet, dali = [], []
    for req in map(Requirement, requires):
        extra = next((e for e in ("", "dev", "dali-cuda130", "dali-cuda120")
                      if req.marker is None or req.marker.evaluate({"extra": e})), None)
        if extra is None:
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            version = None
        met = version is not None and req.specifier.contains(version, prereleases=True)
        if extra.startswith("dali-"):
            dali.append(met)
        elif not met:
            unmet.append(f"{req} (installed: {version})")
    assert not unmet, f"unmet requirements: {unmet}; {SETUP_HINT}"
    assert any(dali), f"no DALI build installed (the dali-cuda130 or dali-cuda120 extra): {SETUP_HINT}"


def test_project_package_data_is_found():
    from pipeline.tokenizer import VOCAB_FILE, vocab_path

    data = resources.files("pipeline") / "data" / VOCAB_FILE
    assert data.is_file() and vocab_path().is_file()
    configs = resources.files("trainer") / "configs"
    assert (configs / "demo_slip.yaml").is_file() and (configs / "slip_vit_b16.yaml").is_file()


def test_dali_decodes_and_resizes_on_the_cpu():
    """DALI without a GPU: decode JPEGs written by pillow-simd and resize them, as the CPU pipeline does."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    colours = [(200, 30, 10), (20, 40, 220)]
    jpegs = []
    for rgb in colours:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), rgb).save(buf, format="JPEG", quality=95)
        jpegs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))

    @pipeline_def(batch_size=len(jpegs), num_threads=1, device_id=None)
    def decode_resize():
        encoded = fn.external_source(source=lambda: jpegs, batch=True)
        return fn.resize(fn.decoders.image(encoded, device="cpu", output_type=types.RGB), resize_x=32, resize_y=24)

    pipe = decode_resize()
    pipe.build()
    (out,) = pipe.run()
    for i, rgb in enumerate(colours):
        img = np.asarray(out.at(i))
        assert img.shape == (24, 32, 3)
        assert np.abs(img.reshape(-1, 3).mean(0) - rgb).max() < 8
