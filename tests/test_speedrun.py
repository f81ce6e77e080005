"""The speedrun's machinery: speedrun.sh end to end (--smoke), records/verify.py on a synthetic record and on
tampered copies of it, records/leaderboard.py, and train.py's track choice and --target."""
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import scipy.stats
import torch

import train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "records"))
import leaderboard  # noqa: E402
import verify  # noqa: E402

HEAD = verify.git("rev-parse", "HEAD").stdout.strip()
RUNS = {0: (25.0, 0.305), 1: (26.0, 0.310), 2: (24.0, 0.300), 3: (25.0, 0.305)}  # seed: (minutes, object_accuracy)
SAMPLING = dict(steps=20, cfg_scale=3.0, shift=1.0, pred="v", route_ratio=0.5, self_guidance=0.0)


def synthetic_log(seed, minutes, accuracy, target, lr=0.002, name="r", cpu="AMD EPYC 7B13", started=True, every=250,
                  runs=4):
    """A CPU-track run's log as train.py writes it (the source of HEAD, config.json, step and eval lines) with
    speedrun.sh's full evaluation after it; started=False: a log from before train.py wrote its start time."""
    reached = bool(target) and accuracy >= target[1]  # it stops there, else at its time budget
    args = dict(track="cpu", data="builtin", resolution=32, eval_data=None, captions="long", seed=seed,
                out=f"runs/{name}-{seed}", target=target, lr=lr, max_steps=100_000, eval_every=every, eval_samples=256,
                max_time=60.0 if reached else minutes)
    config = dict(args=args, world_size=1, git_commit=HEAD, sampling=SAMPLING,
                  weights_sha256={"--repa builtin": verify.committed_sha256(HEAD, verify.TEACHER)},
                  devices=dict(cpu=cpu, cpu_flags=["avx2", "avx512f"], cores=2, threads=1),
                  **({"started": f"2026-12-05T10:{seed:02d}:00"} if started else {}))
    ms, steps = round(minutes * 60_000), 3000
    console = ["peak 5.8e+10 FLOP/s per process: fp32 matmul 1024^3, measured"]
    console += [f"step {s}/100000 | loss 0.1000 | train_time {ms * s // steps}ms | step_avg {ms / steps:.2f}ms | "
                f"eta 0:00:00" for s in (1000, 2000, 3000)]
    console.append(f"eval step {steps} | caption_accuracy 0.1000 | object_accuracy {accuracy:.4f} | train_time {ms}ms")
    if reached:
        console.append(f"target object_accuracy {target[1]:g} reached at step {steps}: stopping")
    confirm = dict(metrics=dict(object_accuracy=accuracy), data="builtin", num_samples=1024, seed=42, ref=None,
                   sampling=SAMPLING, settings={}, checkpoint=f"step_{steps}", weights="model")
    sources = "".join(f"=== {name}\n{text}\n" for name, text in sorted(verify.committed_sources(HEAD).items()))
    return (sources + "=== config.json\n" + json.dumps(config, indent=2) + "\n" + "\n".join(console) + "\n" +
            "=== confirm.json\n" + json.dumps(confirm, indent=2) + "\n" + f"=== attempt.json\n{{\"runs\": {runs}}}\n")


def make_record(folder, runs=RUNS, kind="record", beside=None, lr=0.002, cpu="AMD EPYC 7B13", replaced_lr=0.002,
                every=250):
    """A record folder of synthetic runs of --lr lr; beside: {seed: (minutes, accuracy)} of runs at --lr replaced_lr
    (the configuration it replaces) in beside/, on the same machine; both evaluate every `every` steps. Without
    beside runs, logs from before train.py wrote the start time (as the records before the sixth CPU record's)."""
    target = ("object_accuracy", 0.292) if kind == "record" else None
    folder.mkdir(parents=True)
    for where, name, rate, group in ((folder, "r", lr, runs), (folder / "beside", "b", replaced_lr, beside or {})):
        for seed, (minutes, accuracy) in group.items():
            where.mkdir(exist_ok=True)
            log = synthetic_log(seed, minutes, accuracy, target, rate, name, cpu, started=bool(beside), every=every,
                                runs=len(group))
            (where / f"log_{seed}.txt").write_text(log)
    write_readme(folder, kind, f"synthetic {kind}")
    return folder


def write_readme(folder, kind, what):
    """The README with the results block of the logs, as verify.py --write makes it but unchecked (records that fail
    are made too), and the sources it carries."""
    runs, beside = verify.load_runs(folder), verify.load_runs(folder / "beside")
    verify.carry_sources(runs, folder)
    verify.carry_sources(beside, folder / "beside")
    (folder / "README.md").write_text(verify.new_readme(folder, runs, beside, "cpu", kind, what,
                                                        "bash speedrun.sh --track cpu"))


@pytest.fixture
def cpu_target(monkeypatch, tmp_path):
    """The synthetic records' figures are set against a target of 0.292 from a synthetic calibration of HEAD's
    task, whatever the real calibration makes it."""
    monkeypatch.setitem(verify.TRACKS["cpu"], "target", 0.292)
    calibration = make_record(tmp_path / "calibration", {0: (30.0, 0.29), 1: (30.0, 0.294), 2: (30.0, 0.292),
                                                         3: (30.0, 0.292)}, "calibration")
    monkeypatch.setitem(verify.TRACKS["cpu"], "target_from", str(calibration))
    return calibration


@pytest.fixture
def record(tmp_path, cpu_target):
    return make_record(tmp_path / "records" / "2026-12-02_synthetic")


LR_DEF = "def learning_rate(args, step, train_time):"  # in train.py alone
# Every test's edit of train.py is this one: the edited sources' task and evaluation fingerprints (~3 s) are computed
# once per process (verify.fingerprint's cache), whatever test edits them first.
TRAIN_PY_EDIT = (LR_DEF, LR_DEF + "  #")


def edit(path, old, new, after=""):
    """Replace old by new in a file, in the part after the first `after`."""
    text = path.read_text()
    cut = text.index(after)
    assert old in text[cut:]
    path.write_text(text[:cut] + text[cut:].replace(old, new))


def move_run(folder, seed, new_seed):
    """Seed `seed`'s run becomes seed `new_seed`'s (its log, --seed and --out), as if the runs between were left out."""
    edit(folder / f"log_{seed}.txt", f'"seed": {seed}', f'"seed": {new_seed}')
    edit(folder / f"log_{seed}.txt", f"runs/r-{seed}", f"runs/r-{new_seed}")
    (folder / f"log_{seed}.txt").rename(folder / f"log_{new_seed}.txt")


def drop_source(log, name):
    text = log.read_text()
    start = text.index(f"=== {name}\n")
    log.write_text(text[:start] + text[text.index("\n=== ", start) + 1:])


def own_source(folder, log, name, old, new):
    """One run's source of `name` edited, and carried into the folder as verify.py --write does: a valid source, another
    run's."""
    edit(folder / log, old, new)
    (folder / name).write_text(verify.sections((folder / log).read_text())[name][:-1])


def add_source(folder, name, text):
    """A new top-level source in every run's log (the logs list the sources by name), carried into the folder."""
    for log in folder.glob("log_*.txt"):
        edit(log, "=== config.json\n", f"=== {name}\n{text}\n=== config.json\n")
    (folder / name).write_text(text)


def test_an_x86_cpu_with_avx2_passes_whatever_its_name(record):
    """A VM may hide its CPU's model ("Common KVM processor"); its vector units (AVX2: x86's alone) tell."""
    for k in RUNS:
        edit(record / f"log_{k}.txt", "AMD EPYC 7B13", "Common KVM processor")
    assert verify.verify(record) == []


def test_a_good_synthetic_record_passes(record, capsys):
    assert verify.verify(record) == []
    readme = (record / "README.md").read_text()
    assert readme.startswith("# 2026-12-02_synthetic\n\nWhat changed: synthetic record\n")
    assert f"| [log_1.txt](log_1.txt) | 1 | 3000 | 1560.0 s | 0.3100 | {HEAD[:8]} | 5.8e+10 |" in readme
    assert "- train time: mean 1500.0 s (25.00 min), sd 49.0 s, 4 runs" in readme
    assert "one-sided t-test against 0.292: t 6.37, p 0.00392" in readme
    verify.main([str(record)])  # the command line, in this process: the fixture's target holds
    assert capsys.readouterr().out.startswith("ok ")


@pytest.mark.parametrize("tamper, message", [
    (lambda f: edit(f / "README.md", "1560.0 s", "1460.0 s"), "README's results say"),
    (lambda f: edit(f / "log_1.txt", "0.3100 | train_time 1560000ms", "0.3100 | train_time 1460000ms"),
     "log_1.txt: step 3000 at 1460000 ms comes after step 3000 at 1560000 ms: the clock goes backwards"),
    (lambda f: edit(f / "log_0.txt", *TRAIN_PY_EDIT),
     "log_0.txt: the source of train.py matches neither commit"),
    (lambda f: [(f / f"log_{k}.txt").unlink() for k in (2, 3)], "2 runs; the rules need at least 3"),
    (lambda f: (f / "log_3.txt").unlink(), "3 runs: cpu runs go in pairs"),
    (lambda f: [edit(f / f"log_{k}.txt", '"object_accuracy",\n      0.292', '"object_accuracy",\n      0.2')
                for k in RUNS],
     "log_0.txt: --target object_accuracy 0.2: the cpu track's runs stop at object_accuracy 0.292 or beyond it"),
    (lambda f: edit(f / "log_1.txt", "step 2000/100000", "step 500/100000"),
     "log_1.txt: step 500 at 1040000 ms comes after step 1000 at 520000 ms: the clock goes backwards"),
    (lambda f: edit(f / "log_1.txt", "step_avg 520.00ms", "step_avg 519.50ms"),
     "log_1.txt: step 1000: step_avg 519.5ms is not train_time / step (520.00ms)"),
    (lambda f: edit(f / "log_1.txt", "eval step 3000 | caption_accuracy 0.1000 | object_accuracy 0.3100 | "
                                     "train_time 1560000ms\n", ""), "log_1.txt: does not end on an evaluation"),
    (lambda f: drop_source(f / "log_1.txt", "model.py"), "log_1.txt: no source of model.py, which commit"),
    (lambda f: add_source(f, "tqdm.py", "from shapes import *  # imported for the library"),
     "log_0.txt: its tqdm.py takes the place of the installed module "),
    (lambda f: edit(f / "log_1.txt", HEAD, "0" * 40), f"log_1.txt: names commit {'0' * 8}, which this repository "
                                                       f"lacks: its sources cannot be checked"),
    # one configuration per record: the flags and the sources of every run
    (lambda f: edit(f / "log_1.txt", '"lr": 0.002', '"lr": 0.003'),
     "log_1.txt: --lr 0.003 (theirs 0.002) differs from log_0.txt's, which 3 of the 4 runs share"),
    (lambda f: own_source(f, "log_1.txt", "train.py", *TRAIN_PY_EDIT),
     "log_1.txt: the source of train.py differs from log_0.txt's"),
    # the run and its evaluation as the track's protocol has them
    (lambda f: edit(f / "log_1.txt", "=== confirm.json", "=== config.resume-1000.json\n{}\n=== confirm.json"),
     "log_1.txt: resumed is True, the rules say False"),
    (lambda f: edit(f / "log_1.txt", '"world_size": 1', '"world_size": 2'), "log_1.txt: processes is 2, the rules say 1"),
    (lambda f: edit(f / "log_1.txt", '"eval_data": null', '"eval_data": "data/other"'),
     "log_1.txt: --eval-data is 'data/other', the rules say None"),
    (lambda f: edit(f / "log_1.txt", '"captions": "long"', '"captions": "short"'),
     "log_1.txt: eval captions is 'short', the rules say 'long'"),
    (lambda f: edit(f / "log_1.txt", '"seed": 42', '"seed": 7', after="=== confirm.json"),
     "log_1.txt: eval noise seed is 7, the rules say 42"),
    (lambda f: edit(f / "log_1.txt", '"data": "builtin"', '"data": "data/other"', after="=== confirm.json"),
     "log_1.txt: evaluated data is 'data/other', the rules say 'builtin'"),
    (lambda f: edit(f / "log_1.txt", '"object_accuracy": 0.31', '"caption_accuracy": 0.31', after="=== confirm.json"),
     "log_1.txt: metrics is ['caption_accuracy'], the rules say ['caption_accuracy', 'object_accuracy']"),
    (lambda f: edit(f / "log_1.txt", verify.committed_sha256(HEAD, verify.TEACHER), "0" * 64),
     "log_1.txt: the built-in REPA teacher's sha256 is '0000"),  # another teacher than its commit's
    (lambda f: edit(f / "log_1.txt", '"lr": 0.002', '"lr": 0.002, "repa_weights": "README.md"', after="=== config"),
     f"the rules say '{verify.committed_sha256(HEAD, 'README.md')}'"),  # --repa-weights: that committed file's
    (lambda f: edit(f / "log_1.txt", '"steps": 20', '"steps": 10', after="=== confirm.json"),
     "log_1.txt: sampler steps is 10, the rules say 20"),
    (lambda f: edit(f / "log_1.txt", '"cfg_scale": 3.0', '"cfg_scale": 2.0', after="=== confirm.json"),
     "log_1.txt: cfg scale is 2.0, the rules say 3.0"),
    (lambda f: edit(f / "log_1.txt", '"step_3000"', '"step_2000"', after="=== confirm.json"),
     "log_1.txt: evaluated checkpoint is 'step_2000', the rules say 'step_3000'"),
    (lambda f: edit(f / "log_1.txt", '"lr": 0.002', '"lr": 0.002, "ema": 0.95', after="=== config.json"),
     "log_1.txt: evaluated weights is 'model', the rules say 'ema'"),
    (lambda f: edit(f / "log_1.txt", '"eval_samples": 256', '"eval_samples": 64', after="=== config.json"),
     "log_1.txt: the periodic check's --eval-samples is 64, the rules say 256"),
    (lambda f: edit(f / "log_2.txt", '"threads": 1', '"threads": 2'), "log_2.txt: torch threads is 2, the rules say 1"),
    (lambda f: edit(f / "log_2.txt", '"cores": 2', '"cores": 4'), "log_2.txt: CPU cores is 4, the rules say 2"),
    (lambda f: [edit(f / "log_2.txt", "AMD EPYC 7B13", "Apple M2"), edit(f / "log_2.txt", '"cpu_flags": [\n      '
                '"avx2",\n      "avx512f"\n    ],\n    ', '')],  # a log without the CPU's units: its name decides
     "log_2.txt: CPU is 'Apple M2', the rules say 'an x86"),
    (lambda f: edit(f / "log_2.txt", '"avx2"', '"sse4_2"', after="=== config.json"),
     "log_2.txt: CPU's AVX2 is False, the rules say True"),
    # eval.py follows the run's own shift, prediction, routing and self-guidance (config.json), not other ones
    (lambda f: edit(f / "log_1.txt", '"shift": 1.0', '"shift": 3.0', after="=== confirm.json"),
     "log_1.txt: eval shift (the run's own: config.json 'sampling', eval.py's default) is 3.0, the rules say 1.0"),
    (lambda f: edit(f / "log_1.txt", '"pred": "v"', '"pred": "x"', after="=== confirm.json"), "eval pred (the run"),
    (lambda f: edit(f / "log_1.txt", '"self_guidance": 0.0', '"self_guidance": 2.0', after="=== confirm.json"),
     "eval self_guidance (the run"),
    (lambda f: edit(f / "log_1.txt", '"route_ratio": 0.5', '"route_ratio": 0.25', after="=== confirm.json"),
     "eval route_ratio (the run"),
    # a log cut after an evaluation the run went on from: neither its target reached nor its budget spent
    (lambda f: edit(f / "log_1.txt", "target object_accuracy 0.292 reached at step 3000: stopping\n", ""),
     "log_1.txt: its last evaluation (step 3000, 1560000 ms) neither reaches its --target"),
    (lambda f: edit(f / "log_1.txt", "object_accuracy 0.3100 | train_time", "object_accuracy 0.2800 | train_time"),
     "log_1.txt: says --target object_accuracy 0.292 was reached at step 3000, where it scored 0.28"),
    # runs left out (rule 1): seeds not 0..n-1, or runs of another attempt (another --out NAME)
    (lambda f: edit(f / "log_2.txt", '"seed": 2', '"seed": 7'), "the runs are not one attempt's seeds 0..3"),
    (lambda f: edit(f / "log_2.txt", "runs/r-2", "runs/other-2"), "the runs are not one attempt's seeds 0..3"),
    (lambda f: move_run(f, 3, 5), "the runs are not one attempt's seeds 0..3 (seeds [0, 1, 2, 5]"),
    (lambda f: [edit(f / f"log_{k}.txt", '{"runs": 4}', '{"runs": 6}') for k in range(4)],  # seeds 4, 5 left out
     "the folder holds 4 runs, whose logs say their attempt made [6, 6, 6, 6]"),
    (lambda f: edit(f / "log_2.txt", '{"runs": 4}', '{"runs": 5}'), "whose logs say their attempt made [4, 4, 5, 4]"),
    (lambda f: [edit(f / f"log_{k}.txt", '{"runs": 4}', '{"runs": 2}') for k in range(4)],  # fewer than it holds
     "the folder holds 4 runs, whose logs say their attempt made [2, 2, 2, 2]"),
    (lambda f: [(f / "log_0.txt").rename(f / "tmp"), (f / "log_1.txt").rename(f / "log_0.txt"),
                (f / "tmp").rename(f / "log_1.txt")], "the runs are not one attempt's seeds 0..3"),  # log_k: seed k's
    (lambda f: edit(f / "log_1.txt", "object_accuracy 0.3100 | train_time", "object_accuracy 0.2910 | train_time"),
     "log_1.txt: says --target object_accuracy 0.292 was reached at step 3000, where it scored 0.291"),
    (lambda f: edit(f / "log_1.txt", "reached at step 3000: stopping", "reached at step 1000: stopping"),
     "log_1.txt: its last evaluation (step 3000, 1560000 ms) neither reaches its --target"),  # the stop is another's
    (lambda f: [edit(f / "log_1.txt", *TRAIN_PY_EDIT),
                (f / "train.py").write_text("another train.py")],
     "log_1.txt: the source of train.py matches neither commit"),  # a copy of another text whitelists nothing
    # the task through the interfaces runs use: the evaluated split, the metric, the training data
    (lambda f: edit(f / "log_1.txt", 'ShapesDataset(seed=10_000 + seed, split="heldout")',
                    'ShapesDataset(seed=10_000 + seed, split="train")'),
     "log_1.txt: its shapes.py (or data.py's way to it) draws or reads other"),
    (lambda f: edit(f / "log_1.txt", '"object": float(np.mean([np.mean([r["full"]',
                    '"object": float(np.mean([np.mean([r["color_region"]'),
     "log_1.txt: its shapes.py (or data.py's way to it) draws or reads"),
    # the evaluation, fixed: eval.py's guidance and its averaging over uneven batches
    (lambda f: [own_source(f, f"log_{k}.txt", "eval.py", "return uncond + cfg_scale * (cond - uncond)",
                           "return cond + cfg_scale * (cond - uncond)") for k in range(4)],
     "log_0.txt: its eval.py samples or averages otherwise than that of"),
    (lambda f: [own_source(f, f"log_{k}.txt", "eval.py", "sums.get(key, 0.0) + value * len(idx)",
                           "sums.get(key, 0.0) + value") for k in range(4)],
     "log_0.txt: its eval.py samples or averages otherwise than that of"),
    (lambda f: edit(f / "log_1.txt", "self.dataset, self.encoder = ShapesDataset(seed)",
                    'self.dataset, self.encoder = ShapesDataset(10_000 + seed, "heldout")'),
     "log_1.txt: its shapes.py (or data.py's way to it) draws or reads other"),
    # the same task, reached otherwise: evaluating on other scenes, training on the held-out ones
    (lambda f: own_source(f, "log_1.txt", "data.py", "return HeldoutShapes(seed, caption,",
                          "return HeldoutShapes(seed + 1, caption,"),
     "log_1.txt: its shapes.py (or data.py's way to it) draws or reads other"),
    (lambda f: own_source(f, "log_1.txt", "data.py", "return ShapesLoader(batch_size, rank, world_size, seed,",
                          "return ShapesLoader(batch_size, rank, world_size, 10_000 + seed,"),
     "log_1.txt: its shapes.py (or data.py's way to it) draws or reads other"),
])
def test_a_tampered_record_fails(record, tamper, message):
    tamper(record)
    problems = verify.verify(record)
    assert any(message in p for p in problems), problems


