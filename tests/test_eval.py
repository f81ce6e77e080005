"""eval.py: the metrics against their reference implementations (torch-fidelity, scipy, CLIPImageProcessor, PIL,
closed forms) on tiny or randomly initialised networks built here, and the sampler against an exact flow."""

import argparse
import datetime
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import eval as ev
from model import CHECKSUMS, PRX


def blocky_images(n, seed, size=64, brightness=0):
    """(n, 3, size, size) uint8: random 8x8 colour blocks, upsampled; structured enough to give spread features."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 200, (n, 3, 8, 8), generator=g) + brightness
    return F.interpolate(small.float(), size=(size, size), mode="nearest").clamp(0, 255).to(torch.uint8)


def write_folder(path, images):
    os.makedirs(path)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(path, f"{i}.png"))
    return str(path)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "inception.pth")
    ev.write_random_inception_weights(path)
    return path


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_dino(**kwargs):
    return ev.load_dino(img_size=28, embed_dim=32, depth=1, num_heads=2, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# FID

def test_fid_equals_torch_fidelity(one_process, inception_weights, tmp_path, capsys):
    import torch_fidelity
    real, fake = one_process.real, one_process.fake  # the reference was streamed in batches of 1 and 2: sums
    theirs = torch_fidelity.calculate_metrics(
        input1=write_folder(tmp_path / "fake", fake), input2=write_folder(tmp_path / "real", real), fid=True,
        feature_extractor_weights_path=inception_weights, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True)["frechet_inception_distance"]
    ev.Metrics(None, ["fid"], fid_weights=inception_weights)
    assert "note: FID" not in capsys.readouterr().out  # no count given: no note
    fid = one_process.scores["fid"]  # ours: ev.Metrics' compute() against the reference file, in one process
    assert fid > 1e-3
    assert abs(fid - theirs) <= 1e-3 * abs(theirs)
    ev.Metrics(None, ["fid"], fid_weights=inception_weights, count=2047, count_flag="--eval-samples")
    assert "note: FID of 2047 images (--eval-samples): fewer than Inception's 2048" in capsys.readouterr().out
    ev.Metrics(None, ["fid"], fid_weights=inception_weights, count=2048)
    assert "note" not in capsys.readouterr().out


def test_inception_features_do_not_depend_on_batch(inception_weights):
    net = ev.load_inception(inception_weights)
    images = blocky_images(2, seed=2)
    batched = ev.inception_features(net, images)
    single = torch.cat([ev.inception_features(net, images[i:i + 1]) for i in range(2)])
    assert batched.abs().mean() > 1e-3  # the He-initialised network does not collapse to zero
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=1e-5)


def test_streamed_statistics_equal_numpy():
    x = torch.randn(50, 6, dtype=torch.float64) * torch.arange(1, 7) + 3  # offset, varied scales, correlated
    x[:, 1] += 0.5 * x[:, 0]
    stats = ev.GaussianStats(6, "cpu")
    for part in (x[:1], x[1:8], x[8:]):
        stats.update(part)
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_a_covariance_of_one_image_is_refused():
    """The unbiased covariance divides by n - 1: of one feature row it is refused, of two it is the closed form."""
    stats = ev.GaussianStats(2, "cpu")
    stats.update(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        stats.mean_cov()
    stats.update(torch.tensor([[3.0, 0.0]]))
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, [2.0, 1.0])
    np.testing.assert_allclose(cov, [[2.0, -2.0], [-2.0, 2.0]])


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms_and_sqrtm():
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.standard_normal(20), rng.standard_normal(20), random_spd(20, rng), random_spd(20, rng)
    assert abs(ev.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    np.testing.assert_allclose(ev.frechet_distance(mu1, s1, mu2, s1), np.sum((mu1 - mu2) ** 2), rtol=1e-8)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    np.testing.assert_allclose(ev.frechet_distance(mu1, s1, mu2, s2), direct, rtol=1e-6)


def test_frechet_distance_of_rank_deficient_statistics():
    """Fewer images than features: the eigenvalues of s @ s may all come back real, one a tiny negative; the distance
    of a set to itself is still 0, not nan (the square root is taken in complex numbers)."""
    stats = ev.GaussianStats(4, "cpu")
    stats.update(torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    mu, sigma = stats.mean_cov()
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_a_reset_metrics_scores_each_evaluation_alone(one_process, inception_weights):
    """train.py keeps one Metrics for all of a run's evaluations: after reset() FID sees the new images only."""
    metrics = ev.Metrics(one_process.ref, ["fid"], fid_weights=inception_weights)
    metrics.update(one_process.real)  # an earlier evaluation's images
    metrics.reset()
    metrics.update(one_process.fake)
    score = metrics.compute()["fid"]
    assert score == pytest.approx(one_process.scores["fid"], rel=1e-9) and score > 1  # a fresh Metrics' score
    metrics.reset()
    metrics.update(one_process.real[:1])  # the reference's own images, streamed as it was: its very statistics,
    metrics.update(one_process.real[1:])  # so FID 0 (frechet_distance of equal statistics: the closed forms above)
    ours, ref = metrics.features(), ev.read_reference(one_process.ref)
    assert ours["count"] == int(ref["count"]) == 3
    np.testing.assert_allclose(ours["fid_mu"], ref["fid_mu"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours["fid_cov"], ref["fid_cov"], rtol=1e-12, atol=1e-12)


def test_missing_fid_weights_say_what_and_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        ev.load_inception(str(tmp_path / "missing.pth"))
    (tmp_path / "page.pth").write_text("<html>404</html>")  # a saved web page; a folder
    for path, error, message in ((tmp_path / "page.pth", ValueError, "not the Inception's weights"),
                                 (tmp_path, FileNotFoundError, "no such file")):
        with pytest.raises(error, match=f"--fid-weights {re.escape(str(path))}: {message}"):
            ev.load_inception(str(path))
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")  # another network's: torch lists each key
    with pytest.raises(ValueError, match=r"not the Inception's weights \(RuntimeError: Error\(s\) in loading") as info:
        ev.load_inception(str(tmp_path / "other.pth"))
    assert "\n" not in str(info.value)  # one error line

    def offline(url, dst, *args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="--fid-weights") as info:
        ev.load_inception()
    assert str(tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in str(info.value)


def test_inception_weights_are_read_as_tensors_only(inception_weights, tmp_path, monkeypatch):
    load, calls = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs.get("weights_only")) or
                        load(*args, **kwargs))
    net = ev.load_inception(inception_weights)
    assert calls == [True]  # one read, of tensors only: torch-fidelity's torch.load(weights_only=False) never runs
    for name, tensor in load(inception_weights, weights_only=True).items():
        assert torch.equal(net.state_dict()[name], tensor)

    class Payload:
        def __reduce__(self):
            return print, ("unpickled",)
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, tmp_path / "payload.pth")
    with pytest.raises(ValueError, match="not the Inception's weights \\(UnpicklingError: Weights only load failed"):
        ev.load_inception(str(tmp_path / "payload.pth"))


# ----------------------------------------------------------------------------------------------------------
# MMD, CLIP, DINO

def test_mmd_closed_forms_and_chunks():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 5, generator=g) * 4, torch.randn(23, 5, generator=g) * 4 + 1
    assert ev.mmd(x, x) == 0.0
    d2 = (x[0].double() - y[0].double()).square().sum().item()
    assert ev.mmd(x[:1], y[:1]) == pytest.approx(1000 * (2 - 2 * np.exp(-d2 / 200)), rel=1e-12)
    assert ev.mmd(x, y, chunk=4) == pytest.approx(ev.mmd(x, y, chunk=10_000), rel=1e-12)
    # sets of different sizes (a reference larger than the samples): each mean over its own pairs
    k = lambda a, b: torch.exp(-torch.cdist(a.double(), b.double()).square() / 200).mean().item()
    assert ev.mmd(x, y) == pytest.approx(1000 * (k(x, x) + k(y, y) - 2 * k(x, y)), rel=1e-9)


def test_to_uint8_inverts_the_training_scale_and_clamps():
    """Samples go to images by the inverse of the loader's u / 127.5 - 1 (train.micro_batch): every byte returns
    to itself; values past [-1, 1] clamp to 0 and 255."""
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(ev.to_uint8(u.float() / 127.5 - 1), u)
    assert ev.to_uint8(torch.tensor([-1.5, 1.5])).tolist() == [0, 255]


def test_each_process_samples_every_world_th_prompt(monkeypatch):
    """Under torchrun, rank r of w takes prompts r, r + w, r + 2w, ... in batches: the ranks together take each once."""
    monkeypatch.setattr(ev, "distributed", lambda: True)
    monkeypatch.setattr(ev.dist, "get_world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(ev.dist, "get_rank", lambda rank=rank: rank)
        shares.append([list(batch) for batch in ev.my_batches(10, 2)])
    assert shares[1] == [[1, 4], [7]]
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(10))
    batches = ev.my_batches(10**9, 32)  # a mistyped --num-samples: batches made as they are sampled, not all first
    assert inspect.isgenerator(batches.iterable) and batches.total == math.ceil(len(range(2, 10**9, 3)) / 32)  # rank 2


