"""train.py --fsdp (FSDP2) on 2 gloo processes: the losses of DDP, an exact resume, and a resume on 1 process from
the sharded run's checkpoint. One torchrun launch per run: re-initialising a process group in a process reuses the
store's keys, so two runs in one launch race."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import ROOT, SMALL, losses, run

# Muon on the blocks and AdamW on the rest; EMA and REPA: every kind of state a checkpoint holds. An evaluation each
# step, checkpoints at even ones: the EMA update after step 1's evaluation meets the weights the evaluation left
FLAGS = SMALL + ["--optimizer", "muon", "--ema", "0.9", "--ema-every", "1", "--repa", "builtin", "--max-steps", "4",
                 "--ckpt-every", "2", "--eval-every", "1", "--eval-samples", "2", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP 4 steps; FSDP 4 steps (checkpoints at 2 and 4); a copy of the FSDP run stopped at 2, resumed to 4."""
    tmp = tmp_path_factory.mktemp("fsdp")
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        r = run(FLAGS + flags + ["--out", str(tmp / name)], nproc=2)
        assert r.returncode == 0, r.stderr  # whole: an aborting rank's message is not in torchrun's last lines
    shutil.copytree(tmp / "fsdp", tmp / "resumed", ignore=shutil.ignore_patterns("step_4", "metrics.jsonl"))
    r = run(FLAGS + ["--fsdp", "--out", str(tmp / "resumed"), "--resume"], nproc=2)
    assert r.returncode == 0, r.stderr
    return tmp


@pytest.mark.slow  # its fixture: three 2-process launches (~40 s)
def test_fsdp_matches_ddp(runs):
    a, b = losses(runs / "ddp"), losses(runs / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and len(set(a.values())) == 4
    # the same fp32 arithmetic but for the order of the gradient reductions (all-reduce vs reduce-scatter)
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5, (a, b)
    for file in ("model.safetensors", "ema.safetensors"):
        ddp, fsdp = (load_file(str(runs / name / "checkpoints" / "step_4" / file)) for name in ("ddp", "fsdp"))
        # Newton-Schulz runs in bf16: a gradient's last-bit difference may flip the rounding of an update entry,
        # which moves that weight by lr x scale x 2^-8 (2e-3 x 3 x 2^-8 = 2e-5, measured 1.9e-5); a wrong shard O(lr)
        assert ddp.keys() == fsdp.keys() and all(torch.allclose(ddp[k], fsdp[k], rtol=0, atol=1e-4) for k in ddp)


def test_fsdp_evaluates_the_ema_and_goes_on_sharded(runs):
    """An evaluation's forward has no backward, after which FSDP2 would leave the root's weights gathered: the next
    EMA update then met plain tensors among the DTensors (a RuntimeError), and on CUDA the checkpoint bf16 weights.
    The fixture's FSDP run (its launch ran to the end) evaluates at step 1, which writes no checkpoint (gathering its
    state reshards), then updates the EMA."""
    evals = [r["step"] for r in map(json.loads, open(runs / "fsdp" / "metrics.jsonl")) if "object_accuracy" in r]
    ema = load_file(str(runs / "fsdp" / "checkpoints" / "step_2" / "ema.safetensors"))
    assert evals == [1, 2, 3, 4] and all(t.dtype == torch.float32 for t in ema.values())


def test_fsdp_resumes_exactly(runs):
    a, b = losses(runs / "fsdp"), losses(runs / "resumed")
    assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)
    for name in ("model.safetensors", "ema.safetensors"):
        whole, resumed = (load_file(str(runs / run / "checkpoints" / "step_4" / name)) for run in ("fsdp", "resumed"))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name
    state = torch.load(runs / "resumed" / "checkpoints" / "step_4" / "trainer.pt", weights_only=True)
    # whole tensors keyed by parameter name: the checkpoint loads on any number of processes, sharded or not
    momentum = state["optimizer"][0]["state"]["blocks.0.attention.img_qkv_proj.weight"]["momentum_buffer"]
    assert type(momentum) is torch.Tensor and momentum.shape == (3 * 64, 64)
    assert state["repa"]["projector"]["4.weight"].shape == (32, 32)


