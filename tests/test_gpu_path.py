"""The GPU path's plain logic on the CPU: device indices (current device, SLURM), the peak-FLOP/s
table, the stream hand-off plumbing, buffer lifetime, late bad samples (a JPEG the graph's decoder
rejects although PIL reads it), and the GPU-vs-CPU agreement measure. The tests marked `gpu` run
the same checks on a CUDA device."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pipeline.dali_pipeline as dali_pipeline
from pipeline.augment import BadSampleError
from pipeline.dali_pipeline import (GPU_CPU_TOLERANCE, DaliAugmenter, ImageProbe, graph_agreement,
                                    rejected_samples)
from pipeline.loader import SLIPLoader
from pipeline.manifest import load_manifest
from pipeline.recipe import AugmentationRecipe
from shard_testing import caption_sample, chars, encode, write_shards
from trainer.batches import data_placement
from trainer.distributed import cuda_device_index, local_device_index
from trainer.flops import peak_flops, peak_for_name

RECIPE = AugmentationRecipe(image_size=32)
VIEWS = ["clip_image", "ssl_image_1", "ssl_image_2"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = np.zeros((40 + i % 7 * 5, 50 + i % 5 * 6, 3))
    img[...] = rng.integers(0, 255, 3)
    img[5:20, 10:30] = rng.integers(0, 255, 3)
    return img


def cut_mid_scan() -> bytes:
    """A JPEG whose header is fine and whose scan stops half way: PIL's header check passes it."""
    noise = encode(np.random.default_rng(0).integers(0, 255, (200, 200, 3)))
    return noise[:len(noise) // 2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    samples = [caption_sample(image(i), f"title {i}", f"description {i}") for i in range(24)]
    return load_manifest(write_shards(tmp_path_factory.mktemp("gpu_path"), samples, per_shard=10))


def loader(m, **kw):
    kw = {"batch_size": 4, "num_threads": 1, "backend": "dali", **kw}
    return SLIPLoader(m, kw.pop("recipe", RECIPE), kw.pop("batch_size"), chars, **kw)


def with_broken(plan, slot: int):
    encoded = list(plan.encoded)
    encoded[slot] = np.frombuffer(cut_mid_scan(), np.uint8)
    return dataclasses.replace(plan, encoded=encoded)


# ---------------------------------------------------------------- device indices

def test_an_index_less_cuda_device_is_the_current_device():
    assert cuda_device_index(torch.device("cuda", 2), current=5) == 2
    assert cuda_device_index(torch.device("cuda"), current=5) == 5
    assert cuda_device_index(torch.device("cuda:0"), current=5) == 0
    with pytest.raises(ValueError, match="not a CUDA device"):
        cuda_device_index(torch.device("cpu"), current=0)


def test_the_loader_augments_on_the_training_device_index():
    cuda = torch.device("cuda")       # what tools/bench/bench_train.py builds: no index
    assert data_placement("auto", "dali", cuda, current=3) == ("gpu", 3)
    assert data_placement("auto", "dali", torch.device("cuda", 1), current=3) == ("gpu", 1)
    assert data_placement("gpu", "dali", torch.device("cpu"), current=0) == ("gpu", 0)
    assert data_placement("auto", "pillow", cuda, current=3) == ("cpu", None)
    assert data_placement("auto", "dali", torch.device("cpu")) == ("cpu", None)
    assert data_placement("cpu", "dali", cuda) == ("cpu", None)


def test_slurm_tasks_with_one_visible_gpu_use_device_zero():
    assert [local_device_index(r, 8) for r in range(8)] == list(range(8))    # torchrun: all GPUs visible
    assert [local_device_index(r, 1) for r in range(8)] == [0] * 8          # srun --gpus-per-task=1
    assert local_device_index(5, 4) == 1                                     # 2 visible GPUs... any count
    with pytest.raises(RuntimeError, match="no visible CUDA device"):
        local_device_index(0, 0)


# ---------------------------------------------------------------- MFU peak

def test_the_peak_table_knows_the_h200_and_tells_boards_apart():
    assert peak_for_name("NVIDIA H200") == 989e12
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA GH200 480GB") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_for_name("NVIDIA H200 NVL") == 835e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_for_name("NVIDIA A10G") == 70e12 and peak_for_name("NVIDIA A10") == 125e12
    assert peak_for_name("NVIDIA L40S") == 362e12 and peak_for_name("NVIDIA L4") == 121e12
    assert peak_for_name("Some Future GPU") is None
    assert peak_flops(torch.device("cpu")) is None and peak_flops(torch.device("cpu"), 100) == 100e12


# ---------------------------------------------------------------- stream-ordered hand-off

def test_gpu_outputs_are_asked_for_on_the_callers_stream(manifest, monkeypatch):
    """The augmenter hands DALI the caller's current torch stream of its device (no host sync)."""
    plan = loader(manifest).make_batch(0, 0)
    aug = DaliAugmenter(RECIPE, lambda: plan, 4, num_threads=1, prefetch=1)
    assert aug._consumer_stream() is None          # CPU: outputs are host memory, nothing to order
    asked = []

    class Pipe:
        def run(self, *args, **kwargs):
            asked.append((args, kwargs))
            return [f"out{i}" for i in range(3)]

    aug.device, aug.device_id, aug.pipe = "gpu", 3, Pipe()
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: SimpleNamespace(cuda_stream=0xBEEF if device == 3 else None))
    aug.in_flight.append(plan)
    views, got = aug.run()
    assert asked == [((0xBEEF,), {})] and got is plan and views["clip_image"] == "out0"


