"""RandAugment on the DALI graph (CPU; the GPU graph in the last, GPU-marked test) against the pillow
path's timm operations, operation by operation on the same 8-bit images, and the drawn order of two
operations kept."""
import numpy as np
import pytest
from PIL import Image
from nvidia.dali import fn, pipeline_def, types

from pipeline import dali_rand_augment
from pipeline.rand_augment import OPS, RandAugmentDraw, apply_op, argument

S, B, FILL = 32, 12, (124, 116, 104)
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:S, 0:S]
    out = []
    for i in range(B):
        base = np.stack([(xx * (3 + i % 5) + yy * 2) % 256, (yy * 5 + i * 20) % 256, (xx + yy) * 3 % 256], -1)
        out.append(np.clip(base * 0.6 + rng.integers(0, 60, (S, S, 3)), 0, 255).astype(np.uint8))
    return out


IMAGES = _images()


def dali_apply(draw: RandAugmentDraw, gpu: bool = False) -> np.ndarray:
    inputs = dali_rand_augment.graph_inputs(draw, S)
    names = list(inputs)

    @pipeline_def(batch_size=B, num_threads=1, device_id=0 if gpu else None)
    def pipe():
        outs = fn.external_source(source=lambda: [IMAGES] + [inputs[n] for n in names], num_outputs=len(names) + 1,
                                  batch=True, layout=["HWC"] + [""] * len(names))
        image = outs[0].gpu() if gpu else outs[0]
        return dali_rand_augment.apply_graph(fn.cast(image, dtype=types.FLOAT), dict(zip(names, outs[1:])),
                                             draw.op.shape[1], S, FILL)
    p = pipe()
    p.build()
    out = p.run()[0]
    return np.stack([np.asarray(t) for t in (out.as_cpu() if gpu else out)])


def pil_apply(draw: RandAugmentDraw, resample=Image.BICUBIC) -> np.ndarray:
    out = []
    for i, im in enumerate(IMAGES):
        img = Image.fromarray(im)
        for name, arg in draw.operations(i):
            img = apply_op(img, name, arg, FILL, resample)
        out.append(np.asarray(img))
    return np.stack(out).astype(np.float32)


def one_op(name: str, sign: float = 1.0) -> RandAugmentDraw:
    arg = float(argument(name, np.array([9.0]), np.array([sign]))[0])
    return RandAugmentDraw(np.full((B, 1), OPS.index(name)), np.ones((B, 1), bool), np.full((B, 1), arg))


@pytest.mark.parametrize("name", [n for n in OPS if n not in GEOMETRIC and n != "Equalize"])
def test_colour_and_level_operations_equal_pils_to_the_level(name):
    for sign in (1.0, -1.0):
        draw = one_op(name, sign)
        diff = np.abs(dali_apply(draw) - pil_apply(draw))
        assert diff.max() <= 1 and diff.mean() < 0.01, (name, sign, diff.mean(), diff.max())


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometric_operations_warp_with_pils_matrix(name):
    draw = one_op(name, -1.0)
    got = dali_apply(draw)
    # DALI's warp has no bicubic mode: against PIL's bilinear the matrices and the fill must agree closely
    bilinear = np.abs(got - pil_apply(draw, Image.BILINEAR))
    assert bilinear.mean() < 1.0, bilinear.mean()
    bicubic = np.abs(got - pil_apply(draw))
    assert bicubic.mean() < 5.0, bicubic.mean()
    untouched = np.abs(got - np.stack(IMAGES)).mean()
    assert untouched > 10 * bilinear.mean()          # the comparison is not trivially passed


def test_equalize_follows_a_close_formula():
    draw = one_op("Equalize")
    diff = np.abs(dali_apply(draw) - pil_apply(draw))
    assert diff.mean() < 3.0 and np.quantile(diff, 0.99) <= 8


def test_operations_skipped_by_their_coin_are_exact_identities():
    draw = one_op("Rotate")
    draw.apply[:] = False
    assert np.array_equal(dali_apply(draw), np.stack(IMAGES).astype(np.float32))


def test_two_operations_compose_in_the_drawn_order():
    a, b = OPS.index("Invert"), OPS.index("SolarizeAdd")
    op = np.array([[a, b], [b, a]] * (B // 2))
    draw = RandAugmentDraw(op, np.ones((B, 2), bool), np.where(op == b, 99.0, 0.0))
    got, want = dali_apply(draw), pil_apply(draw)
    assert np.abs(got - want).max() <= 1
    swapped = RandAugmentDraw(op[:, ::-1].copy(), draw.apply, draw.argument[:, ::-1].copy())
    assert np.abs(pil_apply(swapped) - want).mean() > 10        # order matters for this pair


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_graph_applies_the_same_operations_as_the_cpu_graph():
    """Every operation on DALI's GPU graph (per-sample operands moved to the device) against the CPU
    graph that the tests above compare with PIL."""
    for name in OPS:
        draw = one_op(name)
        cpu, gpu = dali_apply(draw), dali_apply(draw, gpu=True)
        assert np.abs(cpu - gpu).mean() < 0.5 and np.abs(cpu - gpu).max() <= 2, name