def test_python_of_the_commit_that_no_log_holds_is_named(monkeypatch):
    """A package beside the top-level sources would be imported by the runs unseen (the logs hold the top-level .py
    files); tests/ and records/ are not the runs' code."""
    assert verify.unlogged_python(HEAD) == []
    listing = ["train.py", "tests/test_train.py", "records/verify.py", "tqdm/__init__.py", "my lib/x y.py", "café/a.py",
               "shapes_teacher.safetensors"]  # git ls-tree -z: names as they are, NUL-separated
    monkeypatch.setattr(verify, "git", lambda *argv: SimpleNamespace(stdout="\0".join(listing) + "\0"))
    assert verify.unlogged_python.__wrapped__("c") == ["tqdm/__init__.py", "my lib/x y.py", "café/a.py"]


def gpu_run(gpus=("NVIDIA H100 80GB HBM3",), data="data/mj"):
    """A 1gpu-track run as verify.parse_log reads it: the H100 80GB SXM is "NVIDIA H100 80GB HBM3" to torch."""
    sampling = dict(SAMPLING, steps=50, cfg_scale=3.5)
    args = dict(track="1gpu", data=data, resolution=256, eval_data=None, captions="long", seed=0, eval_samples=2048,
                eval_every=2500, eval_ref="data/mj/ref-2k.npz", eval_minutes=[], sample_steps=50, cfg_scale=3.5)
    return dict(name="log_0.txt", resumed=False, config=dict(
        args=args, world_size=1, sampling=sampling, devices=dict(gpus=list(gpus), driver="550", cuda="12.4")),
        confirm=dict(metrics=dict(fid=20.0), data=data, num_samples=10_000, seed=42, sampling=sampling,
                     settings=dict(fid="torch-fidelity 0.3.0 inception-v3-compat 2048 tf1-resize"),
                     ref_images="sha256 ab12"))


@pytest.mark.parametrize("run, message", [
    (gpu_run(["NVIDIA H100 PCIe"]), "GPUs is ['NVIDIA H100 PCIe'], the rules say ['NVIDIA H100 80GB HBM3']"),
    (gpu_run(["NVIDIA H100 NVL"]), "GPUs is ['NVIDIA H100 NVL']"),
    (gpu_run(data="data/other"), "--data is 'data/other', the rules say 'data/mj'"),
    (dict(gpu_run(), config=dict(gpu_run()["config"], args=dict(gpu_run()["config"]["args"], eval_every=1000))),
     "the periodic check's --eval-every is 1000, the rules say 2500"),
    (dict(gpu_run(), config=dict(gpu_run()["config"], args=dict(gpu_run()["config"]["args"], eval_minutes=[60.0]))),
     "the periodic check's --eval-minutes is [60.0], the rules say []"),  # more checks: an earlier stop
    (dict(gpu_run(), config=dict(gpu_run()["config"], args=dict(gpu_run()["config"]["args"], sample_steps=100))),
     "the periodic check's --sample-steps is 100, the rules say 50"),  # the scale the track's stop is read on
    (dict(gpu_run(), confirm=dict(gpu_run()["confirm"], settings=dict(fid="clean-fid inception-v3 2048"))),
     "FID network is 'clean-fid inception-v3 2048', the rules say \"torch-fidelity's inception-v3-compat 2048\""),
])
def test_a_gpu_run_on_other_hardware_or_data_fails(run, message):
    assert verify.check_run(gpu_run(), "1gpu") == []
    problems = verify.check_run(run, "1gpu")
    assert len(problems) == 1 and problems[0].startswith(f"log_0.txt: {message}"), problems


def test_a_gpu_run_against_another_fid_reference_than_the_calibrations_fails(monkeypatch):
    monkeypatch.setitem(verify.TRACKS["1gpu"], "ref_images", "sha256 cd34")  # as its calibration will set it
    assert verify.check_run(gpu_run(), "1gpu") == [
        "log_0.txt: FID reference's images is 'sha256 ab12', the rules say 'sha256 cd34'"]


def attempt_runs(values, metric="fid", seconds=None):
    """One attempt's runs (seeds 0.., gpu_run's flags and hardware) as check_runs, summary and check_record read
    them: each with its full evaluation's `metric`, trained its seconds (600 each by default)."""
    runs = []
    for k, (value, s) in enumerate(zip(values, seconds or [600.0] * len(values))):
        run, args = gpu_run(), dict(gpu_run()["config"]["args"], seed=k, out=f"runs/g-{k}")
        runs.append(dict(run, name=f"log_{k}.txt", attempt={"runs": len(values)}, sources={},
                         config=dict(run["config"], args=args), confirm=dict(run["confirm"], metrics={metric: value}),
                         timeline=[(5000, round(1000 * s), None, {metric: value})]))
    return runs


def test_a_gpu_record_is_judged_the_lower_is_better_way(monkeypatch):
    """FID: the one-sided t-test asks whether the mean is below the target, and a run that says it reached its
    --target scored at or below it (the GPU tracks' targets are None until calibrated: set one here)."""
    monkeypatch.setitem(verify.TRACKS["1gpu"], "target", 20.0)
    below, above = (verify.summary(attempt_runs(fids), "1gpu") for fids in ([18.0, 18.5, 19.0], [21.0, 22.0, 21.5]))
    assert below["lower"] and below["meets"] and below["p"] == pytest.approx(0.0175, abs=1e-4)
    assert not above["meets"] and above["p"] == pytest.approx(0.9825, abs=1e-4)

    def stopped(fid):  # the last evaluation of a run that says it reached --target fid 25 there
        return dict(name="log_0.txt", config=dict(args=dict(target=["fid", 25.0], max_steps=100_000, max_time=None)),
                    timeline=[(5000, 1_000_000, None, {"fid": fid})], stopped=5000)
    assert verify.check_stop(stopped(26.0)) == [
        "log_0.txt: says --target fid 25.0 was reached at step 5000, where it scored 26.0"]
    assert verify.check_stop(stopped(24.9)) == [] and verify.check_stop(stopped(25.0)) == []
    monkeypatch.setitem(verify.TRACKS["1gpu"], "stop", 25.0)  # the periodic check's reading of the target
    runs = attempt_runs([18.0, 18.5, 19.0])
    for aim, refused in ((26.0, True), (25.0, False), (24.0, False), (None, False)):  # None: a fixed budget
        runs[1]["config"]["args"]["target"] = aim and ["fid", aim]
        assert verify.check_stopping_value(runs, "1gpu") == [
            f"log_1.txt: --target fid {aim}: the 1gpu track's runs stop at fid 25.0 or beyond it (records/RULES.md: "
            f"STOP may not pass the track's stop)"] * refused


def test_a_run_stops_at_its_last_step_or_its_time():
    """Without a --target the budget ends the run: its last evaluation at --max-steps (not one step before it), or at
    --max-time."""
    def ending(step, ms=1_000_000, max_time=None):
        return dict(name="log_0.txt", config=dict(args=dict(target=None, max_steps=3000, max_time=max_time)),
                    timeline=[(step, ms, None, {"object_accuracy": 0.3})], stopped=None)
    assert verify.check_stop(ending(3000)) == [] and verify.check_stop(ending(2999, 60_000, max_time=1.0)) == []
    assert verify.check_stop(ending(2999, 59_000, max_time=1.0))  # a second short of its budget: cut, not ended
    assert verify.check_stop(ending(2999)) == [
        "log_0.txt: its last evaluation (step 2999, 1000000 ms) neither reaches its --target None nor ends its budget "
        "(--max-steps 3000, --max-time None): the log ends before the run did"]


def test_the_gpu_tracks_take_three_runs_and_the_8gpu_track_eight_gpus():
    eight = gpu_run(["NVIDIA H100 80GB HBM3"] * 8)
    eight["config"] = dict(eight["config"], world_size=8, args=dict(eight["config"]["args"], track="8gpu"))
    assert verify.check_run(eight, "8gpu") == []
    four = dict(eight, config=dict(eight["config"], world_size=4, devices=dict(gpus=["NVIDIA H100 80GB HBM3"] * 4)))
    assert "log_0.txt: processes is 4, the rules say 8" in verify.check_run(four, "8gpu")
    for track in ("8gpu", "1gpu"):
        assert verify.check_runs(attempt_runs([20.0, 21.0]), track) == ["2 runs; the rules need at least 3"]
        assert verify.check_runs(attempt_runs([20.0, 21.0, 20.5]), track) == []  # three are enough, in no pairs
    assert {"runs=3", "world=8", "lower=1", "samples=10000"} <= set(verify.protocol("8gpu").splitlines())


