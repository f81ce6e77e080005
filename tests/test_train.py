import argparse
import contextlib
import errno
import gc
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import shapes
import train
from model import (CHECKSUMS, PRX, file_sha256, list_checkpoints, load_run, preset_config, stage_config,
                   verify_checkpoint)
from train import sample_t

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --track cpu: what a run without --data is on a machine without CUDA, also on one with it
SMALL = ["--track", "cpu", "--hidden", "64", "--depth", "2", "--batch-size", "16", "--micro-batch", "8", "--log-every", "1",
         "--eval-samples", "0", "--warmup", "5"]


def run(args, nproc=1, script=os.path.join(ROOT, "train.py"), **kw):
    # --standalone: the rendezvous binds a free port itself (a port picked here first could be taken by a test
    # running beside this one before torchrun binds it)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + [str(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def refusal(argv, capsys):
    """train.main(argv) in this process (a launch of train.py would import torch again, ~2 s), which must stop with
    an error -> its message: argparse's on stderr, or exit_on's SystemExit("error: ...")."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    code = e.value.code
    assert code not in (0, None), "stopped without an error"
    del e
    gc.collect()  # main's frames, which hold the run's .lock open, as the process's exit would close it
    return capsys.readouterr().err + str(code)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_timestep_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, shift=3.0, uniform_frac=0.1, g=g, device="cpu")
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3
    # closed form: shift_t(u) = s u / (1 + (s - 1) u) has the inverse u = x / (s - (s - 1) x), u = sigmoid(z), and
    # the uniform tenth adds 0.1 x: P(t <= x) = 0.9 Phi(logit(u)) + 0.1 x (binomial sd at 200,000 draws < 0.0012)
    for x in (0.02, 0.2, 0.5, 0.735, 0.9, 0.98):
        u = torch.tensor(x / (3 - 2 * x), dtype=torch.float64)
        cdf = 0.9 * torch.special.ndtr(torch.logit(u)) + 0.1 * x
        assert abs((t <= x).double().mean() - cdf) < 0.005, x
    t1 = sample_t(200_000, shift=1.0, uniform_frac=0.0, g=g, device="cpu")
    logit = torch.log(t1 / (1 - t1))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    edges = sample_t(200_000, shift=1.0, uniform_frac=1.0, g=g, device="cpu")  # uniform: 0.1% beyond each bound
    assert edges.min() == torch.tensor(1e-3) and edges.max() == torch.tensor(1 - 1e-3)
    assert 0.0005 < (edges == edges.min()).float().mean() < 0.0015


def test_foreground_weights_closed_form():
    """Pixels more than 0.1 from the background (the per-channel median) in any channel weigh 1 + w, the others 1,
    normalised to mean 1 per image: with n of 64 pixels foreground, 1 / (1 + w n / 64) and (1 + w) / (1 + w n / 64).
    The third image's object covers 3/8 of it: the median is still the background, its mean would not be."""
    x0 = torch.full((3, 3, 8, 8), -0.5)
    x0[0, :, :2, :2] = 0.5       # 4 foreground pixels
    x0[1, 1, 2:5, 2:5] = -0.35   # 9, in one channel only
    x0[1, 0, 7, 7] = -0.45       # 0.05 from the background: background
    x0[2, :, :3, :] = 0.5        # 24: the mean, -0.125, is 0.375 from the background
    w = train.foreground_weights(x0, 3.0)
    assert w.shape == (3, 1, 8, 8)
    for i, (rows, cols, n) in enumerate(((slice(0, 2), slice(0, 2), 4), (slice(2, 5), slice(2, 5), 9),
                                         (slice(0, 3), slice(0, 8), 24))):
        expected = torch.full((8, 8), 1 / (1 + 3.0 * n / 64))
        expected[rows, cols] *= 4.0
        assert torch.allclose(w[i, 0], expected, atol=1e-6)


def test_torchrun_two_processes_equal_one(tmp_path):
    """Global batch 32 of micro-batches of 8: 4 accumulated on one process, 2 on each of two. The same losses and
    weights: micro-batch i of rank r is the world's r + i x world, and DDP all-reduces once, after the last."""
    flags = SMALL + ["--batch-size", "32", "--max-steps", "10", "--ckpt-every", "10", "--eval-samples", "9",
                     "--sample-steps", "2"]
    train.main(flags + ["--out", str(tmp_path / "one")])  # in this process: no torchrun, no import of torch again
    two = run(flags + ["--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert [json.loads((tmp_path / r / "config.json").read_text())["world_size"] for r in ("one", "two")] == [1, 2]
    assert len(set(a.values())) == 10  # the losses move: this compares training, not constants
    weights = [load_file(str(tmp_path / r / "checkpoints" / "step_10" / "model.safetensors")) for r in ("one", "two")]
    # only the order of the sums differs (measured: 1e-7 on the losses); a micro-batch of the wrong rank, or a
    # micro-batch left out of the all-reduce, moves the losses by ~1e-2 and the weights by ~1e-3
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5, (a, b)
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=0, atol=1e-5) for k in weights[0])
    # the grid: samples 0..8 from both ranks' first batches, in order (rank 0's alone would be 0, 2, 4, 6, 8)
    grids = [np.asarray(Image.open(tmp_path / r / "samples_10.png")).astype(int) for r in ("one", "two")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).mean() < 1, "another grid"


@pytest.mark.slow
def test_compile_under_torchrun_matches_eager_without_graph_breaks(tmp_path):
    """torch.compile inside DDP (2 gloo processes, TREAD routing) gives eager's losses, and dynamo counts no graph
    break in the training step. REPA's loss reads the tokens TREAD keeps: the compiled forward draws eager's."""
    flags = SMALL + ["--tread", "--repa", "builtin", "--max-steps", "3"]
    train.main(flags + ["--out", str(tmp_path / "eager")])  # the reference, in this process
    compiled = run(flags + ["--out", str(tmp_path / "compiled"), "--compile"], nproc=2)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert re.search(r"compile warm-up done \(untimed steps, state restored\): 0 graph breaks, \d+ s",
                     compiled.stdout)
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * (1 + abs(a[k])) for k in a), (a, b)


def test_lr_schedule_warmup_constant_cooldown(tmp_path):
    train.main(SMALL[:-2] + ["--out", str(tmp_path / "c"), "--max-steps", "10", "--warmup", "2", "--lr", "1e-3",
                             "--cooldown", "0.5"])
    with open(tmp_path / "c" / "metrics.jsonl") as f:
        lrs = {rec["step"]: rec["lr"] for rec in map(json.loads, f) if "lr" in rec}
    # logged step s ran optimizer step s - 1: warm-up 1/2, 2/2, constant, then linear to 0 over the last 5 steps
    expected = [1e-3 * min(1, s / 2, (1 - (s - 1) / 10) / 0.5) for s in range(1, 11)]
    assert [lrs[s] for s in range(1, 11)] == pytest.approx(expected, rel=1e-6)


def test_the_cooldown_follows_the_clock_when_the_time_budget_ends_first():
    """--cooldown's progress is the step or the training time, whichever is nearer its budget (--max-time minutes)."""
    args = argparse.Namespace(lr=1.0, warmup=1, cooldown=0.5, max_steps=10 ** 9, max_time=10)
    assert train.learning_rate(args, 5, 150) == 1.0  # a quarter of the 600 s: before the cooldown
    assert train.learning_rate(args, 5, 450) == pytest.approx(0.5)  # 3/4 of the way: half way down
    assert train.learning_rate(args, 5, 600) == 0.0
    args.max_time, args.max_steps = None, 100  # no time budget: the steps alone
    assert train.learning_rate(args, 75, 10 ** 6) == pytest.approx(0.5)


def test_killed_run_resumes_exactly(tmp_path, request):
    # REPA too: its projector's weights and AdamW moments are in trainer.pt
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    torch.set_num_threads(1)  # the killed process's one thread (OMP_NUM_THREADS=1): the same sums in each part
    # --max-time: not the CPU track's 4.3 minutes, which a busy machine can spend before step 30 (the runs then differ)
    args = SMALL + ["--max-steps", "30", "--ckpt-every", "10", "--keep", "5", "--tread", "--repa", "builtin",
                    "--max-time", "600"]
    train.main(args + ["--out", str(tmp_path / "ref")])  # the reference and the resume in this process
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not (out / "checkpoints" / "step_10").exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step_30").exists(), "killed too late to test anything"
    train.main(args + ["--out", str(out), "--resume"])  # the killed process's .lock and torn lines left as they were
    a, b = losses(tmp_path / "ref"), losses(out)
    assert sorted(b) == list(range(1, 31))  # lines logged after the checkpoint by the killed run were cut
    assert max(abs(a[s] - b[s]) for s in range(11, 31)) <= 1e-6
    final_a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_30" / "model.safetensors"))
    final_b = load_file(str(out / "checkpoints" / "step_30" / "model.safetensors"))
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


def test_first_run_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "r"
    train.main(SMALL[:-2] + ["--out", str(out), "--max-steps", "4", "--eval-samples", "8", "--sample-steps", "2",
                             "--ema", "0.9", "--ema-every", "2"])
    stdout = capsys.readouterr().out
    config = json.load(open(out / "config.json"))
    assert config["args"]["hidden"] == 64 and "torch" in config["versions"] and config["model"]["hidden_size"] == 64
    result = json.load(open(out / "eval.json"))
    assert 0 <= result["caption_accuracy"] <= result["color_region_accuracy"] <= 1 and result["data"] == "builtin"
    assert (out / "samples_4.png").exists() and (out / "checkpoints" / "step_4" / "ema.safetensors").exists()
    log = open(out / "log.txt").read()
    sources = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))
    assert len(sources) >= 8 and log.startswith("=== ")
    assert all(f"=== {name}\n{open(os.path.join(ROOT, name)).read()}\n" in log for name in sources)  # each, whole
    assert "step 4/4 | loss" in stdout and "grad_norm" in stdout
    from model import PRXConfig, flops_per_sample
    record = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line][-1]
    text_tokens = 1 + len("a gray background with a large red circle in the top left".split())  # at least this
    flops = 3 * record["samples_per_s"] * flops_per_sample(PRXConfig(**config["model"]), 64, text_tokens)
    assert flops <= record["flops_per_s"] <= 2 * flops and record["mfu"] > 0  # 64 tokens: 32 px, patch 4
    assert 0 < record["data_share"] < 1 and 0 < record["optimizer_share"] < 1
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    times = [0.0] + [r["train_time_s"] for r in records]  # one line a step (--log-every 1), batch 16
    assert all(r["samples_per_s"] * (t1 - t0) == pytest.approx(16) for r, t0, t1 in zip(records, times, times[1:]))


def test_the_logged_flops_and_utilisation_are_3_forwards_a_sample_over_the_peak(tmp_path, monkeypatch):
    """flops/s = 3 x model.flops_per_sample x samples/s (the backward costs two forwards); mfu = flops/s / the peak
    measured at start; samples/s counts the global batch over training time."""
    monkeypatch.setattr(train, "flops_per_sample", lambda *a: 1e6)
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype: 1e9)
    train.main(SMALL + ["--max-steps", "3", "--out", str(tmp_path / "r")])
    records = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl") if '"loss"' in line]
    assert len(records) == 3
    for r in records:
        assert r["flops_per_s"] == pytest.approx(3e6 * r["samples_per_s"]) and r["mfu"] == pytest.approx(
            r["flops_per_s"] / 1e9)


def test_evaluations_checkpoints_and_the_compile_warm_up_are_off_the_clock(tmp_path, monkeypatch):
    """Each of them moves a fake clock 1,000 s ahead: the logged training time never sees those seconds."""
    real, offset = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])

    def pause(result):
        def paused(*a, **kw):
            offset[0] += 1000.0
            return result(*a, **kw)
        return paused
    monkeypatch.setattr(train, "setup_eval", lambda *a: pause(lambda model, grid: {"object_accuracy": 0.0}))
    monkeypatch.setattr(train, "save_run_checkpoint", pause(train.save_run_checkpoint))
    monkeypatch.setattr(train, "compile_warmup", pause(lambda *a: (0, 0.0)))
    monkeypatch.setattr(train.torch, "compile", lambda model: model)
    train.main(SMALL + ["--max-steps", "4", "--eval-every", "1", "--eval-samples", "2", "--ckpt-every", "1",
                        "--compile", "--out", str(tmp_path / "r")])
    assert offset[0] == 1000.0 * (1 + 4 + 4)  # the warm-up, 4 evaluations, 4 checkpoints
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        clock = [r["train_time_s"] for r in map(json.loads, f)]
    assert len(clock) == 8 and max(clock) < 100  # 4 steps and 4 evaluations; a pause on the clock would add 1,000


@pytest.mark.parametrize("argv, message", [
    (["--pred", "z"], "argument --pred: invalid choice: 'z'"),
    (["--tread", "--sprint"], "--tread and --sprint are exclusive"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: no prepared dataset there"),
    (["--batch-size", "24", "--micro-batch", "16"], "must be a multiple of --micro-batch 16 x 1 processes: use "
                                                    "--micro-batch 12"),
    (["--resume"], "--resume: no run folder"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such folder"),
    (["--cooldown", "2"], "argument --cooldown: must be in [0, 1], got 2"),
])
def test_bad_input_fails_before_work(tmp_path, capsys, argv, message):
    err = refusal(["--track", "cpu", "--out", str(tmp_path / "x"), *argv], capsys)
    assert message in err, err[-1000:]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_a_bad_flag_on_the_command_line_exits_with_argparse_status(tmp_path):
    r = run(["--track", "cpu", "--out", str(tmp_path / "x"), "--pred", "z"])
    assert r.returncode == 2 and "train.py: error: argument --pred: invalid choice: 'z'" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "x").exists()


def test_fewer_evaluation_samples_than_processes_are_refused(monkeypatch, capsys):
    """Under torchrun each process samples a share of an evaluation; a process with none would skip the collectives
    the others wait in. --eval-samples below the number of processes is refused; 0 (no evaluations) is not."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        train.get_args(["--track", "cpu", "--eval-samples", "3"])
    assert "--eval-samples 3: the 4 processes each sample a share" in capsys.readouterr().err
    assert [train.get_args(["--track", "cpu", "--eval-samples", n]).eval_samples for n in ("0", "4")] == [0, 4]


@pytest.mark.parametrize("log_every, ckpt_every, message", [
    ("1", "20", r"error: loss \S+, grad_norm (inf|nan) at step \d+: not finite; stopping: no checkpoint was written"),
    ("40", "1", r"error: loss, gradient norm or weights not finite at step \d+; checkpoint not written")])  # no line
def test_an_infinite_gradient_norm_stops_the_run(tmp_path, log_every, ckpt_every, message):
    """lr 1e9: by step 2 the loss is finite (~1e19) but the gradient's norm overflows; clipping would then scale every
    update to 0 and the run would train on unchanged: it stops, at its step line or at its next checkpoint."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    flags = SMALL + ["--out", str(tmp_path / "inf"), "--max-steps", "40", "--lr", "1e9"]
    try:
        with pytest.raises(SystemExit, match=message):
            train.main(flags + ["--log-every", log_every, "--ckpt-every", ckpt_every])
    finally:
        for s, handler in handlers.items():  # main stopped before putting them back
            signal.signal(s, handler)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    err = refusal(SMALL + ["--out", str(out), "--max-steps", "40", "--ckpt-every", "1", "--lr", "1e30", "--warmup",
                           "1", "--grad-clip", "1e30"], capsys)
    assert "not finite" in err and "at step" in err, err[-1000:]
    written = list((out / "checkpoints").iterdir())
    assert written and len(written) < 40
    for ckpt in written:
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "model.safetensors")).values())


def test_repa_loss_uses_the_visible_tokens_positions():
    from train import repa_loss
    g = torch.Generator().manual_seed(0)
    proj, target = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    idx = torch.tensor([[0, 2, 4], [1, 3, 4]])
    expected = -torch.stack([torch.nn.functional.cosine_similarity(proj[b, j], target[b, idx[b, j]], dim=0)
                             for b in range(2) for j in range(3)]).mean()
    assert torch.allclose(repa_loss(proj, target, idx), expected, atol=1e-6)
    assert torch.allclose(repa_loss(target, target, None), torch.tensor(-1.0), atol=1e-6)