def test_held_batches_survive_later_runs(manifest):
    """DALI's dynamic executor hands out fresh buffers that live as long as the tensor: batches kept
    while the loader runs on are unchanged, and no two share memory."""
    held = [{k: b[k] for k in VIEWS} for b in loader(manifest, prefetch=2)]
    fresh = list(loader(manifest, prefetch=2))
    assert len(held) == len(fresh) == 6
    for h, f in zip(held, fresh):
        assert all(torch.equal(h[k], f[k]) for k in VIEWS)
    assert len({h[k].data_ptr() for h in held for k in VIEWS}) == len(held) * len(VIEWS)


# ---------------------------------------------------------------- late bad samples

def test_rejected_samples_are_those_the_decoder_refuses(manifest):
    plan = loader(manifest).make_batch(0, 0)
    refused = plan.encoded[1].tobytes()
    found = rejected_samples(plan, lambda data: data.tobytes() != refused)
    assert found == {int(plan.indices[1]): "late_decode_failure"}
    aug = DaliAugmenter(RECIPE, lambda: plan, 4, num_threads=1, prefetch=1,
                        decodes=lambda data: data.tobytes() != refused)
    assert aug.find_bad(plan) == found         # PIL reads them all: the decoder's word decides
    aug.close()


def test_the_probe_decodes_one_image_with_the_graphs_decoder():
    probe = ImageProbe("cpu")
    assert probe(np.frombuffer(encode(image(1)), np.uint8))
    assert not probe(np.frombuffer(cut_mid_scan(), np.uint8))
    assert probe(np.frombuffer(encode(image(2)), np.uint8))     # usable again after a failure


def test_a_sample_only_the_graph_rejects_is_named(manifest, monkeypatch):
    """PIL reads every image (as with a JPEG only nvJPEG refuses), the graph fails: the graph's own
    decoder, one image at a time, names the culprit."""
    monkeypatch.setattr(dali_pipeline, "undecodable_samples", lambda plan: {})
    plan = with_broken(loader(manifest).make_batch(0, 0), 2)
    aug = DaliAugmenter(RECIPE, lambda: plan, 4, num_threads=1, prefetch=1)
    with pytest.raises(BadSampleError) as e:
        aug.run()
    aug.close()
    assert e.value.samples == {int(plan.indices[2]): "late_decode_failure"}


def test_a_failure_no_sample_explains_is_raised_as_it_came(manifest, monkeypatch):
    monkeypatch.setattr(dali_pipeline, "undecodable_samples", lambda plan: {})
    plan = with_broken(loader(manifest).make_batch(0, 0), 2)
    aug = DaliAugmenter(RECIPE, lambda: plan, 4, num_threads=1, prefetch=1, decodes=lambda data: True)
    with pytest.raises(RuntimeError) as e:
        aug.run()
    aug.close()
    assert not isinstance(e.value, BadSampleError)