def test_a_record_needs_p_below_p_max_and_its_figures_are_means(monkeypatch):
    """check_record on the smoke track (no task to probe): a mean above the target whose one-sided p lies between 0.05
    and 0.1 is not a record; the mean time and metric are means, not medians."""
    monkeypatch.setitem(verify.TRACKS["smoke"], "target", 0.3)
    values = [0.305, 0.32, 0.33]
    p = scipy.stats.ttest_1samp(values, 0.3, alternative="greater").pvalue
    assert 0.05 < p < 0.1
    assert verify.check_record(attempt_runs(values, "object_accuracy"), "smoke", "record") == [
        f"not a record: object_accuracy mean 0.3183 against target 0.3, one-sided p {p:.3g} (needs < 0.05)"]
    assert verify.check_record(attempt_runs([0.31, 0.32, 0.33], "object_accuracy"), "smoke", "record") == []
    s = verify.summary(attempt_runs([0.31, 0.31, 0.4], "object_accuracy", [60.0, 60.0, 240.0]), "smoke",
                       beside=attempt_runs([0.3] * 3, "object_accuracy", [100.0, 100.0, 400.0]))
    assert (s["mean"], s["time"], s["beside_time"], s["ratio"]) == (pytest.approx(0.34), 120.0, 200.0, 0.6)


def test_the_cpu_target_is_its_calibrations_mean():
    t = verify.TRACKS["cpu"]
    runs = verify.load_runs(ROOT / t["target_from"])
    assert len(runs) >= t["min_runs"] and round(verify.summary(runs, "cpu")["mean"], 3) == t["target"]


@pytest.mark.slow
def test_a_gpu_record_whose_eval_samples_or_computes_fid_otherwise_fails(monkeypatch):
    """Once a GPU track is calibrated, each log's eval.py samples a stand-in network and computes FID (random
    Inception weights) as the calibration's: a covariance divided by n, not n - 1, is refused."""
    sources = {path.name: path.read_text() for path in ROOT.glob("*.py")}
    calibration = dict(name="log_0.txt", sources=sources)
    monkeypatch.setattr(verify, "load_runs", lambda folder: [calibration])
    track = dict(verify.TRACKS["1gpu"], target=20.0, target_from="records/2027-01-01_1gpu-calibration")
    mutated = lambda name, old, new: dict(name=name, sources=dict(sources, **{  # noqa: E731
        "eval.py": sources["eval.py"].replace(old, new, 1)}))
    runs = [dict(calibration, name="log_1.txt"), mutated("log_2.txt", "/ (n - 1)).cpu()", "/ n).cpu()")]
    assert runs[1]["sources"]["eval.py"] != sources["eval.py"]
    assert verify.check_task(runs, track) == [
        "log_2.txt: its eval.py samples or computes FID otherwise than that of records/2027-01-01_1gpu-calibration: "
        "the evaluation is fixed (records/RULES.md)"]
    assert verify.check_task(runs, verify.TRACKS["1gpu"]) == []  # not calibrated yet: nothing to compare with


def test_a_new_calibration_says_how_it_becomes_the_target(cpu_target, tmp_path, capsys):
    verify.main([str(cpu_target)])  # the track's own: nothing to do
    assert capsys.readouterr().out.splitlines() == [f"ok {cpu_target}: track: cpu | kind: calibration | "
                                                    f"object_accuracy, higher is better | target: 0.292"]
    again = make_record(tmp_path / "2026-12-09_recalibration", {0: (30.0, 0.31), 1: (30.0, 0.32), 2: (30.0, 0.31),
                                                                          3: (30.0, 0.32)}, "calibration")
    verify.main([str(again)])
    assert capsys.readouterr().out.splitlines()[1] == (  # the folder where it is (here outside the repository)
        f"its mean becomes the cpu track's target where TRACKS['cpu'] in records/verify.py says target=0.315, "
        f"target_from='{again}': commit that with the folder, then write its results again "
        f"(`python records/verify.py --write --track cpu --kind calibration {again}`: their "
        f"header names the target; records/RULES.md)")


def test_a_gpu_calibration_sets_the_stopping_value_on_the_periodic_checks_scale():
    """FID of 2,048 images reads above FID of 10,000: the stopping value is the calibration runs' mean last periodic
    FID, not the target (their mean full FID), and speedrun.sh stops a record there by default."""
    runs = [dict(gpu_run(), name=f"log_{k}.txt", timeline=[(2500, 1000, None, {"fid": 40.0}), (5000, 2000, 0.4, None),
                                                           (5000, 2000, None, {"fid": fid2k})],
                 confirm=dict(gpu_run()["confirm"], metrics=dict(fid=fid10k)))
            for k, (fid2k, fid10k) in enumerate([(24.0, 20.0), (26.0, 22.0)])]
    assert verify.calibration_note(runs, "1gpu", "records/2027-01-01_c") == (
        "its mean becomes the 1gpu track's target where TRACKS['1gpu'] in records/verify.py says target=21, stop=25, "
        "target_from='records/2027-01-01_c', ref_images='sha256 ab12': commit that with the folder, then write its "
        "results again (`python records/verify.py --write --track 1gpu --kind calibration records/2027-01-01_c`: their "
        "header names the target; records/RULES.md)")
    assert "stop=" not in verify.calibration_note(runs, "cpu", "c")


def test_a_calibration_that_stops_at_a_target_fails(cpu_target):
    edit(cpu_target / "log_0.txt", '"target": null', '"target": ["object_accuracy", 0.3]')
    assert "log_0.txt: a calibration runs a fixed budget, not --target" in verify.verify(cpu_target)


@pytest.mark.parametrize("old, new, message", [
    ('"max_time": 30.0', '"max_time": 20.0', "--max-time 20.0: the cpu track's calibration trains --max-time 30"),
    ('"lr": 0.002', '"lr": 0.004, "given": ["eval_every", "lr", "max_time", "out", "seed", "track"]',
     "--lr: a calibration trains the track's baseline as it is (speedrun.sh --calibrate), with no flag of its own"),
])
def test_a_calibration_of_another_budget_or_with_flags_of_its_own_fails(cpu_target, old, new, message):
    edit(cpu_target / "log_1.txt", old, new)
    assert f"log_1.txt: {message}" in verify.verify(cpu_target)


def test_a_cpu_calibrations_runs_go_in_pairs_side_by_side():
    runs = [dict(name=f"log_{k}.txt", config=dict(args=dict(seed=k, max_time=30), started=f"2026-12-09T10:{m:02d}:00"))
            for k, m in enumerate((0, 1, 40, 55))]  # the second pair started 15 minutes apart
    assert verify.check_calibration(runs, "cpu") == [
        "log_3.txt: started 900 s from log_2.txt: a calibration's runs go in pairs, side by side, as speedrun.sh runs "
        "them (seeds 2k and 2k + 1)"]
    assert verify.check_calibration(runs[:2], "cpu") == []


def test_speedrun_sh_calibrates_with_flags_verify_py_accepts(tmp_path):
    """What train.py stores as typed, for the flags speedrun.sh --calibrate gives the CPU track's runs (its TRAIN and
    the budget verify.py's protocol names), is what check_calibration accepts."""
    script = (ROOT / "speedrun.sh").read_text()
    train_flags = re.search(r"^ *cpu\)\n.*\n *TRAIN=\((.*)\) ;;", script, re.M)[1].replace('"${EVERY:-250}"', "250")
    budget = shlex.split(re.search(r"^budget=(.*)$", verify.protocol("cpu"), re.M)[1])[0].split()
    argv = train_flags.split() + budget + ["--seed", "1", "--out", str(tmp_path / "c-1")]
    args = vars(train.get_args(argv, files=False))
    assert set(args["given"]) == {"track", "eval_every", "eval_samples", "max_time", "seed", "out"}
    run = dict(name="log_1.txt", config=dict(args=json.loads(json.dumps(args))))
    assert verify.check_calibration([run], "cpu") == []


def test_a_record_on_another_task_than_the_calibrations_fails(record, cpu_target):
    for log in cpu_target.glob("log_*.txt"):  # the calibration ran a changed shapes.py, copied into its folder
        edit(log, "GRID = 2", "GRID = 3")
    (cpu_target / "shapes.py").write_text(verify.parse_log(log)["sources"]["shapes.py"])
    assert verify.verify(cpu_target) == []
    problems = verify.verify(record)
    assert len(problems) == 4 and all("its shapes.py (or data.py's way to it) draws or reads other scenes" in p
                                      for p in problems), problems


def test_a_task_probe_that_fails_says_why(record):
    """A shapes.py that cannot run is named with its error, not reported as another task."""
    edit(record / "log_1.txt", "GRID = 2", "GRID = NO_SUCH_NAME")
    problems = verify.verify(record)
    assert any(p.startswith("log_1.txt: no fingerprint") and "NameError" in p for p in problems), problems
    assert not any("draws or reads other scenes" in p for p in problems), problems