def test_repa_with_tread_trains_and_resumes(tmp_path):
    """A tiny random timm ViT stands in for DINOv2 through the same loading path (weights file, no download)."""
    import timm
    from safetensors.torch import save_file
    weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(weights))
    args = SMALL + ["--repa", "dinov2", "--repa-teacher", "vit_tiny_patch16_224", "--repa-weights", str(weights),
                    "--tread", "--out", str(tmp_path / "r")]
    train.main(args + ["--max-steps", "3"])  # both runs in this process
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_3" / "trainer.pt", weights_only=True)
    assert state["repa"]["projector"]["4.weight"].shape == (192, 192)  # PRX's MLP h -> D -> D -> D, D the teacher's
    assert "repa_proj.0.weight" not in load_file(str(tmp_path / "r" / "checkpoints" / "step_3" / "model.safetensors"))
    train.main(args + ["--max-steps", "5", "--resume"])
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3, 4, 5]
    # another teacher (384 wide): a projector of its own, not the one learnt from the first teacher's features
    save_file(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), str(weights))
    args[args.index("vit_tiny_patch16_224")] = "vit_small_patch16_224"
    train.main(args + ["--max-steps", "6", "--resume"])
    assert "REPA's mlp projector starts fresh (the checkpoint has one learnt from the teacher vit_tiny_patch16_224)" \
        in (tmp_path / "r" / "log.txt").read_text()
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_6" / "trainer.pt", weights_only=True)
    assert state["repa"]["teacher"] == "vit_small_patch16_224" and state["repa"]["projector"]["4.weight"].shape == \
        (384, 384)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be in [1, inf)"),
    (["--batch-size", "-32"], "argument --batch-size: must be in [1, inf)"),
    (["--micro-batch", "0"], "argument --micro-batch"),
    (["--ckpt-every", "0"], "argument --ckpt-every"),
    (["--log-every", "0"], "argument --log-every"),
    (["--ema-every", "0"], "argument --ema-every"),
    (["--keep", "0"], "argument --keep"),
    (["--keep", "-1"], "argument --keep"),
    (["--max-steps", "-5"], "argument --max-steps"),
    (["--resolution", "0"], "argument --resolution"),
    (["--eval-minutes", "abc"], "argument --eval-minutes: expected minutes"),
    (["--eval-minutes", "1,-2"], "argument --eval-minutes: minutes must be > 0"),
    (["--eval-minutes", "2,0"], "argument --eval-minutes: minutes must be > 0"),
    (["--eval-minutes", ","], "argument --eval-minutes: minutes must be > 0, got ','"),
    (["--eval-minutes", ""], "argument --eval-minutes: minutes must be > 0, got ''"),
    (["--caption-dropout", "2"], "argument --caption-dropout: must be in [0, 1]"),
    (["--lr", "0"], "argument --lr: must be in (0, inf)"),
    (["--lr", "inf"], "argument --lr: must be in (0, inf), got inf"),  # the upper end is open
    (["--max-time", "nan"], "argument --max-time"),
    (["--ema", "1.5"], "argument --ema"),
    (["--ema", "1"], "argument --ema: must be in [0, 1), got 1"),
    (["--route-ratio", "0.3"], "--route-ratio needs --tread or --sprint"),
    (["--captions", "medium"], "--captions: captions 'medium': choose long, short or mixed[:p]"),
    (["--captions", "mixed:1.5"], "(long with probability p, 0 <= p <= 1)"),
    (["--data", "a:0"], "--data: "),
    (["--eval-ref", "/nonexistent.npz"], "--eval-ref /nonexistent.npz: no such file"),
    (["--repa", "builtin", "--repa-teacher", "vit_tiny_patch16_224"], "--repa-teacher names a timm model"),
    (["--irepa"], "--irepa needs --repa"),
    (["--repa-stop", "100"], "--repa-stop needs --repa"),
    (["--repa-layer", "0"], "--repa-layer needs --repa"),
    (["--muon-ns-steps", "3"], "--muon-ns-steps is Muon's: it needs --optimizer muon"),
    (["--muon-lr", "4e-3"], "--muon-lr is Muon's: it needs --optimizer muon"),
    (["--optimizer", "muon", "--muon-lr", "0"], "argument --muon-lr: must be in (0, inf)"),
    (["--repa-lambda", "2"], "--repa-lambda needs --repa"),
    (["--repa-lambda", "0.5"], "--repa-lambda needs --repa"),  # typed, at its default
    (["--fid-weights", "pt_inception.pth"], "--fid-weights is FID's network: it needs --eval-ref"),
    (["--data", "/nonexistent", "--text-context", "3"], "--text-context is the built-in text encoder's: prepared"),
    (["--repa-teacher", "vit_tiny_patch16_224"], "--repa-teacher needs --repa"),
    (["--repa-weights", "dino.safetensors"], "--repa-weights needs --repa"),
    (["--ema-every", "1"], "--ema-every sets how often the EMA updates: it needs --ema"),
    (["--activation-memory-budget", "0.5"], "--activation-memory-budget is the compiled graph's: it needs --compile"),
    (["--compile", "--activation-memory-budget", "1.5"], "argument --activation-memory-budget: must be in [0, 1]"),
    (["--eval-samples", "0", "--eval-every", "100"], "--eval-every shapes the run's evaluations; --eval-samples 0"),
    (["--eval-samples", "0", "--eval-minutes", "1,2"], "--eval-minutes shapes the run's evaluations"),
    (["--eval-samples", "0", "--eval-ref", "ref.npz"], "--eval-ref shapes the run's evaluations"),
    (["--eval-samples", "0", "--eval-data", "data/mj"], "--eval-data shapes the run's evaluations"),
    (["--tread", "--eval-samples", "0", "--self-guidance", "1.5"], "--self-guidance shapes the run's evaluations"),
    (["--data", "/nonexistent", "--repa", "builtin"], "--repa builtin: the built-in teacher reads the built-in shapes"),
    (["--hidden", "96"], "--hidden 96: attention heads are 64 wide"),
    (["--tread", "--route-ratio", "1"], "argument --route-ratio: must be in (0, 1), got 1"),
    (["--tread", "--route-ratio", "0"], "argument --route-ratio: must be in (0, 1), got 0"),
    (["--data", "builtin@0:long;builtin@10:mixed"], "builtin (the built-in shapes) is not a prepared directory and "
                                                    "takes no mixture or phases: --data builtin, with --captions"),
    (["--model", "huge"], "argument --model: invalid choice: 'huge' (choose from 'tiny', 'tiny-pixel', 'small'"),
    (["--betas", "1", "0.95"], "--betas 1 0.95: each must be below 1"),
    (["--seed", "-1"], "argument --seed: must be in [0, 4611686018427387904]"),
    (["--resolution", "40000"], "argument --resolution: must be in [1, 4096], got 40000"),  # not hours to an OOM
    (["--lpips", "0.1", "--resolution", "15"], "--lpips: VGG16's feature maps need images of at least 16 px"),
    (["--cfm", "0.1", "--micro-batch", "1"], "--cfm contrasts each sample with another of its micro-batch: it needs "),
    (["--optimizer", "muon", "--muon-ns-steps", "0"], "argument --muon-ns-steps"),
    (["--cfm", "0"], "argument --cfm: must be in (0, inf)"),
    (["--self-guidance", "1.5"], "--self-guidance extrapolates from the routed network: it needs --tread"),
    (["--eval-data", "/nonexistent"], "--eval-data /nonexistent: no prepared dataset there"),
    (["--lpips-weights", "vgg.pth"], "--lpips-weights needs --lpips"),
    (["--pdino-weights", "dino.safetensors"], "--pdino-weights needs --pdino"),
    (["--lpips", "0"], "argument --lpips: must be in (0, inf)"),
    (["--target", "fid=20", "--eval-every", "10"], "--target fid: this run's evaluations give caption_accuracy"),
    (["--target", "object_accuracy=0.3"], "--target needs evaluations during the run"),
    (["--target", "caption_accuracy=2", "--eval-every", "10"], "--target caption_accuracy=2: an accuracy is at most 1"),
    (["--target", "fid"], "expected METRIC=VALUE"),
])
def test_every_flag_is_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--track", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_a_target_checked_on_the_clock_alone_is_accepted():
    """--target needs evaluations during the run: --eval-minutes gives them as well as --eval-every does."""
    args = train.get_args(["--track", "cpu", "--target", "object_accuracy=0.3", "--eval-minutes", "1,2"])
    assert args.target == ("object_accuracy", 0.3) and args.eval_minutes == [1.0, 2.0] and not args.eval_every


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize("parse, argv, message", [
    (lambda argv: train.get_args(["--track", "cpu", *argv]), ["--lr", "-1"], "error: argument --lr"),  # argparse's
    (lambda argv: train.get_args(["--track", "cpu", *argv]), ["--tread", "--sprint"], "are exclusive"),  # ours
    (lambda argv: __import__("eval").get_args(argv), ["--num-samples", "0"], "error: argument --num-samples"),
    (lambda argv: __import__("prepare").main(argv), ["--resolution", "0"], "error: argument --resolution"),
])
def test_an_argument_error_is_printed_by_rank_0_alone(parse, argv, message, rank, monkeypatch, capsys):
    """Under torchrun every rank of train.py, eval.py and prepare.py parses the flags (data.Parser): one copy of an
    error, not one per process. The other ranks wait for torchrun to stop them once rank 0 has printed and failed (a
    rank failing first gets rank 0 stopped before it prints); started otherwise, they exit at once."""
    import data
    waited = []
    monkeypatch.setattr(data.time, "sleep", waited.append)
    for launcher in ({}, {"TORCHELASTIC_RUN_ID": "none"}):
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        monkeypatch.setenv("RANK", rank)
        for name, value in launcher.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as refused:
            parse(argv)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and (message in err) == (rank == "0") and (err == "") == (rank == "1"), err
    assert waited == [data.QUIET_RANK_WAIT_S] * (rank == "1")  # under torchrun only


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_error_after_parsing_is_printed_by_rank_0_first(rank, monkeypatch):
    """Errors found after parsing (an --out that holds a run, a batch that does not divide) are met by every rank: under
    torchrun the others wait before theirs is printed, so that torchrun stops them once rank 0 has printed and
    failed; a rank that alone met an error still says it (after the wait). Exit codes without a message: at once."""
    import data
    waited = []
    monkeypatch.setattr(data.time, "sleep", waited.append)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    for code in ("error: --out r holds a run already", 143):
        with pytest.raises(SystemExit) as stopped, data.errors_of_rank_0_first():
            raise SystemExit(code)
        assert stopped.value.code == code
    assert waited == [data.QUIET_RANK_WAIT_S] * (rank == "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # another launcher's processes: no torchrun to stop them, no wait
    with pytest.raises(SystemExit), data.errors_of_rank_0_first():
        raise SystemExit("error: --out r holds a run already")
    assert waited == [data.QUIET_RANK_WAIT_S] * (rank == "1")


def test_rank_1_names_the_checkpoint_when_rank_0_was_killed(monkeypatch):
    """torchrun's SIGTERM after rank 0 was killed (out of memory while it sampled): rank 0 said nothing, so rank 1
    names where to resume, once; while rank 0 lives, or seen from another host, the other ranks exit quietly."""
    import data
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid: a process that has ended, reaped
    host = socket.gethostname()
    said = "\nstopped (SIGTERM; rank 0 ended); the last checkpoint is c"
    for rank, rank_0, stopped in (("1", (host, ended.pid), said),
                                  ("1", (host, os.getpid()), 128 + signal.SIGTERM),  # alive: it says it
                                  ("2", (host, ended.pid), 128 + signal.SIGTERM),  # rank 1 says it
                                  ("1", ("another-host", ended.pid), 128 + signal.SIGTERM)):
        monkeypatch.setenv("RANK", rank)
        data.stop_on_signals(lambda: "the last checkpoint is c", False, rank_0)
        with pytest.raises(SystemExit) as e:
            signal.raise_signal(signal.SIGTERM)
        assert e.value.code == stopped and isinstance(e.value, data.AnotherProcessEnded) == isinstance(stopped, str)


def test_rank_1_says_nothing_more_when_rank_0_ended_on_an_error_they_both_met(monkeypatch):
    """An error every rank meets (a non-finite loss): rank 1 waits for torchrun to stop it while rank 0 prints it. Rank
    0 has ended by then, but rank 1 exits quietly: the one line is rank 0's."""
    import data
    ended = subprocess.Popen(["true"])
    ended.wait()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setattr(data.time, "sleep", lambda s: signal.raise_signal(signal.SIGTERM))  # torchrun's, meanwhile
    data.stop_on_signals(lambda: "the last checkpoint is c", False, (socket.gethostname(), ended.pid))
    with pytest.raises(SystemExit) as e, data.errors_of_rank_0_first():
        raise SystemExit("error: loss nan at step 3: not finite; stopping")
    assert e.value.code == 128 + signal.SIGTERM


# each rank meets a library's warning, note, progress bar and error once its process group is up (transformers is
# imported then, as by a model's load); rank 1 then fails on a bug of its own
LIBRARY_NOISE = """import logging, os, sys, warnings
sys.path.insert(0, {root!r})
import train
rank, setup = os.environ["RANK"], train.setup_distributed
def noisy_setup(tf32):
    done = setup(tf32)
    from transformers.utils.logging import tqdm
    warnings.warn(f"a warning of rank {{rank}}")
    logging.getLogger("torch.probe").warning(f"a note of rank {{rank}}")
    list(tqdm(range(2), desc=f"a bar of rank {{rank}}"))
    logging.getLogger("torch.probe").error(f"an error of rank {{rank}}")
    return done
train.setup_distributed = noisy_setup
train.main()
if rank == "1":
    raise RuntimeError("a bug of rank 1")
"""


def test_under_torchrun_library_warnings_print_once_and_errors_on_every_rank(tmp_path):
    """Library warnings, notes and progress bars, which every rank meets alike, print on rank 0 alone (diffusers' and
    transformers' notes of each model load, torch's of each compile, once a process); every rank's errors print."""
    script = tmp_path / "noisy_train.py"
    script.write_text(LIBRARY_NOISE.format(root=ROOT))
    r = run(SMALL + ["--max-steps", "1", "--out", str(tmp_path / "r")], nproc=2, script=script)
    for said in ("a warning of rank 0", "a note of rank 0", "a bar of rank 0", "an error of rank 0",
                 "an error of rank 1", "RuntimeError: a bug of rank 1"):
        assert said in r.stderr, (said, r.stderr[-3000:])
    for quiet in ("a warning of rank 1", "a note of rank 1", "a bar of rank 1"):
        assert quiet not in r.stderr, (quiet, r.stderr[-3000:])


def test_torchruns_sigterm_in_a_ranks_teardown_adds_nothing_to_its_one_line(tmp_path):
    """A rank that has its way out (here: another process ended) gets torchrun's SIGTERM while the interpreter tears
    down: ignored, not a traceback from stop_on_signals' handler and a second, other reason."""
    script = tmp_path / "rank.py"
    script.write_text(f"""import atexit, os, signal, sys
sys.path.insert(0, {ROOT!r})
import data
atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # torchrun's, in the teardown
data.stop_on_signals(lambda: "the last checkpoint is c", True)
with data.errors_of_rank_0_first():
    raise SystemExit("error: another process of this run ended (Connection reset by peer)")
""")
    r = subprocess.run([sys.executable, str(script)], env={**os.environ, "TORCHELASTIC_RUN_ID": "x", "RANK": "0"},
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (1, "error: another process of this run ended (Connection reset by peer)\n")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_collective_that_fails_because_another_process_ended_says_so_in_one_line(rank, monkeypatch):
    """gloo's error when a peer process ended becomes one line (with where to resume, where given), printed at once
    by any rank; any other RuntimeError, or one outside a process group, stays as it is, with its traceback."""
    import data
    waited = []
    monkeypatch.setattr(data.time, "sleep", waited.append)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    gloo = "[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:32902. This is " \
        "typically caused by a remote worker crashing."
    with pytest.raises(RuntimeError, match="Connection closed by peer"), data.errors_of_rank_0_first():
        raise RuntimeError(gloo)  # no process group: a network error of this process (a download), as it is
    monkeypatch.setattr(data.torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(SystemExit) as stopped, data.errors_of_rank_0_first():
        raise RuntimeError(gloo)
    assert stopped.value.code == "error: another process of this run ended (Connection closed by peer)"
    with pytest.raises(SystemExit) as stopped, data.errors_of_rank_0_first(), \
            data.stop_when_another_process_ends(lambda: "the last checkpoint is c"):
        raise RuntimeError("Connection reset by peer")
    assert stopped.value.code == "error: another process of this run ended (Connection reset by peer); the last " \
        "checkpoint is c"
    with pytest.raises(RuntimeError, match="^CUDA out of memory$"), data.errors_of_rank_0_first():
        raise RuntimeError("CUDA out of memory")
    assert waited == []  # at once, on any rank: the process that ended may be rank 0, killed before it said anything


def test_a_data_phase_after_max_steps_is_noted():
    loader = argparse.Namespace(phases=[(0, {"A": 1.0}, None), (100, {"B": 1.0}, None), (400, {"A": 1.0}, "short")])
    assert train.late_phases(argparse.Namespace(max_steps=100), loader) == (
        "note: --data's phase @100, @400 starts at or after --max-steps 100: it trains only if a resume raises "
        "--max-steps")
    assert train.late_phases(argparse.Namespace(max_steps=101), argparse.Namespace(phases=loader.phases[:2])) is None
    assert train.late_phases(argparse.Namespace(max_steps=1), argparse.Namespace()) is None  # the built-in loader


def test_cpu_track_values_apply_only_to_flags_not_given():
    args = train.get_args(["--track", "cpu", "--lr", "5e-4", "--model=small-pixel"])
    assert args.lr == 5e-4 and args.model == "small-pixel" and args.warmup == train.CPU_TRACK["warmup"]
    assert "lr" not in args.track_values and "model" not in args.track_values and "warmup" in args.track_values
    prepared = train.get_parser().parse_args([])  # the general defaults stay PRX's (REFERENCE.md)
    assert (prepared.lr, prepared.model, prepared.betas, prepared.grad_clip, prepared.warmup, prepared.weight_decay) \
        == (1e-4, "small", (0.9, 0.95), 0.2, 1000, 0.0)



def test_get_args_without_files_checks_the_flags_of_a_track_whose_data_is_not_prepared(tmp_path, monkeypatch, capsys):
    """speedrun.sh's check before a GPU track prepares its data (files=False): the flags are parsed, the track's values
    applied and their combinations checked; the data and references they name are not looked for."""
    monkeypatch.chdir(tmp_path)  # no data/mj here
    flags = ["--track", "8gpu", "--eval-ref", "data/mj/ref-2k.npz", "--eval-every", "2500", "--repa", "dinov3"]
    args = train.get_args(flags, files=False)
    assert args.data == train.SPEEDRUN_DATA and args.repa == "dinov3" and args.eval_ref == "data/mj/ref-2k.npz"
    for argv, files, message in ((flags, True, "--data data/mj: no prepared dataset there"),
                                 (flags + ["--sprint", "--tread"], False, "--tread and --sprint are exclusive")):
        with pytest.raises(SystemExit):
            train.get_args(argv, files=files)
        assert message in capsys.readouterr().err


def test_help_shows_each_default_a_flag_has():
    """What argparse's defaults formatter adds, but only where there is a value: not None, a switch off, an empty list;
    a help that states its default itself (the track's, PRX's) keeps its own words."""
    text = " ".join(train.get_parser().format_help().split())
    for shown in ("--lr LR peak learning rate (AdamW's) (default: 0.0001)", "--betas BETAS BETAS AdamW's (default: "
                  "(0.9, 0.95))", "(default: 0) --max-steps", "(0 = plain MSE) (default: 0.0)"):
        assert shown in text
    for bare in ("--compile torch.compile the model (warm-up is untimed) --activation-memory-budget", "(heads = hidden/64) --depth",
                 "e.g. 1,2,5,10,20,30 (the CPU record's curve) --target", "(default PRX's: 1e-15, 1e-8 with muon) --"):
        assert bare in text
    assert "(default: None)" not in text and "(default: False)" not in text
    own = train.Parser()  # data.py's
    own.add_argument("--blocks", type=int, default=0, help="blocks to step (default: all on GPU, 1 on CPU)")
    assert "(default: 0)" not in own.format_help()  # bench.py muon's: 0 stands for the default it names


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4; tests copy it."""
    out = tmp_path_factory.mktemp("runs") / "base"
    train.main(SMALL + ["--out", str(out), "--max-steps", "4", "--ckpt-every", "2", "--keep", "5"])  # in this process
    return out


def run_files(out):
    """A run folder's files and their bytes, but .lock (it names the last process that trained the run or tried to)."""
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_model_tiny_on_builtin_data_and_bad_resolution(tmp_path, capsys):
    # the built-in foreground weight suits any model on pixels
    train.main(SMALL + ["--model", "tiny", "--patch", "4", "--out", str(tmp_path / "a"), "--max-steps", "1"])
    err = refusal(SMALL + ["--resolution", "30", "--out", str(tmp_path / "b"), "--max-steps", "1"], capsys)
    assert "--resolution 30" in err and "patch size 4" in err, err[-1000:]
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_a_damaged_run_folder_is_named_before_any_work(finished_run, tmp_path):
    """Files of a run edited or cut short (its configs, a checkpoint's checksums) stop a resume with one line naming
    the file, before the run folder is touched; a metrics.jsonl line that is not a record stays where it was."""
    out = copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_4"
    resume = SMALL + ["--resume", "--out", str(out), "--max-steps", "6"]
    weights_only = json.dumps({"model.safetensors": json.loads((ckpt / CHECKSUMS).read_text())["model.safetensors"]})
    for path, text, message in ((out / "config.json", '{"args": {', "config.json is not valid JSON"),
                                (out / "config.json", "{}", "config.json is not a run's config"),
                                (out / "config.resume-2.json", "{", "config.resume-2.json is not valid JSON"),
                                (ckpt / CHECKSUMS, "[]", "sha256.json does not list the sha256 of each file"),
                                (ckpt / CHECKSUMS, "{}", "sha256.json does not list the sha256 of each file"),
                                (ckpt / CHECKSUMS, weights_only, "sha256.json does not list the sha256 of each file"),
                                (ckpt / CHECKSUMS, None, "sha256.json cannot be read")):  # (trainer.pt unchecked)
        before = path.read_text() if path.exists() else None
        path.write_text(text) if text is not None else path.unlink()
        with pytest.raises(SystemExit, match=f"error: --resume.*{re.escape(message)}"):
            train.run_folder(train.get_args(resume))
        path.write_text(before) if before is not None else path.unlink()
    (out / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]}\n{"step": 3, "loss": }\n{"step": 5}\n')
    kept, later = train.split_metrics(str(out / "metrics.jsonl"), 4)
    assert kept == ['{"step": 1}\n', '[1, 2]}\n', '{"step": 3, "loss": }\n'] and later == ['{"step": 5}\n']


def test_out_inside_a_file_and_a_checkpoint_path_with_a_dot(finished_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file"):
        train.run_folder(train.get_args(SMALL + ["--out", str(tmp_path / "afile" / "sub")]))
    ckpt = finished_run / "checkpoints" / "step_2"
    assert train.resolve_resume(f"{ckpt}/.", None) == str(ckpt)
    for argv, message in ((["--target", "object_accuracy=nan"], "expected METRIC=VALUE"),
                          (["--seed", str(2 ** 64)], "argument --seed: must be in [0, 4611686018427387904]"),
                          (["--text-context", "1000000000"], "argument --text-context: must be in [0, 64]"),
                          (["--resume", ""], "argument --resume: an empty value (an unset shell variable?)")):
        with pytest.raises(SystemExit):
            train.get_args(SMALL + argv)
        assert message in capsys.readouterr().err
    (tmp_path / "page.safetensors").write_text("<html>404</html>")
    with pytest.raises(SystemExit, match="error: --repa-weights .*page.safetensors: .*header"):
        train.main(SMALL + ["--repa", "builtin", "--repa-weights", str(tmp_path / "page.safetensors"), "--out",
                            str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_a_resume_of_a_run_folder_without_checkpoints_says_so(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")  # killed before its first checkpoint (no checkpoints/ yet)
    with pytest.raises(SystemExit, match=f"--resume: {tmp_path / 'r'} has no checkpoint yet"):
        train.resolve_resume(str(tmp_path / "r"), None)


def test_an_out_that_is_not_a_run_folder_is_refused(tmp_path):
    """--out names a folder of the run's own: a file, or a folder of other files (--out runs/ for runs/<name>), is
    refused before any work; an empty folder, or one holding only the lock a failed start left, is taken."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "mine").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "mine" / name).write_text("mine")
    for out, message in (("file", "is a file; name a folder for the run"),
                         ("mine", "holds other files (a.txt, b.txt), not a run: name a new folder, e.g. --out ")):
        with pytest.raises(SystemExit, match=re.escape(f"--out {tmp_path / out} {message}")):
            train.run_folder(train.get_args(SMALL + ["--out", str(tmp_path / out)]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lock").write_text("123\n")
    assert train.run_folder(train.get_args(SMALL + ["--out", str(tmp_path / "empty")]))[2] is False


def test_a_run_folder_is_trained_by_one_process_at_a_time(tmp_path):
    """Rank 0 holds <out>/.lock while it runs: a second train.py on the folder (a resume started while the run still
    trains, or beside its orphaned workers) is refused before any work, naming the first's host and pid. With the
    lock, the checkpoint folders a killed save left half-written go, a prune a kill cut short ends (its evaluations
    stay, in step_<N>.evals); whole checkpoints stay."""
    import socket
    out, holder = tmp_path / "r", f"host {socket.gethostname()} pid {os.getpid()}"
    (out / "checkpoints" / "step_4.tmp").mkdir(parents=True)
    (out / "checkpoints" / "step_1.pruned").mkdir()
    (out / "checkpoints" / "step_1.pruned" / "trainer.pt").write_text("left by a killed prune")
    (out / "checkpoints" / "step_3.pruned").mkdir()
    for name in ("model.safetensors", "eval.json"):
        (out / "checkpoints" / "step_3.pruned" / name).write_text(name)
    (out / "checkpoints" / "step_2").mkdir()
    first, _ = train.claim_run_folder(str(out), False)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2", "step_3.evals"]
    assert os.listdir(out / "checkpoints" / "step_3.evals") == ["eval.json"]
    assert (out / ".lock").read_text() == f"{holder}\n"
    (tmp_path / "new").mkdir()
    claimed, _ = train.claim_run_folder(str(tmp_path / "new"), False)
    with pytest.raises(SystemExit, match=re.escape(f"--out {tmp_path / 'new'}: another train.py ({holder}) is "
                                                   f"training this run; let it end or stop it, then --resume")):
        train.main(SMALL + ["--out", str(tmp_path / "new"), "--max-steps", "1"])
    assert os.listdir(tmp_path / "new") == [".lock"]  # nothing written
    with pytest.raises(SystemExit, match="another train.py"):
        train.claim_run_folder(str(out), False)
    first.close()  # the process ends: the OS releases its lock
    train.claim_run_folder(str(out), False)[0].close()
    claimed.close()


def test_a_new_run_folder_is_made_by_one_run(tmp_path, monkeypatch):
    """A new --out is made when the run starts writing: a run that finds it made meanwhile (two runs started on one
    --out) is refused; without --out, the second of two runs started in the same second takes runs/<time>-2."""
    out = str(tmp_path / "r")
    lock, made = train.claim_run_folder(out, True)
    assert made == out and os.listdir(out) == [".lock"]
    with pytest.raises(SystemExit, match=re.escape(f"--out {out}: another train.py has made this folder since this "
                                                   f"one started; choose another --out")):
        train.claim_run_folder(out, True)
    lock.close()
    monkeypatch.chdir(tmp_path)  # unnamed: runs/<time>, else the next free runs/<time>-K
    now = train.datetime.datetime(2026, 12, 6, 5, 59, 55)
    monkeypatch.setattr(train, "datetime", argparse.Namespace(datetime=argparse.Namespace(now=lambda: now)))
    assert train.run_folder(train.get_args(SMALL))[0] is None  # no --out: the name is claim_run_folder's
    locks = [train.claim_run_folder(None, True) for _ in range(3)]
    stamp = os.path.join("runs", "20261206-055955")
    assert [made for _, made in locks] == [stamp, f"{stamp}-2", f"{stamp}-3"]
    assert all(os.listdir(made) == [".lock"] for _, made in locks)
    for held, _ in locks:
        held.close()
    with pytest.raises(SystemExit, match=re.escape("--resume without a path continues the run in --out: pass --out")):
        train.run_folder(train.get_args(SMALL + ["--resume"]))  # no --out: no run to continue


@pytest.mark.parametrize("master", [True, False])
@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_says_where_to_resume(finished_run, master, sig, name):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert train.stop_on_signals(lambda: train.where_to_resume(str(finished_run)), master) == previous
        with pytest.raises(SystemExit) as stopped:
            signal.raise_signal(sig)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert stopped.value.code == (f"\nstopped ({name}); the last checkpoint is {finished_run}/checkpoints/step_4: "
                                  f"continue with the run's flags and --resume --out {finished_run}" if master
                                  else 128 + sig)


@pytest.mark.parametrize("where", ["build_model", "RunLog"])
def test_a_stop_while_the_run_starts_says_so_and_what_to_do(tmp_path, where, capsys):
    """A SIGTERM before the run folder's files are written (opening the data, building the model, reading a
    checkpoint) stops the run with one line, not silently (killed by the signal): nothing trained, and the same command
    starts it. Once they are being written (RunLog), the line is where to resume from, as in the loop."""
    script = tmp_path / "stopped_train.py"
    script.write_text(f"""import os, signal, sys
sys.path.insert(0, {ROOT!r})
import train
real = train.{where}
def stopped(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's, a kill
    return real(*args, **kwargs)
train.{where} = stopped
with train.errors_of_rank_0_first():
    train.main()
""")
    out = tmp_path / "r"
    flags = SMALL + ["--max-steps", "2", "--out", str(out)]
    stopped = run(flags, script=script)
    said = "nothing trained yet: run the same command again" if where == "build_model" else \
        f"no checkpoint was written: delete {out} (or choose another --out) and start again"
    assert (stopped.returncode, stopped.stderr.strip()) == (1, f"stopped (SIGTERM); {said}"), stopped.stderr[-2000:]
    if where == "RunLog":
        shutil.rmtree(out)
    capsys.readouterr()
    train.main(flags)  # the same command again (in this process: the stop above is what needed one of its own)
    assert "step 2/2" in capsys.readouterr().out


def test_a_full_disk_while_logging_stops_naming_the_last_checkpoint_and_log_txt_says_why(finished_run, tmp_path):
    """Not only the checkpoint's write: log.txt's and metrics.jsonl's too stop the run with one line (no traceback),
    naming the checkpoint to continue from; and a run that stops writes why into log.txt, not only on the console."""
    out = copy_run(finished_run, tmp_path)
    log = train.RunLog(str(out), True, {"args": {}, "device": "cpu"}, 4, resumed=True)

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    log.file, kept = FullDisk(), log.file
    with pytest.raises(SystemExit) as stopped:
        log("step 5/8 | loss 0.5")
    assert stopped.value.code == (f"error: writing in {out} failed (No space left on device); make room, or make it "
                                  f"writable, then: the last checkpoint is {out}/checkpoints/step_4: continue with "
                                  f"the run's flags and --resume --out {out}")
    log.file = kept
    with pytest.raises(SystemExit), log:
        raise SystemExit("\nstopped (SIGTERM); the last checkpoint is ...")
    with pytest.raises(KeyboardInterrupt), log:
        raise KeyboardInterrupt
    assert (out / "log.txt").read_text().endswith("\nstopped (SIGTERM); the last checkpoint is ...\nstopped (Ctrl-C)\n")


@pytest.mark.parametrize("fails", ["save_grid", "write_whole"])  # the evaluation's grid, its eval.json
def test_a_full_disk_while_writing_an_evaluation_stops_naming_the_last_checkpoint(fails, tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train, fails, full_disk)
    out = tmp_path / "r"
    with pytest.raises(SystemExit, match=f"^error: writing in {out} failed \\(No space left on device\\); make room, "
                                         f"or make it writable, then: the last checkpoint is {out}/checkpoints/step_2"):
        train.main(SMALL + ["--max-steps", "2", "--eval-samples", "4", "--out", str(out)])


def test_a_stop_during_the_final_evaluation_keeps_the_finished_training(tmp_path, monkeypatch):
    """The budget spent, the last checkpoint is written before the final evaluation (minutes of sampling, FID): a
    Ctrl-C there loses no training step."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "evaluate", interrupted)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train.main(SMALL + ["--max-steps", "3", "--ckpt-every", "100", "--eval-samples", "4", "--out", str(out)])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_3"]


@pytest.mark.parametrize("entry", ["config.json", "metrics.jsonl", "checkpoints"])
def test_an_out_with_any_part_of_a_run_is_refused(entry, tmp_path):
    """A folder whose config.json is gone still holds a run when its metrics or checkpoints are there; one killed
    before its first checkpoint has nothing to resume, and the error says to delete it."""
    out = tmp_path / "r"
    out.mkdir()
    (out / entry).mkdir() if entry == "checkpoints" else (out / entry).write_text("{}\n")
    with pytest.raises(SystemExit, match=f"--out {out} holds a run with no checkpoint yet .*: choose another --out, "
                                         f"or delete {out} once it has ended"):
        train.run_folder(train.get_args(SMALL + ["--out", str(out)]))


def test_the_global_batch_splits_over_the_processes():
    args = train.get_args(SMALL + ["--batch-size", "16", "--micro-batch", "16"])  # one process: 1 micro-batch
    with pytest.raises(SystemExit, match="--batch-size 16 must be a multiple of --micro-batch 16 x 2 processes: use "
                                         "--micro-batch 8$"):
        train.open_training_data(args, 0, 2, torch.device("cpu"), 0)
    args.batch_size = 15
    with pytest.raises(SystemExit, match="x 2 processes: use a --batch-size divisible by 2$"):
        train.open_training_data(args, 0, 2, torch.device("cpu"), 0)
    args.batch_size, args.micro_batch, args.resume = 32, 8, "latest"  # a resume keeps its micro-batch
    with pytest.raises(SystemExit, match="--micro-batch 8 x 3 processes: resume on 1 or 2 or 4 process\\(es\\)$"):
        train.open_training_data(args, 0, 3, torch.device("cpu"), 0)


def test_evaluations_come_once_each_across_a_resume(tmp_path):
    """--eval-every N evaluates every N-th step after the start, neither at a fresh run's step 0 nor again at a
    resume's first step (evaluated before the stop); an --eval-minutes point passed before the resume is not met
    again."""
    out = tmp_path / "r"
    flags = SMALL[:-4] + ["--eval-samples", "8", "--sample-steps", "2", "--eval-every", "2", "--eval-minutes", "1e-6",
                          "--ckpt-every", "2", "--out", str(out)]
    train.main(flags + ["--max-steps", "4"])
    train.main(flags + ["--max-steps", "6", "--resume"])
    with open(out / "metrics.jsonl") as f:
        evaluated = [r["step"] for r in map(json.loads, f) if "object_accuracy" in r]
    assert evaluated == [1, 2, 4, 6]  # step 1: the first past 1e-6 minutes of training


@pytest.mark.parametrize("cadence, evaluated", [(["--eval-every", "2", "--ckpt-every", "2"], [2, 4]),
                                                 (["--eval-minutes", "1e-6", "--ckpt-every", "1"], [1, 4]),
                                                 (["--ckpt-every", "8"], [4])])  # the final evaluation
def test_a_stop_during_an_evaluation_loses_no_step_and_the_resume_evaluates_first(tmp_path, monkeypatch, cadence,
                                                                                 evaluated):
    """A step's checkpoint comes before its evaluation (at scale, minutes of FID): a stop during the evaluation
    keeps the step, and the resume evaluates it first, as the run would have (a periodic, a timed and the final
    evaluation: a resume at the budget's end is not refused then)."""
    out, calls = tmp_path / "r", []

    def run_eval(model, grid):
        calls.append(grid)
        if len(calls) == 1:
            raise RuntimeError("stopped during the first evaluation")
        return {"object_accuracy": 0.0}
    monkeypatch.setattr(train, "setup_eval", lambda *a: run_eval)
    flags = SMALL + ["--eval-samples", "2", *cadence, "--max-steps", "4", "--out", str(out)]
    with pytest.raises(RuntimeError, match="stopped during"):
        train.main(flags)
    assert Path(list_checkpoints(out)[-1]).name == f"step_{evaluated[0]}"
    train.main(flags + ["--resume"])
    with open(out / "metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "object_accuracy" in r] == evaluated


def test_the_eta_counts_the_time_budget(tmp_path, capsys, monkeypatch):
    handler, term, installed, install = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), [], \
        train.stop_on_signals
    monkeypatch.setattr(train, "stop_on_signals", lambda *a: installed.append(a) or install(*a))
    train.main(SMALL + ["--max-time", "0.02", "--out", str(tmp_path / "r")])  # 1.2 s; --max-steps 100,000
    assert [(message(), *rest) for message, *rest in installed] == [
        ("nothing trained yet: run the same command again", True),  # until the run folder is written
        (f"the last checkpoint is {list_checkpoints(tmp_path / 'r')[-1]}: continue with the run's flags and "
         f"--resume --out {tmp_path / 'r'}", True, (socket.gethostname(), os.getpid()))]  # rank 0: this process
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    assert signal.getsignal(signal.SIGTERM) is term
    assert (tmp_path / "r" / ".lock").read_text().endswith(f" pid {os.getpid()}\n")  # the new folder's lock
    console = capsys.readouterr().out
    etas = re.findall(r"eta (\d+):(\d\d):(\d\d)", console)
    assert etas and all(h == "0" and m == "00" and int(s) <= 1 for h, m, s in etas)
    last = re.findall(r"step (\d+)/100000 \|", console)[-1]  # the run says where and why it ended
    assert f"--max-time 0.02: the training time is spent at step {last}: stopping" in console


def test_an_out_that_holds_a_run_is_never_reused(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = run_files(out)
    err = refusal(SMALL + ["--out", str(out), "--max-steps", "2"], capsys)
    assert "holds a run already" in err and "--resume" in err, err[-1000:]
    assert run_files(out) == before


def test_resume_from_an_older_checkpoint_sets_the_newer_aside(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    old_step4 = (out / "checkpoints" / "step_4" / "model.safetensors").read_bytes()
    capsys.readouterr()
    train.main(SMALL + ["--out", str(out), "--max-steps", "6", "--ckpt-every", "2", "--keep", "5", "--resume",
                        str(out / "checkpoints" / "step_2"), "--lr", "1e-3"])
    assert "moved step_4, metrics.jsonl's 2 later lines (a history after step 2)" in capsys.readouterr().out
    aside = list((out / "checkpoints").glob("abandoned-*/step_4"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == old_step4
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["step_2", "step_4", "step_6"]
    assert load_run(str(out))[2].endswith("step_6")  # eval.py's "latest" follows this history
    assert (out / "config.resume-2.json").exists()  # each resume's flags are kept; config.json is the first run's
    assert json.load(open(out / "config.json"))["args"]["lr"] == 2e-3
    assert json.load(open(out / "config.resume-2.json"))["args"]["lr"] == 1e-3
    assert sorted(losses(out)) == list(range(1, 7))


def test_a_resume_that_does_not_fit_leaves_the_run_as_it_was(finished_run, tmp_path, capsys):
    """A checkpoint whose optimizer state does not fit (here: none, its checksums made anew) stops the resume before
    the newer checkpoint is set aside, a config written or metrics.jsonl cut."""
    from model import file_sha256
    out = copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_2"
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, ckpt / "trainer.pt")
    (ckpt / CHECKSUMS).write_text(json.dumps({p.name: file_sha256(p) for p in ckpt.iterdir() if p.name != CHECKSUMS}))
    before = run_files(out)
    err = refusal(SMALL + ["--out", str(out), "--max-steps", "6", "--resume", str(ckpt)], capsys)
    assert "step_2 does not fit this model, optimizer or loader (KeyError" in err, err[-1000:]
    assert run_files(out) == before


def test_a_resume_with_nothing_left_to_train_is_refused(finished_run, tmp_path, capsys):
    """A checkpoint at --max-steps or past --max-time would only be evaluated again: refused, the run untouched."""
    out = copy_run(finished_run, tmp_path)
    before = run_files(out)
    for budget, message in [(["--max-steps", "4"], "under --max-steps 4 (it is at step 4): raise it to go on"),
                            (["--max-steps", "8", "--max-time", "1e-6"], "under --max-time 1e-06 (it is at 0.")]:
        err = refusal(SMALL + ["--out", str(out), "--resume", *budget], capsys)
        assert f"{out / 'checkpoints' / 'step_4'} has nothing left to train {message}" in err, err[-1000:]
    assert run_files(out) == before


def test_the_time_budget_of_a_resume_is_in_minutes_and_the_checkpoints_time_in_seconds():
    """A checkpoint trained 90 s has time left under --max-time 2 (120 s), none under --max-time 1.5 (90 s)."""
    budget = lambda max_time: argparse.Namespace(max_steps=8, max_time=max_time, track="cpu", track_values=[],
                                                 eval_samples=8)
    train.check_budget(budget(2), "ckpt", 4, 90.0, 4)
    with pytest.raises(SystemExit, match=re.escape("ckpt has nothing left to train under --max-time 1.5 (it is at "
                                                   "1.50 minutes)")):
        train.check_budget(budget(1.5), "ckpt", 4, 90.0, 4)
    train.check_budget(budget(1.5), "ckpt", 4, 90.0, 2)  # its final evaluation cut short: the resume makes it
    tracks = argparse.Namespace(max_steps=8, max_time=1.5, track="cpu", track_values=["max_time"], eval_samples=0)
    with pytest.raises(SystemExit, match=re.escape("--max-time 1.5 (the cpu track's; it is at 1.50 minutes)")):
        train.check_budget(tracks, "ckpt", 4, 90.0, 2)  # a value the user did not type: where it comes from


def test_a_resume_sets_the_abandoned_configs_aside_and_each_checkpoint_finds_its_own(tmp_path):
    """Resumed from 1000 (trained to 1500), then from 500: the resume-1000 config goes aside with step_1000 and
    step_1500; the new step_1500's config is resume-500's, whatever the files' times (a copy resets them)."""
    run = tmp_path / "run"
    for step in (500, 1000, 1500):
        os.makedirs(run / "checkpoints" / f"step_{step}")
    for name in ("config.json", "config.resume-1000.json"):
        (run / name).write_text(name)
    for step in (500, 1000):
        (run / f"samples_{step}.png").write_text("grid")
    lines = [json.dumps({"step": step}) + "\n" for step in (500, 1000, 1500)]
    (run / "metrics.jsonl").write_text("".join(lines))
    (run / "eval.json").write_text(json.dumps({"step": 1500}))
    moved = train.set_aside_newer(str(run / "checkpoints" / "step_500"), argparse.Namespace(), None)
    aside = next((run / "checkpoints").glob("abandoned-*"))
    assert moved == f"moved step_1000, step_1500, config.resume-1000.json, samples_1000.png, eval.json, " \
                    f"metrics.jsonl's 2 later lines (a history after step 500) to {aside}"
    assert sorted(p.name for p in aside.iterdir()) == ["config.resume-1000.json", "eval.json", "metrics.jsonl",
                                                       "samples_1000.png", "step_1000", "step_1500"]
    assert (aside / "metrics.jsonl").read_text() == "".join(lines[1:]) and (run / "samples_500.png").exists()
    other = tmp_path / "other"  # the evaluation of the step resumed from is of the history kept
    for step in (500, 1000):
        os.makedirs(other / "checkpoints" / f"step_{step}")
    (other / "eval.json").write_text(json.dumps({"step": 500}))
    assert train.set_aside_newer(str(other / "checkpoints" / "step_500"), argparse.Namespace(), None).startswith(
        "moved step_1000 (a history")
    assert (other / "eval.json").exists()
    (run / "config.resume-500.json").write_text("resume-500")
    os.makedirs(run / "checkpoints" / "step_1500")
    os.utime(run / "config.json", (2e9, 2e9))  # the first run's config now looks the most recent
    assert stage_config(run, run / "checkpoints" / "step_1500") == str(run / "config.resume-500.json")
    assert stage_config(run, run / "checkpoints" / "step_500") == str(run / "config.json")
    assert train.set_aside_newer(str(run / "checkpoints" / "step_1500"), argparse.Namespace(), None) is None
    # from step 500 once more: the resume made there is history too (the new one writes its own resume-500)
    moved = train.set_aside_newer(str(run / "checkpoints" / "step_500"), argparse.Namespace(), None)
    assert moved.startswith("moved step_1500, config.resume-500.json, metrics.jsonl's 2 later lines (a history after "
                            "step 500)")  # the lines: RunLog cuts them from the run's file


def test_a_resume_killed_and_made_again_alike_from_the_latest_checkpoint_sets_nothing_aside(tmp_path):
    """Preempted again and again at the same latest checkpoint: the same flags' resume config (and the lines after
    it) are rewritten alike, no abandoned-* folder each time; with other flags, the earlier resume is history."""
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints" / "step_10")
    flags = argparse.Namespace(lr=1e-3, data="builtin")
    (run / "config.resume-10.json").write_text(json.dumps({"args": vars(flags), "model": {}, "sampling": {}}))
    assert train.set_aside_newer(str(run / "checkpoints" / "step_10"), flags, None) is None
    assert not list((run / "checkpoints").glob("abandoned-*"))
    moved = train.set_aside_newer(str(run / "checkpoints" / "step_10"), argparse.Namespace(lr=2e-3, data="builtin"),
                                  None)
    assert moved.startswith("moved config.resume-10.json (a history after step 10)")


def test_a_resume_from_the_latest_checkpoint_with_other_flags_sets_the_lines_after_it_aside(finished_run, tmp_path):
    """A run killed after its latest checkpoint logged steps past it: resumed with its flags, the same lines come
    again; with another --lr, the new lines differ, and the killed run's go aside, not lost."""
    out = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_4")  # killed after step 4's line, before its checkpoint
    train.main(SMALL + ["--max-steps", "4", "--resume", "--out", str(out), "--lr", "1e-3"])
    aside = next((out / "checkpoints").glob("abandoned-*"))
    assert [json.loads(line)["step"] for line in open(aside / "metrics.jsonl")] == [3, 4]
    assert "moved metrics.jsonl's 2 later lines (a history after step 2)" in (out / "log.txt").read_text()


def test_a_checkpoint_pruned_while_a_branch_starts_is_said(finished_run, tmp_path, monkeypatch, capsys):
    """--resume CKPT --out NEW off a run that trains on: its --keep may prune CKPT after the start's checks, while
    the data and the model are set up; the error says so, not that the checkpoint does not fit the flags."""
    out = copy_run(finished_run, tmp_path)
    ckpt, built = out / "checkpoints" / "step_2", train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a: shutil.rmtree(ckpt) or built(*a))
    with pytest.raises(SystemExit, match=re.escape(f"error: --resume {ckpt}: {ckpt / 'trainer.pt'} is gone since the "
                                                   f"resume started (the running train.py's --keep pruned it?)")):
        train.main(SMALL + ["--max-steps", "4", "--resume", str(ckpt), "--out", str(tmp_path / "branch")])
    assert not (tmp_path / "branch").exists()


def test_a_resume_continues_its_own_run_whatever_the_spelling_of_out(finished_run, tmp_path):
    """--resume <run>/checkpoints/step_4 --out <run>/ (a trailing slash) is the run's own folder, not another run's:
    the run goes on in it."""
    out = copy_run(finished_run, tmp_path)
    train.main(SMALL + ["--max-steps", "6", "--resume", str(out / "checkpoints" / "step_4"), "--out", f"{out}/"])
    assert sorted(losses(out)) == list(range(1, 7)) and (out / "checkpoints" / "step_6").is_dir()


def test_resume_into_another_out_branches_and_never_takes_over_a_run(finished_run, tmp_path, capsys):
    """--resume CKPT --out NEW: NEW is a run folder of its own (config.json, the sources) that resumes again; the
    source run is left as it was. An --out holding another run is refused before any work."""
    src = copy_run(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    other_before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    err = refusal(SMALL + ["--max-steps", "3", "--resume", str(src / "checkpoints" / "step_2"), "--out", str(other)],
                  capsys)
    assert f"--out {other} holds a run already" in err and "to branch from" in err, err[-1000:]
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == other_before
    branch = tmp_path / "branch"
    train.main(SMALL + ["--max-steps", "3", "--resume", str(src / "checkpoints" / "step_2"), "--out", str(branch)])
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # nothing moved or cut
    assert (branch / "config.json").exists() and "=== train.py" in (branch / "log.txt").read_text()
    train.main(SMALL + ["--max-steps", "4", "--out", str(branch), "--resume"])
    assert sorted(losses(branch)) == [3, 4] and losses(branch)[4] == losses(src)[4]  # the same run, continued


def test_an_evaluation_that_cannot_start_leaves_no_run_folder(prepared, tmp_path, capsys):
    from data import PreparedDataset
    out = prepared[0] / "out"
    with pytest.raises(SystemExit):  # the built-in data's model cannot read T5Gemma's text nor decode latents
        train.get_args(["--track", "cpu", "--eval-data", str(out)])
    assert f"--eval-data {out}: a prepared dataset, whose text and images a model of the built-in shapes (--data " \
           f"builtin) cannot read" in capsys.readouterr().err
    held = len(PreparedDataset(out, "eval"))
    err = refusal(["--data", str(out), "--model", "tiny", "--resolution", "32", "--hidden", "64", "--depth", "2",
                   "--batch-size", "8", "--micro-batch", "8", "--eval-samples", str(held + 1), "--eval-data", str(out),
                   "--out", str(tmp_path / "run"), "--max-steps", "1"], capsys)
    assert f"fewer than the {held + 1} asked for" in err, err[-1000:]
    assert not (tmp_path / "run").exists()  # so the same command, mended, runs without --resume


def test_corrupt_checkpoint_is_named_with_the_previous_one(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    weights = out / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(10)  # tensor bytes, same size
    weights.write_bytes(bytes(data))
    err = refusal(SMALL + ["--out", str(out), "--max-steps", "6", "--resume"], capsys)
    assert "step_4/model.safetensors is corrupt" in err and "step_2" in err, err[-1000:]
    with pytest.raises(ValueError, match="corrupt"):
        load_run(str(out))


def test_every_file_of_a_checkpoint_is_checked(finished_run, tmp_path):
    ckpt = copy_run(finished_run, tmp_path) / "checkpoints" / "step_4"
    names = sorted(p.name for p in ckpt.iterdir() if p.name != CHECKSUMS)
    assert names == ["model.safetensors", "trainer.pt"]
    for name in names:  # one changed bit, then the file gone
        path, good = ckpt / name, (ckpt / name).read_bytes()
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(ValueError, match=f"step_4/{name} is corrupt.*step_2"):
            verify_checkpoint(str(ckpt))
        path.unlink()
        with pytest.raises(ValueError, match=f"step_4/{name} is missing"):
            verify_checkpoint(str(ckpt))
        path.write_bytes(good)
    verify_checkpoint(str(ckpt))


def test_resume_checks_the_patch_and_takes_a_newer_flags_default(finished_run, tmp_path):
    """A flag the run's config.json lacks (newer than the run) compares as its default; a resolution stage whose
    preset takes another patch size than the run's model is refused, naming both."""
    out = copy_run(finished_run, tmp_path)
    ckpt, config = str(out / "checkpoints" / "step_4"), json.loads((out / "config.json").read_text())
    args = train.get_args(SMALL + ["--out", str(out), "--resume"])
    del config["args"]["muon_ns_steps"]  # at its default, 5
    (out / "config.json").write_text(json.dumps(config))
    train.check_resume_flags(args, ckpt)
    parser = train.get_parser()  # a tuple default compares as stored (a list), not as a change
    assert train.flag_changes({}, args, {"betas", "muon_ns_steps"}, parser) == []
    with pytest.raises(SystemExit, match="--muon-ns-steps 5 -> 3"):  # from that default, a change like any other
        train.check_resume_flags(train.get_args(SMALL + ["--out", str(out), "--resume", "--optimizer", "muon",
                                                         "--muon-ns-steps", "3"]), ckpt)
    config["model"]["patch_size"] = 8
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"takes patch 4 at 32 px \(.*\), the run's model has 8: pass --patch 8"):
        train.check_resume_flags(args, ckpt)


def test_torn_metrics_line_and_changed_flags_on_resume(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a crash in the middle of a write
    err = refusal(SMALL + ["--out", str(out), "--max-steps", "6", "--resume", "--hidden", "128", "--optimizer",
                           "muon"], capsys)
    assert "cannot change on resume" in err and "--hidden 64 -> 128" in err and "--optimizer adamw -> muon" in err, \
        err[-1000:]
    train.main(SMALL + ["--out", str(out), "--max-steps", "6", "--resume"])
    assert sorted(losses(out)) == list(range(1, 7))
    log = (out / "log.txt").read_text()  # the sources once, at the start; each resume its flags
    assert log.count("=== train.py\n") == 1 and "\n=== config.resume-4.json\n" in log


def test_a_gpu_run_logs_nvidia_smi_at_each_start_before_its_config(tmp_path, monkeypatch):
    """log.txt holds nvidia-smi's table on CUDA (modded-nanogpt's logs), at the start and at each resume, before the
    config section whose console records/verify.py reads; a CPU run's log has none."""
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: 13.0 |'\n"
                   "echo '|=========================================|'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for device, out in (("NVIDIA H100 80GB HBM3", tmp_path / "gpu"), ("cpu", tmp_path / "cpu")):
        out.mkdir()
        for step, resumed in ((0, False), (4, True)):
            train.RunLog(str(out), True, {"args": {}, "device": device}, step, resumed)("step 5/8 | loss 0.5")
    gpu, cpu = (tmp_path / "gpu" / "log.txt").read_text(), (tmp_path / "cpu" / "log.txt").read_text()
    table = "=== nvidia-smi\n| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: 13.0 |\n|====="
    assert gpu.count(table) == 2 and gpu.index(table) < gpu.index("=== config.json") < gpu.rindex(table) < \
        gpu.index("=== config.resume-4.json")
    assert "\n=== nvidia-smi\n" not in cpu and cpu.count("step 5/8") == 2


def test_split_metrics_keeps_a_line_not_of_train_py_with_the_first_part_and_drops_a_torn_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json}\n{"step": 9}\n{"st')
    assert train.split_metrics(path, 5) == (['{"step": 1}\n', 'not json}\n'], ['{"step": 9}\n'])


def test_a_failed_checkpoint_write_keeps_the_earlier_ones(finished_run, tmp_path, monkeypatch):
    out = copy_run(finished_run, tmp_path)
    model = torch.nn.Linear(2, 2)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train.torch, "save", disk_full)
    with pytest.raises(SystemExit, match="no space left on the device.*intact.*step_4"):
        train.save_checkpoint(str(out), 6, model, None, [], {}, keep=1)
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["step_2", "step_4"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    load_run(str(out))  # still verified

    def weights_disk_full(*args, **kwargs):  # how safetensors says it: not an OSError
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(train, "save_file", weights_disk_full)
    with pytest.raises(SystemExit, match="failed: .*No space left on device.*intact.*step_4"):
        train.save_checkpoint(str(out), 6, model, None, [], {}, keep=1)
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_keep_leaves_the_most_recent_checkpoints(finished_run, tmp_path, monkeypatch):
    """--keep prunes the oldest checkpoints' files; what eval.py wrote into one (eval.json, grids) stays, in
    step_<N>.evals, and moves aside with the history a resume abandons. An eval.py writing into a checkpoint while it
    is pruned finds no folder (renamed first) and does not stop the run."""
    out = copy_run(finished_run, tmp_path)
    model, ckpts = torch.nn.Linear(2, 2), out / "checkpoints"
    (ckpts / "step_2" / "eval.json").write_text('{"step": 2}')
    (ckpts / "step_2" / "prompts.png").write_bytes(b"png")
    remove, written = os.remove, []

    def remove_while_evaluated(path, *args, **kwargs):  # eval.py of the checkpoint writes eval_1.json into it
        if "step_4" in str(path) and not written:
            try:
                (ckpts / "step_4" / "eval_1.json").write_text("{}")
                written.append(True)
            except FileNotFoundError:
                written.append(False)
        return remove(path, *args, **kwargs)
    train.save_checkpoint(str(out), 6, model, None, [], {}, keep=2)
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["step_4", "step_6"]
    assert sorted(os.listdir(ckpts)) == ["step_2.evals", "step_4", "step_6"]
    assert sorted(os.listdir(ckpts / "step_2.evals")) == ["eval.json", "prompts.png"]
    monkeypatch.setattr(train.os, "remove", remove_while_evaluated)
    train.save_checkpoint(str(out), 8, model, None, [], {}, keep=1)
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["step_8"] and written == [False]
    assert sorted(os.listdir(ckpts)) == ["step_2.evals", "step_8"]  # step_4 and step_6 held only their own files
    (ckpts / "step_9.evals").mkdir()  # a later step's, from a history that a resume from step 8 abandons
    (out / "config.resume-8.json").write_text("{}")
    train.set_aside_newer(str(ckpts / "step_8"), argparse.Namespace(), None)
    aside = next(ckpts.glob("abandoned-*"))
    assert sorted(os.listdir(aside)) == ["config.resume-8.json", "step_9.evals"]
    assert (ckpts / "step_2.evals" / "eval.json").read_text() == '{"step": 2}'


def test_checkpoints_are_found_in_step_order_past_leftovers(finished_run, tmp_path):
    """step_10 is after step_2 (numbers, not names); a step_N.tmp a killed save left is neither listed nor in the way
    of the next save of that step; a path typed with a trailing slash names the same checkpoint."""
    out = copy_run(finished_run, tmp_path)
    model = torch.nn.Linear(2, 2)
    (out / "checkpoints" / "step_6.tmp").mkdir()
    (out / "checkpoints" / "step_6.tmp" / "junk").write_text("a save killed midway")
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["step_2", "step_4"]
    assert train.resolve_resume("latest", str(out)) == str(out / "checkpoints" / "step_4")
    train.save_checkpoint(str(out), 6, model, None, [], {}, keep=5)
    assert sorted(os.listdir(out / "checkpoints" / "step_6")) == sorted(["model.safetensors", "trainer.pt", CHECKSUMS])
    umask = os.umask(0)
    os.umask(umask)  # every file as readable as the logs beside it (safetensors writes 0600)
    assert {os.stat(p).st_mode & 0o777 for p in (out / "checkpoints" / "step_6").iterdir()} == {0o666 & ~umask}
    train.save_checkpoint(str(out), 10, model, None, [], {}, keep=3)
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["step_4", "step_6", "step_10"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    ckpt = out / "checkpoints" / "step_4"
    assert train.resolve_resume(f"{ckpt}/", str(out)) == str(ckpt)
    assert load_run(f"{ckpt}/")[2] == str(ckpt)


def test_a_checkpoint_takes_the_config_of_the_latest_stage_before_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for step in (2, 4):
        (tmp_path / f"config.resume-{step}.json").write_text("{}")
    assert [os.path.basename(stage_config(str(tmp_path), f"{tmp_path}/checkpoints/step_{n}"))
            for n in (2, 3, 6)] == ["config.json", "config.resume-2.json", "config.resume-4.json"]


def test_an_evaluation_writes_eval_json_only_at_the_end_or_the_target(tmp_path):
    """Each evaluation is logged; eval.json holds the last one (the budget's end, or --target reached: the run stops
    there, the target met at or above it for accuracies)."""
    args = train.get_args(SMALL + ["--out", str(tmp_path), "--eval-samples", "4", "--eval-every", "2"])
    lines, model = [], torch.nn.Linear(2, 2)
    log = lambda line, record=None: lines.append(line)  # noqa: E731
    run_eval = lambda model, grid: {"object_accuracy": 0.5}  # noqa: E731
    assert not train.evaluate_and_log(args, run_eval, model, model, 2, 1.0, False, str(tmp_path), True, log)
    assert lines == ["eval step 2 | object_accuracy 0.5000 | train_time 1000ms"]
    assert not (tmp_path / "eval.json").exists()
    for target, reached in ((0.6, False), (0.5, True)):
        args.target = ("object_accuracy", target)
        assert train.evaluate_and_log(args, run_eval, model, model, 4, 2.0, False, str(tmp_path), True, log) == reached
        assert (tmp_path / "eval.json").exists() == reached
    assert lines[-1] == "target object_accuracy 0.5 reached at step 4: stopping"
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 4


def test_a_checkpoint_outside_its_run_is_refused_with_the_layout(finished_run, tmp_path):
    shutil.copytree(finished_run / "checkpoints" / "step_2", tmp_path / "elsewhere" / "step_2")
    with pytest.raises(SystemExit, match="resumes from <run>/checkpoints/step_N, beside its run's config.json"):
        train.resolve_resume(str(tmp_path / "elsewhere" / "step_2"), str(tmp_path / "new"))


def test_a_compiled_resume_warms_up_off_the_clock_and_continues_exactly(finished_run, tmp_path, monkeypatch, capsys):
    """--compile on resume runs the untimed warm-up too, and its restore leaves the run where the checkpoint was:
    steps 3 and 4 after a resume from step 2 equal the uninterrupted run's, and the training clock continues from the
    checkpoint's. torch.compile is the identity here: the state handling is what is tested, without minutes of
    compiling."""
    out = copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_2"  # its training time set to 100 s: the resumed clock continues from there
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    torch.save({**state, "train_time": 100.0}, ckpt / "trainer.pt")
    (ckpt / CHECKSUMS).write_text(json.dumps({n: train.file_sha256(str(ckpt / n)) for n in ("model.safetensors",
                                                                                              "trainer.pt")}))
    monkeypatch.setattr(train.torch, "compile", lambda model: model)
    torch.set_num_threads(1)  # as the subprocess that made finished_run
    train.main(SMALL + ["--out", str(out), "--max-steps", "4", "--ckpt-every", "2", "--keep", "5", "--resume",
                        str(out / "checkpoints" / "step_2"), "--compile"])
    console = capsys.readouterr().out
    assert "compile warm-up done (untimed steps, state restored)" in console
    assert "flags set otherwise than the checkpoint's stage (a flag left out takes its default): --compile " \
        "False -> True\n" in console  # only what differs from the run's flags
    resumed, uninterrupted = losses(out), losses(finished_run)
    assert sorted(resumed) == [1, 2, 3, 4] and resumed == pytest.approx(uninterrupted, rel=1e-6)
    with open(out / "metrics.jsonl") as f:
        clock = [r["train_time_s"] for r in map(json.loads, f) if r.get("step", 0) > 2 and "loss" in r]
    assert len(clock) == 2 and all(100 < t < 200 for t in clock)  # within the CPU track's 258 s budget


@pytest.fixture
def eager_dynamo(monkeypatch):
    """train.py's torch.compile with dynamo's eager backend: its tracing and guards, without minutes of compiling."""
    torch._dynamo.reset()  # an earlier test's graphs of PRX would count against the recompile limit
    compile = torch.compile
    monkeypatch.setattr(train.torch, "compile", lambda model: compile(model, backend="eager"))


def test_a_graph_compiled_inside_the_timed_steps_is_logged(tmp_path, eager_dynamo, monkeypatch, capsys):
    """A micro-batch of a size the compile warm-up did not trace (a loader of another kind might give one) compiles
    on the clock, and the log says so for that step only."""
    next_batch = shapes.ShapesLoader.__next__

    def shorter_twelfth_batch(loader):  # the warm-up reads batches 0-9 and rewinds; step 6: 10, 11
        twelfth, batch = loader.batches == 11, next_batch(loader)
        return {k: v[:-1] for k, v in batch.items()} if twelfth else batch

    monkeypatch.setattr(shapes.ShapesLoader, "__next__", shorter_twelfth_batch)
    train.main(SMALL + ["--max-steps", "7", "--compile", "--out", str(tmp_path / "r")])
    assert re.findall(r"warning: step (\d+) compiled a new graph", capsys.readouterr().out) == ["6"]


def test_the_compile_warm_up_also_traces_the_model_without_repa_when_repa_stops_in_the_run(tmp_path, eager_dynamo,
                                                                                           monkeypatch, capsys):
    """From --repa-stop on the model runs without REPA's hook: other graphs, compiled in the warm-up (off the
    clock), not at the stop's step (tens of seconds on it), nor at a later step whose captions all fill the text (the
    unmasked graph, which real data meets at the token cap)."""
    next_batch = shapes.ShapesLoader.__next__

    def full_at_step_3(loader):  # the warm-up's batches are rewound: step 3 (the fourth) reads batches 6 and 7
        full, batch = loader.batches in (6, 7), next_batch(loader)
        return {**batch, "txt_mask": torch.ones_like(batch["txt_mask"])} if full else batch

    monkeypatch.setattr(shapes.ShapesLoader, "__next__", full_at_step_3)
    train.main(SMALL + ["--repa", "builtin", "--repa-stop", "2", "--max-steps", "4", "--compile", "--caption-dropout",
                        "0", "--out", str(tmp_path / "r")])
    console = capsys.readouterr().out
    assert "REPA stopped at step 2" in console and "compiled a new graph" not in console, console


@pytest.mark.parametrize("twelfth_batch", [
    lambda b: {**b, "txt_mask": torch.ones_like(b["txt_mask"])},                # every caption full: no mask
    lambda b: {**b, "txt": b["txt"][:, :-3], "txt_mask": b["txt_mask"][:, :-3]}])  # a text length not seen before
def test_the_compile_warm_up_traces_what_a_timed_step_meets_later(twelfth_batch, tmp_path, eager_dynamo, monkeypatch,
                                                                  capsys):
    """A micro-batch whose captions all fill the text length, none dropped, reaches the model without a mask
    (trim_text), and real captions come in any length: the warm-up compiles the unmasked graph and one for every
    length, so the timed step that first meets either compiles nothing."""
    next_batch = shapes.ShapesLoader.__next__

    def change_twelfth_batch(loader):  # the warm-up reads batches 0-9 (5 steps of 2) and rewinds; step 6: 10, 11
        twelfth, batch = loader.batches == 11, next_batch(loader)
        return twelfth_batch(batch) if twelfth else batch

    monkeypatch.setattr(shapes.ShapesLoader, "__next__", change_twelfth_batch)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train.main(SMALL + ["--caption-dropout", "0", "--max-steps", "6", "--compile", "--out", str(tmp_path / "r")])
    assert "compiled a new graph" not in capsys.readouterr().out
    # two graphs, with and without the mask: each dynamic in the text length from its first compile (train_step)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


def test_the_compile_warm_up_meets_a_new_text_length_with_and_without_the_mask(tmp_path, eager_dynamo, monkeypatch):
    """Whatever --caption-dropout: the warm-up's fourth step reaches the model with a text longer than the steps
    before, masked; its fifth with every caption full (no mask). (And the run compiles with its
    --activation-memory-budget.)"""
    seen, trim = [], train.trim_text
    monkeypatch.setattr(train, "trim_text", lambda *a: seen.append(trim(*a)) or seen[-1])
    with torch._functorch.config.patch(activation_memory_budget=1.0):  # restored after the test
        train.main(SMALL + ["--caption-dropout", "0.5", "--max-steps", "1", "--compile", "--activation-memory-budget",
                            "0.5", "--out", str(tmp_path / "r")])
        assert torch._functorch.config.activation_memory_budget == 0.5
    lengths = [txt.shape[1] for txt, _ in seen[:10]]  # the warm-up: 5 steps of 2 micro-batches
    assert min(lengths[6:8]) > max(lengths[:6]) and all(m is not None for _, m in seen[6:8])
    assert [m for _, m in seen[8:10]] == [None, None]


def test_a_lower_activation_memory_budget_keeps_fewer_activations_and_trains_the_same(monkeypatch):
    """--activation-memory-budget: the compiled step's forward keeps a smaller share of the activations the backward
    reads (AOTAutograd's min-cut partitioner recomputes the rest; its backend without Inductor's code generation), and
    the step's loss and updated weights are those of the budget 1 (the same arithmetic, recomputed)."""
    compile = torch.compile
    monkeypatch.setattr(train.torch, "compile", lambda model: compile(model, backend="aot_eager_decomp_partition"))
    kept, results = {}, {}
    for budget in ("1", "0.3"):
        args = train.get_args(SMALL + ["--depth", "1", "--micro-batch", "16", "--compile", "--activation-memory-budget",
                                       budget])  # one block, one micro-batch: one short compile
        loader, _ = train.open_training_data(args, 0, 1, torch.device("cpu"), 0)
        _, raw, _, trainee, _ = train.build_model(args, loader, torch.device("cpu"), 0)
        opt = train.build_optimizers(args, trainee)[0]
        torch._dynamo.reset()
        saved = []
        with torch._functorch.config.patch(activation_memory_budget=1.0), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            train.compile_trainee(args, trainee)  # within the patch: restored after it
            loss = train.train_step(args, 0, args.lr, trainee, opt, loader, None, 0, 1)[0]
        kept[budget], results[budget] = sum(saved), (loss, raw.state_dict())
    torch._dynamo.reset()
    assert kept["0.3"] < 0.8 * kept["1"], kept
    torch.testing.assert_close(results["0.3"], results["1"], rtol=1e-5, atol=1e-6)


def test_missing_repa_weights_name_the_flag(tmp_path, capsys):
    err = refusal(SMALL + ["--repa", "dinov2", "--repa-weights", "/nonexistent.safetensors", "--out",
                           str(tmp_path / "r"), "--max-steps", "1"], capsys)
    assert "--repa-weights /nonexistent.safetensors: no such file" in err, err[-1000:]
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    for weights, why in (("/nonexistent.safetensors", "no such file; a built-in teacher's weights: `python shapes.py "
                                                      "teacher --out /nonexistent.safetensors`"),
                         (str(tmp_path / "other.safetensors"), "not the built-in teacher's weights (ShapesTeacher's), "
                                                               "which `python shapes.py teacher --out ")):
        err = refusal(SMALL + ["--repa", "builtin", "--repa-weights", weights, "--out", str(tmp_path / "r")], capsys)
        assert f"error: --repa-weights {weights}: {weights}: {why}" in err, err[-1000:]  # not --repa builtin's file
        assert "\n" not in err.strip()  # one line, not torch's list of keys


def test_a_route_ratio_that_routes_no_token_is_refused(tmp_path, capsys):
    """model.PRX routes int(N r) of N tokens: a ratio below 1 / N would train (and sample) without routing."""
    for routing in ("--tread", "--sprint"):
        err = refusal(SMALL + [routing, "--route-ratio", "0.01", "--out", str(tmp_path / "r"), "--max-steps", "1"],
                      capsys)
        assert f"--route-ratio 0.01 of 64 image tokens routes none (int(N r) = 0), and the run would train without " \
               f"{routing}: use at least 0.0157" in err, err[-1000:]
    assert not (tmp_path / "r").exists()
    train.main(SMALL + ["--tread", "--route-ratio", "0.0157", "--out", str(tmp_path / "r"),  # the advice: it routes
                        "--max-steps", "1"])


def test_repa_builtin_teacher_trains(tmp_path):
    train.main(SMALL + ["--repa", "builtin", "--out", str(tmp_path / "r"), "--max-steps", "2"])
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_2" / "trainer.pt", weights_only=True)
    assert state["repa"]["projector"]["4.weight"].shape == (32, 32)  # the built-in teacher's 32-wide tokens
    from model import file_sha256
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["weights_sha256"] == {"--repa builtin": file_sha256(shapes.TEACHER_FILE)}  # the network it used
    other = tmp_path / "teacher.safetensors"  # --repa-weights: another file for the built-in teacher
    other.write_bytes(open(shapes.TEACHER_FILE, "rb").read() + b" ")
    args = train.get_args(["--track", "cpu", "--repa", "builtin", "--repa-weights", str(other), "--lpips", "0.1"])
    assert train.weight_files(args) == {"--repa builtin": file_sha256(other)} != config["weights_sha256"]  # --lpips:
    # lpips' own weights


# ----------------------------------------------------------------------------------------------------------
# The objective against closed forms: each test fails if its formula is changed (a sign, a swap, a constant)

class FakeLoader:
    """What micro_batch reads of a loader: batches of pixel images and text, and the encoded empty prompt."""

    def __init__(self, batch=4, res=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch, 3, res, res), generator=g, dtype=torch.uint8)
        self.txt, self.txt_mask = torch.ones(batch, 2, 4), torch.ones(batch, 2, dtype=torch.bool)
        # the empty prompt: one real token of 3, so its mask differs from a caption's padded to 3 ([T, T, F])
        self.null_txt, self.null_mask = torch.full((1, 3, 4), 2.0), torch.tensor([[True, False, False]])

    def __next__(self):
        return {"image": self.images, "txt": self.txt, "txt_mask": self.txt_mask}


def objective_args(**kw):
    return argparse.Namespace(**{"seed": 0, "caption_dropout": 0.1, "shift": 1.0, "uniform_t": 0.1, **kw})


def test_interpolation_and_flow_target():
    loader = FakeLoader()
    x0, eps, t, x_t, *_, images = train.micro_batch(objective_args(), loader, 0, 0, torch.device("cpu"))
    assert torch.equal(x0, loader.images.float() / 127.5 - 1) and torch.equal(images, x0)  # pixels in [-1, 1]
    tt = t[:, None, None, None]
    assert torch.equal(x_t, (1 - tt) * x0 + tt * eps)  # t = 0 data, t = 1 noise (REFERENCE 3)
    v = eps - x0
    assert train.flow_loss(v, x0, eps, x_t, t, "v").item() == 0
    assert torch.isclose(train.flow_loss(torch.zeros_like(v), x0, eps, x_t, t, "v"), v.square().mean())
    w = torch.rand(len(x0), 1, *x0.shape[2:])
    assert torch.isclose(train.flow_loss(2 * v, x0, eps, x_t, t, "v", w), (v.square() * w).mean())


def test_x_prediction_loss_is_the_velocity_error_with_t_clamped_at_0_05():
    g = torch.Generator().manual_seed(0)
    x0, eps, d = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.01, 0.04, 0.3, 0.9])
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x0 + tt * eps
    assert train.flow_loss(x0, x0, eps, x_t, t, "x").item() == 0
    # v_hat - v = (x_t - x0_hat) / max(t, 0.05) - (x_t - x0) / max(t, 0.05) = -d / max(t, 0.05)  (JiT)
    expected = (d.square() / tt.clamp(min=0.05).square()).mean()
    assert torch.isclose(train.flow_loss(x0 + d, x0, eps, x_t, t, "x"), expected, rtol=1e-5)


def test_each_micro_batch_of_each_step_draws_its_own_t_and_noise():
    """(seed, step, micro-batch index) seeds a micro-batch: the chunks of one step, and one chunk at two steps, draw
    different t, noise and TREAD routes from the same samples; the same triple draws the same."""
    def draw(step, chunk):
        return train.micro_batch(objective_args(), FakeLoader(), step, chunk, torch.device("cpu"))

    def route_draw(step, chunk):  # what TREAD's routing in the model's forward draws next
        draw(step, chunk)
        return torch.rand(8)

    _, eps, t, *_ = draw(0, 0)
    route = route_draw(0, 0)
    for step, chunk in ((0, 1), (1, 0)):
        _, other_eps, other_t, *_ = draw(step, chunk)
        assert not torch.equal(other_t, t) and not torch.equal(other_eps, eps)
        assert not torch.equal(route_draw(step, chunk), route)
    assert not torch.equal(draw(0, 1)[2], draw(1, 0)[2])  # (step, chunk), not a sum of them
    assert torch.equal(draw(0, 0)[2], t) and torch.equal(route_draw(0, 0), route)


def test_contrastive_flow_matching_pushes_from_another_samples_target():
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.rand(3, generator=g)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    v = eps - x0
    for n in (3, 2):  # the previous sample's target, the first taking the last's; a pair is a batch too
        expected = sum((pred[i] - v[i]).square().mean() - 0.1 * (pred[i] - v[:n][i - 1]).square().mean()
                       for i in range(n)) / n
        assert torch.isclose(train.flow_loss(pred[:n], x0[:n], eps[:n], x_t[:n], t[:n], "v", cfm=0.1), expected,
                             rtol=1e-5)
    # with x-prediction both errors are taken in velocity space: v_hat = (x_t - x0_hat) / t (t >= 0.05 here)
    x0_hat, tt = x0 + pred, t.clamp_min(0.05)[:, None, None, None]
    t = t.clamp_min(0.05)
    x_t = (1 - tt) * x0 + tt * eps
    v_hat = (x_t - x0_hat) / tt
    expected = sum((v_hat[i] - v[i]).square().mean() - 0.1 * (v_hat[i] - v[i - 1]).square().mean()
                   for i in range(3)) / 3
    assert torch.isclose(train.flow_loss(x0_hat, x0, eps, x_t, t, "x", cfm=0.1), expected, rtol=1e-4)
    one = slice(0, 1)  # a batch of one has no other sample: plain flow matching (PRX)
    assert train.flow_loss(pred[one], x0[one], eps[one], x_t[one], t[one], "v", cfm=0.1) == \
        train.flow_loss(pred[one], x0[one], eps[one], x_t[one], t[one], "v")


def test_caption_dropout_rate_and_the_empty_prompt_with_its_mask():
    loader, dropped, total = FakeLoader(batch=8), 0, 0
    for step in range(100):
        *_, txt, mask, _ = train.micro_batch(objective_args(caption_dropout=0.1), loader, step, 0, torch.device("cpu"))
        assert txt.shape == (8, 3, 4) and mask.shape == (8, 3)  # padded to the longer of caption and empty prompt
        empty = (txt == 2).all(dim=(1, 2))
        assert torch.equal(mask[empty], loader.null_mask.expand(int(empty.sum()), -1))
        assert (txt[~empty][:, :2] == 1).all() and not mask[~empty][:, 2].any()
        dropped, total = dropped + int(empty.sum()), total + 8
    assert abs(dropped / total - 0.1) < 0.04  # 800 draws: binomial sd 0.011


def test_longer_captions_are_one_token_longer_than_the_batch_and_the_empty_prompt():
    """FakeLoader: captions of 2 tokens, the empty prompt of 3. The warm-up's batches: the text padded to 4 (zeros),
    every caption's mask full, or (masked graph) the first caption's alone and the others' as before; the loader's
    empty prompt kept for caption dropout."""
    loader = FakeLoader(batch=3)
    for full in (False, True):
        longer = train.LongerCaptions(loader, full)
        batch = next(longer)
        assert longer.null_txt is loader.null_txt and longer.null_mask is loader.null_mask
        assert batch["txt"].shape == (3, 4, 4) and torch.equal(batch["txt"][:, :2], loader.txt)
        assert (batch["txt"][:, 2:] == 0).all() and torch.equal(batch["image"], loader.images)
        expected = torch.tensor([[True] * 4] + [[True, True, False, False]] * 2)
        assert torch.equal(batch["txt_mask"], torch.ones_like(expected) if full else expected)


def test_the_routing_draw_is_a_stream_apart_from_the_micro_batchs_own():
    """micro_batch leaves torch's generator seeded for TREAD's route draw, one seed past the chunk's own generator (t,
    noise, caption dropout): the route does not repeat the dropout's uniform draws."""
    seed = int(np.random.SeedSequence([0, 3, 1]).generate_state(1)[0])
    train.micro_batch(objective_args(), FakeLoader(), 3, 1, torch.device("cpu"))
    route = torch.rand(4)
    assert torch.equal(route, torch.rand(4, generator=torch.Generator().manual_seed(seed + 1)))
    assert not torch.equal(route, torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    dropped = []  # the caption dropout of a chunk is its own: whatever torch's generator held before
    for before in (1, 2):
        torch.manual_seed(before)
        dropped.append(train.micro_batch(objective_args(caption_dropout=0.5), FakeLoader(16), 3, 1, "cpu")[5])
    assert torch.equal(*dropped) and 0 < dropped[0][:, 1].sum() < 16


def test_ema_update_closed_form():
    model, ema = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    expected = [0.99 * e + 0.01 * w for e, w in zip(ema.parameters(), model.parameters())]
    train.ema_update(ema, model, 0.99)
    assert all(torch.allclose(e, x) for e, x in zip(ema.parameters(), expected))


def test_ema_every_k_steps_applies_the_decay_once_per_update(tmp_path, monkeypatch):
    """PRX's "0.999 every 10 steps" is 0.999 per update: after 2 steps with --ema-every 2 the EMA is
    0.9 init + 0.1 w_2, not 0.9^2 init + (1 - 0.9^2) w_2."""
    out, evaluated = tmp_path / "r", []
    monkeypatch.setattr(train, "setup_eval", lambda *a: lambda model, grid: evaluated.append(
        {k: v.clone() for k, v in model.state_dict().items()}) or {"object_accuracy": 0.0})
    train.main(SMALL + ["--ema", "0.9", "--ema-every", "2", "--max-steps", "2", "--out", str(out),
                        "--eval-samples", "2"])
    ckpt = out / "checkpoints" / "step_2"
    w2, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert len(evaluated) == 1 and all(torch.equal(evaluated[0][k], ema[k]) for k in ema)  # evaluations use the EMA
    assert all(torch.equal(v, ema[k]) for k, v in load_run(str(out))[0].state_dict().items())  # so does eval.py
    model, _, _ = load_run(str(out), weights="model")
    torch.manual_seed(0)
    init = type(model)(model.cfg).state_dict()
    assert any(not torch.equal(init[k], w2[k]) for k in w2)
    assert all(torch.allclose(ema[k], 0.9 * init[k] + 0.1 * w2[k], atol=1e-6) for k in w2)
    assert "\nnote: these EMA weights have had 1 update (--ema 0.9 every 2 steps): 90% of them are still the " \
        "initial weights; `python eval.py --ckpt CKPT --weights model`" in (out / "log.txt").read_text()



class FakeTeacher(torch.nn.Module):
    """timm's interface: one prefix token of 100s, then each patch's mean colour (per channel) as its token."""
    pretrained_cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5)}
    num_prefix_tokens, num_features = 1, 3

    def __init__(self, patch=4):
        super().__init__()
        self.patch_embed, self.scale = argparse.Namespace(patch_size=(patch, patch)), torch.nn.Parameter(torch.ones(()))

    def forward_features(self, x):
        tokens = torch.nn.functional.avg_pool2d(x, self.patch_embed.patch_size).flatten(2).transpose(1, 2)
        return torch.cat([torch.full_like(tokens[:, :1], 100.0), tokens * self.scale], dim=1)


def test_teacher_input_is_resized_to_the_token_grid_and_prefix_tokens_dropped():
    colour = torch.tensor([-1.0, 0.0, 0.5])
    images = colour[None, :, None, None].expand(2, 3, 32, 32)  # [-1, 1]
    tokens = train.teacher_tokens(FakeTeacher(), images, (3, 5))
    assert tokens.shape == (2, 15, 3)  # one teacher token per denoiser token: the image resized to 12 x 20 px
    expected = ((colour + 1) / 2 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5])
    assert torch.allclose(tokens, expected.expand(2, 15, 3), atol=1e-5)


def test_teacher_tokens_read_a_non_square_grid_row_major():
    """grid = (h, w): the image is resized to h x w patches and the tokens come row by row. An image 32 x 64 px, dark
    on its left half in channel 0 and on its top half in channel 1, on a (2, 4) grid: channel 0 goes dark, dark,
    light, light along each row, channel 1 is dark in the first row. The tokens away from the halves' border are the
    halves' colours exactly, (0 or 1 - mean) / std (FakeTeacher: each patch's mean)."""
    images = torch.ones(1, 3, 32, 64)
    images[:, 0, :, :32] = -1
    images[:, 1, :16] = -1
    tokens = train.teacher_tokens(FakeTeacher(), images, (2, 4)).view(2, 4, 3)
    dark, light = (0 - torch.tensor([0.5, 0.4])) / torch.tensor([0.2, 0.25]), \
        (1 - torch.tensor([0.5, 0.4])) / torch.tensor([0.2, 0.25])
    midpoint = (dark + light) / 2
    assert torch.equal(tokens[..., 0] < midpoint[0], torch.tensor([[True, True, False, False]] * 2))
    assert torch.equal(tokens[..., 1] < midpoint[1], torch.tensor([[True] * 4, [False] * 4]))
    torch.testing.assert_close(tokens[:, 0, 0], dark[0].expand(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, 3, 0], light[0].expand(2), rtol=0, atol=1e-5)


def test_the_mlp_projector_and_the_attention_projector_without_routing():
    """REPA's projector: h -> D -> D -> D, SiLU between. iREPA's attention projector without routing reads every token
    at its place on the grid: position n of a non-square grid w wide (a 4 x 8 token grid)."""
    from model import PRX, preset_config
    mlp = train.repa_projector("mlp", 64, 5)
    assert [type(m) for m in mlp] == [torch.nn.Linear, torch.nn.SiLU] * 2 + [torch.nn.Linear]
    assert [(m.in_features, m.out_features) for m in mlp[::2]] == [(64, 5), (5, 5), (5, 5)]
    torch.manual_seed(0)
    model = PRX(preset_config("tiny", 32, in_channels=3, context_dim=8, depth=2, hidden_size=64, num_heads=1,
                              axes_dim=(32, 32)))
    attention = train.Trainee(model, "attention", 5, 0)
    hidden = []
    model.blocks[0].register_forward_hook(lambda m, a, out: hidden.append(out))
    with torch.no_grad():
        _, proj, idx = attention(torch.randn(1, 3, 8, 16), torch.rand(1), torch.randn(1, 2, 8), None, 0.0)
        expected = attention.repa_proj(hidden[0], torch.arange(32)[None], 8)
    assert idx is None and proj.shape == (1, 32, 5)
    torch.testing.assert_close(proj, expected, rtol=0, atol=1e-6)


def test_teacher_input_is_shrunk_with_antialiasing():
    """A 1 px light line in a dark 16 px patch shrunk to the teacher's 4 px patch: the token is 1/16 of the way from
    dark to light (the patch's mean, antialiased), where plain bicubic sampling would catch the line or miss it."""
    images = -torch.ones(1, 3, 32, 32)
    images[..., 5] = 1  # column 5: inside the first column of 16 px patches
    tokens = train.teacher_tokens(FakeTeacher(), images, (2, 2))[0, :, 0] * 0.2 + 0.5  # channel 0, in [0, 1]
    torch.testing.assert_close(tokens, torch.tensor([1 / 16, 0, 1 / 16, 0]), rtol=0, atol=2e-3)


def test_irepa_spatial_normalisation_by_hand():
    f = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])  # (B=1, T=2, D=2)
    # channel means per token (2, 6) times token means per channel (3, 5): [[-5, -7], [-13, -23]]; std over tokens
    # (unbiased) 8 / sqrt 2 and 16 / sqrt 2
    expected = torch.tensor([[[-5 / 5.656854, -7 / 11.313708], [-13 / 5.656854, -23 / 11.313708]]])
    assert torch.allclose(train.spatial_normalize(f), expected, atol=1e-5)


def test_repa_hidden_tokens_at_the_routing_boundaries():
    from model import PRX, preset_config
    cfg = preset_config("tiny", 32, in_channels=4, context_dim=8, depth=4)
    model, x = PRX(cfg).eval(), torch.randn(2, 4, 8, 8)
    txt, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    n = (8 // cfg.patch_size) ** 2
    for layer, tokens, routed in ((cfg.route_start, n // 2, True), (cfg.route_end, n // 2, True),
                                  (cfg.route_end + 1, n, False)):  # route_end's visible tokens, as PRX's hook
        _, hidden, idx = model(x, torch.rand(2), txt, mask, route_ratio=0.5, repa_layer=layer)
        assert hidden.shape[1] == tokens and (idx is not None) == routed, layer


def test_irepa_projectors_keep_the_token_layout():
    """The conv projector reads the (B, N, h) tokens as their grid: a token's projection depends on its grid
    neighbours only; the attention projector (under routing) equals itself on a permutation of its tokens."""
    from model import PRX, preset_config
    model = PRX(preset_config("tiny", 32, in_channels=3, context_dim=8, depth=2, hidden_size=64, num_heads=1,
                              axes_dim=(32, 32)))
    conv = train.Trainee(model, "conv", 5, 0)
    hidden = torch.randn(1, 16, 64)
    grid = conv.repa_proj(hidden.transpose(1, 2).unflatten(2, (4, 4))).flatten(2).transpose(1, 2)
    bumped = hidden.clone()
    bumped[0, 0] += 1  # token (0, 0): its 3x3 neighbourhood is (0..1, 0..1) -> tokens 0, 1, 4, 5
    changed = (conv.repa_proj(bumped.transpose(1, 2).unflatten(2, (4, 4))).flatten(2).transpose(1, 2) - grid)
    assert sorted(changed.abs().sum(-1).nonzero()[:, 1].tolist()) == [0, 1, 4, 5]
    attention = train.AttentionProjector(64, 5)
    pos = torch.tensor([[0, 3, 5, 6, 9, 12]])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    x = torch.randn(1, 6, 64)
    out = attention(x, pos, 4)
    assert torch.allclose(attention(x[:, perm], pos[:, perm], 4), out[:, perm], atol=1e-5)
    assert not torch.allclose(attention(x, pos.flip(1), 4), out, atol=1e-3)  # positions matter (RoPE)
    # RoPE is relative: the same tokens a row lower or a column to the right (same rows) attend alike
    assert torch.allclose(attention(x, pos + 4, 4), out, atol=1e-5)
    assert torch.allclose(attention(x, pos + 1, 5), attention(x, pos + 6, 5), atol=1e-5)


def test_irepa_projectors_read_the_grid_row_major():
    """Token n sits at row n // w, column n % w of the (h, w) token grid, RoPE's axis 0 the row as in the model. The
    conv projector through Trainee, with one kernel tap to the right, gives each token its right neighbour (0 past
    the last column) on a non-square grid. The attention projector with q, k zero on the column half of each head
    sees rows only: moving tokens within their rows changes nothing, moving one to another row does."""
    from model import PRX, preset_config
    torch.manual_seed(0)
    model = PRX(preset_config("tiny", 32, in_channels=3, context_dim=8, depth=2, hidden_size=64, num_heads=1,
                              axes_dim=(32, 32)))
    conv = train.Trainee(model, "conv", 64, 0)
    with torch.no_grad():
        conv.repa_proj.weight.zero_()
        conv.repa_proj.bias.zero_()
        conv.repa_proj.weight[:, :, 1, 2] = torch.eye(64)  # output (r, c) = hidden (r, c + 1)
    hidden = []
    model.blocks[0].register_forward_hook(lambda m, a, out: hidden.append(out))
    x_t, txt = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8)  # patch 2: a 4 x 8 token grid
    with torch.no_grad():
        _, proj, _ = conv(x_t, torch.rand(1), txt, None, 0.0)
    grid, right = hidden[0].unflatten(1, (4, 8)), proj.unflatten(1, (4, 8))
    assert grid.abs().amax() > 0.1
    torch.testing.assert_close(right, torch.cat([grid[:, :, 1:], torch.zeros_like(grid[:, :, :1])], 2), rtol=0,
                               atol=1e-6)
    attention = train.AttentionProjector(64, 5)
    with torch.no_grad():  # qkv's rows: q heads then k heads, 16 channels each; the last 8 of a head are its columns
        attention.qkv.weight.view(3, 4, 2, 8, 64)[:2, :, 1] = 0
        attention.qkv.bias.view(3, 4, 2, 8)[:2, :, 1] = 0
    x = torch.randn(1, 6, 64)
    out = attention(x, torch.tensor([[0, 3, 5, 10, 12, 17]]), 8)  # rows 0, 0, 0, 1, 1, 2 of a grid 8 wide
    assert torch.allclose(attention(x, torch.tensor([[1, 3, 7, 8, 14, 16]]), 8), out, atol=1e-5)  # other columns
    assert not torch.allclose(attention(x, torch.tensor([[0, 3, 5, 10, 12, 25]]), 8), out, atol=1e-3)  # row 3


def one_batch_run(flags=()):
    """The CPU track's flags (and `flags`) for a global batch of one micro-batch of 8 pixel images from FakeLoader,
    and a 2-block model of width 64 -> (args, loader, model)."""
    args = train.get_args(SMALL + list(flags) + ["--out", "unused"])
    args.micro_batch = args.batch_size = 8
    loader = FakeLoader(batch=8, res=32)
    loader.txt, loader.null_txt = torch.randn(8, 2, 32), torch.randn(1, 3, 32)
    model = train.PRX(train.preset_config(args.model, 32, in_channels=3, context_dim=32, hidden_size=64,
                                          num_heads=1, axes_dim=(32, 32), depth=2))
    return args, loader, model


def test_all_techniques_off_is_plain_flow_matching_bit_for_bit():
    """The training step with every technique flag off computes exactly MSE(model(x_t), eps - x0) with the
    foreground weights: no flag leaks into the step when off."""
    args, loader, model = one_batch_run()
    with torch.no_grad():  # random weights: a fresh model's zero output would hide what it is given
        for p in model.parameters():
            p.normal_(0, 0.05)
    x0, eps, t, x_t, txt, mask, _ = train.micro_batch(args, loader, 0, 0, torch.device("cpu"))
    reference = ((model(x_t, t, txt, mask) - (eps - x0)).square() * train.foreground_weights(x0, 2.0)).mean()
    loss, *_ = train.train_step(args, 0, 0.0, train.Trainee(model), [torch.optim.SGD(model.parameters(), lr=0.0)],
                                loader, None, 0, 1)
    assert torch.equal(loss, reference.detach())


@pytest.mark.parametrize("irepa", [False, True])
def test_repa_enters_the_loss_with_its_weight(irepa):
    """--repa-lambda W: the step's loss is the flow loss plus W x REPA's loss on the teacher's tokens (with --irepa:
    the conv projector's, on the teacher's tokens spatially normalised)."""
    args, loader, model = one_batch_run(["--repa", "builtin", "--repa-lambda", "1.5"] + ["--irepa"] * irepa)
    teacher = train.load_teacher(train.TEACHER_FILE)
    trainee = train.Trainee(model, "conv" if irepa else "mlp", teacher.num_features, 0)
    x0, eps, t, x_t, txt, mask, images = train.micro_batch(args, loader, 0, 0, torch.device("cpu"))
    pred, proj, idx = trainee(x_t, t, txt, mask, 0.0)
    flow = ((pred - (eps - x0)).square() * train.foreground_weights(x0, 2.0)).mean()
    target = train.teacher_tokens(teacher, images, (8, 8))
    reference = flow + 1.5 * train.repa_loss(proj, train.spatial_normalize(target) if irepa else target, idx)
    loss, *_ = train.train_step(args, 0, 0.0, trainee, [torch.optim.SGD(trainee.parameters(), lr=0.0)], loader,
                                teacher, 0, 1)
    torch.testing.assert_close(loss, reference.detach())


@pytest.mark.parametrize("repa", [False, True])
def test_train_step_clips_the_gradient_to_grad_clip_and_returns_the_norm_before(repa):
    """With plain SGD at lr 1 the step moves the weights by minus the clipped gradient: the reference gradient
    scaled to norm --grad-clip (a quarter of its own norm here); the returned norm is the unclipped one. With REPA
    the norm is over every trained weight, the projector's included (PRX clips all)."""
    args, loader, model = one_batch_run(["--repa", "builtin"] * repa)
    teacher = train.load_teacher(train.TEACHER_FILE) if repa else None
    trainee = train.Trainee(model, "mlp" if repa else None, teacher.num_features if repa else 0, 0)
    x0, eps, t, x_t, txt, mask, images = train.micro_batch(args, loader, 0, 0, torch.device("cpu"))
    pred, proj, idx = trainee(x_t, t, txt, mask, 0.0)
    loss = ((pred - (eps - x0)).square() * train.foreground_weights(x0, 2.0)).mean()
    if repa:
        loss = loss + args.repa_lambda * train.repa_loss(proj, train.teacher_tokens(teacher, images, (8, 8)), idx)
    loss.backward()
    grads = [p.grad.clone() for p in trainee.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    before = [p.detach().clone() for p in trainee.parameters()]
    trainee.zero_grad(set_to_none=True)
    args.grad_clip = norm.item() / 4
    _, grad_norm, *_ = train.train_step(args, 0, 1.0, trainee, [torch.optim.SGD(trainee.parameters())], loader,
                                        teacher, 0, 1)
    assert torch.allclose(grad_norm, norm, rtol=1e-5)
    for p, p0, g in zip(trainee.parameters(), before, grads):
        torch.testing.assert_close(p.detach() - p0, -g / 4, rtol=1e-4, atol=1e-7)


def test_the_micro_batches_of_a_step_average_into_its_loss_and_gradient():
    """A global batch of two micro-batches (gradient accumulation): the step's loss is the mean of their losses and
    its gradient the mean of their gradients, as one process per micro-batch averages them (DDP)."""
    args, loader, model = one_batch_run()
    args.batch_size = 16  # two micro-batches of 8, each drawing its own t and noise
    losses, lengths = [], []
    for chunk in range(2):
        x0, eps, t, x_t, txt, mask, _ = train.micro_batch(args, loader, 0, chunk, torch.device("cpu"))
        lengths.append(train.trim_text(txt, mask)[0].shape[1])  # the text the model reads: the step line's FLOPs
        losses.append(((model(x_t, t, txt, mask) - (eps - x0)).square() * train.foreground_weights(x0, 2.0)).mean())
        (losses[-1] / 2).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()  # of the mean gradient
    model.zero_grad(set_to_none=True)
    loss, grad_norm, txt_len, *_ = train.train_step(args, 0, 0.0, train.Trainee(model),
                                                    [torch.optim.SGD(model.parameters())], loader, None, 0, 1)
    torch.testing.assert_close(loss, (losses[0] + losses[1]).detach() / 2)
    torch.testing.assert_close(grad_norm, norm)
    assert txt_len == sum(lengths) / 2


TECHNIQUES = {"repa": ["--repa", "builtin"], "irepa": ["--repa", "builtin", "--irepa"],
              "repa-stop": ["--repa", "builtin", "--repa-stop", "1"], "tread": ["--tread"], "sprint": ["--sprint"],
              "x-pred": ["--pred", "x"], "cfm": ["--cfm", "0.1"], "ema": ["--ema", "0.9", "--ema-every", "1"],
              "muon": ["--optimizer", "muon"], "mixed": ["--captions", "mixed"]}
REFUSED = {("tread", "sprint"): "--tread and --sprint are exclusive"}


@pytest.mark.parametrize("a, b", list(itertools.combinations(TECHNIQUES, 2)))
def test_every_pair_of_techniques_trains_or_is_refused(a, b, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype: 1e11)  # the log's mfu only: not measured 45 times
    argv = SMALL + TECHNIQUES[a] + TECHNIQUES[b] + ["--max-steps", "2", "--out", str(tmp_path / "r")]
    if (a, b) in REFUSED:
        with pytest.raises(SystemExit):
            train.main(argv)
        assert REFUSED[(a, b)] in capsys.readouterr().err
        return
    train.main(argv)
    logged = losses(tmp_path / "r")
    assert sorted(logged) == [1, 2] and all(map(math.isfinite, logged.values()))


def test_repa_stops_and_is_added_or_dropped_on_resume(tmp_path):
    out = tmp_path / "r"
    train.main(SMALL + ["--repa", "builtin", "--repa-stop", "2", "--max-steps", "3", "--out", str(out)])
    assert "REPA stopped at step 2" in (out / "log.txt").read_text()
    assert "repa" not in torch.load(out / "checkpoints" / "step_3" / "trainer.pt", weights_only=True)
    # past the stop, with the run's flags: no teacher, projector or note ("starts fresh") built again
    train.main(SMALL + ["--repa", "builtin", "--repa-stop", "2", "--max-steps", "4", "--out", str(out), "--resume"])
    resumed = (out / "log.txt").read_text().split("=== config.resume-3.json")[1]
    assert "REPA" not in resumed.split("\n=== ")[-1] and sorted(losses(out)) == [1, 2, 3, 4]
    plain, with_repa = tmp_path / "plain", tmp_path / "repa"
    train.main(SMALL + ["--max-steps", "2", "--out", str(plain)])
    train.main(SMALL + ["--max-steps", "4", "--out", str(plain), "--resume", "--repa", "builtin"])
    assert "REPA's mlp projector starts fresh (the checkpoint has none)" in (plain / "log.txt").read_text()
    assert "repa" in torch.load(plain / "checkpoints" / "step_4" / "trainer.pt", weights_only=True)
    train.main(SMALL + ["--max-steps", "2", "--out", str(with_repa), "--repa", "builtin"])
    train.main(SMALL + ["--max-steps", "4", "--out", str(with_repa), "--resume"])
    assert "REPA dropped" in (with_repa / "log.txt").read_text()
    assert sorted(losses(with_repa)) == [1, 2, 3, 4]
    irepa = tmp_path / "irepa"  # another projector kind: a fresh one, not the checkpoint's
    train.main(SMALL + ["--max-steps", "3", "--out", str(irepa), "--resume", str(with_repa / "checkpoints" / "step_2"),
                        "--repa", "builtin", "--irepa"])
    assert "REPA's conv projector starts fresh (the checkpoint has a mlp one)" in (irepa / "log.txt").read_text()


def test_a_cut_short_index_is_named_with_its_flag_before_any_work(tmp_path, capsys):
    (tmp_path / "index.json").write_text('{"schema": {"lat')  # a preparation killed while writing it
    with pytest.raises(SystemExit):
        train.get_args(["--data", str(tmp_path), "--model", "tiny-pixel", "--lpips", "0.1"])
    assert f"--data {tmp_path}: {tmp_path / 'index.json'}: unreadable" in capsys.readouterr().err


def test_prx_defaults_that_follow_other_flags(tmp_path):
    assert train.get_args(["--track", "cpu"]).shift == 1.0  # the CPU track's (32 px)
    for space, model, shift in (("image", "tiny-pixel", 3.0), ("latent", "tiny", 1.0)):  # pixel space; latents
        (tmp_path / "index.json").write_text(json.dumps({"schema": {space: {"shape": [3, 32, 32]}}}))
        assert train.get_args(["--data", str(tmp_path), "--model", model]).shift == shift
    assert train.get_args(["--track", "cpu", "--sprint"]).route_ratio == 0.75
    assert train.get_args(["--track", "cpu", "--tread"]).route_ratio == 0.5
    assert train.get_args(["--track", "cpu", "--eval-minutes", "5,1,2"]).eval_minutes == [1, 2, 5]  # earliest first
    assert train.get_args(["--track", "cpu", "--optimizer", "muon"]).eps == 1e-8
    assert train.get_args(["--track", "cpu"]).eps == 1e-15
    assert train.get_args(["--track", "cpu", "--optimizer", "muon", "--eps", "1e-6"]).eps == 1e-6
    args = train.get_args(["--track", "cpu", "--tread", "--self-guidance", "1.5"])
    assert train.sampling_settings(args)["self_guidance"] == 1.5  # periodic evaluation samples with it
    for flags, ratio in ((["--sprint", "--self-guidance", "1.5"], 0.75), (["--tread", "--route-ratio", "0.3"], 0.3)):
        assert train.sampling_settings(train.get_args(["--track", "cpu", *flags]))["route_ratio"] == ratio


def test_the_last_step_is_logged_off_the_log_every_grid(tmp_path, capsys):
    train.main(SMALL + ["--max-steps", "5", "--log-every", "3", "--out", str(tmp_path / "r")])
    assert sorted(losses(tmp_path / "r")) == [3, 5] and "\nstep 5/5 | loss " in capsys.readouterr().out


def test_muon_ns_steps_and_precision_reach_muon():
    trainee = train.Trainee(PRX(preset_config("tiny", 32, in_channels=3, context_dim=8)))
    for precision, ns_dtype in (("fp32", None), ("bf16", torch.bfloat16)):  # None: fp32 on the CPU (test_muon)
        args = train.get_args(["--track", "cpu", "--optimizer", "muon", "--muon-ns-steps", "3",
                               "--precision", precision])
        muon_opt, _ = train.build_optimizers(args, trainee)[0]
        assert muon_opt.defaults["ns_steps"] == 3  # what Muon.step iterates (test_muon: against torch.optim.Muon's)
        assert muon_opt.ns_dtype == ns_dtype  # Newton-Schulz in the run's precision
    adamw_opt = train.build_optimizers(train.get_args(["--track", "cpu"]), trainee)[0][0]
    assert adamw_opt.defaults["fused"]  # on every device: test_fused_adamw_steps_as_the_default_implementation


def test_optimizer_flags_reach_every_optimizer():
    """--betas, --eps and --weight-decay reach AdamW (the model's, the REPA projector's) and Muon (its decay)."""
    trainee = train.Trainee(PRX(preset_config("tiny", 32, in_channels=3, context_dim=8)), "mlp", 16, 1)
    flags = ["--track", "cpu", "--betas", "0.8", "0.9", "--eps", "1e-6", "--weight-decay", "0.1"]
    for optimizer in ("adamw", "muon"):
        opts = train.build_optimizers(train.get_args(flags + ["--optimizer", optimizer]), trainee)[0]
        adamws = [o for o in opts if isinstance(o, torch.optim.AdamW)]
        assert len(adamws) == 2 and len(opts) == (2 if optimizer == "adamw" else 3)  # model (Muon: the rest), projector
        assert all(tuple(o.defaults["betas"]) == (0.8, 0.9) and o.defaults["eps"] == 1e-6
                   and o.defaults["weight_decay"] == 0.1 for o in adamws)
        assert all(o.defaults["weight_decay"] == 0.1 for o in opts)


def test_the_default_repa_layer_is_prx_s_7_of_16_scaled_to_the_depth():
    for depth, layer in ((16, 7), (4, 1), (2, 0)):
        args = train.get_args(["--track", "cpu", "--repa", "builtin", "--depth", str(depth)])
        loader = train.open_training_data(args, 0, 1, torch.device("cpu"), 0)[0]
        assert train.build_model(args, loader, torch.device("cpu"), 0)[3].repa_layer == layer


def muon_step_moves(flags, step):
    """One train_step of a fresh tiny model (seed 0, every weight drawn: zero-initialised layers give the blocks no
    gradient) with Muon at `step`'s lr -> (args, the optimizers, [(whether Muon steps it, its move) per parameter])."""
    torch.manual_seed(0)  # the same text and weights
    args, loader, model = one_batch_run(["--optimizer", "muon", "--lr", "2e-3"] + flags)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    trainee, before = train.Trainee(model), [p.detach().clone() for p in model.parameters()]
    opt = train.build_optimizers(args, trainee)[0]
    train.train_step(args, 0, train.learning_rate(args, step, 0.0), trainee, opt, loader, None, 0, 1)
    muon = {id(p) for p in train.split_muon_params(model)[0]}
    return args, opt, [(id(p) in muon, p.detach() - p0) for p, p0 in zip(model.parameters(), before)]


def test_muon_lr_moves_muon_weights_by_its_ratio_and_the_rest_as_before():
    """--muon-lr 4 x --lr: in a step Muon's weights move 4 times as far (its orthogonalised update does not depend on
    the lr), AdamW's exactly as without the flag."""
    plain_moves, faster_moves = (muon_step_moves(["--warmup", "1"] + extra, 0)[2]
                                 for extra in ([], ["--muon-lr", "8e-3"]))
    assert 0 < sum(in_muon for in_muon, _ in plain_moves) < len(plain_moves)
    for (in_muon, plain), (_, faster) in zip(plain_moves, faster_moves):
        if in_muon:  # to the rounding of weight + move
            assert plain.abs().max() > 0
            torch.testing.assert_close(faster, 4 * plain, rtol=0, atol=1e-3 * faster.abs().max().item())
        else:
            assert torch.equal(faster, plain)


def test_muon_follows_the_lr_schedule_at_its_ratio():
    """Muon's lr rides --lr's schedule: in the warm-up, at a quarter of --lr, its groups hold a quarter of --muon-lr
    and its weights move a quarter as far as at the full lr (its orthogonalised update, like AdamW's first, does not
    depend on the gradient's scale: a move is lr x a fixed direction)."""
    moves = []
    for step in (0, 3):  # --warmup 4: lr / 4, then lr; step 0's batch both times: one gradient
        args, opt, step_moves = muon_step_moves(["--muon-lr", "8e-3", "--warmup", "4"], step)
        assert train.learning_rate(args, step, 0.0) == pytest.approx(2e-3 * (step + 1) / 4)
        assert all(group["lr"] == pytest.approx(8e-3 * (step + 1) / 4) for group in opt[0].param_groups)
        moves.append(step_moves)
    assert 0 < sum(in_muon for in_muon, _ in moves[0]) < len(moves[0])
    for (in_muon, warm), (_, full) in zip(*moves):
        if in_muon:  # to the rounding of weight + move
            assert full.abs().max() > 0
            torch.testing.assert_close(warm, full / 4, rtol=0, atol=1e-3 * full.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# The CUDA path's precision on the CPU: --precision bf16 runs the step under torch.autocast("cpu", bfloat16), the
# code the CUDA branch runs

class GradCatcher:
    """An optimizer that keeps the gradients it is given and changes nothing."""

    def __init__(self, params):
        self.params, self.param_groups, self.grads = list(params), [{}], None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("flags", [[], ["--repa", "builtin"], ["--repa", "builtin", "--irepa", "--tread"], ["--sprint"],
                                   ["--pred", "x"], ["--cfm", "0.1"]])
def test_bf16_autocast_step_is_fp32_within_bf16_rounding(flags, monkeypatch):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); through a 2-block model with random
    weights (a fresh one's zero-initialised gates and output would hide the blocks) the loss moves by well under 2%
    and each gradient keeps its direction (cosine > 0.99). What PRX keeps in fp32 stays fp32."""
    import model as model_module
    from data import open_loader
    t_emb = []  # (autocast on, dtype) of each time embedding
    embed = model_module.timestep_embedding
    monkeypatch.setattr(model_module, "timestep_embedding", lambda *a, **k: t_emb.append(
        (torch.is_autocast_enabled("cpu"), (out := embed(*a, **k)).dtype)) or out)
    args = train.get_args(SMALL + flags + ["--batch-size", "8", "--out", "unused"])
    cpu = torch.device("cpu")
    loader = open_loader("builtin", 8, 0, 1, 0, "long", cpu, 1, 32, 5, images=bool(args.repa))
    _, raw, _, trainee, teacher = train.build_model(args, loader, cpu, 0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainee.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    results = {}
    for precision in ("fp32", "bf16"):
        args.precision = precision
        catcher = GradCatcher(trainee.parameters())
        loss, *_ = train.train_step(args, 0, 1e-3, trainee, [catcher], loader, teacher, 0, 1)
        results[precision] = loss, catcher.grads
        loader.load_state_dict({"batches": 0})
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    assert loss16.dtype == torch.float32 and loss16 != loss32 and abs(loss16 / loss32 - 1) < 0.02
    assert (True, torch.float32) in t_emb  # the sinusoidal time features, computed under autocast, in fp32
    for g32, g16 in zip(grads32, grads16):
        assert g16.dtype == torch.float32
        if g32.norm() > 1e-6 * max(g.norm() for g in grads32):
            assert torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.99
    assert all(p.dtype == torch.float32 for p in raw.parameters())


def test_the_log_names_the_cpu_and_its_matmul_units(monkeypatch, tmp_path):
    """devices() reads the first core's entry of /proc/cpuinfo: its name and which of the vector units that set the
    matmuls' speed it has (bf16 is fast with AMX or AVX512-BF16, emulated with AVX2 alone); records/verify.py checks
    AVX2."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
                       "flags\t\t: fpu sse4_2 avx2 avx512f amx_tile amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: another\nflags\t\t: avx512_bf16\n")
    real_open = open
    monkeypatch.setattr(train, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                        *a, **k), raising=False)
    found = train.devices(torch.device("cpu"))
    assert found["cpu"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert found["cpu_flags"] == ["avx2", "avx512f", "amx_bf16"]


@pytest.mark.parametrize("units, warned", [(["avx2"], True), (["avx2", "avx512f", "amx_bf16"], False),
                                            (["avx2", "avx512_bf16"], False)])
def test_bf16_on_a_cpu_without_bf16_units_is_warned_at_start(units, warned):
    class Log(list):  # RunLog's call and its config.json (devices: what config_of read of the CPU)
        config = {"devices": {"cpu": "x", "cpu_flags": units}}

        def __call__(self, text, record=None):
            self.append(text)

    for precision in ("bf16", "fp32"):
        lines = Log()
        args = train.get_args(["--track", "cpu", "--precision", precision])
        train.log_start(lines, args, 1, 1, torch.device("cpu"), 1, "out", None)
        assert any("warning: --precision bf16" in line for line in lines) == (warned and precision == "bf16")


def test_step_log_closed_form(monkeypatch):
    """A step line covers the steps since the last one: samples/s = batch x steps / their seconds; flops/s = the sum
    over those steps of 3 x flops_per_sample (the image tokens of x0_shape, the step's text length, the route ratio) x
    batch / processes, over their seconds; mfu over
    --peak-tflops on CUDA; the loader's and optimizer's shares of those seconds; the ETA: the steps left at this speed,
    or the time budget left if sooner; step_avg over the whole training time."""
    calls = []
    monkeypatch.setattr(train, "flops_per_sample", lambda cfg, img, txt, route: calls.append((img, txt, route)) or
                        txt * 1e8)
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype: pytest.fail("measured the peak on CUDA"))
    args = argparse.Namespace(batch_size=8, route_ratio=0.25, max_steps=100, peak_tflops=2.0)
    lines = []
    log = train.StepLog(args, argparse.Namespace(patch_size=4), argparse.Namespace(x0_shape=(3, 32, 16)), 2,
                        torch.device("cuda"), 10.0, lambda text, record=None: lines.append((text, record)))
    assert lines.pop() == ("peak 2e+12 FLOP/s per process: --peak-tflops (bf16)", None)
    log.add(1.0, 0.5, 7)
    log.add(1.0, 0.5, 13)
    log(10, 0.5, 1.0, 1e-3, 14.0, 1000.0)  # 16 samples in 4 s; 3 x (0.7 + 1.3)e9 x 8 / 2 FLOPs
    text, record = lines.pop()
    assert calls == [(32, 7, 0.25), (32, 13, 0.25)]  # 32 x 16 px in 4 px patches
    assert record == {"step": 10, "loss": 0.5, "grad_norm": 1.0, "lr": 1e-3, "samples_per_s": 4.0, "flops_per_s": 6e9,
                      "mfu": pytest.approx(3e-3), "data_share": 0.5, "optimizer_share": 0.25, "train_time_s": 14.0}
    assert text.endswith("| train_time 14000ms | step_avg 1400.00ms | eta 0:03:00")  # 90 steps x 8 at 4/s
    log.add(0.2, 0.1, 7)
    log(11, 0.5, 1.0, 1e-3, 16.0, 100.0)  # 8 samples in the 2 s since the last line; 84 s of the budget left
    text, record = lines.pop()
    assert (record["samples_per_s"], record["data_share"], record["optimizer_share"]) == (4.0, 0.1, 0.05)
    assert text.endswith("| eta 0:01:24") and record["train_time_s"] == 16.0


def test_matmul_peak_is_the_best_of_its_timed_products(monkeypatch):
    """2 n^3 FLOP over the fastest of reps timed products, after one untimed warm-up run."""
    seen = []
    monkeypatch.setattr(train.timeit, "repeat", lambda f, number, repeat: seen.append((f(), number, repeat)) or [
        9.0, 0.5, 0.25, 0.75])
    assert train.matmul_peak(torch.device("cpu"), torch.bfloat16, n=16, reps=3) == 2 * 16 ** 3 / 0.25
    product, number, repeat = seen[0]
    assert product.shape == (16, 16) and product.dtype == torch.bfloat16 and (number, repeat) == (1, 4)
    measured, lines = [], []  # a CPU run's peak: products in its precision (bf16 autocast: bf16 ones)
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype: measured.append(dtype) or 3e10)
    train.StepLog(argparse.Namespace(precision="bf16"), argparse.Namespace(patch_size=4),
                  argparse.Namespace(x0_shape=(3, 32, 32)), 1, torch.device("cpu"), 0.0, lines.append)
    assert measured == [torch.bfloat16] and lines == ["peak 3e+10 FLOP/s per process: bf16 matmul 1024^3, measured"]


def test_config_json_records_the_run(monkeypatch):
    """config_of: every flag, the model, the sampling settings eval.py reads, the processes, the parameter count, the
    commit, and the machine as devices() reads it (its torch threads, not its cores; on CUDA its GPUs)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    args = train.get_args(["--track", "cpu", "--sample-steps", "9", "--cfg-scale", "2.5"])
    cfg = preset_config("tiny", 32, in_channels=3, context_dim=64)
    config = train.config_of(args, cfg, 3, 1234, torch.device("cpu"))
    assert config["args"] == vars(args) and config["model"] == vars(cfg)
    assert config["sampling"] == train.sampling_settings(args) and config["sampling"]["steps"] == 9
    assert (config["world_size"], config["parameters"], config["device"]) == (3, 1234, "cpu")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert config["git_commit"] == head and len(head) == 40
    assert config["devices"]["threads"] == 7 and config["devices"]["cores"] == os.cpu_count()
    assert config["devices"]["cpu_flags"] == train.devices(torch.device("cpu"))["cpu_flags"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")  # a CUDA run: its GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(train.shutil, "which", lambda name: None)  # no nvidia-smi: the driver is unknown
    config = train.config_of(args, cfg, 2, 1234, torch.device("cuda", 1))
    assert config["device"] == "NVIDIA H100" and config["devices"]["gpus"] == ["NVIDIA H100"] * 2
    assert (config["devices"]["driver"], config["devices"]["cuda"]) == ("unknown", torch.version.cuda)


def test_the_start_lines_name_the_batch_split_the_resume_and_the_tracks_values():
    class Log(list):
        config = {"devices": {"cpu": "x", "cpu_flags": ["avx2"]}}

        def __call__(self, text, record=None):
            self.append(text)

    args, lines = train.get_args(["--track", "cpu", "--batch-size", "24", "--micro-batch", "4"]), Log()
    train.log_start(lines, args, 1234, 3, torch.device("cpu"), 2, "runs/x", "runs/x/checkpoints/step_5")
    assert lines[0].startswith(f"model {args.model}: 1,234 parameters | 3 process(es) on cpu | global batch 24 = "
                               "4 x 3 x 2 accumulation")
    assert lines[0].endswith("| out runs/x | resumed from runs/x/checkpoints/step_5")
    assert lines[1].startswith("track cpu (") and ": its values for the flags not given: --" in lines[1]
    assert all(f"--{k.replace('_', '-')} {getattr(args, k)}" in lines[1] for k in args.track_values)
    assert not any("FID needs --eval-ref" in line for line in lines)  # the built-in data: scored by the checker
    args.data, lines = "data/mj", Log()
    train.log_start(lines, args, 1234, 1, torch.device("cpu"), 6, "runs/x", None)
    assert "resumed" not in lines[0] and any("FID needs --eval-ref" in line for line in lines)


def test_bf16_autocast_keeps_weights_optimizer_state_and_ema_in_fp32(tmp_path, monkeypatch):
    # the log's mfu only: 9 emulated bf16 1024^3 products (~20 s on a CPU without bf16 units) measure nothing tested
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype: 1e11)
    out = tmp_path / "r"
    train.main(SMALL + ["--precision", "bf16", "--optimizer", "muon", "--ema", "0.9", "--ema-every", "1",
                        "--max-steps", "2", "--batch-size", "8", "--micro-batch", "4", "--out", str(out)])
    ckpt = out / "checkpoints" / "step_2"
    for name in ("model.safetensors", "ema.safetensors"):
        assert {v.dtype for v in load_file(str(ckpt / name)).values()} == {torch.float32}
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    dtypes = {v.dtype for o in state["optimizer"] for s in o["state"].values() for v in s.values()
              if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0}
    assert dtypes == {torch.float32}


def test_sampler_under_bf16_autocast_keeps_its_state_in_fp32():
    from eval import sample
    from model import PRX, preset_config
    torch.manual_seed(0)
    model = PRX(preset_config("tiny", 32, in_channels=3, context_dim=8, depth=2, hidden_size=64, num_heads=1,
                              axes_dim=(32, 32))).eval()
    for p in model.parameters():  # zero-initialised output layers would make every sample the noise
        torch.nn.init.normal_(p, std=0.05)
    txt, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.randn(1, 1, 8), torch.ones(1, 1, dtype=torch.bool)
    x32 = sample(model, txt, mask, null, null_mask, [0, 1], (3, 8, 8), steps=4, cfg_scale=3.0, pred="x")
    with torch.autocast("cpu", torch.bfloat16):
        x16 = sample(model, txt, mask, null, null_mask, [0, 1], (3, 8, 8), steps=4, cfg_scale=3.0, pred="x")
    assert x16.dtype == torch.float32
    assert (x16 - x32).abs().max() < 0.05 * x32.abs().max() and not torch.equal(x16, x32)


def test_fused_adamw_steps_as_the_default_implementation():
    """build_optimizers' AdamW is torch's fused one (one kernel for all tensors): the for-loop one's steps."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(8, 8, generator=g) for _ in range(2)]
    grads = [[torch.randn(8, 8, generator=g) for _ in params] for _ in range(3)]
    results = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-15, fused=fused)
        for step_grads in grads:
            for p, grad in zip(ps, step_grads):
                p.grad = grad
            opt.step()
        results.append(ps)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))


