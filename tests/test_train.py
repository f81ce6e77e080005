import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from model import list_checkpoints, load_run
from train import sample_t

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--hidden", "64", "--depth", "2", "--batch-size", "16", "--micro-batch", "8", "--log-every", "1",
         "--eval-samples", "0", "--warmup", "5"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, nproc=1, **kw):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                                                    "--master_addr=127.0.0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + [os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_timestep_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, shift=3.0, uniform_frac=0.1, g=g, device="cpu")
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3
    # logit-normal median 0.5 shifted by s=3 -> 0.75; the uniform 10% has median 0.5 too and moves it a little
    assert abs(t.median().item() - 0.735) < 0.01
    t1 = sample_t(200_000, shift=1.0, uniform_frac=0.0, g=g, device="cpu")
    logit = torch.log(t1 / (1 - t1))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01


def test_torchrun_two_processes_equal_one(tmp_path):
    one = run(SMALL + ["--out", str(tmp_path / "one"), "--max-steps", "20"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(SMALL + ["--out", str(tmp_path / "two"), "--max-steps", "20"], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-4
    assert len(set(a.values())) == 20  # the losses move: this compares training, not constants


def test_lr_schedule_warmup_constant_cooldown(tmp_path):
    r = run(SMALL[:-2] + ["--out", str(tmp_path / "c"), "--max-steps", "10", "--warmup", "2", "--lr", "1e-3",
                          "--cooldown", "0.5"])
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "c" / "metrics.jsonl") as f:
        lrs = {rec["step"]: rec["lr"] for rec in map(json.loads, f) if "lr" in rec}
    # logged step s ran optimizer step s - 1: warm-up 1/2, 2/2, constant, then linear to 0 over the last 5 steps
    expected = [1e-3 * min(1, s / 2, (1 - (s - 1) / 10) / 0.5) for s in range(1, 11)]
    assert [lrs[s] for s in range(1, 11)] == pytest.approx(expected, rel=1e-6)


def test_killed_run_resumes_exactly(tmp_path):
    args = SMALL + ["--max-steps", "30", "--ckpt-every", "10", "--keep", "5", "--tread"]
    ref = run(args + ["--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
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
    resumed = run(args + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(tmp_path / "ref"), losses(out)
    assert sorted(b) == list(range(1, 31))  # lines logged after the checkpoint by the killed run were cut
    assert max(abs(a[s] - b[s]) for s in range(11, 31)) <= 1e-6
    final_a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_30" / "model.safetensors"))
    final_b = load_file(str(out / "checkpoints" / "step_30" / "model.safetensors"))
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


def test_first_run_writes_the_run_folder(tmp_path):
    out = tmp_path / "r"
    r = run(SMALL[:-2] + ["--out", str(out), "--max-steps", "4", "--eval-samples", "8", "--sample-steps", "2",
                          "--ema", "0.9", "--ema-every", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.load(open(out / "config.json"))
    assert config["args"]["hidden"] == 64 and "torch" in config["versions"] and config["model"]["hidden_size"] == 64
    result = json.load(open(out / "eval.json"))
    assert 0 <= result["caption_accuracy"] <= result["color_region_accuracy"] <= 1
    assert (out / "samples_4.png").exists() and (out / "checkpoints" / "step_4" / "ema.safetensors").exists()
    log = open(out / "log.txt").read()
    assert log.startswith("=== ") and all(f"=== {name}\n" in log for name in ("train.py", "model.py", "shapes.py"))
    assert "step 4/4 | loss" in r.stdout and "grad_norm" in r.stdout
    from model import PRXConfig, flops_per_sample
    record = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line][-1]
    text_tokens = 1 + len("a gray background with a large red circle in the top left".split())  # at least this
    flops = 3 * record["samples_per_s"] * flops_per_sample(PRXConfig(**config["model"]), 64, text_tokens)
    assert flops <= record["flops_per_s"] <= 2 * flops and record["mfu"] > 0  # 64 tokens: 32 px, patch 4
    assert 0 < record["data_share"] < 1 and 0 < record["optimizer_share"] < 1


@pytest.mark.parametrize("argv, message", [
    (["--pred", "z"], "argument --pred: invalid choice: 'z'"),
    (["--tread", "--sprint"], "--tread and --sprint are exclusive"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: no prepared dataset there"),
    (["--batch-size", "24", "--micro-batch", "16"], "must be a multiple of --micro-batch"),
    (["--resume"], "no checkpoint in"),
    (["--cooldown", "2"], "argument --cooldown: must be in [0, 1], got 2"),
])
def test_bad_input_fails_before_work(tmp_path, argv, message):
    r = run(["--out", str(tmp_path / "x"), *argv])
    assert r.returncode != 0 and message in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    r = run(SMALL + ["--out", str(out), "--max-steps", "40", "--ckpt-every", "1", "--lr", "1e30", "--warmup", "1",
                     "--grad-clip", "1e30"])
    assert r.returncode != 0 and "not finite" in r.stderr and "at step" in r.stderr, r.stderr[-1000:]
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
    r = run(args + ["--max-steps", "3"])
    assert r.returncode == 0, r.stderr[-2000:]
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_3" / "trainer.pt", weights_only=True)
    assert state["repa_proj"]["4.weight"].shape == (192, 1024)  # projector h -> 1024 -> 1024 -> teacher width
    assert "repa_proj.0.weight" not in load_file(str(tmp_path / "r" / "checkpoints" / "step_3" / "model.safetensors"))
    r = run(args + ["--max-steps", "5", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3, 4, 5]


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
    (["--caption-dropout", "2"], "argument --caption-dropout: must be in [0, 1]"),
    (["--lr", "0"], "argument --lr: must be in (0, inf)"),
    (["--max-time", "nan"], "argument --max-time"),
    (["--ema", "1.5"], "argument --ema"),
    (["--ema", "1"], "--ema must be a decay in (0, 1)"),
    (["--route-ratio", "0.3"], "--route-ratio needs --tread or --sprint"),
    (["--tread", "--route-ratio", "0"], "--route-ratio must be in (0, 1)"),
    (["--captions", "mixed"], "--captions mixed: the built-in dataset has long and short captions only"),
    (["--data", "a:0"], "--data: "),
    (["--eval-ref", "/nonexistent.npz"], "--eval-ref /nonexistent.npz: no such file"),
    (["--repa", "builtin", "--repa-teacher", "vit_tiny_patch16_224"], "--repa-teacher names a timm model"),
])
def test_every_flag_is_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.get_args(argv)
    assert message in capsys.readouterr().err


def test_cpu_track_values_apply_only_to_flags_not_given():
    args = train.get_args(["--lr", "5e-4", "--model=tiny"])
    assert args.lr == 5e-4 and args.model == "tiny" and args.warmup == train.CPU_TRACK["warmup"]
    assert "lr" not in args.cpu_track and "model" not in args.cpu_track and "warmup" in args.cpu_track
    prepared = train.get_parser().parse_args([])
    assert prepared.lr == 1e-4 and prepared.model == "small"  # the general defaults stay PRX's


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4; tests copy it."""
    out = tmp_path_factory.mktemp("runs") / "base"
    r = run(SMALL + ["--out", str(out), "--max-steps", "4", "--ckpt-every", "2", "--keep", "5"])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_model_tiny_on_builtin_data_and_bad_resolution(tmp_path):
    r = run(SMALL + ["--model", "tiny", "--out", str(tmp_path / "a"), "--max-steps", "1"])
    assert r.returncode == 0, r.stderr[-2000:]  # the built-in foreground weight suits any model on pixels
    r = run(SMALL + ["--resolution", "30", "--out", str(tmp_path / "b"), "--max-steps", "1"])
    assert r.returncode != 0 and "--resolution 30" in r.stderr and "patch size 4" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_an_out_that_holds_a_run_is_never_reused(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run(SMALL + ["--out", str(out), "--max-steps", "2"])
    assert r.returncode != 0 and "holds a run already" in r.stderr and "--resume" in r.stderr, r.stderr[-1000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_from_an_older_checkpoint_sets_the_newer_aside(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    old_step4 = (out / "checkpoints" / "step_4" / "model.safetensors").read_bytes()
    r = run(SMALL + ["--out", str(out), "--max-steps", "6", "--ckpt-every", "2", "--keep", "5", "--resume",
                     str(out / "checkpoints" / "step_2"), "--lr", "1e-3"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "moved 1 newer checkpoint(s) (step_4)" in r.stdout
    aside = list((out / "checkpoints").glob("abandoned-*/step_4"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == old_step4
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["step_2", "step_4", "step_6"]
    assert load_run(str(out))[2].endswith("step_6")  # eval.py's "latest" follows this history
    assert (out / "config.resume-2.json").exists()  # each resume's flags are kept; config.json is the first run's
    assert json.load(open(out / "config.json"))["args"]["lr"] == 2e-3
    assert json.load(open(out / "config.resume-2.json"))["args"]["lr"] == 1e-3
    assert sorted(losses(out)) == list(range(1, 7))


def test_corrupt_checkpoint_is_named_with_the_previous_one(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    weights = out / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(10)  # tensor bytes, same size
    weights.write_bytes(bytes(data))
    r = run(SMALL + ["--out", str(out), "--max-steps", "6", "--resume"])
    assert r.returncode != 0 and "step_4/model.safetensors is corrupt" in r.stderr, r.stderr[-1000:]
    assert "step_2" in r.stderr
    with pytest.raises(ValueError, match="corrupt"):
        load_run(str(out))


def test_torn_metrics_line_and_changed_flags_on_resume(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a crash in the middle of a write
    r = run(SMALL + ["--out", str(out), "--max-steps", "6", "--resume", "--hidden", "32", "--optimizer", "muon"])
    assert r.returncode != 0 and "cannot change on resume" in r.stderr, r.stderr[-1000:]
    assert "--hidden 64 -> 32" in r.stderr and "--optimizer adamw -> muon" in r.stderr
    r = run(SMALL + ["--out", str(out), "--max-steps", "6", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(losses(out)) == list(range(1, 7))


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


def test_missing_repa_weights_name_the_flag(tmp_path):
    r = run(SMALL + ["--repa", "dinov2", "--repa-weights", "/nonexistent.safetensors", "--out", str(tmp_path / "r"),
                     "--max-steps", "1"])
    assert r.returncode != 0 and "--repa-weights /nonexistent.safetensors: no such file" in r.stderr, r.stderr[-1000:]


def test_repa_builtin_teacher_trains(tmp_path):
    r = run(SMALL + ["--repa", "builtin", "--out", str(tmp_path / "r"), "--max-steps", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_2" / "trainer.pt", weights_only=True)
    assert state["repa_proj"]["4.weight"].shape == (32, 1024)  # the built-in teacher's 32-wide tokens