def fresh_interpreter(probe, files, resolution, tmp_path):
    """What a probe prints run as `python -c PROBE RESOLUTION` in a folder of the files: the reference for the
    probe server."""
    folder = tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for name, text in files:
        (folder / name).write_text(text)
    r = subprocess.run([sys.executable, "-c", probe, str(resolution)], cwd=folder, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("probe", ["TASK_PROBE", "EVAL_PROBE"])  # FID_PROBE: EVAL_PROBE's sampler, + ~15 s
def test_each_probe_prints_in_the_server_what_it_prints_in_a_fresh_interpreter(probe, tmp_path):
    files = tuple(sorted((p.name, p.read_text()) for p in ROOT.glob("*.py")))
    ours = verify.fingerprint(getattr(verify, probe), files, 16)
    assert re.fullmatch(r"[0-9a-f]{64}", ours)
    assert ours == fresh_interpreter(getattr(verify, probe), files, 16, tmp_path)


def test_probes_run_apart_and_a_probe_that_dies_leaves_the_server_running(tmp_path):
    """Each probe starts from the server's state, as a fresh interpreter: what one changes (torch's defaults, a
    module's attributes, sys.path) never reaches the next; a source named as a library the server imported is the
    folder's file; a probe killed by a signal fails with its status and the next one runs, in a new server where
    the probe killed the server."""
    changes = ("import sys, torch, shapes; torch.set_default_dtype(torch.float64); shapes.CHANGED = 1; "
               "sys.path.insert(0, '/nowhere'); torch.manual_seed(5); print('changed')")
    assert verify.fingerprint(changes, (("shapes.py", "VALUE = 1\n"),), 1) == "changed"
    reads = ("import sys, numpy, torch, shapes, tqdm; print(torch.get_default_dtype(), shapes.VALUE, "
             "hasattr(shapes, 'CHANGED'), '/nowhere' in sys.path, tqdm.VALUE, sys.argv[1]); "
             "print(torch.rand(1).item(), numpy.random.rand())")
    files = (("shapes.py", "VALUE = 2\n"), ("tqdm.py", "VALUE = 3\n"))
    first, draws = verify.fingerprint(reads, files, 7).split("\n")
    assert first == "torch.float32 2 False False 3 7" == fresh_interpreter(reads, files, 7, tmp_path).split("\n")[0]
    assert verify.fingerprint(reads, files, 8).split("\n")[1] != draws  # unseeded: other draws, as fresh ones
    with pytest.raises(RuntimeError, match="no fingerprint"):
        verify.fingerprint("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", (), 1)
    assert verify.fingerprint("print('next')", (), 1) == "next"
    with pytest.raises(RuntimeError, match="the probe server ended"):  # a probe that kills the server
        verify.fingerprint("import os, signal; os.kill(os.getppid(), signal.SIGKILL)", (), 1)
    assert verify.fingerprint("print('then')", (), 1) == "then"  # in a new server


def test_a_record_on_a_refactored_task_passes(record, cpu_target):
    """The task is what shapes.py draws and reads, not its bytes: the calibration ran a reworded shapes.py."""
    for log in cpu_target.glob("log_*.txt"):
        edit(log, "def render(scene, resolution=32):", "def render(scene, resolution=32):  # reworded")
    (cpu_target / "shapes.py").write_text(verify.parse_log(log)["sources"]["shapes.py"])
    assert verify.verify(cpu_target) == [] and verify.verify(record) == []


def test_verify_names_the_commit_a_records_runs_trained_at(record, capsys):
    verify.main(["--commit", str(record)])
    assert capsys.readouterr().out.strip() == HEAD
    edit(record / "log_1.txt", HEAD, "0" * 40, after="=== config.json")
    with pytest.raises(SystemExit):
        verify.main(["--commit", str(record)])
    assert "needs the logs (log_<k>.txt) of runs at one commit" in capsys.readouterr().err


def test_verify_main_refuses_an_empty_folder_or_an_abbreviated_flag(capsys):
    for argv, message in (([""], "argument folder: an empty path"),  # not the current folder
                          (["--proto", "cpu"], "unrecognized arguments: --proto")):  # not --protocol
        with pytest.raises(SystemExit):
            verify.main(argv)
        assert message in capsys.readouterr().err


def test_a_folder_in_another_layout_fails():
    problems = verify.verify(ROOT / "records" / "2026-12-01_cpu-baseline-30min")  # logs from before RULES.md
    assert len(problems) == 1 and "README.md: no results block naming a track" in problems[0]


def test_an_unreadable_log_or_readme_leaves_its_record_out_and_fails_it_in_one_line(record, monkeypatch, capsys):
    """A log that is a folder, a README no one may read: a reason (verify.py's FAIL, leaderboard.py's "left out"),
    not a traceback that takes the whole board with it."""
    broken = record.parent / "2026-12-03_broken"
    shutil.copytree(record, broken)
    (broken / "log_3.txt").unlink()
    (broken / "log_3.txt").mkdir()
    assert verify.verify(broken) == [f"{broken / 'log_3.txt'}: cannot be read: Is a directory"]
    with pytest.raises(SystemExit):
        verify.main([str(broken)])
    assert capsys.readouterr().out == f"FAIL {broken / 'log_3.txt'}: cannot be read: Is a directory\n"
    assert [e["folder"] for e in leaderboard.entries(record.parent)] == [record]
    assert f"left out {broken.name}: {broken / 'log_3.txt'}: cannot be read: Is a directory" in capsys.readouterr().err
    read_text = Path.read_text

    def forbidden(path, *args, **kwargs):  # as root, chmod would not stop the read
        if path == broken / "README.md":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", forbidden)
    assert [e["folder"] for e in leaderboard.entries(record.parent)] == [record]
    assert f"left out {broken.name}: {broken / 'README.md'}: cannot be read: Permission denied" in \
        capsys.readouterr().err
    assert verify.verify(broken) == [f"{broken / 'README.md'}: cannot be read: Permission denied"]


def test_write_verifies_first_and_writes_nothing_that_fails(record, tmp_path, capsys):
    """verify.py --write with the wrong --track or a log missing leaves a valid results block as it was; a new folder
    gets its README and the sources its logs carry only when it passes."""
    before = (record / "README.md").read_text()
    (record / "log_3.txt").rename(tmp_path / "log_3.txt")
    for track, message in (("smoke", "log_0.txt: eval samples is 1024, the rules say 8"),
                           ("cpu", "the folder holds 3 runs, whose logs say their attempt made [4, 4, 4]")):
        with pytest.raises(SystemExit):
            verify.main(["--write", "--track", track, str(record)])
        out = capsys.readouterr().out
        assert message in out, out
        assert (record / "README.md").read_text() == before
    (tmp_path / "log_3.txt").rename(record / "log_3.txt")
    for log in record.glob("log_*.txt"):  # every run's train.py differs from the commit's: --write carries it
        edit(log, *TRAIN_PY_EDIT, after="=== train.py")
    (record / "README.md").unlink()
    with pytest.raises(SystemExit):
        verify.main(["--write", "--track", "smoke", str(record)])
    assert "FAIL " in capsys.readouterr().out and sorted(p.name for p in record.iterdir() if p.is_file()) == \
        [f"log_{k}.txt" for k in range(4)]
    verify.main(["--write", "--track", "cpu", "--what", "synthetic record", "--command", "bash speedrun.sh --track cpu",
                 str(record)])
    assert capsys.readouterr().out.startswith("ok ") and TRAIN_PY_EDIT[1] in (record / "train.py").read_text()
    assert (record / "README.md").read_text().split(verify.BEGIN)[1] == before.split(verify.BEGIN)[1]


def test_a_record_that_misses_the_target_or_shares_seeds_fails(tmp_path, cpu_target, capsys):
    slow = make_record(tmp_path / "slow", {0: (20.0, 0.29), 1: (21.0, 0.30), 2: (22.0, 0.28), 3: (21.0, 0.29)})
    assert any(p.startswith("not a record: object_accuracy mean 0.2900") for p in verify.verify(slow))
    wide = make_record(tmp_path / "wide", {0: (20.0, 0.40), 1: (21.0, 0.20), 2: (22.0, 0.35), 3: (21.0, 0.25)})
    assert any(p.startswith("not a record: object_accuracy mean 0.3000 against target 0.292, one-sided p 0.4")
               for p in verify.verify(wide))  # above the target, too spread out to say so
    edit(slow / "log_1.txt", '"seed": 1', '"seed": 0')
    problems = verify.verify(slow)
    assert any(p.startswith("the runs are not one attempt's seeds 0..3 (seeds [0, 0, 2, 3]") for p in problems)
    with pytest.raises(SystemExit) as failed:
        verify.main([str(slow)])
    assert failed.value.code == 1 and "FAIL not a record" in capsys.readouterr().out


BESIDE = {0: (30.0, 0.30), 1: (32.0, 0.30), 2: (29.0, 0.30), 3: (31.0, 0.30)}  # the replaced configuration's runs


def test_the_runs_beside_a_record_give_its_time_against_theirs(tmp_path, cpu_target):
    folder = make_record(tmp_path / "2026-12-05_faster", beside=BESIDE, lr=0.003)
    assert verify.verify(folder) == []
    diffs = [25 - 30, 26 - 32, 24 - 29, 25 - 31]  # minutes, seed by seed
    p = 2 * scipy.stats.t.sf(abs(statistics.mean(diffs)) / (statistics.stdev(diffs) / 2), 3)  # paired t, 3 dof
    assert ("- beside/: the configuration it replaces on the same machine, 4 runs: mean 1830.0 s (30.50 min), "
            f"times 1800.0, 1920.0, 1740.0, 1860.0 s; this configuration takes 0.820x its time (paired by seed, "
            f"two-sided p {p:.3g})") in (folder / "README.md").read_text()  # 1500 s / 1830 s


@pytest.mark.parametrize("tamper, message", [
    (lambda f: edit(f / "beside" / "log_2.txt", "AMD EPYC 7B13", "Intel(R) Xeon(R) Processor"),
     "beside/log_2.txt: ran on {'cpu': 'Intel(R) Xeon(R) Processor'"),
    (lambda f: [edit(f / "beside" / f"log_{k}.txt", '"lr": 0.002', '"lr": 0.003') for k in range(4)],
     "beside/: the record's own configuration"),
    (lambda f: edit(f / "beside" / "log_1.txt", '"lr": 0.002', '"lr": 0.001'),
     "beside/: log_1.txt: --lr 0.001 (theirs 0.002) differs from log_0.txt's, which 3 of the 4 runs share"),
    (lambda f: (f / "beside" / "log_3.txt").unlink(), "beside/: 3 runs: cpu runs go in pairs"),
    (lambda f: [edit(f / "beside" / f"log_{k}.txt", '"eval_every": 250', '"eval_every": 100') for k in range(4)],
     "beside/log_0.txt: eval_every 100, the record's runs 250: the runs beside share its stopping rule"),
    (lambda f: edit(f / "beside" / "log_1.txt", '"max_time": 60.0', '"max_time": 90.0'),
     "beside/log_1.txt: max_time 90.0, the record's runs 60.0"),
    (lambda f: edit(f / "beside" / "log_1.txt", '"max_steps": 100000', '"max_steps": 50000'),
     "beside/log_1.txt: max_steps 50000, the record's runs 100000"),
    (lambda f: edit(f / "beside" / "log_2.txt", '0.292', '0.25', after="=== config.json"),
     "beside/log_2.txt: target ['object_accuracy', 0.25], the record's runs ['object_accuracy', 0.292]"),
    (lambda f: [(f / "beside" / f"log_{k}.txt").unlink() for k in (2, 3)],
     "beside/: 2 runs beside the record's 4: one beside each run"),
    (lambda f: edit(f / "log_3.txt", '"cores": 2', '"cores": 3'), "log_3.txt: ran on {'cpu': 'AMD EPYC 7B13', "
                                                                 "'cores': 3"),
    (lambda f: edit(f / "beside" / "log_0.txt", '"resolution": 32', '"resolution": 64'),
     "beside/log_0.txt: --resolution is 64"),
    (lambda f: edit(f / "beside" / "log_1.txt", "1920000ms", "1200000ms"), "README's results say"),
    (lambda f: edit(f / "beside" / "log_1.txt", "T10:01:00", "T10:06:01"),
     "beside/log_1.txt: started 301 s from log_1.txt: a run beside a record runs side by side"),
    (lambda f: edit(f / "beside" / "log_1.txt", "T10:01:00", "T09:55:59"),  # before its run, as far
     "beside/log_1.txt: started 301 s from log_1.txt: a run beside a record runs side by side"),
    (lambda f: edit(f / "log_1.txt", '"cores": 2', '"cores": 3'),  # the second run's machine, as the others'
     "log_1.txt: ran on {'cpu': 'AMD EPYC 7B13', 'cores': 3"),
    (lambda f: [edit(f / where / f"log_{k}.txt", f'"lr": {lr}', f'"lr": {lr}, "eval_minutes": {minutes}',
                     after="=== config.json") for where, lr, minutes in (("", 0.003, [5]), ("beside", 0.002, []))
                for k in range(4)],
     "beside/log_0.txt: eval_minutes [], the record's runs [5]: the runs beside share its stopping rule"),
    (lambda f: [own_source(f / "beside", f"log_{k}.txt", "shapes.py", "GRID = 2", "GRID = 3") for k in range(4)],
     "beside/: log_0.txt: its shapes.py (or data.py's way to it) draws or reads other scenes"),
])
def test_runs_beside_a_record_that_break_the_rules_fail(tmp_path, cpu_target, tamper, message):
    folder = make_record(tmp_path / "2026-12-05_faster", beside=BESIDE, lr=0.003)
    tamper(folder)
    problems = verify.verify(folder)
    assert any(message in p for p in problems), problems


def test_a_record_of_faster_code_runs_beside_its_own_flags_at_the_older_source(tmp_path, cpu_target):
    """The same flags are another configuration where the source differs (speedrun.sh's runs beside train at their
    record's commit): faster code counts as a better flag does. The same flags and source are the record's own."""
    folder = make_record(tmp_path / "2026-12-05_faster", beside=BESIDE, lr=0.003)
    for k in range(4):
        edit(folder / "beside" / f"log_{k}.txt", '"lr": 0.002', '"lr": 0.003')
    assert any("beside/: the record's own configuration" in p for p in verify.verify(folder))
    for k in range(4):
        own_source(folder / "beside", f"log_{k}.txt", "muon.py", "QUINTIC = (", "QUINTIC =  (")
    assert verify.verify(folder) == []


def test_runs_beside_a_record_of_a_track_without_them_fail(tmp_path, cpu_target):
    """A GPU track's record takes no runs beside it (leaderboard.py would rank it on their ratio); a CPU record's
    are its rule."""
    folder = make_record(tmp_path / "2026-12-05_faster", beside=BESIDE, lr=0.003)
    runs, beside = verify.load_runs(folder), verify.load_runs(folder / "beside")
    assert verify.check_beside(runs, beside, "8gpu", folder) == [
        "beside/: the 8gpu track's records run nothing beside them (records/RULES.md): remove beside/"]
    assert verify.verify(folder) == []


def test_runs_beside_at_a_commit_that_logged_no_cpu_units_share_the_machine(tmp_path, cpu_target):
    folder = make_record(tmp_path / "2026-12-05_faster", beside=BESIDE, lr=0.003)
    assert verify.verify(folder) == []
    for k in range(4):  # the code of an older record's commit names the CPU, not its units
        log = folder / "beside" / f"log_{k}.txt"
        log.write_text(re.sub(r'"cpu_flags": \[[^]]*\],\s*', "", log.read_text()))
        assert "cpu_flags" not in log.read_text().split("=== config.json")[1]
    assert verify.verify(folder) == []
    edit(folder / "beside" / "log_0.txt", '"cores": 2', '"cores": 4', after="=== config.json")
    assert any("beside/log_0.txt: ran on" in p for p in verify.verify(folder))


def test_a_cpu_record_made_since_train_py_writes_the_start_time_needs_runs_beside_it(tmp_path, cpu_target):
    folder = tmp_path / "2026-12-06_alone"
    folder.mkdir()
    for seed, (minutes, accuracy) in RUNS.items():  # one log without the start time: made since all the same
        log = synthetic_log(seed, minutes, accuracy, ("object_accuracy", 0.292), started=seed != 3)
        (folder / f"log_{seed}.txt").write_text(log)
    write_readme(folder, "record", "alone")
    assert [p for p in verify.verify(folder) if p.startswith("no beside/log_<k>.txt: a cpu record runs")]


def test_a_record_beside_the_one_it_replaces_races_on_that_ones_clock(record, tmp_path, capsys):
    """On another machine a record takes the time of the record it replaces times its ratio to it, measured there."""
    faster = {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS}  # 10.5 min on the mean, twice as fast as beside it
    make_record(record.parent / "2026-12-05_faster", faster, beside={k: (20.0 + 2 * (k % 2), 0.3) for k in RUNS},
                lr=0.003, cpu="Intel(R) Xeon(R) Processor", every=100)  # both sides checked more often than `record`
    make_record(record.parent / "2026-12-06_orphan", faster, beside=BESIDE, lr=0.003, replaced_lr=0.005)
    make_record(record.parent / "2026-12-06_slower", faster, beside={k: (10.0 + k % 2, 0.3) for k in RUNS},
                lr=0.006)  # level with the runs beside it (ratio 1): not below the record it replaces (rule 3)
    # the next record, the same day, in a folder whose name sorts first: placed after the one it replaces all the same
    fastest = {k: (5.0 + k % 2 * 0.5, RUNS[k][1]) for k in RUNS}
    make_record(record.parent / "2026-12-05_a-fastest", fastest, beside={k: (10.0 + k % 2, 0.3) for k in RUNS},
                lr=0.004, replaced_lr=0.003, cpu="Intel(R) Xeon(R) Processor")
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "| 1 | 6.25 min | 5.25 min = 0.500 x 10.50 beside | 0.3050 +- 0.0041 | synthetic record | 2026-12-05 |" \
        in board  # 12.50 min (the record it replaces, itself scaled) x 0.5
    assert "| 2 | 12.50 min | 10.50 min = 0.500 x 21.00 beside | 0.3050 +- 0.0041 | synthetic record | 2026-12-05 |" \
        in board  # 25.00 min (the record it replaces) x 0.5
    assert "| 3 | 25.00 min | - | 0.3050 +- 0.0041 | synthetic record | 2026-12-02 |" in board
    assert "orphan" not in board and "slower" not in board
    err = capsys.readouterr().err
    assert "left out 2026-12-06_orphan: its beside/ runs have the flags of no record" in err
    assert "left out 2026-12-06_slower: 25.00 min on the board's clock (1.000x its runs beside), not below the " \
        "current record's 12.50" in err


def test_records_race_in_the_order_their_runs_started_whatever_their_folders_names(record, tmp_path, capsys):
    """A record made after the current one, racing beside an older record and named with an earlier date, comes after
    the current record all the same (its runs' start time): not below it, it is left out (rule 3)."""
    make_record(record.parent / "2026-12-05_faster", {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS},
                beside={k: (20.0 + 2 * (k % 2), 0.3) for k in RUNS}, lr=0.003)  # 12.50 min
    backdated = make_record(record.parent / "2026-12-03_later", {k: (15.0, RUNS[k][1]) for k in RUNS},
                            beside={k: (25.0, 0.3) for k in RUNS}, lr=0.009)  # 15.00 min, beside the first record
    for log in [*backdated.glob("log_*.txt"), *(backdated / "beside").glob("log_*.txt")]:
        edit(log, '"started": "2026-12-05T', '"started": "2026-12-07T')
    assert verify.verify(backdated) == []
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "| 1 | 12.50 min |" in board and "later" not in board, board
    assert "left out 2026-12-03_later: 15.00 min on the board's clock (0.600x its runs beside), not below the " \
        "current record's 12.50" in capsys.readouterr().err


def test_of_two_folders_holding_the_same_runs_the_one_git_added_first_races(record, tmp_path, capsys, monkeypatch):
    """A copy of a record (its runs: their machine, start times and folders) under another name: the folder git
    added first stays on the board; where git cannot tell (neither committed), neither does."""
    faster = make_record(record.parent / "2026-12-05_faster", {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS},
                         beside={k: (20.0 + 2 * (k % 2), 0.3) for k in RUNS}, lr=0.003)
    for log in [*faster.glob("log_*.txt"), *(faster / "beside").glob("log_*.txt")]:
        edit(log, '"cores": 2,', '"host": "vm1",\n      "cores": 2,')
    shutil.copytree(faster, record.parent / "2026-12-05_a-copy")
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "faster" not in board and "a-copy" not in board, board
    assert "left out 2026-12-05_a-copy: its runs are also those of 2026-12-05_faster: one folder per attempt, the " \
        "one git added first" in capsys.readouterr().err
    git = verify.git  # the original committed: `git log --diff-filter=A` gives the time of the commit adding it
    monkeypatch.setattr(verify, "git", lambda *argv: git(*argv) if argv[0] != "log" else  # newest first: a later
                        SimpleNamespace(stdout="1764990000\n1764900000\n" if argv[-1].endswith("_faster") else  # file
                                        "1764950000\n"))  # the copy, added after the original, before its last file
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "| 1 | 12.50 min |" in board and "2026-12-05_faster" in board and "a-copy" not in board, board


def test_a_record_level_with_the_current_one_on_its_clock_is_left_out(record, tmp_path, capsys):
    """Rule 3: a record's time on the board must be below the current record's; the same time is not."""
    level = {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS}
    make_record(record.parent / "2026-12-03_level", level, beside={k: (10.0 + k % 2, 0.3) for k in RUNS}, lr=0.006)
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "| 1 | 25.00 min | - |" in board and "2026-12-03_level" not in board and "| 2 |" not in board
    assert "left out 2026-12-03_level: 25.00 min on the board's clock (1.000x its runs beside), not below the " \
        "current record's 25.00" in capsys.readouterr().err


def test_the_board_shows_the_targets_calibration_alone_and_keeps_rule_3_without_runs_beside(record, tmp_path, capsys):
    """A calibration other than the one the track's target comes from (another configuration: no baseline) is left
    out, and so is a record without runs beside it (a GPU track's) that is not below an earlier record's time."""
    make_record(record.parent / "2026-12-01_calibration-lr", {k: (30.0, 0.3) for k in RUNS}, "calibration", lr=0.01)
    make_record(record.parent / "2026-12-03_slower", {k: (30.0 + k % 2, RUNS[k][1]) for k in RUNS}, lr=0.003)
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "| 1 | 25.00 min | - |" in board and "slower" not in board and "calibration-lr" not in board
    err = capsys.readouterr().err
    assert "left out 2026-12-01_calibration-lr: a calibration that is not the one the cpu track's target comes from" \
        in err
    assert "left out 2026-12-03_slower: 30.50 min on the board's clock, not below the current record's 25.00" in err


def test_runs_beside_a_configuration_recorded_twice_race_its_latest_record(record, tmp_path):
    """Two records of one configuration and code (logs from before the start time: no runs beside them): the runs
    beside a later record are of that configuration, and it races on the clock of the latest of the two."""
    make_record(record.parent / "2026-12-03_again", {k: (20.0 + k % 2, RUNS[k][1]) for k in RUNS})
    make_record(record.parent / "2026-12-04_next", {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS},
                beside={k: (20.0 + 2 * (k % 2), 0.3) for k in RUNS}, lr=0.003)
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "| 1 | 10.25 min | 10.50 min = 0.500 x 21.00 beside |" in board  # 20.50 min (2026-12-03_again) x 0.5
    assert "| 2 | 20.50 min | - |" in board and "| 3 | 25.00 min | - |" in board


def test_of_two_records_with_the_same_flags_the_runs_beside_race_the_one_whose_code_they_ran(record, tmp_path):
    """A record of faster code keeps its predecessor's flags; the next record's runs beside ran at its commit, so
    they are its configuration, not the predecessor's (whose time would make the next record's twice as long)."""
    def edited_code(folder):
        for k in range(4):
            own_source(folder, f"log_{k}.txt", "muon.py", "QUINTIC = (", "QUINTIC =  (")
    half = {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS}  # 10.5 min, beside 21.0: 0.5 x `record`'s 25.00 min
    faster_code = make_record(record.parent / "2026-12-05_b-code", half, beside={k: (20.0 + 2 * (k % 2), 0.3)
                                                                                  for k in RUNS})
    edited_code(faster_code)
    quarter = {k: (5.0 + k % 2 * 0.5, RUNS[k][1]) for k in RUNS}  # 5.25 min, beside 10.5: 0.5 x 12.50 min
    following = make_record(record.parent / "2026-12-05_a-flags", quarter, beside={k: (10.0 + k % 2, 0.3)
                                                                                  for k in RUNS}, lr=0.003)
    edited_code(following / "beside")
    assert verify.verify(faster_code) == [] and verify.verify(following) == []
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "| 1 | 6.25 min | 5.25 min = 0.500 x 10.50 beside |" in board
    assert "| 2 | 12.50 min | 10.50 min = 0.500 x 21.00 beside |" in board


def test_runs_beside_at_code_of_no_record_race_nothing(record, tmp_path, capsys):
    """Runs beside with the replaced record's flags but code of no record place the candidate nowhere; with the
    candidate's own code they match on the flags only in logs from before attempt.json (up to the eighth CPU
    record, whose runs beside trained on the candidate's code)."""
    faster = {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS}
    folder = make_record(record.parent / "2026-12-05_faster", faster, beside={k: (20.0 + 2 * (k % 2), 0.3)
                                                                              for k in RUNS}, lr=0.003)
    for k in range(4):
        own_source(folder / "beside", f"log_{k}.txt", "train.py", *TRAIN_PY_EDIT)
    assert verify.verify(folder) == []
    board = leaderboard.leaderboard(record.parent, tmp_path)
    assert "2026-12-05_faster" not in board and "left out 2026-12-05_faster" in capsys.readouterr().err
    for k in range(4):  # the candidate's code on both sides
        own_source(folder, f"log_{k}.txt", "train.py", *TRAIN_PY_EDIT)
    assert "2026-12-05_faster" not in leaderboard.leaderboard(record.parent, tmp_path)
    for log in [*folder.glob("log_*.txt"), *(folder / "beside").glob("log_*.txt")]:  # logs of the older layout
        edit(log, '=== attempt.json\n{"runs": 4}\n', "")
    assert "| 1 | 12.50 min | 10.50 min = 0.500 x 21.00 beside |" in leaderboard.leaderboard(record.parent, tmp_path)


def test_a_record_and_its_runs_beside_race_under_their_own_stopping_rule(record, tmp_path):
    """The runs beside share the candidate's STOP and EVERY, not those of the record whose configuration they are."""
    faster = {k: (10.0 + k % 2, RUNS[k][1]) for k in RUNS}
    folder = make_record(record.parent / "2026-12-05_faster", faster, beside={k: (20.0 + 2 * (k % 2), 0.3)
                                                                              for k in RUNS}, lr=0.003)
    for log in [*folder.glob("log_*.txt"), *(folder / "beside").glob("log_*.txt")]:
        edit(log, "0.292", "0.3", after="=== config.json")  # STOP=0.3 (--target, its line): the target is 0.292
    assert verify.verify(folder) == []
    assert "| 1 | 12.50 min | 10.50 min = 0.500 x 21.00 beside |" in leaderboard.leaderboard(record.parent, tmp_path)


def test_leaderboard_writes_and_checks_the_readme_block(record, tmp_path, capsys, monkeypatch):
    calibration = {0: (30.0, 0.29), 1: (30.0, 0.30), 2: (30.0, 0.295), 3: (30.0, 0.295)}
    baseline = make_record(record.parent / "2026-12-01_baseline", calibration, "calibration")
    monkeypatch.setitem(verify.TRACKS["cpu"], "target_from", str(baseline))  # the board's baseline
    assert verify.verify(baseline) == []
    assert "mean 0.2950, sd 0.0041; a calibration: its mean" in (baseline / "README.md").read_text()
    make_record(record.parent / "2026-12-03_failing", {0: (1.0, 0.1), 1: (1.0, 0.2), 2: (1.0, 0.25), 3: (1.0, 0.2)})
    make_record(record.parent / "2026-12-04_slower", {0: (31.0, 0.305), 1: (31.0, 0.31), 2: (31.0, 0.30),
                                                     3: (31.0, 0.305)})  # slower than the record: left out
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- leaderboard -->\nold\n<!-- /leaderboard -->\n\nmore\n")
    argv = ["--records", str(record.parent), "--readme", str(readme)]
    leaderboard.main(argv + ["--write"])
    text = readme.read_text()
    assert "| 1 | 25.00 min | - | 0.3050 +- 0.0041 | synthetic record | 2026-12-02 | " \
           "[2026-12-02_synthetic](records/2026-12-02_synthetic) |\n| baseline | 30.00 min | - | 0.2950 +- 0.0041 | " \
           "synthetic calibration | 2026-12-01 |" in text
    assert "2026-12-04_slower" not in text and "| 2 |" not in text  # rule 3
    assert "**8gpu**" in text and "not measured yet" in text and text.endswith("\n\nmore\n")
    assert "2026-12-03_failing" not in text and "left out 2026-12-03_failing: not a record" in capsys.readouterr().err
    leaderboard.main(argv + ["--check"])
    assert capsys.readouterr().out == f"ok {readme}: the leaderboard is current\n"
    readme.write_text(text.replace("25.00 min", "20.00 min"))
    with pytest.raises(SystemExit, match="not current"):
        leaderboard.main(argv + ["--check"])


def test_leaderboard_refuses_a_wrong_records_or_readme_before_any_work(record, tmp_path, monkeypatch, capsys):
    """A folder of no records would write "No record yet" over the README's rows; a missing or read-only README
    would fail after the board's minutes of verifying: each is refused first, naming the flag."""
    readme, run = tmp_path / "README.md", tmp_path / "run"
    readme.write_text("# x\n\n<!-- leaderboard -->\nold\n<!-- /leaderboard -->\n")
    (run / "checkpoints").mkdir(parents=True)  # a run folder of train.py, not a folder of records
    monkeypatch.setattr(leaderboard, "leaderboard", lambda *a: pytest.fail("worked"))
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != readme and access(path, mode))  # root: chmod won't
    for argv, message in (
            (["--records", str(tmp_path / "nope")], f"--records {tmp_path / 'nope'}: no such folder; pass the folder"),
            (["--records", str(run), "--readme", str(readme), "--write"], f"--records {run}: holds no record folder"),
            (["--records", ""], "argument --records: an empty path"),
            (["--readme", str(tmp_path / "nope.md"), "--write"], f"--readme {tmp_path / 'nope.md'}: no such file"),
            (["--readme", "", "--write"], "argument --readme: an empty path"),
            (["--readme", str(readme), "--write"], f"--readme {readme}: cannot be written"),
            (["--wr"], "unrecognized arguments: --wr")):  # not --write
        with pytest.raises(SystemExit):
            leaderboard.main(["--records", str(record.parent), *argv])
        assert message in capsys.readouterr().err
    assert readme.read_text().endswith("\nold\n<!-- /leaderboard -->\n")
    monkeypatch.setattr(leaderboard, "leaderboard", lambda records, readme_dir: f"board of {readme_dir}")
    leaderboard.main(["--records", str(record.parent), "--readme", str(tmp_path / "new" / "README.md")])  # printed
    assert capsys.readouterr().out == f"board of {tmp_path / 'new'}\n"  # links from the folder of a README to come