def test_the_bf16_teacher_gives_the_fp32_teachers_tokens():
    """What only CUDA selects, run here through the same calls: the bf16 teacher (build_model) gives the fp32
    teacher's tokens within bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    from shapes import TEACHER_FILE, load_teacher
    teacher = load_teacher(os.path.join(ROOT, TEACHER_FILE))
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    fp32 = train.teacher_tokens(teacher, images, (16, 16))
    bf16 = train.teacher_tokens(teacher.to(torch.bfloat16), images, (16, 16))
    assert bf16.dtype == torch.float32 and torch.nn.functional.cosine_similarity(bf16, fp32, dim=-1).min() > 0.98


def test_norms_and_rope_compute_in_fp32_under_autocast():
    """Under CPU bf16 autocast, as under CUDA's: layer norms give fp32 (the attention's input is fp32 before its
    projections cast it), RMSNorm and RoPE compute in fp32 and round once to the input's bf16."""
    import model as m
    net = m.PRX(m.preset_config("tiny", 32, in_channels=3, context_dim=8, depth=1, hidden_size=64, num_heads=1,
                                axes_dim=(32, 32)))
    seen = {}
    net.blocks[0].attention.register_forward_pre_hook(lambda mod, inputs: seen.update(x=inputs[0].dtype))
    x = torch.randn(2, 5, 64).bfloat16()
    cos, sin = (table[:5][None, :, None] for table in m.rope_table((32, 32), 10000.0))
    norm = m.RMSNorm(64)
    with torch.autocast("cpu", torch.bfloat16):
        net(torch.randn(1, 3, 8, 8), torch.rand(1), torch.randn(1, 2, 8))
        rms, rope = norm(x), m.apply_rope(x[:, :, None], cos, sin)
    assert seen["x"] == torch.float32
    assert torch.equal(rms, torch.nn.functional.rms_norm(x.float(), (64,), norm.weight, 1e-6).bfloat16())
    assert torch.equal(rope, m.apply_rope(x[:, :, None].float(), cos, sin).bfloat16())


