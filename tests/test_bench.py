"""bench.py: every mode runs at tiny sizes and prints each figure next to its baseline (no timing is asserted)."""

import os
import re
import subprocess
import sys

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_compared(out, what, baseline):
    """A line `<what ...>: ours X unit | <baseline> Y unit | ours/<baseline> R` with numbers X, Y and R."""
    number = r"[\d,.e+-]+"
    pattern = (rf"^{re.escape(what)}.*: ours {number} .*\| {re.escape(baseline)} {number} .*\| "
               rf"ours/{re.escape(baseline)} \d+\.\d{{3}}$")
    assert re.search(pattern, out, re.MULTILINE), f"no '{what}' line against {baseline} in:\n{out}"


def test_model(capsys):
    bench.main(["model", "--preset", "tiny", "--batch", "2", "--img-tokens", "16", "--txt-tokens", "8",
                "--min-len", "2", "--max-len", "8", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert_compared(out, "forward of sample 0", "closed form")
    assert_compared(out, "eager fwd+bwd", "diffusers")


def test_muon(capsys):
    bench.main(["muon", "--preset", "tiny", "--steps", "1"])
    out = capsys.readouterr().out
    assert_compared(out, "largest Newton-Schulz share", "ideal")
    assert_compared(out, "step", "torch.optim.Muon")


def test_loader(tmp_path):
    # a subprocess: the loader bench pins its process to one core
    out = subprocess.run([sys.executable, "bench.py", "loader", str(tmp_path), "--samples", "96", "--batch", "16"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "96 samples, 6 batches of 16" in out
    assert_compared(out, "samples per wall second", "datasets")
    assert_compared(out, "samples per CPU second", "datasets")


def test_eval(capsys, monkeypatch):
    # CLIP and DINOv2 shrunk to one small layer (Inception has no smaller form); sampling with the tiny pixel model
    monkeypatch.setattr(bench, "CLIP_CONFIG", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=28, patch_size=14,
                                                   projection_dim=16))
    monkeypatch.setattr(bench, "DINO_KWARGS", dict(img_size=28, embed_dim=32, depth=1, num_heads=2,
                                                   pretrained_cfg_overlay=dict(input_size=(3, 28, 28))))
    bench.main(["eval", "--batch", "1", "--warmup", "0", "--steps", "1", "--mmd-rows", "256",
                "--preset", "tiny-pixel", "--sample-steps", "2"])
    out = capsys.readouterr().out
    assert_compared(out, "Inception (FID)", "torch-fidelity")
    assert_compared(out, "CLIP ViT-L/14-336 (CMMD)", "CLIPImageProcessor")
    assert_compared(out, "DINOv2 ViT-L/14 (DINO-MMD)", "timm")
    assert_compared(out, "MMD of 256 against 256", "one block")
    assert_compared(out, "sampling PRX tiny-pixel", "diffusers")