def test_one_process_resumes_a_sharded_checkpoint(runs, tmp_path):
    shutil.copytree(runs / "fsdp", tmp_path / "one", ignore=shutil.ignore_patterns("step_4", "metrics.jsonl"))
    train.main(FLAGS + ["--out", str(tmp_path / "one"), "--resume"])  # from step 2, without --fsdp
    a, b = losses(runs / "fsdp"), losses(tmp_path / "one")
    assert sorted(b) == [3, 4] and max(abs(a[s] - b[s]) for s in b) <= 1e-4, (a, b)  # 1 process vs 2: sum order


@pytest.mark.parametrize("argv, env, message", [
    ([], {}, "torchrun"),
    (["--eval-samples", "256"], {"RANK": "0", "WORLD_SIZE": "3"}, "multiple of the 3 processes"),
    pytest.param(["--precision", "bf16"], {"RANK": "0", "WORLD_SIZE": "2"}, "without autocast",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's sampler")),
])
def test_fsdp_refusals(argv, env, message, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit):
        train.get_args(["--fsdp"] + argv)
    assert message in capsys.readouterr().err


def run_patched(tmp_path, patch, args):
    """train.py on 2 gloo processes, each running `patch` first (Python, with train imported): the way to change a
    torchrun rank's code in a test. The rank leaves as train.py's __main__ does (os._exit after flushing): gloo can
    abort the interpreter's teardown of a finished run."""
    script = tmp_path / "patched_train.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport train\n{patch}\ntrain.main()\n"
                      "sys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)\n")
    return run(args, nproc=2, script=script)


# dynamo's eager backend (its tracing and guards, without minutes of compiling), each rank's batches from the sixth
# on 3 tokens shorter in text (the compile warm-up reads batches 0-4, 5 steps of one, and rewinds; timed steps 6 and 7
# read 5 and 6)
SHORTER_TEXT_AFTER_THE_WARM_UP = """
import shapes, torch
compile, next_batch = torch.compile, shapes.ShapesLoader.__next__
torch.compile = lambda model: compile(model, backend="eager")
def next_shorter(loader):
    late, batch = loader.batches >= 5, next_batch(loader)
    return {**batch, "txt": batch["txt"][:, :-3], "txt_mask": batch["txt_mask"][:, :-3]} if late else batch
shapes.ShapesLoader.__next__ = next_shorter
"""


def test_fsdp_compiled_blocks_meet_a_new_text_length_in_the_warm_up(tmp_path):
    """--fsdp --compile compiles each block alone; a block takes txt_in's output, which dynamo keeps static in length
    until it has seen the length change: the warm-up changes it, so no timed step meets a new graph."""
    r = run_patched(tmp_path, SHORTER_TEXT_AFTER_THE_WARM_UP, SMALL + ["--caption-dropout", "0", "--max-steps", "7",
                                                                       "--compile", "--fsdp", "--out", str(tmp_path / "r")])
    assert r.returncode == 0, r.stderr
    assert "step 7/7" in r.stdout and "compiled a new graph" not in r.stdout, r.stdout


# rank 1 reads a clock running 10 times as fast as rank 0's
FAST_CLOCK_ON_RANK_1 = """
import os, time, types
if os.environ["RANK"] == "1":
    train.time = types.SimpleNamespace(perf_counter=lambda: 10 * time.perf_counter())
"""


def test_processes_end_the_time_budget_together(tmp_path):
    """--max-time ends the run at rank 0's clock on every rank: a rank whose clock ran ahead would stop first and
    leave the other waiting in a collective."""
    r = run_patched(tmp_path, FAST_CLOCK_ON_RANK_1, SMALL + ["--max-time", "0.02", "--out", str(tmp_path / "r")])
    assert r.returncode == 0, r.stderr
    record = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")][-1]
    assert record["train_time_s"] >= 1.2  # rank 0's clock: 0.02 minutes