def test_the_resume_note_lists_what_differs_from_the_checkpoints_stage():
    args = train.get_args(SMALL)
    stage = {**json.loads(json.dumps(vars(args))), "data": "d/mj"}  # the stage's args, as its config stores them
    args.data = "./d/mj/"  # the same dataset, spelt otherwise: not a change
    assert train.resume_changes(args, stage) is None
    args.lr, args.data, args.max_steps = 1e-3, "d/mj:0.5,d/cc:0.5", 100_000  # the budget: left out after a kill?
    stage["max_steps"] = 30
    assert train.resume_changes(args, stage).endswith("--data d/mj -> d/mj:0.5,d/cc:0.5; --lr 0.002 -> 0.001; "
                                                      "--max-steps 30 -> 100000")


def test_a_resume_reads_its_stage_config_once(finished_run, tmp_path, monkeypatch):
    """The config of the stage that trained the checkpoint is read once: for its data's encoders and for the note of
    the flags this resume sets otherwise."""
    out = copy_run(finished_run, tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.resume-2.json").write_text(json.dumps({**config, "args": {**config["args"], "lr": 1e-3}}))
    opened = []
    for module in (train, sys.modules["model"]):  # model.read_config reads the configs
        monkeypatch.setattr(module, "open", lambda path, *a, **kw: opened.append(os.path.basename(path)) or
                            open(path, *a, **kw), raising=False)
    train.main(SMALL + ["--out", str(out), "--max-steps", "5", "--resume"])  # from step_4, trained by resume-2
    assert opened.count("config.resume-2.json") == 1
    assert re.search(r"flags set otherwise than the checkpoint's stage .*; --lr 0\.001 -> 0\.002; --max-steps",
                     (out / "log.txt").read_text())


def test_a_resume_continues_the_ema_of_its_checkpoint(tmp_path):
    """The EMA weights are part of the run's state: a run branched from step 2 ends at step 4 with the EMA (and the
    weights) of the run that went on uninterrupted, not an EMA restarted from the initial weights."""
    args = SMALL + ["--ema", "0.9", "--ema-every", "1", "--ckpt-every", "2", "--keep", "5", "--max-steps", "4"]
    train.main(args + ["--out", str(tmp_path / "ref")])
    train.main(args + ["--resume", str(tmp_path / "ref" / "checkpoints" / "step_2"), "--out", str(tmp_path / "b")])
    for name in ("ema.safetensors", "model.safetensors"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "step_4" / name)) for r in ("ref", "b"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def fake_run(run, argv):
    """A run folder's config.json as train.py writes it for `argv` (its args as stored: tuples as lists)."""
    args = train.get_args(argv)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"args": json.loads(json.dumps(vars(args))),
                                                 "model": {"patch_size": 4}, "sampling": {}}))
    return str(run / "checkpoints" / "step_2")