@pytest.mark.slow
def test_the_readme_leaderboard_is_current():
    if verify.git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone: the records' logs name commits it lacks, so their sources cannot be checked")
    leaderboard.main(["--check"])


@pytest.mark.slow
def test_smoke_speedrun_trains_evaluates_and_writes_a_verified_record(tmp_path):
    """The whole path on the CPU: two tiny runs of a candidate, each side by side with the record configuration's of
    its seed (BESIDE), stop at the target, are confirmed by eval.py, and become a record folder that verify.py
    accepts, the runs beside it checked as its own."""
    env = {**os.environ, "RECORDS": str(tmp_path), "NAME": "smoke", "BESIDE": "1", "EVERY": "2", "RUNS": "2"}
    r = subprocess.run(["bash", "speedrun.sh", "--smoke", "--", "--repa", "builtin", "--repa-lambda", "3"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "\nok " in r.stdout, r.stdout + r.stderr
    folder = next(tmp_path.glob("*_smoke"))
    assert sorted(p.name for p in folder.glob("samples_*.png")) == ["samples_0.png", "samples_1.png"]
    log, beside = folder.joinpath("log_1.txt").read_text(), folder.joinpath("beside", "log_1.txt").read_text()
    assert log.startswith("=== ") and "=== train.py\n" in log and f'"host": "{socket.gethostname()}"' in log
    assert re.search(r'"started": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"', log)  # UTC; the pairs' check reads it
    assert "\ntrack cpu (--track): its values for the flags not given:" in log
    assert '"repa_lambda": 3.0' in log and '"tread": false' in log  # the candidate's flags reached train.py
    assert '"repa_lambda": 2.0' in beside and '"tread": true' in beside  # and the record configuration's
    readme = (folder / "README.md").read_text()
    assert "\n- beside/: the configuration it replaces on the same machine, 2 runs: " in readme
    replay = "RUNS=2 EVERY=2 BESIDE=1 bash speedrun.sh --smoke -- --repa builtin --repa-lambda 3"
    assert f"\n    {replay}\n" in readme
    assert "| train_time " in log and "ms | step_avg " in log and "\neval step 2 | caption_accuracy" in log
    assert "\ntarget object_accuracy -1 reached at step 2: stopping\n" in log and "\n=== confirm.json\n" in log
    assert r.stdout.endswith(f"the smoke record is in {tmp_path}, its runs in {tmp_path / 'runs'} (remove them when "
                             f"done)\n"), r.stdout[-300:]


# speedrun.sh's machinery alone: train.py and eval.py stubs in a copy of the repository, where run 1 fails at once
TORCHRUN_REPORT = """Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 947, in main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train.py FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 14913)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""  # how a failed torchrun run's console ends
STUB_TRAIN = """import os, sys, time
out, seed = sys.argv[sys.argv.index("--out") + 1], int(sys.argv[sys.argv.index("--seed") + 1])
os.makedirs(out)  # as train.py, which refuses an --out that holds a run
open(os.path.join(out, "argv"), "w").write(" ".join(sys.argv[1:]))
open(os.path.join(out, "train.pid"), "w").write(str(os.getpid()))
time.sleep(1 if seed else 30)
if seed:
    print("train.py: error: --lrr is not a flag: did you mean --lr?", file=sys.stderr)
    print(%r, file=sys.stderr)
sys.exit(seed)
""" % TORCHRUN_REPORT
STUB_EVAL = """import pathlib, sys
pathlib.Path(sys.argv[sys.argv.index('--ckpt') + 1], 'evaluated').touch()
pathlib.Path(sys.argv[sys.argv.index('--out') + 1]).write_text('{}')
"""


def as_train_py(stub):
    """A stub train.py: run, it is `stub`; imported by speedrun.sh to check the runs' flags (train.get_args), it takes
    any."""
    return f"def get_args(argv, files=True):\n    pass\n\n\nif __name__ == '__main__':\n    exec({stub!r})\n"


def git_in(folder, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                          capture_output=True, text=True).stdout.strip()


def stub_speedrun(tmp_path, *options, stub_train=STUB_TRAIN, **env):
    """speedrun.sh in a git repository of its own whose train.py is `stub_train` (committed, or a change of the
    working tree: the runs train on a snapshot of the tree either way)."""
    (tmp_path / "records").mkdir(exist_ok=True)
    if not (tmp_path / ".git").exists():
        shutil.copy(ROOT / "speedrun.sh", tmp_path)
        shutil.copy(ROOT / "records" / "verify.py", tmp_path / "records")
        (tmp_path / "train.py").write_text(as_train_py(stub_train))
        (tmp_path / "eval.py").write_text(STUB_EVAL)
        (tmp_path / ".gitignore").write_text("records/runs/\n")
        git_in(tmp_path, "init", "-q")
        git_in(tmp_path, "add", ".")
        git_in(tmp_path, "commit", "-q", "-m", "stubs")
    (tmp_path / "train.py").write_text(as_train_py(stub_train))
    env = {**os.environ, "RECORDS": str(tmp_path / "records"), "NAME": "x", **env}  # runs in records/runs (smoke)
    return subprocess.run(["bash", "speedrun.sh", *(options or ["--smoke"])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def alive(pid):
    try:  # a zombie, which nobody reaps in some containers, is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_failed_run_stops_the_speedrun_and_its_sibling_at_once(tmp_path):
    """Run 1 fails while run 0 trains: speedrun.sh says so then, not after run 0, and ends run 0, whose eval.py
    never starts (on the CPU, a run left going slows the next attempt)."""
    start = time.monotonic()
    r = stub_speedrun(tmp_path)
    assert r.returncode == 1 and "speedrun.sh: run x-1 failed: train.py: error: --lrr is not a flag: did you mean " \
        "--lr? (console: " in r.stderr, r.stderr  # the console's last line: why it failed
    assert time.monotonic() - start < 20, "waited for run 0"
    time.sleep(1)
    run0 = tmp_path / "records" / "runs" / "x-0"
    assert not alive(int((run0 / "train.pid").read_text())) and not (run0 / "evaluated").exists()


def test_a_reused_name_and_bad_runs_beside_or_stop_are_refused_up_front(tmp_path):
    (tmp_path / "records" / "runs" / "x-0").mkdir(parents=True)  # an earlier attempt's run 0, which train.py refuses
    r = stub_speedrun(tmp_path)
    assert r.returncode == 1 and "speedrun.sh: NAME=x: " in r.stderr and "choose another NAME" in r.stderr, r.stderr
    assert not (tmp_path / "records" / "runs" / "x-1").exists()
    for env, message in ((dict(RUNS="3"), "RUNS=3: smoke runs go 2 side by side"),
                         (dict(RUNS="1"), "RUNS=1: the smoke track's rules need at least 2 runs"),
                         (dict(BESIDE="0"), "BESIDE=0: set BESIDE=1"),
                         (dict(STOP="-2"), "STOP=-2: runs stopping there would not meet the target on the mean "
                                           "(object_accuracy >= -1.0)")):
        r = stub_speedrun(tmp_path, NAME="y", **env)
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert not (tmp_path / "records" / "runs" / "y-0").exists()
    for args, env, message in (([], dict(STOP="abc"), "STOP=abc: a number (object_accuracy's value"),
                               ([], dict(NAME="../y"), "NAME=../y: letters, digits, '.', '_' and '-' only"),
                               (["--track"], {}, "--track (missing): one of 8gpu, 1gpu, cpu"),
                               (["--track", "gpu"], {}, "--track gpu: one of 8gpu, 1gpu, cpu"),
                               (["--smoke", "--calibrate", "--", "--lr", "3e-3"], {},
                                "--calibrate trains the track's baseline as it is: no train.py flags after --"),
                               (["--smoke", "--", "--eval-every=1"], {}, "--eval-every=1 after --: the track's rules "
                                                                         "set it (records/RULES.md); STOP and EVERY"),
                               (["--smoke", "--", "--seed", "3"], {}, "--seed after --: speedrun.sh gives each run"),
                               (["--smoke", "--", "--track", "cpu"], {}, "--track after --: give it before --"),
                               (["--smoke", "--", "-h"], {}, "-h after --: python train.py --help lists")):
        r = stub_speedrun(tmp_path, *args, **{"NAME": "y", **env})
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "records" / "runs" / "y-0").exists() and not (tmp_path / "y-0").exists()
    fake = tmp_path / "no-torch"  # a python without torch: the environment of README's Install not activated
    fake.mkdir()
    (fake / "python").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: no site-packages
    (fake / "python").chmod(0o755)
    r = stub_speedrun(tmp_path, NAME="y", PATH=f"{fake}:{os.environ['PATH']}")
    assert r.returncode == 1 and f"{fake / 'python'} cannot import torch: activate the environment" in r.stderr, r.stderr
    assert not (tmp_path / "records" / "runs" / "y-0").exists()
    r = stub_speedrun(tmp_path, "--track", "8gpu", NAME="y", EVERY="100")  # the GPU tracks' cadence is the rules'
    assert r.returncode == 1 and "EVERY is for the CPU track" in r.stderr, r.stderr
    teacher = tmp_path / "shapes_teacher.safetensors"  # verify.py checks a run's teacher against its commit's
    teacher.write_bytes(b"the committed teacher")
    git_in(tmp_path, "add", teacher.name)
    git_in(tmp_path, "commit", "-q", "-m", "a teacher")
    teacher.write_bytes(b"another teacher")
    r = stub_speedrun(tmp_path, NAME="y")
    assert r.returncode == 1 and "shapes_teacher.safetensors differs from HEAD's: commit" in r.stderr, r.stderr
    git_in(tmp_path, "checkout", "--", teacher.name)
    git_in(tmp_path, "mv", "eval.py", "evaluate.py")  # a rename: the logs would lack a source verify.py asks for
    r = stub_speedrun(tmp_path, NAME="y")
    assert r.returncode == 1 and "speedrun.sh: eval.py of HEAD deleted or renamed in the working tree: commit that " \
        "first" in r.stderr, r.stderr
    assert not (tmp_path / "records" / "runs" / "y-0").exists()


def no_gpu_torch(folder):
    """PYTHONPATH of a torch module that sees no GPU (speedrun.sh's GPU check, here and on a GPU machine too), whose
    import takes no seconds as the real one's would."""
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "__init__.py").write_text("class cuda:\n    device_count = staticmethod(lambda: 0)\n")
    return str(folder)


def test_a_gpu_record_stops_at_the_calibrated_stopping_value(tmp_path, tmp_path_factory):
    """A GPU track's STOP defaults to its `stop` (the periodic check's reading of the target) and may not pass it."""
    stub_speedrun(tmp_path, NAME="setup")  # the stub repository
    verify_py = tmp_path / "records" / "verify.py"
    verify_py.write_text(verify_py.read_text().replace('metric="fid", target=None, stop=None,',
                                                       'metric="fid", target=20.0, stop=25.0,'))
    r = stub_speedrun(tmp_path, "--track", "8gpu", NAME="y", STOP="26")
    assert r.returncode == 1 and "STOP=26: runs stopping there would not meet the target on the mean (fid <= 20.0, " \
        "which the periodic check reads as 25.0); use 25.0 or a margin beyond it" in r.stderr, r.stderr
    no_gpu = no_gpu_torch(tmp_path_factory.mktemp("no-gpu"))
    for env in ({}, dict(STOP="24.5")):  # on to the check for GPUs
        r = stub_speedrun(tmp_path, "--track", "8gpu", NAME="y", PYTHONPATH=no_gpu, **env)
        assert r.returncode == 1 and r.stderr.startswith("speedrun.sh: no GPU visible"), r.stderr


def test_flags_train_py_refuses_are_named_before_anything_starts(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """The runs' flags go through train.get_args first (a GPU track's data is prepared after): a flag train.py
    refuses, alone or with the track's, is named in one line, and no run, snapshot or record folder is made (the
    smoke track's temporary RECORDS neither). Two launches, one with RECORDS and one without; the other refusals are
    train.get_args's, in this process, on the argv speedrun.sh's check was given (each launch imports torch, ~5 s)."""
    where = tmp_path_factory.mktemp("python")  # a python that keeps the argv of speedrun.sh's flag check
    (where / "python").write_text(f'#!/bin/sh\ncase "$2" in *"import train"*) printf "%s\\0" "$@" > '
                                  f'{where / "argv"};; esac\nexec {sys.executable} "$@"\n')
    (where / "python").chmod(0o755)
    env = {**os.environ, "RECORDS": str(tmp_path), "NAME": "x", "PATH": f"{where}:{os.environ['PATH']}"}
    for flags, message in ((["--lr", "-1"], "argument --lr: must be in (0, inf), got -1"),  # argparse's, after usage
                           (["--self-guidance", "3"], "--self-guidance extrapolates from the routed network: it needs "
                                                      "--tread or --sprint")):  # the flags replace the record's
        r = subprocess.run(["bash", "speedrun.sh", "--smoke", "--", *flags], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr == f"speedrun.sh: train.py: error: {message} (nothing started)\n", \
            r.stderr
        assert os.listdir(tmp_path) == [] and r.stdout == ""
        env = {**env, "TMPDIR": str(tmp_path)}
        env.pop("RECORDS", None)
    argv = (where / "argv").read_text().split("\0")[2:-1]  # python -c CODE ARGV..., the last launch's
    assert argv[-2:] == ["--self-guidance", "3"] and "--track" in argv
    monkeypatch.setattr(sys, "argv", ["train.py"])  # as speedrun.sh's check names it
    monkeypatch.delenv("RANK", raising=False)  # and unsets them on the CPU tracks
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(ROOT)
    for flags, message in ((["--lrr", "3"], "--lrr is not a flag: did you mean --lr?"),
                           (["--pred", "x", "--lpips", "0.1", "--resolution", "8"], "--lpips: VGG16's feature maps "
                                                                                     "need images of at least 16 px; "
                                                                                     "--resolution 8")):
        with pytest.raises(SystemExit) as e:
            train.get_args(argv[:-2] + flags, files=False)
        said = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
        assert e.value.code not in (0, None) and [line for line in said.splitlines() if line.startswith(
            "train.py: error: ")][:1] == [f"train.py: error: {message}"], said  # the line speedrun.sh shows


def test_a_flag_check_that_ends_without_a_message_still_says_why(tmp_path):
    """train.get_args exiting with nothing printed (a rank's quiet exit, a kill): a line still says what failed."""
    stub_speedrun(tmp_path, NAME="setup", RUNS="3")  # the stub repository (refused: odd)
    (tmp_path / "train.py").write_text("import sys\n\n\ndef get_args(argv, files=True):\n    sys.exit(3)\n")
    r = subprocess.run(["bash", "speedrun.sh", "--smoke"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RECORDS": str(tmp_path / "records"), "NAME": "x"})
    assert (r.returncode, r.stderr) == (2, "speedrun.sh: train.py's check of the runs' flags ended with no message "
                                           "(nothing started)\n"), r.stderr


def test_a_gpu_track_checks_the_flags_as_torchrun_sets_them_before_preparing_its_data(tmp_path):
    """On a GPU track train.get_args checks the runs' flags with torchrun's RANK and WORLD_SIZE and without the files
    (data/mj is prepared after): a refused flag stops the speedrun before prepare.py. 8 GPUs of the rules' kind are
    faked by a torch module of two functions."""
    stub_speedrun(tmp_path, NAME="setup", RUNS="3")  # the stub repository (refused: odd)
    (tmp_path / "train.py").write_text(
        "import json, os, sys\n\n\ndef get_args(argv, files=True):\n"
        "    json.dump([argv, files, os.environ['RANK'], os.environ['WORLD_SIZE']], open('checked.json', 'w'))\n"
        "    sys.exit('train.py: error: --lrr is not a flag')\n")
    (tmp_path / "prepare.py").write_text("open('prepared', 'w')\n")
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"class cuda:\n    device_count = staticmethod(lambda: 8)\n    get_device_name = "
                                      f"staticmethod(lambda i: {verify.TRACKS['8gpu']['gpu']!r})\n")
    r = subprocess.run(["bash", "speedrun.sh", "--calibrate"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "RECORDS": str(tmp_path / "records"), "NAME": "x",
                                         "PYTHONPATH": str(fake.parent)})
    assert (r.returncode, r.stderr) == (2, "speedrun.sh: train.py: error: --lrr is not a flag (nothing started)\n"), \
        r.stderr
    argv, files, rank, world = json.loads((tmp_path / "checked.json").read_text())
    assert (files, rank, world) == (False, "0", "8") and argv[:2] == ["--track", "8gpu"] and "--eval-ref" in argv
    assert not (tmp_path / "prepared").exists()


def test_help_prints_the_usage_and_starts_nothing(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "speedrun.sh"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("The speedrun (records/RULES.md)") and "Environment: RUNS" in \
        r.stdout and "set -euo" not in r.stdout and os.listdir(tmp_path) == [], r.stderr


STUB_QUICK = """import os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out)
open(os.path.join(out, "log.txt"), "w").write("a stub's log\\n")
"""


def test_bad_every_or_records_are_refused_before_any_run_and_runs_is_decimal(tmp_path):
    """EVERY is checked as STOP is, RECORDS (a file here) before the runs, not at their end; RUNS=010 runs 10, RUNS=08
    8 (bash's arithmetic: octal); files an earlier attempt left are named, with what to do."""
    runs = tmp_path / "records" / "runs"
    for every in ("abc", "0", "-1", "1.5"):
        r = stub_speedrun(tmp_path, stub_train=STUB_QUICK, EVERY=every)
        assert r.returncode == 2 and f"speedrun.sh: EVERY={every}: a whole number of steps above 0" in r.stderr, \
            r.stderr
        assert not list(runs.glob("x-*"))
    (tmp_path / "file").write_text("the user's")
    for records in (tmp_path / "file", tmp_path / "file" / "sub"):
        r = stub_speedrun(tmp_path, stub_train=STUB_QUICK, RECORDS=str(records), RUNS_DIR=str(runs))
        assert r.returncode == 1 and f"speedrun.sh: RECORDS={records}: {tmp_path / 'file'} is not a folder you can " \
            "write in" in r.stderr, r.stderr
        assert not list(runs.glob("x-*")) and (tmp_path / "file").read_text() == "the user's"
    for value, n in (("010", 10), ("08", 8)):
        r = stub_speedrun(tmp_path, stub_train=STUB_QUICK, RUNS=value, NAME=f"n{n}")
        assert "failed" not in r.stderr and "value too great" not in r.stderr, r.stderr
        assert {p.name for p in runs.glob(f"n{n}-*") if p.is_dir()} == {f"n{n}-{k}" for k in range(n)}
        assert f'=== attempt.json\n{{"runs": {n}}}' in (runs / f"n{n}-0" / "log.txt").read_text()
    (runs / "gone-1.out").write_text("train.py: error: ...")  # a run that failed before train.py made its folder
    r = stub_speedrun(tmp_path, stub_train=STUB_QUICK, NAME="gone")
    assert r.returncode == 1 and f"speedrun.sh: NAME=gone: an earlier attempt's files are there: {runs}/gone-1.out " \
        "(runs, which train.py would not overwrite; *.out, their consoles, which say why a run failed;" in r.stderr, \
        r.stderr
    assert not (runs / "gone-0").exists()


def test_the_cpu_track_runs_whole_pairs_at_its_budget_cadence_and_evaluation(tmp_path):
    """speedrun.sh --track cpu, its defaults: the track's minimum of runs rounded up to whole pairs, each checking for
    the target every 250 steps on the calibration's periodic samples and stopping at the target or 60 minutes, then
    eval.py on the track's samples, steps and CFG with noise seed 42 whatever the run's seed; --calibrate trains the
    baseline the calibration's 30 minutes, no --target."""
    import bench
    runs, t = tmp_path / "records" / "runs", verify.TRACKS["cpu"]
    n = (t["min_runs"] + 1) // 2 * 2  # whole pairs: 4
    stub = STUB_QUICK + 'open(os.path.join(out, "argv"), "w").write(" ".join(sys.argv[1:]))\n'
    stub_speedrun(tmp_path, stub_train=stub, RUNS="7")  # refused (odd): the repository, its stubs committed
    (tmp_path / "eval.py").write_text(STUB_EVAL + "pathlib.Path(sys.argv[sys.argv.index('--ckpt') + 1], 'eval_argv')"
                                                  ".write_text(' '.join(sys.argv[1:]))\n")  # the runs' snapshot has it
    calibrated = verify.load_runs(ROOT / t["target_from"])[0]["config"]["args"]  # as the target was measured
    assert calibrated["eval_samples"] == t["periodic"]["eval_samples"] and not calibrated["target"]
    cadence = f"--track cpu --eval-every {calibrated['eval_every']} --eval-samples {calibrated['eval_samples']}"
    record = " ".join(bench.speedrun_record("cpu"))
    for name, options, budget in (("x", [], f"--max-time 60 --target {t['metric']}={t['target']}"),
                                  ("c", ["--calibrate"], f"--max-time {calibrated['max_time']:g}")):
        r = stub_speedrun(tmp_path, "--track", "cpu", *options, stub_train=stub, NAME=name, RUNS_DIR=str(runs))
        assert f"run {name}-{n - 1}: " in r.stdout and "failed" not in r.stderr, r.stdout + r.stderr
        assert {p.name for p in runs.glob(f"{name}-*") if p.is_dir()} == {f"{name}-{k}" for k in range(n)}
        for k in range(n):
            assert f'=== attempt.json\n{{"runs": {n}}}' in (runs / f"{name}-{k}" / "log.txt").read_text()
            assert (runs / f"{name}-{k}" / "argv").read_text() == f"{cadence} {budget} --seed {k} --out " \
                f"{runs}/{name}-{k}" + (f" {record}" if name == "x" else "")
            assert (runs / f"{name}-{k}" / "eval_argv").read_text() == (
                f"--ckpt {runs}/{name}-{k} --num-samples {t['eval_samples']} --steps {t['steps']} --cfg-scale "
                f"{t['cfg_scale']} --seed {verify.EVAL_SEED} --out {runs}/{name}-{k}/confirm.json")


# BESIDE's pairs: a run waits for its partner of the same seed to start (side by side, or it fails), and a run of the
# next seed finds the last pair evaluated (pairs one after the other)
STUB_PAIRED = """import os, sys, time
out, seed = sys.argv[sys.argv.index("--out") + 1], int(sys.argv[sys.argv.index("--seed") + 1])
os.makedirs(out)
open(os.path.join(out, "argv"), "w").write(" ".join(sys.argv[1:]))
open(os.path.join(out, "log.txt"), "w").write("a stub's log")
base, beside = out.rsplit("-", 1)[0].removesuffix("-beside"), "-beside-" in out
partner = f"{base}-{seed}" if beside else f"{base}-beside-{seed}"
deadline = time.monotonic() + 60
while not os.path.exists(partner) and time.monotonic() < deadline:
    time.sleep(0.05)
earlier = [f"{base}{kind}-{seed - 1}/evaluated" for kind in ("", "-beside")] if seed else []
sys.exit(0 if os.path.exists(partner) and all(os.path.exists(e) for e in earlier) else 3)
"""


def test_the_runs_train_on_a_snapshot_of_the_working_tree(tmp_path):
    """The tree's uncommitted changes of top-level .py files, staged or not, and its new ones are in it (each log holds
    them); not another file, which would reach the runs unlogged (a package shadowing a library); the folder goes at
    the end."""
    stub = STUB_PAIRED.replace("os.makedirs(out)\n", "os.makedirs(out)\nimport helper\nhere = os.path.dirname("
                               "os.path.abspath(__file__))\nopen(out + '/code', 'w').write(os.path.abspath(__file__) + "
                               "' ' + helper.MARK + ' ' + str(os.path.exists(os.path.join(here, 'tqdm'))))\n")
    stub_speedrun(tmp_path, stub_train=STUB_PAIRED, RUNS="7")  # refused (odd): the repository, its stubs committed
    (tmp_path / "helper.py").write_text("MARK = 'uncommitted'\n")
    git_in(tmp_path, "add", "helper.py")  # a new file, staged; train.py's change (stub_speedrun's) stays unstaged
    (tmp_path / "tqdm").mkdir()
    (tmp_path / "tqdm" / "__init__.py").write_text("# would be imported in place of the library\n")
    r = stub_speedrun(tmp_path, "--smoke", "--", "--lr=3e-3", stub_train=stub, BESIDE="1")
    runs = tmp_path / "records" / "runs"
    assert "run x-beside-1: " in r.stdout and "failed" not in r.stderr, r.stdout + r.stderr
    assert "the runs train on HEAD's version of what is not a top-level .py file (the logs hold those only; commit " \
        "the rest): left out tqdm/__init__.py\n" in r.stdout, r.stdout
    for run in ("x-0", "x-1", "x-beside-0", "x-beside-1"):
        assert (runs / run / "code").read_text() == f"{runs / 'x-code' / 'train.py'} uncommitted False"
    assert not (runs / "x-code").exists() and len(git_in(tmp_path, "worktree", "list").splitlines()) == 1


def test_editing_speedrun_sh_while_it_runs_changes_nothing(tmp_path):
    """bash reads a script as it runs it; speedrun.sh is read whole before its first command, so an edit of it while
    the runs train (the tree is the user's meanwhile) neither breaks nor changes the speedrun: it writes its folder."""
    stub = STUB_PAIRED.replace("sys.exit(", "time.sleep(2)\nsys.exit(")
    stub_speedrun(tmp_path, stub_train=stub, RUNS="7")  # refused (odd): the repository, its stubs committed
    env = {**os.environ, "RECORDS": str(tmp_path / "records"), "NAME": "x", "BESIDE": "1"}
    speedrun = subprocess.Popen(["bash", "speedrun.sh", "--smoke", "--", "--lr=3e-3"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "records" / "runs" / "x-0" / "argv").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    script = (tmp_path / "speedrun.sh").read_text()  # an edit that moves every later line: 1,000 bytes at the top
    (tmp_path / "speedrun.sh").write_text(script.replace("\n", "\n" + "# edited\n" * 125, 1))
    out, err = speedrun.communicate(timeout=120)
    assert "run x-beside-1: " in out and "log_0.txt: needs train.py's config.json section" in out, out + err


def test_beside_runs_the_record_configuration_seed_by_seed_beside_the_candidate(tmp_path):
    r = stub_speedrun(tmp_path, "--smoke", "--", "--lr=3e-3", stub_train=STUB_PAIRED, BESIDE="1")
    runs, folder = tmp_path / "records" / "runs", next((tmp_path / "records").glob("*_x"))
    assert "run x-beside-1: " in r.stdout and "failed" not in r.stderr, r.stdout + r.stderr
    # verify.py --write reads the logs (a stub's: refused), WHAT ("--lr=3e-3", a dash first) passed as its value
    assert "FAIL " in r.stdout and "log_0.txt: needs train.py's config.json section" in r.stdout, r.stdout + r.stderr
    for seed in (0, 1):
        assert (runs / f"x-{seed}" / "argv").read_text().endswith("--lr=3e-3")
        beside = (runs / f"x-beside-{seed}" / "argv").read_text()
        assert beside.endswith("--repa builtin --tread --optimizer muon --repa-lambda 2") and "3e-3" not in beside
        assert (folder / f"log_{seed}.txt").exists() and (folder / "beside" / f"log_{seed}.txt").exists()
    r = stub_speedrun(tmp_path, "--smoke", stub_train=STUB_PAIRED, BESIDE="1", NAME="y")
    assert r.returncode == 1 and "BESIDE=1 runs the record configuration beside a candidate's" in r.stderr
    r = stub_speedrun(tmp_path, "--track", "8gpu", "--", "--lr", "3e-3", BESIDE="1", NAME="z")
    assert r.returncode == 1 and "BESIDE is for the CPU track" in r.stderr, r.stderr
    shutil.rmtree(folder)
    for seed in (0, 1):  # only the runs beside the first attempt's are left
        shutil.rmtree(runs / f"x-{seed}")
        (runs / f"x-{seed}.out").unlink()
    r = stub_speedrun(tmp_path, "--smoke", "--", "--lr", "3e-3", BESIDE="1")
    assert r.returncode == 1 and "speedrun.sh: NAME=x: " in r.stderr, r.stderr


def test_beside_runs_train_at_the_commit_their_record_trained_at(tmp_path):
    """The configuration a record replaces is its flags and its code: BESIDE runs it from a worktree of the commit its
    record's logs name (a code speedup then counts), the candidate from the working tree; the worktree goes after.
    Refused before any run: a commit the clone lacks, and a candidate that is that configuration (nothing changed)."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()
    def marked(code):  # STUB_PAIRED, which also writes which code ran it, and the .py files beside it
        return STUB_PAIRED.replace("os.makedirs(out)\n", f"os.makedirs(out)\nopen(out + '/code', 'w').write({code!r})\n"
                                   "open(out + '/files', 'w').write(' '.join(sorted(f for f in os.listdir(os.path."
                                   "dirname(os.path.abspath(__file__))) if f.endswith('.py'))))\n")
    (tmp_path / "records").mkdir()
    script = (ROOT / "speedrun.sh").read_text()
    smoke = "smoke) RECORD=(--repa builtin --tread --optimizer muon --repa-lambda 2)"
    assert smoke in script
    (tmp_path / "speedrun.sh").write_text(script.replace(smoke, smoke + " RECORD_DIR=records/2026-01-01_old"))
    shutil.copy(ROOT / "records" / "verify.py", tmp_path / "records")
    (tmp_path / "train.py").write_text(as_train_py(marked("old")))
    (tmp_path / "eval.py").write_text(STUB_EVAL)
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "the old record's code")
    old = git("rev-parse", "HEAD")
    (tmp_path / "records" / "2026-01-01_old").mkdir()
    log = tmp_path / "records" / "2026-01-01_old" / "log_0.txt"
    env = {**os.environ, "RECORDS": str(tmp_path / "records"), "NAME": "x", "BESIDE": "1"}
    log.write_text(synthetic_log(0, 25.0, 0.305, None).replace(HEAD, "0" * 40))  # a commit this clone lacks
    r = subprocess.run(["bash", "speedrun.sh", "--smoke", "--", "--lr", "3e-3"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"commit {'0' * 40}, which this clone lacks" in r.stderr, r.stderr
    log.write_text(synthetic_log(0, 25.0, 0.305, None).replace(HEAD, old))
    r = subprocess.run(["bash", "speedrun.sh", "--smoke", "--", "--repa", "builtin", "--tread", "--optimizer", "muon",
                        "--repa-lambda", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "with the record's own flags and its code" in r.stderr, r.stderr
    assert not list((tmp_path / "records" / "runs").glob("x-*")), "refused before any run"
    (tmp_path / "NOTES.md").write_text("a commit since, of no source")  # HEAD moved on, the code did not: refused too
    git("add", "NOTES.md")
    git("commit", "-q", "-m", "notes")
    r = subprocess.run(["bash", "speedrun.sh", "--smoke", "--", "--repa", "builtin", "--tread", "--optimizer", "muon",
                        "--repa-lambda", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "with the record's own flags and its code" in r.stderr, r.stderr
    assert not list((tmp_path / "records" / "runs").glob("x-*")) and len(git("worktree", "list").splitlines()) == 1
    (tmp_path / "train.py").write_text(as_train_py(marked("new")))  # the candidate's code: the same flags race
    # the record's carried source (its logs hold train.py) goes to the runs beside; a script kept beside it does not
    (log.parent / "train.py").write_text(as_train_py(marked("old, carried")))
    (log.parent / "evalbench.py").write_text("print('a measurement of its own')\n")
    r = subprocess.run(["bash", "speedrun.sh", "--smoke", "--", "--repa", "builtin", "--tread", "--optimizer", "muon",
                        "--repa-lambda", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    runs = tmp_path / "records" / "runs"
    assert "the runs beside train at records/2026-01-01_old's commit" in r.stdout, r.stdout + r.stderr
    for seed in (0, 1):
        assert (runs / f"x-{seed}" / "code").read_text() == "new"
        assert (runs / f"x-beside-{seed}" / "code").read_text() == "old, carried"
        assert "evalbench.py" not in (runs / f"x-beside-{seed}" / "files").read_text().split()
    assert not (runs / "x-beside-code").exists() and len(git("worktree", "list").splitlines()) == 1


def test_track_choice_follows_track_data_and_cuda():
    assert train.choose_track(None, None, cuda_available=True) == ("8gpu", "CUDA available, no --data")
    assert train.choose_track(None, None, cuda_available=False) == ("cpu", "no CUDA, no --data")
    assert train.choose_track(None, "builtin", cuda_available=True) == ("cpu", "--data builtin")
    assert train.choose_track(None, "data/x", cuda_available=True) == (None, "--data data/x")
    assert train.choose_track("1gpu", None, cuda_available=False) == ("1gpu", "--track")


def test_cuda_without_data_is_the_8gpu_track_and_names_its_preparation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    args = train.get_args([])
    assert (args.track, args.data, args.model) == ("cpu", "builtin", "tiny-pixel")
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        train.get_args([])
    err = capsys.readouterr().err
    assert f"--data {train.SPEEDRUN_DATA}: no prepared dataset there" in err and train.SPEEDRUN_PREPARE in err
    assert "the 8gpu track's dataset: CUDA available, no --data" in err and "--track cpu" in err


def test_target_direction_follows_the_metric():
    assert train.target_reached(("fid", 20.0), {"fid": 19.9}) and not train.target_reached(("fid", 20.0), {"fid": 21})
    assert train.target_reached(("fid", 20.0), {"fid": 20.0})  # at the target: reached, as an accuracy at it is
    assert train.target_reached(("object_accuracy", 0.3), {"object_accuracy": 0.3})
    assert not train.target_reached(("object_accuracy", 0.3), {"object_accuracy": 0.29})


def metrics_run(folder, evals, torn=False):
    """A run folder whose metrics.jsonl holds train.py's step and eval records: evals = [(step, seconds, accuracy)]."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "train_time_s": t, "loss": 0.1}) + "\n" for s, t, _ in evals]
    lines += [json.dumps({"step": s, "train_time_s": t, "object_accuracy": a}) + "\n" for s, t, a in evals]
    (folder / "metrics.jsonl").write_text("".join(lines) + ('{"step": 999, "train_ti' if torn else ""))
    return str(folder)


def test_plot_reads_a_torn_line_and_every_run_to_its_end(tmp_path, monkeypatch, capsys):
    import plot
    short = metrics_run(tmp_path / "a", [(250, 60, 0.2), (500, 120, 0.42)])  # stopped at the target
    long = metrics_run(tmp_path / "b", [(250, 60, 0.1), (500, 120, 0.3), (750, 180, 0.5)], torn=True)  # killed
    monkeypatch.setattr(sys, "argv", ["plot.py", "--target", "0.4", "--out", str(tmp_path / "c.png"),
                                      f"base={short},{long}"])
    plot.main()
    out = capsys.readouterr().out
    assert "| 3.0 | 750 | 0.500 | **0.500** |" in out  # the longer run's last evaluation, though the first run stopped
    assert "| 1.0 | 250, 250 | 0.200, 0.100 | **0.150** +- 0.071 |" in out  # the sample sd of the two runs
    assert "minutes to object_accuracy 0.4: 1.9, 2.5 (mean 2.2)" in out and (tmp_path / "c.png").exists()
    written = (tmp_path / "c.png").read_bytes()
    for name, message in (("c.png", "exists; write another file"), ("c.json", "must end in .png")):  # before any work
        monkeypatch.setattr(sys, "argv", ["plot.py", "--out", str(tmp_path / name), f"base={short}"])
        with pytest.raises(SystemExit):
            plot.main()
        assert f"--out {tmp_path / name}: {message}" in capsys.readouterr().err
    assert (tmp_path / "c.png").read_bytes() == written


def test_plot_refuses_a_nan_target_or_a_missing_out_folder_before_any_work(tmp_path, monkeypatch, capsys):
    import plot
    run = metrics_run(tmp_path / "a", [(250, 60, 0.2)])
    monkeypatch.setattr(plot, "table", lambda *a: pytest.fail("worked"))
    for argv, message in ((["--target", "nan"], "argument --target: expected a finite number, got nan"),
                          (["--target", "inf"], "argument --target: expected a finite number, got inf"),
                          (["--out", "/nonexistent/p.png"], "--out /nonexistent/p.png: no folder /nonexistent to "),
                          (["--out", ""], "--out : must end in .png"),
                          (["--metric", "loss"], "no evaluation of --metric loss in its metrics.jsonl")):  # a step's
        monkeypatch.setattr(sys, "argv", ["plot.py", *argv, f"base={run}"])
        with pytest.raises(SystemExit):
            plot.main()
        assert message in capsys.readouterr().err


def test_plot_reads_run_folders_whose_path_holds_an_equals_sign(tmp_path, monkeypatch, capsys):
    import plot
    run = metrics_run(tmp_path / "lr=1e-3-0", [(250, 60, 0.2)])
    for group, name in ((f"lr={run}", "lr"), (run, run)):  # named, and unnamed (the runs themselves)
        monkeypatch.setattr(sys, "argv", ["plot.py", group])
        plot.main()
        assert f"\n{name} (1 runs)" in capsys.readouterr().out


def test_plot_time_to_a_lower_is_better_target():
    import plot
    fid = [(1.0, 250, 80.0), (2.0, 500, 40.0), (3.0, 750, 20.0)]
    assert plot.time_to(30.0, fid, lower=True) == 2.5 and plot.time_to(90.0, fid, lower=True) == 1.0
    assert plot.time_to(10.0, fid, lower=True) is None and plot.time_to(0.5, [(1.0, 250, 0.25)]) is None
    # reaching the target exactly counts, at that evaluation, either way
    assert plot.time_to(40.0, fid, lower=True) == 2.0 and plot.time_to(0.25, [(1.0, 250, 0.25)]) == 1.0
    assert plot.time_to(0.4, [(1.0, 250, 0.2), (2.0, 500, 0.4)]) == 2.0
    assert plot.time_to(0.4, [(2.0, 100, 0.5), (4.0, 200, 0.6)]) == 2.0  # met at the first: not before it


def test_plot_refuses_a_run_without_the_metric(tmp_path, monkeypatch, capsys):
    import plot
    run = metrics_run(tmp_path / 'a', [(1, 60, 0.2)])
    for argv, message in ((["--metric", "fid", f"x={run}"], "no evaluation of --metric fid"),
                          ([f"x={run}", f"x={run}"], "two groups named 'x'"),
                          ([f"x={run},{tmp_path / 'nowhere'}"], f"{tmp_path / 'nowhere'}: no metrics.jsonl there")):
        monkeypatch.setattr(sys, "argv", ["plot.py", *argv])
        with pytest.raises(SystemExit):
            plot.main()
        assert message in capsys.readouterr().err


def test_plot_names_the_argument_typed_and_refuses_an_unwritable_out_before_any_work(tmp_path, monkeypatch, capsys):
    import plot
    run, ro = metrics_run(tmp_path / "a", [(1, 60, 0.2)]), tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(plot, "evaluations", lambda *a: pytest.fail("read a run"))
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(ro) and access(path, mode))  # root: chmod won't
    for argv, message in (([str(tmp_path / "rnu1")], f"{tmp_path / 'rnu1'}: no metrics.jsonl there"),  # a typo
                          ([""], "'': an empty run folder"), ([f"x={run},"], f"'x={run},': an empty run folder"),
                          ([run, "--ta", "0.5"], "unrecognized arguments: --ta 0.5"),  # not --target
                          (["--out", str(ro / "p.png"), run], f"--out {ro / 'p.png'}: its folder cannot be written")):
        monkeypatch.setattr(sys, "argv", ["plot.py", *argv])
        with pytest.raises(SystemExit):
            plot.main()
        assert message in capsys.readouterr().err


def test_plot_draws_every_group_and_flat_zero_curves(tmp_path, monkeypatch):
    import numpy as np
    import plot
    from PIL import Image
    monkeypatch.setattr(plot, "COLOURS", [(200, 30, 30)])  # fewer colours than groups
    zero = [plot.evaluations(metrics_run(tmp_path / "z", [(250, 60, 0.0), (500, 120, 0.0)]), "object_accuracy")]
    rising = [plot.evaluations(metrics_run(tmp_path / "r", [(250, 60, 0.1), (500, 120, 0.3)]), "object_accuracy")]
    red = []
    for groups in ({"zero": zero}, {"zero": zero, "rising": rising}):
        plot.plot(groups, "object_accuracy", None, tmp_path / "c.png")  # all-zero accuracies: no division by zero
        red.append((np.asarray(Image.open(tmp_path / "c.png")) == (200, 30, 30)).all(-1).sum())
    assert red[1] > red[0] > 0  # the second group drawn too


def test_a_calibration_trains_a_fixed_budget_and_a_gpu_track_needs_a_gpu(tmp_path, tmp_path_factory):
    stub_speedrun(tmp_path, "--smoke", "--calibrate")  # run 1 of the stub fails: run 0's flags are what is read
    argv = (tmp_path / "records" / "runs" / "x-0" / "argv").read_text().split()
    assert "--max-steps" in argv and "--target" not in argv  # verify.py refuses a calibration with a --target
    no_gpu = no_gpu_torch(tmp_path_factory.mktemp("no-gpu"))
    for track in ("8gpu", "1gpu"):  # refused before any preparation starts (the stub has no prepare.py)
        r = stub_speedrun(tmp_path, "--track", track, "--calibrate", NAME=track, PYTHONPATH=no_gpu)
        assert r.returncode == 1 and r.stderr.startswith("speedrun.sh: no GPU visible"), r.stderr


def test_the_cpu_record_configuration_is_its_record_folders():
    """speedrun.sh's CPU RECORD flags are those its RECORD_DIR's runs trained (BESIDE runs them at that commit)."""
    import bench
    flags = bench.speedrun_record("cpu")
    folder = re.search(r"^ *cpu\) RECORD=\([^)]*\) RECORD_DIR=(\S+) ;;", (ROOT / "speedrun.sh").read_text(), re.M)[1]
    runs = verify.load_runs(ROOT / folder)
    assert runs and verify.main(["--commit", str(ROOT / folder)]) is None
    ours = vars(train.get_args(["--track", "cpu"] + flags))
    for name in (f[2:].replace("-", "_") for f in flags if f.startswith("--")):
        assert all(r["config"]["args"][name] == ours[name] for r in runs), name


def board_entry(name, time, kind="record", flags=None, replaces=None, ratio=None, code="c1", replaces_code="c1",
                attempt_logged=True):
    """What leaderboard.scaled reads of a record folder: a measured time, or a ratio to its runs beside."""
    return dict(track="cpu", kind=kind, configuration=flags or {"lr": name}, replaces=replaces, code=code,
                replaces_code=replaces_code, attempt_logged=attempt_logged, summary=dict(time=time, ratio=ratio),
                folder=Path(name))


def test_the_board_scales_by_the_latest_record_of_a_configuration_and_keeps_rule_3(capsys):
    first, same = board_entry("a", 100.0, flags={"lr": 1}), board_entry("b", 80.0, flags={"lr": 1})  # faster code
    baseline = board_entry("calibration", 50.0, kind="calibration")
    faster = board_entry("c", 90.0, flags={"lr": 2}, replaces={"lr": 1}, ratio=0.9)
    kept = leaderboard.scaled([baseline, first, same, faster])
    assert [e["folder"].name for e in kept] == ["calibration", "a", "b", "c"]
    assert faster["time"] == pytest.approx(72.0)  # 0.9 x the latest of its configuration's records (80), not 90
    tie = board_entry("d", 90.0, flags={"lr": 3}, replaces={"lr": 1}, ratio=1.0)  # 80 again: not below the record
    assert [e["folder"].name for e in leaderboard.scaled([first, same, tie])] == ["a", "b"]
    assert "left out d: 1.33 min on the board's clock (1.000x its runs beside), not below the current record's" in \
        capsys.readouterr().err
    # before attempt.json, runs beside on the candidate's code matched on flags; on a third code, nothing
    orphan = board_entry("e", 90.0, flags={"lr": 4}, replaces={"lr": 1}, ratio=0.5, code="c2", replaces_code="c0",
                         attempt_logged=False)
    assert [e["folder"].name for e in leaderboard.scaled([first, orphan])] == ["a"]
    # a calibration of the replaced flags is not a record of them: it scales nothing
    twin = board_entry("calibration", 50.0, kind="calibration", flags={"lr": 1})
    kept = leaderboard.scaled([first, twin, faster])
    assert [e["folder"].name for e in kept] == ["a", "calibration", "c"] and faster["time"] == pytest.approx(90.0)
    assert [e["folder"].name for e in leaderboard.scaled([twin, faster])] == ["calibration"]


def test_rule_3_compares_a_record_with_its_own_tracks_and_the_baseline_is_no_record(tmp_path):
    """A slower CPU record after a GPU one is on its own board; a calibration after a faster record (a
    recalibration) stays the baseline; a baseline faster than a record does not take a rank."""
    gpu = dict(board_entry("g", 100.0), track="1gpu")
    cpu = board_entry("c", 900.0)
    assert [e["folder"].name for e in leaderboard.scaled([gpu, cpu])] == ["g", "c"]
    record, later = board_entry("r", 500.0), board_entry("calibration", 900.0, kind="calibration")
    assert [e["folder"].name for e in leaderboard.scaled([record, later])] == ["r", "calibration"]
    rows = [dict(e, summary=dict(e["summary"], mean=0.5, sd=0.1), what="", date="2026-12-01", folder=tmp_path / n)
            for e, n in ((board_entry("b", 400.0, kind="calibration"), "b"), (board_entry("r", 500.0), "r"))]
    for e in rows:
        e["time"] = e["summary"]["time"]
    ranks = [line.split(" | ")[0] for line in leaderboard.table("cpu", rows, tmp_path)[4:]]
    assert ranks == ["| baseline", "| 1"]


def test_the_board_names_each_tracks_goal_the_way_its_metric_improves(monkeypatch, tmp_path):
    cpu = verify.TRACKS["cpu"]
    assert leaderboard.table("cpu", [], tmp_path)[0] == (f"**cpu**: {cpu['title']}; target object_accuracy >= "
                                                         f"{cpu['target']} ({cpu['target_from']})")
    monkeypatch.setitem(verify.TRACKS["1gpu"], "target", 20.0)
    assert leaderboard.table("1gpu", [], tmp_path)[0] == (f"**1gpu**: {verify.TRACKS['1gpu']['title']}; target fid "
                                                          f"<= 20.0 (speedrun.sh --calibrate)")


def test_the_run_whose_flags_or_source_differ_is_named_with_what_differs(tmp_path):
    """One configuration per record: the odd run is the one that differs from what most runs share (an edited first
    log is blamed, not the three honest ones after it), with its flag values against theirs, or the file whose source
    differs; verify.py says when the folder is not there."""
    def fake(name, lr=0.002, source="def main(): ..."):
        return {"name": name, "config": {"args": {"lr": lr, "seed": 0, "out": name}}, "sources": {"train.py": source}}
    runs = [fake("log_0.txt", lr=0.003), *(fake(f"log_{k}.txt") for k in (1, 2, 3))]
    assert verify.odd_runs(runs) == ["log_0.txt: --lr 0.003 (theirs 0.002) differs from log_1.txt's, which 3 of the 4 "
                                     "runs share: one configuration per record"]
    runs[0], runs[2] = fake("log_0.txt"), fake("log_2.txt", lr=0.001, source="faster")
    assert verify.odd_runs(runs) == ["log_2.txt: --lr 0.001 (theirs 0.002), the source of train.py differ from "
                                     "log_0.txt's, which 3 of the 4 runs share: one configuration per record"]
    assert verify.odd_runs(runs[:1] + runs[3:]) == []
    r = subprocess.run([sys.executable, "records/verify.py", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"{tmp_path / 'nowhere'}: no such folder" in r.stderr, r.stderr