def test_a_late_bad_sample_is_counted_and_replaced_never_a_crash(tmp_path, monkeypatch):
    """An image that passes every check of the planning stage and that only the graph's decoder
    rejects: the loader's structural check (where it has one) and the PIL scan are switched off."""
    import pipeline.loader
    monkeypatch.setattr(pipeline.loader, "jpeg_problem", lambda data: None, raising=False)
    monkeypatch.setattr(dali_pipeline, "undecodable_samples", lambda plan: {})
    samples = [caption_sample(image(i), f"title {i}") for i in range(11)]
    samples.insert(5, {"jpg": cut_mid_scan(), "txt": "passes the header check"})
    ld = loader(load_manifest(write_shards(tmp_path, samples, per_shard=6)))
    batches = list(ld)
    assert len(batches) == 3 and all(b["clip_image"].shape == (4, 3, 32, 32) for b in batches)
    assert 5 not in {i for b in batches for i in b["index"].tolist()}
    assert ld.bad_reasons["late_decode_failure"] >= 1 and sum(b["bad_samples"] for b in batches) == ld.bad_samples


# ---------------------------------------------------------------- GPU against CPU graph

def fake_batch(index, value: float, n: int = 2) -> dict:
    b = {v: torch.full((n, 3, 4, 4), value) for v in VIEWS}
    b["index"], b["text"] = torch.tensor(index), torch.zeros(n, 3, dtype=torch.long)
    return b


def test_agreement_compares_every_batch_and_counts_late_replacements():
    ref = [fake_batch([0, 1], 0.0), fake_batch([2, 3], 0.0), fake_batch([4, 5], 0.0)]
    got = [fake_batch([0, 1], 0.01), fake_batch([2, 9], 5.0), fake_batch([4, 5], -0.02)]
    got[2]["ssl_image_1"][0, 0, 0, 0] = 0.5
    r = graph_agreement(ref, got, VIEWS)
    assert (r["batches"], r["compared"], r["late_replaced"], r["text_mismatch"]) == (3, 2, 1, 0)
    assert r["views"]["clip_image"]["mean"] == pytest.approx(0.015)
    assert r["views"]["ssl_image_1"]["max"] == pytest.approx(0.5) and r["max"] == pytest.approx(0.5)
    assert r["within_tolerance"] and r["tolerance"] == GPU_CPU_TOLERANCE
    got[0]["text"][0, 0] = 7
    assert not graph_agreement(ref, got, VIEWS)["within_tolerance"]
    assert not graph_agreement(ref, [fake_batch([0, 1], 0.1)] + got[1:], VIEWS)["within_tolerance"]
    with pytest.raises(ValueError):
        graph_agreement(ref, got[:2], VIEWS)       # the two epochs must have the same length


def test_the_cpu_graph_agrees_with_itself_exactly(manifest):
    r = graph_agreement(loader(manifest), loader(manifest, num_threads=2), VIEWS)
    assert r["compared"] == 6 and r["max"] == 0.0 and r["within_tolerance"]


# ---------------------------------------------------------------- the same on a GPU

@pytest.mark.gpu
@needs_cuda
def test_gpu_batches_held_across_later_runs_stay_unchanged(manifest):
    held = [{k: b[k] for k in VIEWS} for b in loader(manifest, device="gpu", device_id=0)]
    kept = [{k: v.clone() for k, v in h.items()} for h in held]
    for _ in loader(manifest, device="gpu", device_id=0):     # more GPU work while they are held
        pass
    torch.cuda.synchronize()
    assert all(torch.equal(h[k], c[k]) for h, c in zip(held, kept) for k in VIEWS)
    assert len({h[k].data_ptr() for h in held for k in VIEWS}) == len(held) * len(VIEWS)


@pytest.mark.gpu
@needs_cuda
def test_gpu_graph_is_deterministic_and_ordered_on_a_side_stream(manifest):
    first = [{k: b[k].cpu() for k in VIEWS} for b in loader(manifest, device="gpu", device_id=0)]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):          # consumed on a non-default stream, no explicit sync
        again = [{k: (b[k] * 1).cpu() for k in VIEWS} for b in loader(manifest, device="gpu", device_id=0)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in VIEWS)


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_rejection_is_a_late_bad_sample(manifest, monkeypatch):
    monkeypatch.setattr(dali_pipeline, "undecodable_samples", lambda plan: {})
    plan = with_broken(loader(manifest).make_batch(0, 0), 1)
    aug = DaliAugmenter(RECIPE, lambda: plan, 4, num_threads=1, prefetch=1, device="gpu", device_id=0)
    with pytest.raises(BadSampleError) as e:
        aug.run()
    aug.close()
    assert e.value.samples == {int(plan.indices[1]): "late_decode_failure"}