@pytest.mark.parametrize("change, message", [(["--seed", "1"], "--seed 0 -> 1"), (["--pred", "x"], "--pred v -> x"),
                                             (["--batch-size", "32"], "--batch-size 16 -> 32"),
                                             (["--micro-batch", "16"], "--micro-batch 8 -> 16"),
                                             (["--shift", "2"], "--shift 1.0 -> 2.0")])
def test_a_resume_refuses_a_flag_that_defines_the_runs_sequence(tmp_path, change, message):
    """--seed, --pred, the batch split and the shift make the run what it is (its samples, t and noise; its
    objective): a resume that changes one is refused, naming it (RESUMABLE leaves them out); the same flags pass."""
    run = tmp_path / "run"
    ckpt = fake_run(run, SMALL + ["--out", str(run)])
    train.check_resume_flags(train.get_args(SMALL + ["--out", str(run), "--resume"]), ckpt)
    with pytest.raises(SystemExit, match=f"cannot change on resume: {re.escape(message)}"):
        train.check_resume_flags(train.get_args(SMALL + ["--out", str(run), "--resume", *change]), ckpt)


@pytest.mark.parametrize("change", [["--warmup", "10"], ["--cooldown", "0.2"], ["--grad-clip", "0.5"],
                                    ["--caption-dropout", "0.2"], ["--eval-samples", "8", "--eval-every", "2"],
                                    ["--lr", "1e-3"], ["--keep", "3"], ["--log-every", "5"], ["--ckpt-every", "7"],
                                    ["--max-time", "1"]])