def test_a_grid_cut_short_leaves_no_file(tmp_path, monkeypatch):
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    def cut_short(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG")  # what a kill leaves of the file being written
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", cut_short)
        with pytest.raises(KeyboardInterrupt):
            ev.save_grid(images, ["a", "b"], str(tmp_path / "g.png"))
    assert os.listdir(tmp_path) == []  # no grid, no temporary file: one before it would stay as it was
    ev.save_grid(images, ["a", "b"], str(tmp_path / "g.png"))
    assert Image.open(tmp_path / "g.png").format == "PNG"
    ev.save_grid(images, ["a", "b"], str(tmp_path / "g.jpg"))  # sample --out x.jpg
    assert Image.open(tmp_path / "g.jpg").format == "JPEG"


def test_an_evaluation_reads_the_runs_eval_data_and_sample_its_data(tmp_path):
    args, train_args = SimpleNamespace(data=None, ckpt="run"), {"data": "builtin", "eval_data": str(tmp_path)}
    assert ev.run_data(args, train_args, evaluation=True) == str(tmp_path)
    assert ev.run_data(args, train_args) == "builtin"


def test_crop_resize_matches_pil():
    g = torch.Generator().manual_seed(0)
    blocks = blocky_images(2, seed=3, size=40)
    blocks = (blocks.int() + torch.randint(-20, 21, blocks.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    for images, centre in ((blocks[..., :36], np.s_[2:38]), (blocks[..., :36, :], np.s_[:, 2:38])):  # tall, wide
        for size in (28, 50):  # down and up: the centre 36 x 36 square, resized
            ours = ev.crop_resize(images, size).permute(0, 2, 3, 1).int().numpy()
            for i, im in enumerate(images.permute(0, 2, 3, 1).numpy()):
                pil = np.asarray(Image.fromarray(im[centre]).resize((size, size), Image.BICUBIC)).astype(int)
                assert np.abs(ours[i] - pil).max() <= 2 and (ours[i] != pil).mean() < 0.02


def test_clip_features_equal_the_cmmd_pipeline(tmp_path):
    tiny_clip().save_pretrained(tmp_path / "clip")
    model = ev.load_clip(str(tmp_path / "clip"))  # the loader of the real model, on a local folder
    images = blocky_images(3, seed=4, size=28)
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False)  # CLIP mean/std, rescale by 1/255
    pixels = processor(list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = F.normalize(model(pixel_values=pixels).image_embeds, dim=-1)
        ours = ev.clip_features(model, images)
        single = torch.cat([ev.clip_features(model, images[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, ours, atol=1e-5, rtol=1e-5)
    from transformers import CLIPVisionModel  # CLIP without the projection CMMD reads: refused, not left random
    CLIPVisionModel(tiny_clip().config).save_pretrained(tmp_path / "no-projection")
    with pytest.raises(ValueError, match="not a CLIP vision model with projection: 1 of its weights .*projection"):
        ev.load_clip(str(tmp_path / "no-projection"))


def test_dino_features_are_the_normalised_cls_token(tmp_path):
    save_file(tiny_dino(pretrained=False).state_dict(), tmp_path / "dino.safetensors")
    model = tiny_dino(weights=str(tmp_path / "dino.safetensors"))  # offline weights file
    images = blocky_images(3, seed=5, size=28)
    mean, std = torch.tensor(model.pretrained_cfg["mean"]), torch.tensor(model.pretrained_cfg["std"])
    with torch.no_grad():
        expected = F.normalize(model((images / 255 - mean[:, None, None]) / std[:, None, None]), dim=-1)  # timm head
        ours = ev.dino_features(model, images)
        single = torch.cat([ev.dino_features(model, images[i:i + 1]) for i in range(3)])
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # ImageNet
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, ours, atol=1e-5, rtol=1e-5)
    small = blocky_images(3, seed=6, size=20)  # resized as PRX's DINO-MMD: float bicubic, no antialiasing
    resized = F.interpolate(small.float() / 255, size=(28, 28), mode="bicubic", align_corners=False)
    with torch.no_grad():
        expected = F.normalize(model((resized - mean[:, None, None]) / std[:, None, None]), dim=-1)
        torch.testing.assert_close(ev.dino_features(model, small), expected, atol=1e-5, rtol=1e-5)


def test_clip_and_dino_offline_fail_fast_and_say_what_to_fetch(unreachable_hub):
    import timm  # noqa: F401 (imported before the clock)
    for load, fetch, flag in ((ev.load_clip, f"`hf download {ev.CLIP_ID}`", "--clip"),
                              (ev.load_dino, f"`hf download timm/{ev.DINO_ID} model.safetensors`", "--dino-weights"),
                              (lambda: ev.load_dino(flag="--repa-weights"), "model.safetensors", "--repa-weights")):
        start = time.time()
        with pytest.raises(RuntimeError, match="http://127.0.0.1:9 cannot be reached") as info:
            load()
        assert time.time() - start < 5 and fetch in str(info.value) and flag in str(info.value)
    with pytest.raises(FileNotFoundError, match="--clip ./no/clip: no such folder; pass a folder holding a local"):
        ev.load_clip("./no/clip")  # a path, not a hub id: no `hf download ./no/clip`


def test_a_dino_weights_file_that_is_not_weights_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_text("<html>404</html>")  # a saved web page
    with pytest.raises(ValueError, match=f"--dino-weights {re.escape(str(tmp_path))}/model.safetensors: not "
                                         f"model.safetensors of timm/{ev.DINO_ID}"):
        tiny_dino(weights=str(tmp_path / "model.safetensors"))


def test_metric_networks_run_in_full_fp32_whatever_the_caller_set(monkeypatch):
    """Metrics.update runs the networks without TF32 (train.py turns it on for CUDA's matmuls and convolutions; cuDNN's
    default is on) and without the caller's autocast, and gives the caller its settings back."""
    seen = []

    def features(net, images):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.is_autocast_enabled("cpu")))
        return torch.ones(len(images), 4)
    monkeypatch.setitem(ev.FEATURES, "cmmd", features)
    metrics = ev.Metrics(None, ["cmmd"], clip=tiny_clip())
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train.py's setup_distributed
        with torch.autocast("cpu", torch.bfloat16):
            metrics.update(blocky_images(2, seed=6, size=28))
            assert torch.is_autocast_enabled("cpu")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert seen == [(False, False, False)]


def test_metrics_stream_gather_and_refuse_mismatched_references(tmp_path):
    clip, dino = tiny_clip(), tiny_dino(pretrained=False)
    real, fake = blocky_images(3, seed=6, size=28), blocky_images(3, seed=7, size=28, brightness=30)
    ref = ev.Metrics(None, ["cmmd", "dino_mmd"], clip=clip, dino=dino)
    ref.update(real)
    ref.save_reference(tmp_path / "ref.npz")
    metrics = ev.Metrics(tmp_path / "ref.npz", ["cmmd", "dino_mmd"], clip=clip, dino=dino)
    metrics.update(fake[:1])
    metrics.update(fake[1:])
    with torch.no_grad():
        expected = {"cmmd": ev.mmd(ev.clip_features(clip, fake), ev.clip_features(clip, real)),
                    "dino_mmd": ev.mmd(ev.dino_features(dino, fake), ev.dino_features(dino, real))}
    result = metrics.compute()
    assert result == pytest.approx(expected, rel=1e-6) and min(result.values()) > 0
    metrics.reset()
    with torch.autocast("cpu", torch.bfloat16):  # a caller's autocast (a training step's) stops at the metrics
        metrics.update(fake)
    assert metrics.compute() == pytest.approx(expected, rel=1e-6)
    metrics.reset()
    metrics.update(real)
    assert metrics.compute() == pytest.approx({"cmmd": 0.0, "dino_mmd": 0.0}, abs=1e-9)

    metrics.reset()
    metrics.update(real[:2])
    with pytest.raises(ValueError, match="holds 3 images"):
        metrics.compute()
    with pytest.raises(ValueError, match="other settings: cmmd"):
        ev.Metrics(tmp_path / "ref.npz", ["cmmd"], clip=tiny_clip(seed=1))  # other weights
    loaded = []  # --dino-weights: the hub id's network from the local file, loaded after the reference's checks

    def load_dino(name, weights=None, **kwargs):
        loaded.append((name, weights, kwargs))
        return dino
    ev_load_dino, ev.load_dino = ev.load_dino, load_dino
    try:
        with pytest.raises(ValueError, match="holds 3 images"):
            ev.Metrics(tmp_path / "ref.npz", ["dino_mmd"], dino_weights="w.safetensors", count=2, resolution=28)
        assert loaded == []
        metrics = ev.Metrics(tmp_path / "ref.npz", None, clip=clip, dino_weights="w.safetensors")
    finally:
        ev.load_dino = ev_load_dino
    assert loaded == [(ev.DINO_ID, "w.safetensors", {})]
    assert metrics.metrics == ("cmmd", "dino_mmd")  # None: those the reference holds


def test_metrics_asked_for_are_a_subset_of_the_reference(tmp_path):
    """A reference of cmmd and dino_mmd serves --metrics cmmd: CMMD alone is computed (no DINO loaded)."""
    clip, dino = tiny_clip(), tiny_dino(pretrained=False)
    ref = ev.Metrics(None, ["cmmd", "dino_mmd"], clip=clip, dino=dino)
    ref.update(blocky_images(3, seed=6, size=28))
    ref.save_reference(tmp_path / "ref.npz")
    metrics = ev.Metrics(tmp_path / "ref.npz", ["cmmd"], clip=clip, dino=dino)
    metrics.update(blocky_images(3, seed=7, size=28))
    assert metrics.metrics == ("cmmd",) and list(metrics.nets) == ["cmmd"] and list(metrics.compute()) == ["cmmd"]


def seeded_networks():
    """The tiny CLIP and DINO with the same weights in every process (the reference's settings name them)."""
    clip = tiny_clip()
    torch.manual_seed(1)
    return clip, tiny_dino(pretrained=False)


def metrics_worker(rank, world_size, init_file, ref_path, fid_weights, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    clip, dino = seeded_networks()
    metrics = ev.Metrics(ref_path, ev.FEATURE_METRICS, fid_weights=fid_weights, clip=clip, dino=dino)
    metrics.update(blocky_images(3, seed=7, size=28, brightness=30)[rank::world_size])  # 2 images, then 1
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(metrics.compute(), f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process(inception_weights, tmp_path_factory):
    """Every metric in one process (shared, read only): .ref a reference of .real (3 images streamed in batches of 1
    and 2), .scores those of .fake (3 others) against it; the networks are seeded_networks()."""
    root = tmp_path_factory.mktemp("one_process")
    real, fake = blocky_images(3, seed=6, size=28), blocky_images(3, seed=7, size=28, brightness=30)
    clip, dino = seeded_networks()
    ref = ev.Metrics(None, ev.FEATURE_METRICS, fid_weights=inception_weights, clip=clip, dino=dino)
    ref.update(real[:1])  # batches of any size: the statistics are sums
    ref.update(real[1:])
    ref.save_reference(root / "ref.npz")
    one = ev.Metrics(root / "ref.npz", ev.FEATURE_METRICS, fid_weights=inception_weights, clip=clip, dino=dino)
    one.update(fake)
    scores = one.compute()
    return SimpleNamespace(real=real, fake=fake, ref=str(root / "ref.npz"), scores=scores)


@pytest.mark.slow
def test_metrics_of_images_spread_over_ranks_equal_one_process(one_process, inception_weights, tmp_path):
    """eval.py under torchrun: each rank streams its share; FID's sums are all-reduced, the embeddings gathered and
    the count summed, so every rank computes what one process computes from all the images."""
    mp.spawn(metrics_worker, nprocs=2, args=(2, str(tmp_path / "init"), one_process.ref, inception_weights,
                                             str(tmp_path / "out")))
    for rank in range(2):
        with open(tmp_path / f"out.{rank}") as f:
            assert json.load(f) == pytest.approx(one_process.scores, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Sampler

class PointFlow(torch.nn.Module):
    """The exact flow of data concentrated at one point c, read from the first text token: v = (x - c) / t, or
    x0 = c with pred x. Routing moves the point by route_ratio, so self-guidance shows in the result."""

    cfg = SimpleNamespace(patch_size=1)  # one image token per pixel

    def __init__(self, pred):
        super().__init__()
        self.pred, self.routes = pred, []

    def forward(self, x, t, txt, txt_mask, route_ratio=0.0, route_scores=None):
        if route_ratio > 0:  # the sampler passes one score per token of every sample in the batch
            assert route_scores.shape == (x.shape[0], x.shape[2] * x.shape[3])
            self.routes.append(route_scores)
        c = (txt[:, 0, 0] + route_ratio)[:, None, None, None]
        return c.expand_as(x) if self.pred == "x" else (x - c) / t[:, None, None, None]


@pytest.mark.parametrize("pred", ["v", "x"])
@pytest.mark.parametrize("w", [3.0, 1.0, 0.5, 0.0])  # 0: the unconditional flow
@pytest.mark.parametrize("steps, shift", [(4, 3.0), (10, 1.0)])  # shift 1: t down to 0.1, where x-pred's clamp is off
def test_sampler_lands_on_the_guided_point(pred, w, steps, shift):
    # Euler is exact on v = (x - c) / t; CFG makes the point c0 + w (c1 - c0); self-guidance routed + s (full - routed)
    txt, mask = torch.zeros(3, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    txt[:, 0, 0] = torch.tensor([0.5, -0.3, 1.0])
    null_txt, null_mask = torch.full((1, 2, 4), -0.2), torch.ones(1, 2, dtype=torch.bool)
    s, r, flow = 1.5, 0.5, PointFlow(pred)
    x0 = ev.sample(flow, txt, mask, null_txt, null_mask, [0, 1, 2], (2, 4, 4), steps=steps, cfg_scale=w, shift=shift,
                   pred=pred, self_guidance=s, route_ratio=r)
    expected = -0.2 + w * (txt[:, 0, 0] + 0.2) + r * (1 - s)
    torch.testing.assert_close(x0, expected[:, None, None, None].expand_as(x0), atol=1e-5, rtol=1e-5)
    assert len(flow.routes) == steps  # each step's route: each sample's own, its guided pair's the same
    for scores in flow.routes:
        samples = scores.chunk(2)[0] if w != 1 else scores
        assert (w == 1 or torch.equal(*scores.chunk(2))) and not torch.equal(samples[0], samples[1])


def test_x_pred_sampling_clamps_t_at_the_end_of_the_path():
    """50 steps at shift 1 go down to t = 0.02: below 0.05 the x-prediction's velocity divides by 0.05 (JiT), so
    Euler's last steps shrink x - c by 1 + dt / 0.05, not to 0 as the exact flow would: the closed form."""
    txt, mask = torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool)
    txt[:, 0, 0] = torch.tensor([0.5, -0.3])
    null_txt, null_mask = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    still = PointFlow("v")
    still.forward = lambda x, t, *a, **kw: torch.zeros_like(x)  # v = 0: the sample is its starting noise
    run = lambda flow, pred: ev.sample(flow, txt, mask, null_txt, null_mask, [0, 1], (1, 2, 2), steps=50,  # noqa
                                       cfg_scale=1.0, shift=1.0, pred=pred)
    noise, x0 = run(still, "v"), run(PointFlow("x"), "x")
    ts = ev.timesteps(50, 1.0).tolist()
    assert min(ts[:-1]) < ev.X_PRED_MIN_T
    shrink = math.prod(1 + (t1 - t0) / max(t0, ev.X_PRED_MIN_T) for t0, t1 in zip(ts, ts[1:]))
    c = txt[:, 0, 0][:, None, None, None]
    assert shrink > 0.01  # without the clamp: 0, the sample exactly c
    torch.testing.assert_close(x0, c + (noise - c) * shrink, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [0.25, 0.75])  # 0.75: SPRINT's default route ratio
def test_self_guidance_routes_the_route_ratio_it_is_given(r):
    """The routed pass of self-guidance runs at the sampler's route_ratio (the run's --route-ratio), not at the
    default 0.5: with PointFlow the guided point moves by r (1 - s)."""
    txt, mask = torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool)
    txt[:, 0, 0] = torch.tensor([0.5, -0.3])
    null_txt, null_mask = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    x0 = ev.sample(PointFlow("v"), txt, mask, null_txt, null_mask, [0, 1], (1, 2, 2), steps=4, cfg_scale=1.0,
                   route_ratio=r, self_guidance=2.0)
    expected = txt[:, 0, 0] + r * (1 - 2.0)
    torch.testing.assert_close(x0, expected[:, None, None, None].expand_as(x0), atol=1e-5, rtol=1e-5)


def test_x0_to_velocity_clamps_t_at_x_pred_min_t_for_floats_and_tensors():
    """The sampler passes t as a float, training as a tensor: both divide by max(t, 0.05) (JiT)."""
    x_t, x0 = torch.full((2, 1, 1, 1), 3.0), torch.ones(2, 1, 1, 1)
    assert ev.X_PRED_MIN_T == 0.05
    torch.testing.assert_close(ev.x0_to_velocity(x_t, x0, 0.01), torch.full_like(x0, 2 / 0.05))
    torch.testing.assert_close(ev.x0_to_velocity(x_t, x0, 0.5), torch.full_like(x0, 2 / 0.5))
    t = torch.tensor([0.01, 0.5])[:, None, None, None]
    torch.testing.assert_close(ev.x0_to_velocity(x_t, x0, t), 2 / torch.tensor([0.05, 0.5])[:, None, None, None])


def test_timesteps_follow_the_training_shift():
    t = torch.linspace(1, 0, 11)
    torch.testing.assert_close(ev.timesteps(10, 3.0), 3 * t / (1 + 2 * t))
    assert ev.timesteps(10, 3.0)[5] == pytest.approx(0.75)  # s t / (1 + (s - 1) t) at t = 0.5


def random_tiny_prx():
    torch.manual_seed(0)
    model = PRX.from_preset("tiny-pixel").eval()
    for p in model.parameters():  # the zero-initialised modulation and output layers would make every sample noise
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("self_guidance", [0.0, 2.0])
def test_sampler_same_seed_same_image_whatever_the_batch(self_guidance):
    # with self-guidance the TREAD routes come from each sample's own generator too, not from the global RNG
    model = random_tiny_prx()
    g = torch.Generator().manual_seed(1)
    txt, lengths = torch.randn(4, 6, 64, generator=g), torch.tensor([6, 2, 4, 1])
    mask = torch.arange(6)[None] < lengths[:, None]
    null_txt, null_mask = torch.randn(1, 1, 64, generator=g), torch.ones(1, 1, dtype=torch.bool)
    kwargs = dict(shape=(3, 16, 16), steps=3, cfg_scale=2.0, self_guidance=self_guidance)
    seeds = [7, 3, 11, 5]
    batched = ev.sample(model, txt, mask, null_txt, null_mask, seeds, **kwargs)
    single = torch.cat([ev.sample(model, txt[i:i + 1, :lengths[i]], mask[i:i + 1, :lengths[i]], null_txt, null_mask,
                                  seeds[i:i + 1], **kwargs) for i in range(4)])
    assert (batched[0] - batched[1]).abs().mean() > 0.1
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vae_kind", ["flux", "dc-ae"])
def test_exported_pipeline_reproduces_the_sampler(tmp_path, vae_kind):
    """model.save_diffusers -> PRXPipeline.from_pretrained, sampled with the README's call, gives eval.sample's latents
    for the same prompts and seeds: the same cleaning, text encoder, empty prompt, noise, grid and guidance; and its
    images are eval.py's decoding of them (data.latent_stats: the pipeline undoes the same normalisation)."""
    from diffusers import AutoencoderDC, AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXPipeline
    from data import denormalize_latent, latent_stats
    from model import PRXConfig
    from prepare import T5GemmaTextEncoder
    from tiny_prepared import save_tiny_encoders
    save_tiny_encoders(tmp_path)
    encoder = T5GemmaTextEncoder.from_pretrained(str(tmp_path / "t5gemma"), max_tokens=12)
    torch.manual_seed(0)
    model = PRX(PRXConfig(in_channels=4, context_dim=32, hidden_size=64, depth=2, num_heads=2, axes_dim=(16, 16)))
    for p in model.eval().parameters():  # zero-initialised layers would make the output ignore the text
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    vae = AutoencoderKL.from_pretrained(tmp_path / "flux", subfolder="vae") if vae_kind == "flux" else \
        AutoencoderDC.from_pretrained(tmp_path / "dc-ae")
    side = 16 // (2 if vae_kind == "flux" else 4)  # the tiny VAEs' downsampling
    model.save_diffusers(str(tmp_path / "x"), shift=3.0, resolution=16, tokenizer=encoder.tokenizer, max_tokens=12,
                         vae=vae, text_encoder=encoder.model)
    pipe = PRXPipeline.from_pretrained(tmp_path / "x")
    assert pipe.scheduler.config.shift == 3.0  # the run's shift, for the pipeline's own grid
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    null_txt, null_mask = encoder([""])
    # cleaning changes the first prompt's tokens; the second is cut at 12 tokens
    prompts = ["A Photo of a #Cat (Red) / http://x.com @bob", "The big red dog under the blue sky on the green tree"]
    latents = []
    for i, prompt in enumerate(prompts):  # one prompt per call: with guidance, a batch of prompts fails (below)
        txt, mask = encoder([prompt])
        ours = ev.sample(model, txt, mask, null_txt, null_mask, [42 + i], (4, side, side), steps=5, cfg_scale=3.5,
                         shift=3.0)
        call = dict(height=16, width=16, timesteps=ev.diffusers_timesteps(5, 3.0), guidance_scale=3.5,
                    use_resolution_binning=False)
        theirs = pipe(prompt, generator=torch.Generator().manual_seed(42 + i), output_type="latent", **call).images
        assert (theirs - ours).abs().max() <= 1e-5
        latents.append(ours)
        images = pipe(prompt, generator=torch.Generator().manual_seed(42 + i), output_type="pt", **call).images
        with torch.no_grad():
            decoded = ev.to_uint8(vae.decode(denormalize_latent(ours, *latent_stats(vae))).sample)
        assert (images * 255 - decoded.float()).abs().max() <= 1.0  # uint8 rounding
    assert (latents[0] - latents[1]).abs().mean() > 0.1
    with pytest.raises(RuntimeError, match="size of tensor"):  # diffusers 0.42: 2 timesteps for 4 rows
        pipe(prompts, height=16, width=16, guidance_scale=3.5, output_type="latent", use_resolution_binning=False)


class Brightness:
    """A held-out split of 5 prompts whose score is the mean pixel of the batch."""
    null = torch.zeros(1, 1, 64), torch.ones(1, 1, dtype=torch.bool)
    txt = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0))

    def encode(self, idx):
        return self.txt[list(idx)], torch.ones(len(idx), 3, dtype=torch.bool)

    def score(self, images, idx):
        return {"brightness": images.float().mean().item()}


def test_evaluate_weighs_each_batch_score_by_its_size(tmp_path):
    model, split = random_tiny_prx(), Brightness()
    sampling = dict(steps=2, cfg_scale=2.0, shift=1.0, pred="x", route_ratio=0.5)
    images = ev.to_uint8(ev.sample(model, split.txt, torch.ones(5, 3, dtype=torch.bool), *split.null,
                                   [42 + i for i in range(5)], (3, 16, 16), **sampling))
    ref = ev.Metrics(None, ["cmmd"], clip=tiny_clip())
    ref.update(images)
    ref.save_reference(tmp_path / "ref.npz")
    metrics = ev.Metrics(tmp_path / "ref.npz", ["cmmd"], clip=tiny_clip())
    for batch_size in (2, 5):  # batches of 2, 2 and 1, or one of 5; the same Metrics each time, as train.py's
        result = ev.evaluate(model, split, 5, (3, 16, 16), metrics=metrics, batch_size=batch_size, **sampling)
        assert result == {"brightness": pytest.approx(images.float().mean().item(), rel=1e-6),
                          "cmmd": pytest.approx(0.0, abs=1e-9)}  # the reference's own images
    real_all_reduce = ev.all_reduce
    try:  # two ranks that saw the same: the sums over ranks over the count over ranks
        ev.all_reduce = lambda x: 2 * x
        result = ev.evaluate(model, split, 5, (3, 16, 16), batch_size=2, **sampling)
    finally:
        ev.all_reduce = real_all_reduce
    assert result == {"brightness": pytest.approx(images.float().mean().item(), rel=1e-6)}


def test_evaluate_over_ranks_is_the_mean_over_every_sample(monkeypatch):
    """Rank 1 of 2 scores prompts 1 and 3, rank 0 prompts 0, 2 and 4 (with the noise of 42 + i): the all-reduced
    scores over the all-reduced count of samples are those of one process over all five."""
    model, split = random_tiny_prx(), Brightness()
    sampling = dict(steps=2, cfg_scale=2.0, shift=1.0, pred="x", route_ratio=0.5)
    images = ev.to_uint8(ev.sample(model, split.txt, torch.ones(5, 3, dtype=torch.bool), *split.null,
                                   [42 + i for i in range(5)], (3, 16, 16), **sampling))
    monkeypatch.setattr(ev, "distributed", lambda: True)
    monkeypatch.setattr(ev.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ev.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(ev, "gather_rows", lambda x: x)  # the grid's samples: this rank's alone here
    sent = []
    monkeypatch.setattr(ev, "all_reduce", lambda x: sent.append(x) or x)
    assert ev.evaluate(model, split, 5, (3, 16, 16), batch_size=2, **sampling) == {
        "brightness": pytest.approx(images[[1, 3]].float().mean().item(), rel=1e-6)}
    monkeypatch.setattr(ev.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ev, "all_reduce", lambda x: x + sent[0])  # rank 0 receives rank 1's sums
    assert ev.evaluate(model, split, 5, (3, 16, 16), batch_size=2, **sampling) == {
        "brightness": pytest.approx(images.float().mean().item(), rel=1e-6)}


def test_an_evaluations_grid_is_the_same_on_one_process_and_on_two(monkeypatch):
    """The grid: samples 0..B-1 of batch size B, which every rank's first batch covers (before: 2 ranks' first
    batches together, twice one process's samples)."""
    model, grids = random_tiny_prx(), []
    split = type("Captioned", (Brightness,), {"captions": lambda self, idx: [f"prompt {i}" for i in idx]})()
    sampling = dict(steps=2, cfg_scale=2.0, shift=1.0, pred="v", route_ratio=0.0)
    images = ev.to_uint8(ev.sample(model, split.txt, torch.ones(5, 3, dtype=torch.bool), *split.null,
                                   [42 + i for i in range(5)], (3, 16, 16), **sampling))
    draw = lambda shown, captions: grids.append((shown, captions))  # noqa: E731
    ev.evaluate(model, split, 5, (3, 16, 16), batch_size=2, grid=draw, **sampling)
    monkeypatch.setattr(ev, "distributed", lambda: True)
    monkeypatch.setattr(ev.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ev.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ev, "all_reduce", lambda x: x)

    def gather_rows(x):  # rank 0's rows (samples 0, 2, ...), then as many of rank 1's (samples 1, 3, ...)
        theirs = torch.tensor([1, 3])[:len(x)]
        return torch.cat([x, theirs.to(x.device) if x.dtype == torch.int64 else images[theirs]])
    monkeypatch.setattr(ev, "gather_rows", gather_rows)
    ev.evaluate(model, split, 5, (3, 16, 16), batch_size=2, grid=draw, **sampling)
    (one, one_captions), (two, two_captions) = grids
    assert one_captions == two_captions == ["prompt 0", "prompt 1"] and torch.equal(one, two)


def test_the_grid_is_samples_0_to_63_whatever_the_number_of_ranks(monkeypatch):
    """Rank r of 3 holds samples r, r + 3, ... (my_batches): each gives its first 22 rows, and the grid is 0..63 in
    order, as one process's first batch would be."""
    monkeypatch.setattr(ev, "distributed", lambda: True)
    monkeypatch.setattr(ev.dist, "get_world_size", lambda: 3)
    firsts = [torch.arange(r, 96, 3) for r in range(3)]  # each rank's first batch of 32: its indices

    def gather_rows(x):  # every rank's first len(x) rows, in rank order; an "image" here is its index
        rows = torch.cat([f[:len(x)] for f in firsts])
        return rows.float()[:, None] if x.is_floating_point() else rows
    monkeypatch.setattr(ev, "gather_rows", gather_rows)
    images, idx = ev.first_samples(firsts[0].float()[:, None], range(0, 96, 3), 64)
    assert idx == list(range(64)) and images[:, 0].tolist() == list(range(64))


def test_evaluation_data_of_another_vae_with_the_models_text_width_is_refused(tmp_path):
    """Where the run's own data is not on this machine to compare encoders with, the shapes are the last guard: the
    text width alone is not enough (a DC-AE set's 32 channels against a FLUX VAE model's 16)."""
    (tmp_path / "index.json").write_text(json.dumps({"schema": {"latent": {"shape": [32, 8, 8]}}}))
    model = SimpleNamespace(cfg=SimpleNamespace(context_dim=24, in_channels=16))
    split = SimpleNamespace(encode=lambda idx: (torch.zeros(1, 3, 24), torch.ones(1, 3, dtype=torch.bool)))
    with pytest.raises(SystemExit, match="gives 24-wide text and 32-channel inputs, the model reads 24-wide text and "
                                         "16 channels"):
        ev.check_data_fits(model, split, str(tmp_path), "--data d")


def test_a_fingerprint_is_the_sha256_of_every_weight():
    """The reference names its networks by fingerprint: a change of any one weight is another network."""
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert ev.fingerprint(w) == hashlib.sha256(w.numpy().tobytes()).hexdigest()[:8]
    changed = w.clone()
    changed[-1, -1] += 1
    assert ev.fingerprint(changed) != ev.fingerprint(w)
    assert ev.fingerprint(w.bfloat16()) == ev.fingerprint(w.bfloat16().float())  # read as float32


# ----------------------------------------------------------------------------------------------------------
# Command line, on the built-in data

def write_run(run, model, step=10, captions="long", data="builtin", pred="x"):
    """A run folder as train.py writes it: config.json ("args", "model", "sampling") and a checkpoint with the
    sha256 of each of its files."""
    from model import CHECKSUMS, file_sha256
    ckpt = run / "checkpoints" / f"step_{step}"
    os.makedirs(ckpt)
    save_file(model.state_dict(), ckpt / "model.safetensors")
    (ckpt / CHECKSUMS).write_text(json.dumps({"model.safetensors": file_sha256(ckpt / "model.safetensors")}))
    args = dict(data=data, eval_data=None, captions=captions, resolution=32, seed=0, text_context=5, tread=False,
                sprint=False, ema=0.0, ema_every=10)
    sampling = dict(steps=2, cfg_scale=3.0, shift=1.0, pred=pred, route_ratio=0.5, self_guidance=0.0)
    (run / "config.json").write_text(json.dumps({"args": args, "model": vars(model.cfg), "sampling": sampling}))
    return ckpt


def add_ema(ckpt):
    """The checkpoint with EMA weights (a copy of the model's) and their checksum, as a run with --ema 0.9 --ema-every
    2 keeps."""
    from model import CHECKSUMS, file_sha256
    config = json.loads((ckpt.parent.parent / "config.json").read_text())
    config["args"].update(ema=0.9, ema_every=2)
    (ckpt.parent.parent / "config.json").write_text(json.dumps(config))
    shutil.copy(ckpt / "model.safetensors", ckpt / "ema.safetensors")
    (ckpt / CHECKSUMS).write_text(json.dumps({name: file_sha256(ckpt / name)
                                              for name in ("model.safetensors", "ema.safetensors")}))
    return ckpt


def test_cli_ref_then_eval_writes_json(tmp_path, capsys, monkeypatch):
    ckpt = write_run(tmp_path / "run", random_tiny_prx(), captions="mixed:0.5")
    tiny_clip().save_pretrained(tmp_path / "clip")
    common = ["--metrics", "cmmd", "--clip", str(tmp_path / "clip"), "--num-samples", "3", "--batch-size", "2"]
    ev.main(["ref", "--data", "builtin", "--out", str(tmp_path / "ref"), *common])  # np.savez adds .npz: said so
    assert f"wrote {tmp_path / 'ref.npz'}: 3 images" in capsys.readouterr().out
    written = (tmp_path / "ref.npz").read_bytes()
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'ref.npz'} exists; remove it to rebuild it"):
        ev.main(["ref", "--data", "builtin", "--out", str(tmp_path / "ref.npz"), *common[:-4]])  # another count
    assert (tmp_path / "ref.npz").read_bytes() == written
    ev.main(["--ckpt", str(tmp_path / "run"), "--ref", str(tmp_path / "ref.npz"), *common])
    result = json.loads((ckpt / "eval.json").read_text())
    assert set(result["metrics"]) == {"cmmd", "caption_accuracy", "color_region_accuracy", "object_accuracy"}
    assert result["metrics"]["cmmd"] > 0 and result["sampling"] == dict(
        steps=2, cfg_scale=3.0, shift=1.0, pred="x", route_ratio=0.5, self_guidance=0.0)  # the run's own
    assert os.path.exists(ckpt / "eval_samples.png") and result["grid"] == "eval_samples.png"
    reference = json.loads(str(np.load(tmp_path / "ref.npz")["images"]))  # the images it holds, named for verify.py
    assert result["ref_images"] == reference["id"] == "shapes.py held-out scenes"
    first = (ckpt / "eval.json").read_bytes()
    ev.main(["--ckpt", str(tmp_path / "run"), "--num-samples", "1", "--steps", "1"])  # a second evaluation: new files
    assert (ckpt / "eval.json").read_bytes() == first
    assert json.loads((ckpt / "eval_1.json").read_text())["grid"] == "eval_samples_1.png"
    assert os.path.exists(ckpt / "eval_samples_1.png")
    with monkeypatch.context() as m:  # a reference of another count: refused before any network loads
        m.setattr(ev, "load_clip", lambda *a: pytest.fail("CLIP loaded before the reference was checked"))
        with pytest.raises(SystemExit, match=r"error: the reference holds 3 images at 32 px but this evaluation has 2 "
                                             r"at 32 px; use --num-samples 3, or build a matching reference"):
            ev.main(["--ckpt", str(ckpt), "--ref", str(tmp_path / "ref.npz"), *common[:4], "--num-samples", "2"])
    ev.main(["--ckpt", str(ckpt), "--num-samples", "2", "--steps", "1", "--cfg-scale", "1.5", "--caption", "short",
             "--out", str(tmp_path / "eval.json")])  # no --metrics on the built-in data: the checker only
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["metrics"]) == {"caption_accuracy", "color_region_accuracy", "object_accuracy"}
    assert result["ref_images"] is None
    assert result["grid"] == "eval_samples.png" and (tmp_path / result["grid"]).exists()  # beside --out
    ev.main(["--ckpt", str(ckpt), "--ref", str(tmp_path / "ref.npz"), *common[2:], "--out", str(tmp_path / "r.json")])
    assert "cmmd" in json.loads((tmp_path / "r.json").read_text())["metrics"]  # --ref alone: the metrics it holds
    assert (result["sampling"]["steps"], result["sampling"]["cfg_scale"]) == (1, 1.5)
    assert (result["checkpoint"], result["weights"]) == ("step_10", "model")  # the run keeps no EMA
    with pytest.raises(SystemExit, match="step_10 keeps no EMA weights .*: use --weights model$"):
        ev.main(["--ckpt", str(ckpt), "--num-samples", "1", "--weights", "ema"])  # asked for: not the model's instead
    add_ema(ckpt)
    capsys.readouterr()
    for flags, weights in (([], "ema"), (["--weights", "model"], "model")):
        ev.main(["--ckpt", str(ckpt), "--num-samples", "1", "--steps", "1", "--out", str(tmp_path / f"{weights}.json"),
                 *flags])
        assert json.loads((tmp_path / f"{weights}.json").read_text())["weights"] == weights
        noted = "note: these EMA weights have had 5 updates (--ema 0.9 every 2 steps): 59% of them are still the " \
            "initial weights" in capsys.readouterr().out  # at step 10
        assert noted == (weights == "ema")


@pytest.mark.parametrize("reader", ["verify_checkpoint", "load_file"])
def test_a_checkpoint_pruned_while_it_is_read_is_named(tmp_path, monkeypatch, reader):
    """eval.py --ckpt <run> reads the latest checkpoint while the run may still train: its --keep can remove that
    checkpoint between the listing and the reading. Said so, with what to do, not a missing file's traceback."""
    import model
    ckpt = write_run(tmp_path / "run", random_tiny_prx())
    read = getattr(model, reader)

    def pruned(path, *rest):  # the run's next checkpoint is in place, and this one pruned
        shutil.rmtree(ckpt, ignore_errors=True)
        return read(path, *rest)
    monkeypatch.setattr(model, reader, pruned)
    with pytest.raises(SystemExit, match=re.escape(f"error: --ckpt {tmp_path / 'run'}: {ckpt} was removed while being "
                                                   f"read (the training run's --keep pruned it): pass a checkpoint the "
                                                   f"run keeps, or rerun")):
        ev.main(["--ckpt", str(tmp_path / "run"), "--num-samples", "1"])


def test_a_checkpoint_pruned_during_its_evaluation_keeps_the_result(tmp_path, monkeypatch, capsys):
    """The run's --keep may remove the checkpoint while it is sampled: the metrics are printed (eval.json has no
    folder left), and with --out the result is written, naming the weights that were read (the EMA's), not those the
    empty folder would suggest."""
    evaluate, pruned = ev.evaluate, []

    def evaluate_then_prune(*args, **kwargs):  # the grid drawn, then the run's next checkpoint prunes this one
        result = evaluate(*args, **kwargs)
        shutil.rmtree(pruned[-1])
        return result
    monkeypatch.setattr(ev, "evaluate", evaluate_then_prune)
    pruned.append(add_ema(write_run(tmp_path / "run", random_tiny_prx())))
    with pytest.raises(SystemExit, match=re.escape(f"error: {pruned[-1]} was removed during the evaluation (the "
                                                   f"training run's --keep pruned it), so eval.json has no folder: "
                                                   f"caption_accuracy ")):
        ev.main(["--ckpt", str(tmp_path / "run"), "--num-samples", "1", "--steps", "1"])
    pruned.append(add_ema(write_run(tmp_path / "run2", random_tiny_prx())))
    ev.main(["--ckpt", str(tmp_path / "run2"), "--num-samples", "1", "--steps", "1", "--out", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["weights"] == "ema"


def test_a_checkpoint_pruned_before_its_grid_is_drawn_is_said(tmp_path, monkeypatch):
    ckpt, sample = write_run(tmp_path / "run", random_tiny_prx()), ev.sample

    def prune_then_sample(*args, **kwargs):  # the run's --keep prunes the checkpoint during the first batch
        shutil.rmtree(ckpt, ignore_errors=True)
        return sample(*args, **kwargs)
    monkeypatch.setattr(ev, "sample", prune_then_sample)
    with pytest.raises(SystemExit, match="was removed during the evaluation .* so eval.json has no folder: caption_"):
        ev.main(["--ckpt", str(ckpt), "--num-samples", "1", "--steps", "1"])


def test_an_unwritable_output_is_refused_before_sampling(tmp_path, monkeypatch):
    ckpt = write_run(tmp_path / "run", random_tiny_prx())
    (tmp_path / "locked").mkdir()
    access = os.access  # refused as for a user without write permission (root has it)
    monkeypatch.setattr(os, "access", lambda path, mode, **k: str(path) not in (str(ckpt), str(tmp_path / "locked")) and
                        access(path, mode, **k))
    monkeypatch.setattr(ev, "sample", lambda *a, **k: pytest.fail("sampled"))
    for argv, message in ((["--out", str(tmp_path / "locked" / "e.json")], f"cannot write in {tmp_path / 'locked'}"),
                          ([], f"cannot write in {ckpt} (no permission, or a read-only file system); the evaluation "
                               f"writes eval.json and its grid there: write them elsewhere with --out FILE.json"),
                          (["sample", "--prompt", "a"], f"cannot write in {ckpt} (no permission, or a read-only file "
                                                        f"system); write the image elsewhere with --out")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            ev.main(["--ckpt", str(ckpt), "--num-samples", "1", *argv] if not argv or argv[0] != "sample" else
                    [*argv, "--ckpt", str(ckpt)])
    assert sorted(os.listdir(tmp_path / "locked")) == []


def test_two_evaluations_of_one_checkpoint_take_two_files(tmp_path):
    """write_new takes its name once the result is whole: another evaluation of the same checkpoint ending meanwhile
    (here: inside the first's write) takes eval.json, the first eval_1.json, a later one eval_2.json; a write that
    fails (a kill) leaves nothing, not an empty eval.json."""
    inner = []

    def write(text):
        return lambda path: open(path, "w").write(text)

    def first_then_another(path):
        write("first")(path)
        inner.append(ev.write_new(tmp_path, "eval.json", write("second")))
    assert ev.write_new(tmp_path, "eval.json", first_then_another) == str(tmp_path / "eval_1.json")
    assert inner == [str(tmp_path / "eval.json")]

    def killed(path):
        open(path, "w").write("{")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ev.write_new(tmp_path, "eval.json", killed)
    assert ev.write_new(tmp_path, "eval.json", write("third")) == str(tmp_path / "eval_2.json")
    assert [(tmp_path / f).read_text() for f in ("eval.json", "eval_1.json", "eval_2.json")] == \
        ["second", "first", "third"] and len(os.listdir(tmp_path)) == 3
    out = tmp_path / "mine.json"  # --out, checked free at start, then written by another process during the evaluation
    out.write_text("another's")
    assert ev.write_new(None, None, write("mine"), str(out)) == str(tmp_path / "mine_1.json")
    assert out.read_text() == "another's" and (tmp_path / "mine_1.json").read_text() == "mine"


def test_an_interrupted_evaluation_leaves_no_empty_grid(tmp_path, monkeypatch):
    """The grid's name is claimed when the grid is written: an evaluation stopped before (Ctrl-C, or killed by the
    system: no handler runs) has left no file, and the next evaluation takes the name."""
    ckpt = write_run(tmp_path / "run", random_tiny_prx())
    before = sorted(os.listdir(ckpt))

    def interrupted(*args, **kwargs):
        assert sorted(os.listdir(ckpt)) == before  # nothing claimed while sampling
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(ev, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ev.main(["--ckpt", str(tmp_path / "run"), "--num-samples", "1", "--steps", "1"])
    assert sorted(os.listdir(ckpt)) == before
    ev.main(["--ckpt", str(tmp_path / "run"), "--num-samples", "1", "--steps", "1"])
    assert json.loads((ckpt / "eval.json").read_text())["grid"] == "eval_samples.png"
    assert (ckpt / "eval_samples.png").stat().st_size > 0


def test_an_evaluation_samples_prompt_i_from_the_noise_of_seed_42_plus_i(tmp_path, monkeypatch):
    """eval.py's default --seed is 42 (PRX's): held-out prompt i starts from the noise of 42 + i, whatever the
    batches, and eval.json says so."""
    ckpt = write_run(tmp_path / "run", random_tiny_prx())
    sample, seeds = ev.sample, []
    monkeypatch.setattr(ev, "sample", lambda *a, **k: seeds.extend(a[5]) or sample(*a, **k))
    ev.main(["--ckpt", str(ckpt), "--num-samples", "3", "--batch-size", "2", "--steps", "1", "--out",
             str(tmp_path / "e.json")])
    assert seeds == [42, 43, 44] and json.loads((tmp_path / "e.json").read_text())["seed"] == 42


def test_held_out_prompts_use_the_caption_the_run_trained_on(tmp_path, monkeypatch):
    """eval.py --ckpt and train.py's periodic evaluation read the held-out prompts with the short caption after
    --captions short, the long one after long or mixed (a user writes long prompts); --caption overrides."""
    import types
    import train
    seen = []
    def record(spec, num_samples, caption, *rest):
        seen.append(caption)
        raise SystemExit("recorded")
    monkeypatch.setattr(ev, "open_heldout", record)
    monkeypatch.setattr(train, "open_heldout", record)
    for captions, caption in (("short", "short"), ("long", "long"), ("mixed:0.2", "long")):
        write_run(tmp_path / captions, random_tiny_prx(), captions=captions)
        for run in (lambda: ev.main(["--ckpt", str(tmp_path / captions), "--num-samples", "1"]),
                    lambda: train.setup_eval(types.SimpleNamespace(
                        eval_samples=1, captions=captions, eval_data=None, data="builtin", resolution=32, seed=0,
                        text_context=5, eval_ref=None), None, "cpu")):
            with pytest.raises(SystemExit, match="recorded"):
                run()
            assert seen.pop() == caption, captions
    with pytest.raises(SystemExit, match="recorded"):
        ev.main(["--ckpt", str(tmp_path / "long"), "--num-samples", "1", "--caption", "short"])
    assert seen.pop() == "short"
    for data, caption in (("d@0:short", "short"), ("d@0:long;d@5:short", "short"), ("d@0:short;d@5:mixed", "long"),
                          ("d", "long")):  # the caption mode of the last --data phase, else --captions (long)
        with pytest.raises(SystemExit, match="recorded"):
            train.setup_eval(types.SimpleNamespace(eval_samples=1, captions="long", eval_data=None, data=data,
                                                   resolution=32, seed=0, text_context=5, eval_ref=None), None, "cpu")
        assert seen.pop() == caption, data


def test_cli_sample_draws_each_prompt_as_the_sampler_does(prepared, tmp_path, capsys, monkeypatch):
    from shapes import BuiltinTextEncoder
    model = random_tiny_prx()
    ckpt = write_run(tmp_path / "run", model)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["args"]["text_context"] = 3  # not the built-in encoder's default
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    prompts = ["a gray background with a large red circle in the top left", "a white background with a small blue "
               "cross in the bottom right", "a black background"]
    for k, name in enumerate(("prompts.png", "prompts_1.png")):  # a second grid is a new file
        ev.main(["sample", "--ckpt", str(tmp_path / "run"), "--prompt", prompts[k]])
        assert f"1 image, 2 steps, guidance 3.0 -> {ckpt / name}" in capsys.readouterr().out
    assert Image.open(ckpt / "prompts.png").width > 96  # the 96 px image and its caption beside it
    assert Image.open(ckpt / "prompts.png").tobytes() != Image.open(ckpt / "prompts_1.png").tobytes()
    grids = []
    monkeypatch.setattr(ev, "save_grid", lambda images, captions, path: grids.append((images, captions, path)) or
                        open(path, "w").close())
    ev.main(["sample", "--ckpt", str(ckpt), "--batch-size", "2", "--seed", "7", "--steps", "3",
             *[word for p in prompts for word in ("--prompt", p)], "--out", str(tmp_path / "p.png")])
    images, captions, path = grids[0]
    encoder = BuiltinTextEncoder(context=3)  # the run's --text-context
    expected = ev.sample(model, *encoder(prompts), *encoder([""]), [7, 8, 9], (3, 32, 32), steps=3, cfg_scale=3.0,
                         shift=1.0, pred="x")  # the run's sampling, --steps over it
    # batches of 2 here, of 3 there: the float sums differ in their last bits, a pixel by at most one level
    assert (images.int() - ev.to_uint8(expected).int()).abs().max() <= 1
    assert captions == prompts and os.path.splitext(path)[1] == ".png" and (tmp_path / "p.png").exists()
    for argv, message in ((["--prompt", "a zebra"], "--prompt (the text encoder of --data builtin): words ['zebra']"),
                          ([], 'sample needs at least one --prompt "a caption"'),
                          (["--prompt", "a", "--data", str(ckpt)], "index.json not found: a training run or"),
                          (["--prompt", "a", "--data", "builtin@0;x@5"], "--prompt (the text encoder of --data "
                                                                         "builtin@0;x@5): data spec"),
                          (["--prompt", "a", "--data", str(prepared[0] / "out")], "the run trained on builtin, whose "
                                                                                   "text encoder its prompts need"),
                          (["--prompt", " ".join(["red"] * 80)], "a caption of 81 words ('red red"),
                          (["--prompt", "a", "--out", str(tmp_path / "p.xbm")], "sample writes an image: end the "
                                                                                 "name in .png, .jpg, .jpeg, .webp"),
                          (["--prompt", "a", "--out", f"{tmp_path}/"], "names a folder; sample writes a file")):
        with pytest.raises(SystemExit) as refused:
            ev.main(["sample", "--ckpt", str(ckpt), *argv])
        assert message in str(refused.value)
    monkeypatch.setattr(ev, "build_metrics", lambda *a: pytest.fail("a network loaded before the data was checked"))
    with pytest.raises(SystemExit, match=rf"error: --data {prepared[0] / 'out'}: gives 32-wide text and \d-channel "
                                         rf"inputs, the model reads 64-wide text and 3 channels: evaluate on data"):
        ev.main(["--ckpt", str(ckpt), "--data", str(prepared[0] / "out"), "--num-samples", "2"])


def test_cli_sample_encodes_prompts_with_the_prepared_datas_t5gemma(prepared, tmp_path, monkeypatch):
    from data import PreparedDataset
    from model import preset_config
    from tiny_prepared import stored_samples
    out = prepared[0] / "out"
    shape = PreparedDataset(out).index["schema"]["latent"]["shape"]  # (C, h, w) of the tiny VAE
    torch.manual_seed(0)
    ckpt = write_run(tmp_path / "run", PRX(preset_config("tiny", in_channels=shape[0], context_dim=32)).eval(),
                     data=str(out))
    shard, row = next(iter(stored_samples(out).values()))
    prompt, stored = shard.string("caption_long", row), torch.from_numpy(shard.ragged("txt_long", row).copy())
    texts, grids = [], []
    real_sample = ev.sample
    monkeypatch.setattr(ev, "sample", lambda model, txt, mask, *args, **kwargs: texts.append(txt[mask]) or
                        real_sample(model, txt, mask, *args, **kwargs))
    monkeypatch.setattr(ev, "save_grid", lambda images, captions, path: grids.append(images) or open(path, "w").close())
    ev.main(["sample", "--ckpt", str(ckpt), "--prompt", prompt])
    # the caption's tokens as prepare.py stored them for training (bf16)
    torch.testing.assert_close(texts[0].to(torch.bfloat16), stored.view(torch.bfloat16).view(-1, 32))
    assert grids[0].shape == (1, 3, 32, 32) and grids[0].dtype == torch.uint8  # decoded by the data's VAE
    from test_data import another_text_encoder
    other = another_text_encoder(out, tmp_path / "other", 3.0)  # the run's width, another encoder: refused
    for command in (["sample", "--prompt", prompt], ["--num-samples", "2"],
                    ["export", "--out", str(tmp_path / "x")]):
        with pytest.raises(SystemExit, match=f"^error: --data {other}: its text encoder differs from the data the "
                                             f"model trained on"):
            ev.main([*command, "--ckpt", str(ckpt), "--data", str(other)])


def test_cli_export_writes_the_runs_pipeline(prepared, tmp_path, capsys):
    """eval.py export: the checkpoint's weights with its prepared data's VAE, T5Gemma and token cap, and the run's
    shift, as PRXPipeline loads them; a built-in, x-prediction or already exported run is refused."""
    from diffusers import AutoencoderKL, PRXPipeline
    from data import PreparedDataset
    from model import preset_config
    out = prepared[0] / "out"
    index = PreparedDataset(out).index
    torch.manual_seed(0)
    model = PRX(preset_config("tiny", in_channels=index["schema"]["latent"]["shape"][0], context_dim=32)).eval()
    ckpt = write_run(tmp_path / "run", model, data=str(out), pred="v")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["sampling"].update(shift=3.0, self_guidance=2.0)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    ev.main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe") + "/"])
    printed = (f"{ckpt} (model.safetensors) -> {tmp_path / 'pipe'}/: PRXPipeline.from_pretrained; the run samples "
               f"with self-guidance 2, which PRXPipeline has not\n")
    assert capsys.readouterr().out == printed
    umask = os.umask(0)
    os.umask(umask)  # its weights as readable as any file (safetensors writes 0600)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "pipe").rglob("*.safetensors")} == {0o666 & ~umask}
    pipe = PRXPipeline.from_pretrained(tmp_path / "pipe")
    theirs = pipe.transformer.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())
    assert pipe.scheduler.config.shift == 3.0 and pipe.tokenizer.model_max_length == index["settings"]["max_tokens"]
    vae = AutoencoderKL.from_pretrained(prepared[0] / "models" / "flux", subfolder="vae")
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in vae.state_dict().items())
    assert not list(tmp_path.glob("pipe.tmp-*"))
    with pytest.raises(SystemExit, match="pipe exists; export writes a new folder"):
        ev.main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")])
    for name, data, pred, trained in [("x", str(out), "x", f"{out} with --pred x"),
                                      ("builtin", "builtin", "v", "the built-in shapes")]:
        write_run(tmp_path / name, model, data=data, pred=pred)
        with pytest.raises(SystemExit, match=f"v-prediction; this run trained on {trained}: sample it with eval.py"):
            ev.main(["export", "--ckpt", str(tmp_path / name), "--out", str(tmp_path / "new")])
    sprint = PRX(preset_config("tiny", in_channels=model.cfg.in_channels, context_dim=32, sprint=True)).eval()
    write_run(tmp_path / "sprint", sprint, data=str(out), pred="v")
    with pytest.raises(SystemExit, match="PRXPipeline has no SPRINT layers and no FLUX.2 BatchNorm decoding"):
        ev.main(["export", "--ckpt", str(tmp_path / "sprint"), "--out", str(tmp_path / "new")])
    flux2 = tmp_path / "flux2-data"  # data encoded with FLUX.2's AE: its BatchNorm decoding is not the pipeline's
    shutil.copytree(out, flux2)
    index = json.loads((flux2 / "index.json").read_text())
    (flux2 / "index.json").write_text(json.dumps({**index, "settings": {**index["settings"], "vae": "flux2"}}))
    write_run(tmp_path / "flux2", model, data=str(flux2), pred="v")
    with pytest.raises(SystemExit, match="PRXPipeline has no SPRINT layers and no FLUX.2 BatchNorm decoding"):
        ev.main(["export", "--ckpt", str(tmp_path / "flux2"), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_cli_refuses_bad_flags_and_corrupt_checkpoints(tmp_path, capsys, monkeypatch):
    for argv, message in ((["--metrics", "fid,bogus"], "unknown bogus; choose from fid,cmmd,dino_mmd"),
                          (["--metrics", "caption"], "the caption checker needs no flag"),
                          (["--num-samples", "0"], "argument --num-samples: must be in [1, inf), got 0"),
                          (["--batch-size", "-2"], "argument --batch-size: must be in [1, inf), got -2"),
                          (["--steps", "2.5"], "argument --steps: expected a whole number, got '2.5'"),
                          (["--cfg-scale", "-1"], "argument --cfg-scale: must be in [0, inf), got -1")):
        with pytest.raises(SystemExit):
            ev.get_args(argv)  # at parse time, before any model is loaded
        assert message in capsys.readouterr().err
    ckpt = write_run(tmp_path / "run", random_tiny_prx())
    with pytest.raises(SystemExit, match="--ref"):
        ev.main(["--ckpt", str(ckpt), "--metrics", "cmmd"])
    for argv, message in ((["--resolution", "64"], "--resolution is not a flag of `eval`: it is ref's"),
                          (["--prompt", "a red circle"], "--prompt is not a flag of `eval`: it is sample's"),
                          (["sample", "--num-samples", "3"], "--num-samples is not a flag of `sample`: it is eval and "
                                                             "ref's (python eval.py eval ...)"),
                          (["ref", "--caption=short"], "--caption is not a flag of `ref`: it is eval's"),
                          (["export", "--steps", "4"], "--steps is not a flag of `export`: it is eval and sample's"),
                          (["--out", ""], "argument --out: an empty value (an unset shell variable?)"),
                          (["sample", "--prompt", "a", "--num-sam", "3"], "--num-sam is not a flag: did you mean "
                                                                          "--num-samples?"),
                          (["--prom", "a"], "--prom is not a flag: did you mean --prompt?")):  # not "invalid choice"
        with pytest.raises(SystemExit):  # each was silently ignored (or the default taken; argparse's abbreviation
            ev.main(["--ckpt", str(ckpt), *argv])  # --num-sam of a flag of another command)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", str(ckpt), "--bogus", "1"])  # like no flag once the dashes all share are set aside
    assert capsys.readouterr().err.endswith("error: --bogus is not a flag\n")  # not "did you mean --out?"
    assert ev.get_args(["sample", "--ckpt", str(ckpt), "--prompt", ""]).prompt == [""]  # the empty prompt: a prompt
    with monkeypatch.context() as m:  # under torchrun with 4 processes: each must have a sample
        m.setattr(ev, "distributed", lambda: True)
        m.setattr(ev.dist, "get_world_size", lambda: 4)
        m.setattr(ev.dist, "destroy_process_group", lambda: None)
        with pytest.raises(SystemExit, match="--num-samples 3 is fewer than the 4 processes"):
            ev.main(["--ckpt", str(ckpt), "--num-samples", "3"])
    for command in (["--ckpt", str(ckpt)], ["ref", "--out", str(tmp_path / "ref.npz")]):  # before any network loads
        with pytest.raises(SystemExit, match=f"--data {tmp_path / 'nowhere'} .*index.json not found"):
            ev.main([*command, "--data", str(tmp_path / "nowhere"), "--metrics", "cmmd", "--clip", "no/such-clip"])
    (tmp_path / "mine.json").write_text("{}")
    for argv, message in ((["--ckpt", str(ckpt), "--out", str(tmp_path / "no" / "eval.json")], "no folder"),
                          (["--ckpt", str(tmp_path / "nowhere")], f"--ckpt {tmp_path / 'nowhere'}: no such folder$"),
                          (["--ckpt", str(tmp_path)], f"--ckpt {tmp_path}: not a run folder \\(with config.json\\) "
                                                      f"nor a checkpoint"),
                          (["--ckpt", str(ckpt), "--out", str(tmp_path / "e.png")], "the evaluation writes JSON: "
                                                                                     "end the name in .json"),
                          (["--ckpt", str(ckpt), "--out", str(tmp_path / "mine.json")], "mine.json exists; write "
                                                                                           "another file"),
                          (["sample", "--ckpt", str(ckpt), "--prompt", "a", "--out", str(tmp_path / "mine.json")],
                           "without --out, sample writes a new one beside the checkpoint"),
                          (["ref", "--data", "builtin", "--out", str(tmp_path / "no" / "r")], "no folder"),
                          (["ref", "--data", "builtin", "--out", "r", "--metrics", "fid", "--num-samples", "1"],
                           "FID's covariance needs at least 2"),
                          (["--ckpt", str(ckpt), "--self-guidance", "2"], "trained without --tread or --sprint"),
                          (["ref", "--data", "builtin", "--out", f"{tmp_path}/"], "names a folder; ref writes a file")):
        with monkeypatch.context() as m:  # refused before any sampling
            m.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("sampled"))
            m.setattr(ev, "open_heldout", lambda *a, **k: pytest.fail("opened the data"))
            with pytest.raises(SystemExit, match=message):
                ev.main(argv)
    assert (tmp_path / "mine.json").read_text() == "{}"
    with pytest.raises(SystemExit, match=f"^error: --ref {tmp_path}/none.npz: no such reference"):
        ev.main(["--ckpt", str(ckpt), "--ref", str(tmp_path / "none.npz")])  # before any sampling
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(SystemExit, match="model.safetensors is corrupt"):
        ev.main(["--ckpt", str(tmp_path / "run")])
    (ckpt / "model.safetensors").write_bytes(weights)
    checksums, config = (ckpt / CHECKSUMS).read_text(), (tmp_path / "run" / "config.json").read_text()
    for path, text, message in ((ckpt / CHECKSUMS, "[]", "does not list the sha256 of each file of the checkpoint"),
                                (ckpt / CHECKSUMS, "{}", "does not list the sha256 of each file of the checkpoint"),
                                (tmp_path / "run" / "config.json", "{}", "config.json is not a run's config"),
                                (tmp_path / "run" / "config.json", '{"args"', "config.json is not valid JSON")):
        path.write_text(text)  # edited or cut short: one line naming the file, not a traceback
        with pytest.raises(SystemExit, match=f"error: --ckpt {re.escape(str(tmp_path / 'run'))}: .*{message}"):
            ev.main(["--ckpt", str(tmp_path / "run")])
        (ckpt / CHECKSUMS).write_text(checksums)
        (tmp_path / "run" / "config.json").write_text(config)


def test_metric_list_takes_names_separated_by_commas():
    assert ev.metric_list("cmmd,,fid,") == ["cmmd", "fid"]  # empty items are no metric
    for text in (",", "fid,cmd"):
        with pytest.raises(argparse.ArgumentTypeError, match="choose from fid,cmmd,dino_mmd"):
            ev.metric_list(text)


def test_an_evaluation_of_prepared_data_scores_every_feature_metric(prepared, tmp_path, monkeypatch):
    """Without --metrics, eval.py on prepared data scores fid, cmmd and dino_mmd: without --ref it stops before
    sampling, naming them, rather than scoring nothing."""
    from model import preset_config
    out = prepared[0] / "out"
    ckpt = write_run(tmp_path / "run", PRX(preset_config("tiny", in_channels=4, context_dim=32)).eval(), data=str(out))
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(SystemExit, match=r"^error: on prepared data the evaluation computes fid,cmmd,dino_mmd "
                                         r"\(--metrics chooses\), which needs reference statistics: --ref ref.npz"):
        ev.main(["--ckpt", str(ckpt), "--num-samples", "1"])  # no --metrics typed: none named as if it were
    with pytest.raises(SystemExit, match="^error: --metrics cmmd needs reference statistics: --ref ref.npz"):
        ev.main(["--ckpt", str(ckpt), "--num-samples", "1", "--metrics", "cmmd"])


def test_a_held_out_split_that_cannot_serve_names_the_flags_typed(prepared, tmp_path):
    """Opened before any network loads; the error names the flags given, and the run's data as the run's."""
    data = prepared[0] / "out"
    write_run(tmp_path / "run", random_tiny_prx(), data=str(data))
    with pytest.raises(SystemExit, match=f"^error: the run's data \\({data}\\) --num-samples 10000: .* held-out "):
        ev.main(["--ckpt", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=f"^error: --data {data} --caption short --num-samples 10000: .* held-out "):
        ev.main(["--ckpt", str(tmp_path / "run"), "--data", str(data), "--caption", "short"])


def test_a_reference_of_prepared_data_refuses_a_resolution(prepared, tmp_path):
    data = prepared[0] / "out"
    with pytest.raises(SystemExit, match=f"^error: --resolution 512: {data} holds its images at the resolution it was "
                                         f"prepared at; leave --resolution out"):
        ev.main(["ref", "--data", str(data), "--resolution", "512", "--out", str(tmp_path / "r.npz")])
    assert not (tmp_path / "r.npz").exists()


def test_a_reference_of_other_images_is_refused(prepared, tmp_path, monkeypatch):
    """A reference names the real images it holds statistics of (a sha256 of the held-out images of prepared data):
    eval.py and train.py's periodic evaluation refuse one of another dataset, of other held-out images of the same
    one, or one too old to say, before any network loads; the built-in scenes of every seed are one distribution."""
    import types
    import train
    from data import HeldoutSplit
    out = prepared[0] / "out"
    assert HeldoutSplit(out, 2, None).images_id(2) != HeldoutSplit(out, 1, None).images_id(1)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    assert HeldoutSplit(other, 2, None).images_id(2) == HeldoutSplit(out, 2, None).images_id(2)  # moved: the same
    shard, row = HeldoutSplit(other, 2, None).prepared.locate(1)
    image = np.load(shard.path / "image.npy", mmap_mode="r+")
    image[row, 0, 0, 0] ^= 1  # one pixel's lowest bit
    image.flush()
    assert HeldoutSplit(other, 2, None).images_id(2) != HeldoutSplit(out, 2, None).images_id(2)
    assert ev.open_heldout("builtin", 4, None, 32, 0, 5).images_id(4) == \
        ev.open_heldout("builtin", 8, "long", 32, 3, 5).images_id(8)
    from data import PreparedDataset
    from model import preset_config
    torch.manual_seed(0)
    channels = PreparedDataset(out).index["schema"]["latent"]["shape"][0]
    ckpt = write_run(tmp_path / "run", PRX(preset_config("tiny", in_channels=channels, context_dim=32)).eval(),
                     data=str(out))
    tiny_clip().save_pretrained(tmp_path / "clip")
    flags = ["--clip", str(tmp_path / "clip"), "--num-samples", "2", "--metrics", "cmmd"]
    for data, name in ((out, "ref.npz"), ("builtin", "builtin.npz")):
        ev.main(["ref", "--data", str(data), "--out", str(tmp_path / name), *flags])
        fid = ev.read_reference(tmp_path / name)  # train.py's periodic FID: the same file, holding FID's settings
        fid["settings"] = json.dumps({**json.loads(str(fid["settings"])), "fid": "not loaded"})
        np.savez(tmp_path / f"fid-{name}", **fid)
    monkeypatch.setattr(ev, "load_clip", lambda *a: pytest.fail("CLIP loaded before the reference was checked"))
    monkeypatch.setattr(ev, "load_inception", lambda *a: pytest.fail("Inception loaded before the check"))
    ref = ev.read_reference(tmp_path / "ref.npz")
    ev.check_reference_images("ref.npz", ref, "data/mj", HeldoutSplit(out, 2, None).images_id(2))  # this data's
    old = {k: v for k, v in ref.items() if k != "images"}
    with pytest.raises(ValueError, match=r"old.npz does not name the images .*: remove it and rebuild it with "
                                         rf"`python eval.py ref --data {out} --num-samples 2 --out old.npz`"):
        ev.check_reference_images("old.npz", old, str(out), HeldoutSplit(out, 2, None).images_id(2))
    with pytest.raises(ValueError, match=r"holds statistics of other images of it \(prepared again\?\), not of the "):
        ev.check_reference_images("ref.npz", ref, str(out), HeldoutSplit(other, 2, None).images_id(2))
    for reference, made_of in (("ref.npz", out), ("builtin.npz", "builtin")):
        with pytest.raises(SystemExit, match=rf"{reference} holds statistics of those of --data {made_of}, not of the "
                                             rf"held-out images of {other} this evaluation compares with"):
            ev.main(["--ckpt", str(ckpt), "--data", str(other), "--ref", str(tmp_path / reference), *flags])
        with pytest.raises(SystemExit, match=rf"error: evaluation .*: .*fid-{reference} holds statistics of those of "
                                             rf"--data {made_of}, not of the held-out images of {other}"):
            train.setup_eval(types.SimpleNamespace(
                eval_samples=2, captions="long", eval_data=str(other), data="builtin", resolution=32, seed=0,
                text_context=5, eval_ref=str(tmp_path / f"fid-{reference}"), fid_weights=None), None, "cpu")


def test_reference_mismatch_names_the_callers_flag():
    holder = {"count": 8, "resolution": 32}
    with pytest.raises(ValueError, match="use --eval-samples 8"):
        ev.check_reference_size(holder, 16, 32, "--eval-samples")  # train.py's flag for the count
    with pytest.raises(ValueError, match="use --num-samples 8"):
        ev.check_reference_size(holder, 16, 32)
    with pytest.raises(ValueError, match=r"at 64 px; build a matching reference with `python eval.py ref --data "
                                         r"<eval data> --num-samples 8 --out <file>` from eval data at 64 px \(the "
                                         r"built-in data: add --resolution 64\)$"):
        ev.check_reference_size(holder, 8, 64)  # the count is right: no "use --num-samples"
    ev.check_reference_size(holder, 8, 32)


def test_a_reference_of_another_eval_version_is_refused(tmp_path, monkeypatch):
    """EVAL_VERSION changes with a preprocessing step or a metric's definition: a reference made before is refused,
    whatever networks made it."""
    clip = tiny_clip()
    ref = ev.Metrics(None, ["cmmd"], clip=clip)
    ref.update(blocky_images(2, seed=1, size=28))
    ref.save_reference(tmp_path / "ref.npz")
    monkeypatch.setattr(ev, "EVAL_VERSION", ev.EVAL_VERSION + 1)
    with pytest.raises(ValueError, match=f"other settings: eval_version is {ev.EVAL_VERSION - 1} there, "
                                         f"{ev.EVAL_VERSION} here"):
        ev.Metrics(tmp_path / "ref.npz", ["cmmd"], clip=clip)


def test_a_reference_without_the_metric_is_refused_before_the_networks_load(tmp_path, monkeypatch):
    ref = ev.Metrics(None, ["cmmd"], clip=tiny_clip())
    ref.update(blocky_images(2, seed=1, size=28))
    ref.save_reference(tmp_path / "ref.npz")
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed
    monkeypatch.setattr(ev, "load_inception", lambda *a: pytest.fail("a network loaded"))
    monkeypatch.setattr(ev, "load_clip", lambda *a: pytest.fail("a network loaded"))
    for metrics in (["fid"], ["cmmd", "fid"]):  # every metric asked for, not only the first
        with pytest.raises(ValueError, match="ref.npz holds cmmd, not fid: pass --metrics cmmd, or build"):
            ev.Metrics(tmp_path / "ref.npz", metrics)
    with pytest.raises(ValueError, match="holds 2 images at 28 px but this evaluation has 3 at 28 px; use --eval-"):
        ev.Metrics(tmp_path / "ref.npz", ["cmmd"], count=3, resolution=28, count_flag="--eval-samples")
    whole = (tmp_path / "ref.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])  # a write cut short (before writes were atomic)
    with pytest.raises(ValueError, match=r"cut.npz is not a readable reference \(BadZipFile.*remove it and rebuild"):
        ev.Metrics(tmp_path / "cut.npz", ["cmmd"])
    with pytest.raises(FileNotFoundError, match=f"did you mean {tmp_path / 'ref'}.npz"):
        ev.Metrics(tmp_path / "ref", ["cmmd"])
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    (tmp_path / "config.json").write_text("{}")
    np.save(tmp_path / "array.npy", np.zeros(2))
    for path, why in ((tmp_path, "this is a folder"), (tmp_path / "config.json", "ValueError"),
                      (tmp_path / "array.npy", "TypeError"),
                      (tmp_path / "other.npz", "an .npz without settings, count, resolution")):
        with pytest.raises(ValueError, match=rf"^--eval-ref {re.escape(str(path))}: not a reference, which is the "
                                             rf".npz file that `python eval.py ref .*` writes \({why}\)$"):
            ev.Metrics(path, ["cmmd"], ref_flag="--eval-ref")  # nothing to remove: the flag names the wrong file
    monkeypatch.setattr(ev, "load_dino", lambda *a, **k: pytest.fail("DINO loaded for CMMD"))
    args = SimpleNamespace(ref=tmp_path / "ref.npz", command="eval", dino_weights="/no/such.safetensors",
                           fid_weights=None, clip=tiny_clip())
    assert ev.build_metrics(args, None, "cpu").metrics == ("cmmd",)  # --dino-weights only for dino_mmd


HEAP = """
import ctypes, torch, eval
fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = type("Mallinfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
def measure():
    heap = mallinfo2().arena
    block = torch.empty(10 << 20)  # 40 MiB: over glibc's largest adaptive mmap threshold (32 MiB)
    mapped = mallinfo2().hblkhd
    del block
    return mapped >> 20, (mallinfo2().arena - heap) >> 20
print(*measure())  # glibc's defaults
assert eval.keep_freed_memory()
print(*measure())  # kept
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_serves_blocks_from_the_heap_and_keeps_them():
    # By default glibc maps a 40 MiB block on its own and unmaps it when freed (the next one faults its pages in
    # again); kept, it comes from the heap, which holds on to it once freed. A fresh process (the setting lasts for
    # the process): glibc's defaults measured first, then the setting; glibc's counters (mallinfo2, MiB): mapped
    # blocks, then what the heap grew by and kept.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    out = subprocess.run([sys.executable, "-c", HEAP], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(ev.__file__), env=env).stdout
    heap = dict(zip(("default", "keep"), (tuple(int(v) for v in line.split()) for line in out.splitlines())))
    assert heap["default"][0] >= 40 and heap["default"][1] < 10, heap
    assert heap["keep"][0] < 10 and heap["keep"][1] >= 30, heap  # the heap may have had a few MiB free already


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's process setup")
def test_cpu_processes_keep_freed_memory(monkeypatch):
    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(ev, "keep_freed_memory", lambda: calls.append(True))
    assert ev.setup_distributed(tf32=True) == (0, 1, torch.device("cpu")) and calls == [True]  # train.py's, eval.py's


def test_a_vae_the_data_names_but_this_machine_lacks_is_one_error(prepared, tmp_path):
    """The prepared data's index.json names its VAE's local copy; on another machine the evaluation says where to
    point it (eval.py has no --vae-path)."""
    from model import preset_config
    data = tmp_path / "data"
    shutil.copytree(prepared[0] / "out", data)
    index = json.loads((data / "index.json").read_text())
    index["settings"]["vae_path"] = str(tmp_path / "elsewhere" / "flux")
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=f"^error: the VAE that {data}/index.json names cannot be loaded "
                                         f"\\(prepare.py --vae-path {tmp_path}/elsewhere/flux: no such fol.*\\); set "
                                         f"settings.vae_path there"):
        ev.load_decoder(preset_config("tiny", in_channels=index["schema"]["latent"]["shape"][0]), str(data), 32, "cpu")
    index["settings"]["text_encoder"] = str(tmp_path / "elsewhere" / "t5gemma")  # and its text encoder
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=f"^error: the text encoder that {data}/index.json names cannot be "
                                         f"loaded .*; set settings.text_encoder there"):
        ev.prompt_encoder(str(data), 0, "cpu")
    run = tmp_path / "run"  # a run whose --data was relative to a folder it is not evaluated from
    write_run(run, random_tiny_prx(), data="relative/data")
    for command in (["--num-samples", "1"], ["sample", "--prompt", "a cat"], ["export", "--out", str(tmp_path / "x")]):
        with pytest.raises(SystemExit, match=f"^error: --ckpt {run}: the run's data relative/data is not here .*: "
                                             f"pass --data <its folder on this machine>"):
            ev.main([*command, "--ckpt", str(run)])


def test_torchruns_workers_ask_to_die_with_it(monkeypatch):
    """setup_distributed: a process torchrun started (TORCHELASTIC_RUN_ID) asks for die_with_launcher; one another
    launcher started with RANK set does not. Its collectives wait an hour, not NCCL's default 10 minutes, which a
    large checkpoint's writing on rank 0 can outlast."""
    calls = []
    monkeypatch.setattr(ev, "die_with_launcher", lambda: calls.append(True))
    monkeypatch.setattr(ev, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(ev.dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setattr(ev.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ev.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    hour = datetime.timedelta(hours=1)
    assert ev.setup_distributed(tf32=False)[:2] == (0, 1) and calls == [True, ("gloo", hour)]  # before the group
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    ev.setup_distributed(tf32=False)
    assert calls == [True, ("gloo", hour), ("gloo", hour)]


LAUNCHER = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(worker.pid, flush=True)
worker.wait()
"""
WORKER = "import sys, time, eval; print(eval.die_with_launcher(), flush=True); time.sleep(300)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_a_torchrun_worker_dies_with_its_launcher():
    """Killed with SIGKILL, torchrun cannot stop its workers: every process it starts (setup_distributed) asks the
    kernel for SIGTERM when its parent dies, so none trains on into the run folder (the lock would hold a resume
    off until it ended)."""
    assert_dies_with_launcher(WORKER)


def assert_dies_with_launcher(worker, env=None):
    """Start `worker` (Python code that prints True once set up, then sleeps) from LAUNCHER, as torchrun starts its
    workers, SIGKILL the launcher, and check that the worker is gone."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, worker], stdout=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(ev.__file__), env=env)
    pid = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline().strip() == "True"  # the worker has asked (and then sleeps)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 120  # a bound, not a timing: the kernel signals at once
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
        assert not alive(pid), "the worker outlived its launcher"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid):
    """Running (not gone, nor a zombie its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False



def test_a_reference_made_before_eval_version_existed_is_refused(tmp_path):
    """A reference whose settings do not name an EVAL_VERSION predates the versions: refused as another version."""
    clip = tiny_clip()
    ref = ev.Metrics(None, ["cmmd"], clip=clip)
    ref.update(blocky_images(2, seed=1, size=28))
    ref.save_reference(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as f:
        arrays = dict(f)
    settings = json.loads(str(arrays["settings"]))
    del settings["eval_version"]
    np.savez(tmp_path / "old.npz", **{**arrays, "settings": json.dumps(settings)})
    with pytest.raises(ValueError, match="other settings: eval_version is 'absent' there"):
        ev.Metrics(tmp_path / "old.npz", ["cmmd"], clip=clip)


def test_the_fid_count_note_comes_only_with_fid(capsys):
    ev.Metrics(None, ["cmmd"], clip=tiny_clip(), count=10, resolution=28)
    assert "note: FID" not in capsys.readouterr().out


def test_a_zero_given_on_the_command_line_overrides_the_runs_sampling(tmp_path):
    """--cfg-scale 0 and --self-guidance 0 are values (no guidance), not 'not given': they replace the run's."""
    write_run(tmp_path / "run", random_tiny_prx())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["args"]["tread"], config["sampling"]["self_guidance"] = True, 0.5
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    args = SimpleNamespace(ckpt=str(tmp_path / "run"), weights=None, steps=None, cfg_scale=0.0, self_guidance=0.0)
    sampling = ev.load_checkpoint(args)[3]
    assert (sampling["cfg_scale"], sampling["self_guidance"], sampling["steps"]) == (0.0, 0.0, 2)


def test_sample_or_eval_with_out_reads_a_checkpoint_it_cannot_write_into(tmp_path, monkeypatch):
    """`sample --out FILE` and `eval --out FILE.json` (its grid beside it) write nothing beside the checkpoint: a
    read-only checkpoint (another user's, a mounted copy of tens of GB) is sampled where it is."""
    ckpt = write_run(tmp_path / "run", random_tiny_prx())
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: str(path) != str(ckpt) and access(path, mode, **k))
    ev.main(["sample", "--ckpt", str(ckpt), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")])
    ev.main(["--ckpt", str(ckpt), "--num-samples", "2", "--steps", "1", "--out", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["grid"] == "eval_samples.png"
    assert (tmp_path / "x.png").stat().st_size > 0 and (tmp_path / "eval_samples.png").stat().st_size > 0
    assert sorted(os.listdir(ckpt)) == sorted([CHECKSUMS, "model.safetensors"])


def test_sample_with_data_of_the_other_kind_names_data_not_the_prompt(prepared, tmp_path, monkeypatch):
    """A run of prepared data sampled with --data builtin (or the reverse): its prompts need the run's text encoder,
    so the error names --data, before any encoder reads the prompt."""
    from model import preset_config
    latent = write_run(tmp_path / "run", PRX(preset_config("tiny", in_channels=4, context_dim=32)).eval(),
                       data=str(prepared[0] / "out"))
    monkeypatch.setattr(ev, "prompt_encoder", lambda *a: pytest.fail("an encoder read the prompt"))
    for ckpt, data in ((latent, "builtin"), (write_run(tmp_path / "b", random_tiny_prx()), str(prepared[0] / "out"))):
        with pytest.raises(SystemExit, match=f"^error: --data {re.escape(data)}: the run trained on .*leave --data "):
            ev.main(["sample", "--ckpt", str(ckpt), "--prompt", "a cat", "--data", data, "--out",
                     str(tmp_path / "s.png")])
    monkeypatch.undo()  # prepared data for a run of prepared data not on this machine: its encoder's width tells
    wide = write_run(tmp_path / "w", PRX(preset_config("tiny", in_channels=4, context_dim=64)).eval(),
                     data="/elsewhere/mj")
    with pytest.raises(SystemExit, match="its text encoder gives 32-wide tokens, the model reads 64: name the data"):
        ev.main(["sample", "--ckpt", str(wide), "--prompt", "a cat", "--data", str(prepared[0] / "out"), "--out",
                 str(tmp_path / "s.png")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_sampler_runs_the_model_under_bf16_autocast_on_cuda():
    """As training does (fp32 weights, bf16 compute): fp32 sampling would be slower and score other images."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, txt, txt_mask, route_ratio=0.0, route_scores=None):
            seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
            return torch.zeros_like(x)
    txt, mask = torch.zeros(2, 3, 8, device="cuda"), torch.ones(2, 3, dtype=torch.bool, device="cuda")
    ev.sample(Recorder(), txt, mask, txt[:1], mask[:1], [0, 1], (4, 2, 2), steps=2, cfg_scale=2.0)
    assert seen == [(True, torch.bfloat16)] * 2
