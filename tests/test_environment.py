"""The environment the project's own set-up script builds: pillow-simd, not Pillow, provides PIL."""
import importlib.metadata as md
import io


def _installed() -> set[str]:
    return {d.metadata["Name"].lower() for d in md.distributions()}


def test_pillow_simd_provides_pil():
    names = _installed()
    assert "pillow-simd" in names, "pillow-simd is not installed: run tools/setup_env.sh"
    assert "pillow" not in names, "Pillow is installed and has overwritten pillow-simd's PIL package"
    import PIL

    assert PIL.__version__ == md.version("pillow-simd")


def test_pil_round_trips_jpeg():
    from PIL import Image

    img = Image.new("RGB", (64, 48), (200, 30, 10))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    back = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert back.size == (64, 48)
    r, g, b = back.getpixel((32, 24))
    assert abs(r - 200) < 8 and abs(g - 30) < 8 and abs(b - 10) < 8