def test_a_resume_may_change_the_flags_of_a_new_phase(tmp_path, change):
    """A second phase (PRX part 3) changes its schedule, clipping, caption dropout and evaluations: accepted."""
    run = tmp_path / "run"
    ckpt = fake_run(run, SMALL + ["--out", str(run)])
    train.check_resume_flags(train.get_args(SMALL + ["--out", str(run), "--resume", *change]), ckpt)


def test_the_lock_names_only_the_process_that_holds_it(tmp_path):
    """A .lock left by an ended run is rewritten, not appended to: a refused second train.py names the holder alone."""
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("host gone pid 1\n")
    lock, _ = train.claim_run_folder(str(out), False)
    try:
        holder = f"host {socket.gethostname()} pid {os.getpid()}"
        assert (out / ".lock").read_text() == f"{holder}\n"
        with pytest.raises(SystemExit, match=re.escape(f"another train.py ({holder}) is training this run")):
            train.claim_run_folder(str(out), False)
    finally:
        lock.close()


def test_a_resume_of_a_run_being_trained_is_refused_before_its_checkpoints_are_read(finished_run, tmp_path,
                                                                                     monkeypatch):
    """The live run prunes its checkpoints: a second train.py --resume on it is told another one trains it, not that
    the checkpoint it was reading went missing; a branch (--out NEW) reads the checkpoint as it is. Rank 0 alone
    asks: another rank of the same launch would find the lock its own rank 0 has taken."""
    out = copy_run(finished_run, tmp_path)
    lock, _ = train.claim_run_folder(str(out), False)
    try:
        (out / "checkpoints" / "step_4" / "trainer.pt").unlink()  # pruned meanwhile
        holder = f"host {socket.gethostname()} pid {os.getpid()}"
        with pytest.raises(SystemExit, match=re.escape(f"--out {out}: another train.py ({holder}) is training")):
            train.resolve_resume("latest", str(out))
        with pytest.raises(SystemExit, match="step_4/trainer.pt is missing"):
            train.resolve_resume(str(out), str(tmp_path / "branch"))
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(SystemExit, match="step_4/trainer.pt is missing"):
            train.resolve_resume("latest", str(out))
    finally:
        lock.close()
    assert train.lock_holder(str(out)) is None


def worker_of_rank(launcher, rank):
    """The pid of the process torchrun (pid launcher) started as RANK=rank, or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            ppid = int(re.search(r"PPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
            if ppid == launcher and f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    return None


def test_under_torchrun_a_refused_resume_stops_every_process_in_one_line(finished_run, tmp_path):
    """Rank 0 alone asks whether another train.py holds the run; every rank learns its answer and stops alike: one
    line, not a traceback from a rank meeting rank 0's exit in its next collective."""
    out = copy_run(finished_run, tmp_path)
    lock, _ = train.claim_run_folder(str(out), False)
    try:
        r = run(SMALL + ["--out", str(out), "--resume", "--ckpt-every", "2", "--keep", "5", "--max-steps", "8"],
                nproc=2)
    finally:
        lock.close()
    holder = f"host {socket.gethostname()} pid {os.getpid()}"
    assert r.returncode != 0 and f"another train.py ({holder}) is training this run" in r.stderr, r.stderr[-3000:]
    assert "[rank1]" not in r.stderr and "another process of this run ended" not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])  # rank 0 killed: rank 1 alone can say where to resume
def test_under_torchrun_a_killed_process_stops_the_run_naming_the_checkpoint(killed, finished_run, tmp_path):
    """A process killed with SIGKILL mid-run (the OOM killer) fails the others' next collective (gloo): one line from
    a survivor naming the checkpoint to resume from, or torchrun's SIGTERM's line if that comes first; no traceback."""
    out = copy_run(finished_run, tmp_path)
    flags = SMALL + ["--out", str(out), "--resume", "--ckpt-every", "2", "--keep", "5", "--max-steps", "100000"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with subprocess.Popen(launcher + ["train.py", *flags], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}) as p:
        while not (out / "checkpoints" / "step_6").exists() and p.poll() is None:  # training on 2 processes
            time.sleep(0.2)
        os.kill(worker_of_rank(p.pid, killed), signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=300)
    assert p.returncode != 0 and "[rank0]" not in stderr and "[rank1]" not in stderr, stderr[-3000:]
    assert re.search(r"(another process of this run ended \(Connection \w+ by peer\)|stopped \(SIGTERM\)); the last "
                     r"checkpoint is \S+step_\d+: continue with the run's flags and --resume", stderr), stderr[-3000:]


def test_a_prune_keeps_the_evaluations_of_an_earlier_life_of_the_step(tmp_path):
    """step_2.evals already there (an earlier life of the run): pruning step_2 again keeps both sets of evaluations."""
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_2.evals").mkdir(parents=True)
    (ckpts / "step_2.evals" / "eval.json").write_text("old")
    (ckpts / "step_2").mkdir()
    (ckpts / "step_2" / "model.safetensors").write_text("weights")
    (ckpts / "step_2" / "eval.json").write_text("new")
    train.prune_checkpoint(str(ckpts / "step_2"))
    assert (ckpts / "step_2.evals" / "eval.json").read_text() == "old" and not (ckpts / "step_2").exists()
    later = [p for p in ckpts.iterdir() if p.name.startswith("step_2.evals-")]
    assert len(later) == 1 and sorted(os.listdir(later[0])) == ["eval.json"]
    assert (later[0] / "eval.json").read_text() == "new"


def test_a_resume_keeps_the_timed_evaluations_still_ahead_of_its_clock(tmp_path, monkeypatch):
    """--eval-minutes are minutes, the checkpoint's clock seconds: resumed at 0.5 s of training, an --eval-minutes
    0.02 point (1.2 s) is still ahead and is evaluated, before the end of --max-time 0.03 (1.8 s). A fake clock
    (10 ms a reading) makes the step times, whatever the machine's load."""
    clock = [0.0]

    def tick():
        clock[0] += 0.01
        return clock[0]
    monkeypatch.setattr(train.time, "perf_counter", tick)
    out = tmp_path / "r"
    flags = SMALL[:-4] + ["--eval-samples", "8", "--sample-steps", "2", "--warmup", "5", "--ckpt-every", "2", "--out",
                          str(out)]
    train.main(flags + ["--max-steps", "2"])
    ckpt = out / "checkpoints" / "step_2"
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    torch.save({**state, "train_time": 0.5}, ckpt / "trainer.pt")
    (ckpt / CHECKSUMS).write_text(json.dumps({n: file_sha256(ckpt / n) for n in ("model.safetensors", "trainer.pt")}))
    train.main(flags + ["--max-steps", "100000", "--max-time", "0.03", "--eval-minutes", "0.02", "--resume"])
    with open(out / "metrics.jsonl") as f:
        evals = [r["train_time_s"] for r in map(json.loads, f) if "object_accuracy" in r and r["step"] > 2]
    assert len(evals) == 2 and 1.2 <= evals[0] < 1.8 <= evals[1], evals


def test_the_runs_evaluations_sample_the_eval_data(monkeypatch):
    """--eval-data: the run's evaluations draw the held-out prompts of that dataset and decode with its VAE, not
    --data's; without it, --data's."""
    opened = []
    monkeypatch.setattr(train, "open_heldout", lambda data, *a: opened.append(data) or SimpleNamespace(
        images_id=lambda n: "id"))
    monkeypatch.setattr(train, "load_decoder", lambda cfg, data, *a: opened.append(data) or ((3, 32, 32), None))
    args = SimpleNamespace(eval_samples=2, eval_data="data/eval", data="data/train", captions="long", resolution=32,
                           seed=0, text_context=5, eval_ref=None, fid_weights=None, sample_steps=2, cfg_scale=3.0,
                           shift=1.0, pred="v", route_ratio=None, self_guidance=0.0)
    assert train.setup_eval(args, None, torch.device("cpu")) is not None
    assert opened == ["data/eval", "data/eval"]
    opened.clear()
    args.eval_data = None
    train.setup_eval(args, None, torch.device("cpu"))
    assert opened == ["data/train", "data/train"]


def test_a_run_folder_made_meanwhile_by_another_run_is_not_taken(tmp_path, monkeypatch):
    """Two runs started on one new --out: the one that finds the folder made when it claims it stops, and the other
    run's config.json stays as that run wrote it."""
    out = tmp_path / "r"
    opened = train.open_training_data

    def another_run_starts_meanwhile(*a, **k):
        out.mkdir()
        (out / "config.json").write_text('{"the other run": 1}')
        return opened(*a, **k)
    monkeypatch.setattr(train, "open_training_data", another_run_starts_meanwhile)
    with pytest.raises(SystemExit, match=re.escape(f"--out {out}: another train.py has made this folder since this "
                                                   f"one started")):
        train.main(SMALL + ["--out", str(out), "--max-steps", "1"])
    assert (out / "config.json").read_text() == '{"the other run": 1}' and sorted(os.listdir(out)) == ["config.json"]
