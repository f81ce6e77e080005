"""bench.py: every mode runs at tiny sizes and prints each figure next to its baseline. No real time is asserted: on
a fake clock (the `clock` fixture) every figure is a closed form of the seconds each side takes."""

import os
import re
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

import bench
from data import pad_text
from eval import sample
from model import PRX, Attention, flops_per_sample, preset_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compared(out, what, baseline):
    """The line `<what ...>: ours X unit | <baseline> Y unit | ours/<baseline> R` -> (X, Y, R)."""
    number = r"([\d,.e+-]+)"
    pattern = (rf"^{re.escape(what)}.*: ours {number} .*\| {re.escape(baseline)} {number} .*\| "
               rf"ours/{re.escape(baseline)} (\d+\.\d{{3}})$")
    found = re.search(pattern, out, re.MULTILINE)
    assert found, f"no '{what}' line against {baseline} in:\n{out}"
    return tuple(float(g.replace(",", "")) for g in found.groups())


class FakeClock:
    """clock({side: seconds}) puts bench.timed on a fake clock on which each call of a side takes its seconds (twice
    as many on the CPU clock, time.process_time): each figure is then a closed form. A side not named fails.
    clock.spy(key, owner, name) records the side being timed at each call of owner.name (clock.ran[key]): what a side
    runs is what its name says."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.side, self.ran = monkeypatch, None, {}

    def __call__(self, seconds):
        real = bench.timed

        def timed(fns, warmup, steps, clock=time.perf_counter):
            now, scale = [0.0], 2.0 if clock is time.process_time else 1.0

            def advancing(name, fn):
                def call():
                    self.side = name
                    fn()
                    self.side = None
                    now[0] += seconds[name] * scale
                return call
            return real({name: advancing(name, fn) for name, fn in fns.items()}, warmup, steps, clock=lambda: now[0])
        self.monkeypatch.setattr(bench, "timed", timed)

    def spy(self, key, owner, name, detail=lambda *args, **kwargs: None):
        """owner.name records (the side, detail(its arguments)) in ran[key] at each call."""
        real, calls = getattr(owner, name), self.ran.setdefault(key, set())

        def spied(*args, **kwargs):
            calls.add((self.side, detail(*args, **kwargs)))
            return real(*args, **kwargs)
        self.monkeypatch.setattr(owner, name, spied)


@pytest.fixture
def clock(monkeypatch):
    return FakeClock(monkeypatch)


def test_timed_times_every_call_after_the_untimed_rounds():
    now, calls = [0.0], []

    def work(name, seconds):  # the k-th call of all takes k x seconds on the fake clock
        def fn():
            calls.append(name)
            now[0] += seconds * len(calls)
        return fn

    times = bench.timed({"a": work("a", 1.0), "b": work("b", 10.0)}, warmup=2, steps=3, clock=lambda: now[0])
    assert calls == ["a", "b"] * 5  # each round calls every side in turn
    assert times == {"a": [5.0, 7.0, 9.0], "b": [60.0, 80.0, 100.0]}  # calls 5 to 10: after the 2 warm-up rounds


def test_compare_prints_ours_the_baseline_and_their_ratio(capsys):
    bench.compare("step", 3.0, "torch", 2.0, "ms")
    assert capsys.readouterr().out == "step: ours 3.0 ms | torch 2.0 ms | ours/torch 1.500\n"


def test_model(capsys, clock):
    clock({"ours": 0.5, "diffusers": 2.0})
    bench.main(["model", "--preset", "tiny", "--batch", "2", "--img-tokens", "16", "--txt-tokens", "8",
                "--min-len", "2", "--max-len", "6", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert compared(out, "forward of sample 0", "closed form")[2] == 1.0  # of its real text tokens, not the padding
    assert compared(out, "eager fwd+bwd", "diffusers") == (500.0, 2000.0, 0.25)


def test_mfu_credits_each_side_three_forwards_of_the_real_text():
    """MFU: 3 x the forward's closed form (the backward costs two forwards) of each sample's real text tokens, over
    the step's time, against the peak."""
    cfg = preset_config("tiny")
    mfu = bench.mfu_percent(cfg, 16, torch.tensor([3, 5]), {"ours": 2.0, "diffusers": 4.0}, 1e-3)
    useful = 3 * (flops_per_sample(cfg, 16, 3) + flops_per_sample(cfg, 16, 5))
    assert mfu == pytest.approx({"ours": 100 * useful / 2e-3 / 1e9, "diffusers": 100 * useful / 4e-3 / 1e9})


def test_parity_row_puts_bf16_first_against_fp32(monkeypatch):
    """The parity row: bf16 autocast's last loss as ours, fp32's as the baseline, and the largest relative gap of any
    step, from a fresh copy of the model each (training_step stubbed: a loss by precision and batch)."""
    losses, models = {True: [1.5, 2.25], False: [1.0, 2.0]}, []
    monkeypatch.setattr(bench, "training_step", lambda trial, opt, b, bf16: models.append(trial) or
                        torch.tensor(losses[bf16][b]))
    model = torch.nn.Linear(2, 2)
    assert bench.parity_row(model, [0, 1]) == (
        "loss after 2 AdamW steps, bf16 autocast (largest gap over the steps 50.00%)", 2.25, "fp32", 2.0, "", ".4f")
    assert len({id(m) for m in models}) == 2 and model not in models


def test_muon(capsys, clock):
    clock({"gram": 1.0, "plain": 4.0, "ours": 1.0, "torch": 4.0})
    clock.spy("newton_schulz", bench, "newton_schulz", lambda G, **kwargs: kwargs["plain"])
    clock.spy("ours", bench.Muon, "step")
    clock.spy("torch", torch.optim.Muon, "step")
    bench.main(["muon", "--preset", "tiny", "--steps", "1"])
    out = capsys.readouterr().out
    assert "blocks=1 " in out.splitlines()[0] and "first 1 block(s)" in out  # the header says what runs (CPU: 1)
    assert clock.ran == {"newton_schulz": {("gram", False), ("plain", True)}, "ours": {("ours", None)},
                         "torch": {("torch", None)}}
    share, ideal, _ = compared(out, "largest Newton-Schulz share", "ideal")
    with torch.device("meta"):
        costs = [bench.ns_cost(p.shape) for p in bench.split_muon_params(PRX.from_preset("tiny"))[0]]
    # greedy largest-first: the busiest of 8 ranks holds at least an eighth, and at most an eighth plus one matrix
    assert ideal == 12.5 and 12.5 <= share <= 12.5 + 100 * max(costs) / sum(costs)
    assert compared(out, "fp32 Newton-Schulz", "plain iteration") == (1000.0, 4000.0, 0.25)
    assert compared(out, "step, bf16 Newton-Schulz", "torch.optim.Muon") == (1000.0, 4000.0, 0.25)  # torch's: bf16


def test_loader(tmp_path):
    # a subprocess: the loader bench pins its process to one core
    out = subprocess.run([sys.executable, "bench.py", "loader", str(tmp_path), "--samples", "96", "--batch", "16"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "96 samples, 6 batches of 16" in out
    compared(out, "samples per wall second", "datasets")
    compared(out, "samples per CPU second", "datasets")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "null_txt.npy", "train"]  # datasets' copy gone


def test_loader_figures(tmp_path, capsys, monkeypatch, clock):
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: None)  # in process: the pytest worker stays as is
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    clock({"datasets": 4.0, "ShardLoader": 1.0})
    readings, advices = cold_clock(monkeypatch)
    bench.main(["loader", str(tmp_path), "--samples", "96", "--batch", "16"])
    out = capsys.readouterr().out
    assert compared(out, "samples per wall second", "datasets") == (16.0, 4.0, 4.0)  # 16 samples a batch
    assert compared(out, "samples per CPU second", "datasets") == (8.0, 2.0, 4.0)
    tokens = float(re.search(r"text (\d+) tokens", out)[1])
    assert 110 <= tokens <= 130  # write_synthetic's realistic captions: 60 to 180 tokens, mean 120
    # out of the page cache, on cold_clock: 1 s between each side's readings, 1 s more a data.will_need call there
    advised, unadvised = compared(out, "ms a batch out of the page cache", "unadvised")[:2]
    calls = sum(readings[-2] < t < readings[-1] for t in advices)  # the advised side's, the last timed
    assert calls and advised == 1000 * (1 + calls) / 8 and unadvised == 1000 / 8  # the unadvised side advises nothing


def cold_clock(monkeypatch):
    """bench.cold_batch_ms's clock made fake: each reading moves it 1 s on, each data.will_need call 1 s more ->
    (the readings, the times of the calls of data.will_need)."""
    now, readings, advices, will_need, lock = [0.0], [], [], bench.data.will_need, threading.Lock()

    def tick(times):  # the reader thread advises while the main thread reads the clock
        with lock:
            times.append(now[0])
            now[0] += 1.0
            return times[-1]

    def advised(*args):
        tick(advices)
        will_need(*args)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: tick(readings),
                                                             process_time=time.process_time))
    monkeypatch.setattr(bench.data, "will_need", advised)
    return readings, advices


def test_loader_writes_its_synthetic_dataset_only_into_a_new_or_empty_folder(tmp_path, capsys, monkeypatch):
    """A folder of the user's files or a half-prepared one (no index.json yet) is refused before any work, as a file
    is; a write that fails takes the part written with it, the folders it made too; no room: refused."""
    (tmp_path / "half" / "train").mkdir(parents=True)  # prepare.py's shards, before its index.json
    (tmp_path / "half" / "null_txt.npy").write_bytes(b"the user's")
    (tmp_path / "file").write_text("the user's")
    (tmp_path / "locked").mkdir()  # as for a user without write permission (root has it)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: str(path) != str(tmp_path / "locked") and
                        access(path, mode, **k))
    for argv, message in (([str(tmp_path / "half")], "holds files but no index.json"),
                          ([str(tmp_path / "locked" / "new")], f"cannot write in {tmp_path / 'locked'}"),
                          ([str(tmp_path / "file")], f"{tmp_path / 'file'} is a file"),
                          ([str(tmp_path / "file" / "x")], f"{tmp_path / 'file'} is a file")):
        with pytest.raises(SystemExit):
            bench.main(["loader", *argv, "--samples", "16", "--batch", "16"])
        captured = capsys.readouterr()
        assert message in captured.err and "bench " not in captured.out, captured.err
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["null_txt.npy", "train"]
    assert (tmp_path / "half" / "null_txt.npy").read_bytes() == b"the user's"
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: None)  # in process: the pytest worker stays as is
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bench, "write_index", full)  # after the shards and null_txt.npy
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new" / "er", tmp_path / "empty"):
        with pytest.raises(OSError, match="No space left"):
            bench.main(["loader", str(folder), "--samples", "16", "--batch", "16"])
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: bench.shutil._ntuple_diskusage(10**12, 0, 10**9))
    with pytest.raises(SystemExit):
        bench.main(["loader", str(tmp_path / "empty"), "--samples", "5000"])
    err = capsys.readouterr().err
    assert "--samples 5000 needs about 5.5 GiB in " in err and "0.9 GiB free; pass --samples 853 or fewer" in err, err


def test_eval(capsys, monkeypatch, clock):
    # CLIP and DINOv2 shrunk to one small layer (Inception has no smaller form); sampling with the tiny pixel model
    monkeypatch.setattr(bench, "CLIP_CONFIG", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=28, patch_size=14,
                                                   projection_dim=16))
    monkeypatch.setattr(bench, "DINO_KWARGS", dict(img_size=28, embed_dim=32, depth=1, num_heads=2,
                                                   pretrained_cfg_overlay=dict(input_size=(3, 28, 28))))
    clock({"ours": 0.5, "base": 2.0, "blocks": 1.0, "one": 4.0, "diffusers": 2.0})
    clock.spy("mmd", bench, "mmd", lambda x, y, **kwargs: kwargs.get("chunk"))
    bench.main(["eval", "--batch", "2", "--warmup", "0", "--steps", "1", "--mmd-rows", "256",
                "--preset", "tiny-pixel", "--sample-steps", "2"])
    out = capsys.readouterr().out
    for network, library in [("Inception (FID)", "torch-fidelity"), ("CLIP ViT-L/14-336 (CMMD)", "CLIPImageProcessor"),
                             ("DINOv2 ViT-L/14 (DINO-MMD)", "timm")]:
        assert compared(out, network, library) == (4.0, 1.0, 4.0)  # 2 images a call
    assert compared(out, "MMD of 256 against 256", "one block") == (1.0, 4.0, 0.25)
    assert clock.ran["mmd"] == {("blocks", None), ("one", 256)}  # mmd's own row blocks against all rows at once
    assert compared(out, "sampling PRX tiny-pixel", "diffusers") == (4.0, 1.0, 4.0)


def test_diffusers_loop_samples_what_eval_samples():
    """The sampling benchmark's baseline is the same computation as ours: the same images from the same noise."""
    ours, theirs = (m.eval() for m in bench.prx_pair("tiny-pixel"))
    D, shape = ours.cfg.context_dim, (3, 32, 32)
    txt, mask = torch.randn(2, 6, D), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    null_txt, null_mask = torch.randn(1, 2, D), torch.ones(1, 2, dtype=torch.bool)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in (7, 8)])
    with torch.no_grad():
        expected = sample(ours, txt, mask, null_txt, null_mask, [7, 8], shape, steps=3, cfg_scale=3.5)
        got = bench.diffusers_sample(theirs, txt, mask, *pad_text(null_txt, null_mask, 6), noise, 3, 3.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_sampling_sides_do_the_same_work():
    """eval.sample and diffusers' loop: the same batch through the same weights, once a step, guided in one pass."""
    ours, theirs = (m.eval() for m in bench.prx_pair("tiny-pixel"))
    batches = {"ours": [], "diffusers": []}
    for name, model in (("ours", ours), ("diffusers", theirs)):
        model.register_forward_pre_hook(lambda module, args, kwargs, name=name: batches[name].append(
            len(kwargs.get("hidden_states", args[0] if args else None))), with_kwargs=True)
    bench.sampling_rates(ours, theirs, 3, 32, 4, 0, 1)
    assert batches["ours"] == batches["diffusers"] == [6] * 4  # 4 Euler steps of 3 prompts and their empty prompt


def closed_form_params(cfg):
    """(all, Muon's, one block's) parameter counts of a PRX config from the architecture (REFERENCE.md section 1)."""
    h, m, d, pd, b = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), sum(cfg.axes_dim), \
        cfg.in_channels * cfg.patch_size ** 2, cfg.bottleneck_size
    img_in = pd * b + b + b * h + h if b else pd * h + h
    block_matrices = 3 * h * h + 2 * h * h + h * h + 3 * h * m + 6 * h * h  # qkv, text kv, out, MLP, modulation
    block = block_matrices + 3 * d + 6 * h  # + q, k, text k norms and the modulation bias
    rest = img_in + cfg.context_dim * h + h + 256 * h + h + h * h + h + 2 * h * h + 2 * h + h * pd + pd
    return rest + cfg.depth * block, cfg.depth * block_matrices, block


def test_memory_states_closed_form():
    for name in ["small", "base", "small-pixel", "base-pixel"]:
        with torch.device("meta"):
            model = PRX.from_preset(name, 512 if "pixel" in name else 256)
        n, m, _ = closed_form_params(model.cfg)
        assert bench.state_bytes(model) == {"weights": 4 * n, "grads": 4 * n, "AdamW": 8 * n,
                                            "Muon": 4 * m + 8 * (n - m)}, name


def test_memory_fake_count_equals_real():
    # the full-size count runs on fake tensors; here the same count on real tensors, at two sizes and depths
    for depth, batch, side, txt in [(1, 2, 8, 8), (3, 3, 16, 5)]:
        cfg = preset_config("tiny", depth=depth)
        real = bench.saved_bytes(cfg, batch, side, txt, fake=False)
        assert bench.saved_bytes(cfg, batch, side, txt) == real
        # at least each block's bf16 gate_proj and up_proj outputs and GELU output: 3 (B, N, mlp) tensors
        tokens, mlp = batch * (side // cfg.patch_size) ** 2, int(cfg.hidden_size * cfg.mlp_ratio)
        assert real > depth * 3 * tokens * mlp * 2


def test_memory_counts_the_attention_in_bf16_as_cuda_runs_it(monkeypatch):
    # the CPU runs its attention in fp32 under bf16 autocast (model.Attention.fp32_on_cpu); CUDA's saves bf16
    dtypes, sdpa = [], F.scaled_dot_product_attention

    def spied(q, k, v, **kwargs):
        dtypes.append(q.dtype)
        return sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spied)
    cfg = preset_config("tiny", depth=1)
    bench.saved_bytes(cfg, 2, 8, 5, fake=False)
    assert dtypes == [torch.bfloat16] and Attention.fp32_on_cpu
    with torch.autocast("cpu", torch.bfloat16):  # where the CPU trains: fp32
        PRX(cfg)(torch.randn(2, cfg.in_channels, 8, 8), torch.rand(2), torch.randn(2, 5, cfg.context_dim))
    assert dtypes[1:] == [torch.float32]


def test_memory_per_gpu_shards_the_states_not_the_activations():
    with torch.device("meta"):
        model = PRX.from_preset("base")
    n, m, block = closed_form_params(model.cfg)
    parts = bench.per_gpu(model, act_ddp=7e9, act_fsdp=5e9)
    ddp, fsdp = parts["DDP"], parts["FSDP2"]
    assert all(fsdp[k] == ddp[k] / 8 for k in ("weights", "grads", "AdamW", "Muon"))  # sharded over 8 GPUs
    assert (ddp["activations"], fsdp["activations"]) == (7e9, 5e9)  # each GPU's own micro-batch: not divided
    assert ddp["buckets"] == ddp["grads"] == 4 * n and fsdp["buckets"] == 0 == ddp["units"]
    root = n - model.cfg.depth * block
    assert fsdp["units"] == 8 * (2 * block + root)  # bf16 weights + bf16 and fp32 gradients of 2 blocks and the root
    assert bench.total(ddp, "AdamW") == 4 * n + 2 * 4 * n + 8 * n + 7e9
    assert bench.total(fsdp, "Muon") == (4 * n + 4 * n + 4 * m + 8 * (n - m)) / 8 + fsdp["units"] + 5e9


def test_fsdp_activations_hold_no_weight_copies():
    """bf16 weights (FSDP2's gathered ones) save no autocast copy: the count drops by 2 bytes for each matrix whose
    input needs a gradient, all but the embeddings of the data (img_in, txt_in, time_in.in_layer), and grows by the
    fp32 copies of the RMSNorm scales (model.RMSNorm computes in fp32)."""
    cfg = preset_config("tiny", depth=3)
    with torch.device("meta"):
        model = PRX(cfg)
    inputs = {"img_in.weight", "txt_in.weight", "time_in.in_layer.weight"}
    copied = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and name not in inputs)
    norms = sum(p.numel() for name, p in model.named_parameters() if ".norm_" in name)
    fp32, bf16 = (bench.saved_bytes(cfg, 2, 8, 5, param_dtype=d) for d in (torch.float32, torch.bfloat16))
    assert fp32 - bf16 == 2 * copied - 4 * norms


def test_memory_table(capsys):
    bench.main(["memory", "--micro-batch", "2"])
    out = capsys.readouterr().out.splitlines()
    rows = [r for r in out if r.startswith("| small |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    weights, grads, adamw, muon, act, act_fsdp = (float(c) * 2**30 for c in cells[3:9])
    n, m, block = closed_form_params(preset_config("small"))
    for printed, exact in [(weights, 4 * n), (grads, 4 * n), (adamw, 8 * n), (muon, 4 * m + 8 * (n - m))]:
        assert abs(printed - exact) <= 0.05 * 2**30
    ddp = 4 * n + 2 * 4 * n + 8 * n + act  # gradients twice: DDP's buckets
    fsdp = (4 * n + 4 * n + 8 * n) / 8 + 8 * (2 * block + n - 16 * block) + act_fsdp
    for cell, exact in [(cells[9], ddp), (cells[11], fsdp)]:
        value, verdict = cell.split()
        assert abs(float(value) * 2**30 - exact) <= 0.1 * 2**30 and verdict == "fits"
    # base part by part: the sharded states are DDP's / 8, the activations DDP's less the weight copies
    parts = {r.split("|")[1].strip(): r.split("|")[2:4] for r in out[out.index("| part | DDP | FSDP2 |") + 2:]}
    for part in ("weights (fp32)", "gradients (fp32)", "AdamW state (2 moments)"):
        ddp_gib, fsdp_gib = (float(c) for c in parts[part])
        assert abs(fsdp_gib - ddp_gib / 8) <= 0.05
    assert [c.split()[1] for c in parts["total with AdamW"]] == ["over", "fits"]


def test_gpu_check_measures_the_half_of_the_table_asked_for(tmp_path, monkeypatch, capsys):
    """--rows train: train.py end to end alone; --rows components: the rest alone; neither: both, train.py's first."""
    monkeypatch.setattr(bench, "train_rows", lambda s, peak: ["| train.py row |"])
    monkeypatch.setattr(bench, "component_rows", lambda s, peak, emit: emit("| component row |"))
    for rows, expected in (("train", ["| train.py row |"]), ("components", ["| component row |"]),
                           (None, ["| train.py row |", "| component row |"])):
        out = tmp_path / f"{rows}.md"
        bench.gpu_check(out, 1.0, rows)
        table = out.read_text().splitlines()
        assert table[2:4] == ["| measure | ours | baseline | ours/baseline |", "|---|---|---|---|"]
        assert table[4:] == expected
    with pytest.raises(SystemExit):
        bench.get_parser().parse_args(["gpu", "--rows", "all"])
    asked = []
    monkeypatch.setattr(bench, "CUDA", True)  # bench_gpu's check, as on a GPU
    monkeypatch.setattr(bench, "gpu_check", lambda out, peak, rows: asked.append((out, peak, rows)))
    bench.bench_gpu(bench.get_parser().parse_args(["gpu", "--rows", "train", "--out", str(tmp_path / "t.md")]))
    assert asked == [(str(tmp_path / "t.md"), 989.0, "train")]


@pytest.mark.slow
def test_gpu_check_on_cpu(tmp_path, capsys, monkeypatch, clock):
    # the GPU check's own code at tiny sizes; aot_eager: dynamo and AOTAutograd trace both models as for inductor
    sizes = dict(preset="tiny", batch=2, side=8, txt_tokens=16, min_len=4, max_len=12, parity_steps=2, warmup=1,
                 steps=1, loader_samples=64, sample_steps=2, backend="aot_eager", train_steps=2, train_samples=8,
                 train_flags=[], teacher="vit_small_patch16_dinov3.lvd1689m")
    monkeypatch.setattr(bench, "GPU_CHECK", sizes)
    clock({"ours": 1.0, "diffusers": 4.0, "muon": 1.0, "adamw": 4.0, "loader": 0.5})
    clock.spy("Muon", bench.Muon, "step")
    real_run, real_train_rows, runs = bench.train_run, bench.train_rows, {}

    def train_run(out, flags):  # the real runs, their logged speeds replaced by known ones
        config, speed = real_run(out, flags)
        runs[os.path.basename(out)] = flags
        known = {"baseline": (1.0, 0.01), "record": (3.0, 0.02)}[os.path.basename(out)]
        return config, {**speed, "samples_per_s": known[0], "mfu": known[1]}
    monkeypatch.setattr(bench, "train_run", train_run)
    (tmp_path / "gpu.md").write_text("an earlier check")
    monkeypatch.setattr(bench, "train_rows", lambda *a: 1 / 0)  # a failure after the header
    with pytest.raises(ZeroDivisionError):
        bench.gpu_check(tmp_path / "gpu.md", 0.001)
    assert (tmp_path / "gpu.md").read_text() == "an earlier check"  # kept whole; the rows so far beside it
    assert "| measure | ours | baseline | ours/baseline |" in (tmp_path / "gpu.md.partial").read_text()
    monkeypatch.setattr(bench, "train_rows", real_train_rows)
    real_step, compiled_steps = bench.training_step, []

    def training_step(*args, **kwargs):  # the compiled step's calls, by side
        if "diffusers" in kwargs:
            compiled_steps.append("diffusers" if kwargs["diffusers"] else "ours")
        return real_step(*args, **kwargs)
    monkeypatch.setattr(bench, "training_step", training_step)
    capsys.readouterr()
    bench.gpu_check(tmp_path / "gpu.md", 0.001)  # a peak of 1 GFLOP/s: a CPU's MFU in printable figures
    out = capsys.readouterr().out
    assert compiled_steps == ["ours", "diffusers"] * 2  # warm-up and timed rounds: the sides take turns
    table = (tmp_path / "gpu.md").read_text()
    assert not (tmp_path / "gpu.md.partial").exists()
    assert [line for line in out.splitlines() if line in table.splitlines()] == table.splitlines()  # same table
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table.splitlines() if line.startswith("| ")}
    step, mfu = "compiled training step, batch 2, median of 1", "compiled training step, batch 2, MFU at 0.001 TFLOP/s"
    expected = ["loss after 2 AdamW steps", step, mfu, "compiled training step, batch 2, peak memory",
                "optimizer step, Muon + AdamW", "ShardLoader, synthetic shards", "sampling, 2 Euler steps, CFG 3.5",
                "train.py --repa dinov3 --optimizer muon, 2 steps of batch 2 (cpu, fp32), data loading included",
                "train.py --repa dinov3 --optimizer muon, 2 steps of batch 2 (cpu, fp32), MFU"]
    for what in expected:
        assert sum(name.startswith(what) for name in rows) == 1, f"no row '{what}' in:\n{table}"
    number = lambda cell: [float(w.replace(",", "")) for w in cell.split() if re.fullmatch(r"[\d,.]+", w)][-1]
    parity = next(v for k, v in rows.items() if k.startswith("loss after"))
    assert abs(number(parity[0]) / number(parity[1]) - 1) < 0.01  # bf16 autocast's loss near fp32's
    # MFU = 3 x forward FLOPs (closed form, real text tokens only) / step time / peak
    cfg = preset_config("tiny")
    lengths = bench.synthetic_batch(cfg, sizes, 0)[4].sum(1).tolist()
    useful = 3 * sum(flops_per_sample(cfg, (8 // cfg.patch_size) ** 2, n) for n in lengths)
    expected_mfu = 100 * useful / (number(rows[step][0]) / 1e3) / 1e9
    assert 1 < number(rows[mfu][0]) and abs(number(rows[mfu][0]) - expected_mfu) < 0.05 + 0.01 * expected_mfu
    # every other figure on the fake clock: (ours, baseline, ratio)
    figures = lambda what: tuple(number(cell) for cell in rows[what])  # noqa: E731
    record = bench.speedrun_record("8gpu")
    assert runs["record"][:len(runs["baseline"])] == runs["baseline"] and runs["record"][-8:-4] == record
    train = f"train.py {' '.join(record)}, 2 steps of batch 2 (cpu, fp32)"
    assert figures(f"{train}, data loading included") == (3.0, 1.0, 3.0)
    assert figures(f"{train}, MFU (train.py's: text as trimmed)") == (2.0, 1.0, 2.0)
    assert figures(step) == (1000.0, 4000.0, 0.25)
    assert figures("optimizer step, Muon + AdamW") == (1000.0, 4000.0, 0.25) and clock.ran["Muon"] == {("muon", None)}
    assert figures("ShardLoader, synthetic shards") == (4.0, 2.0, 2.0)  # 2 samples in 0.5 s; a 1 s step of 2
    assert figures("sampling, 2 Euler steps, CFG 3.5") == (2.0, 0.5, 4.0)


@pytest.mark.parametrize("argv, message", [
    (["model", "--img-tokens", "200"], "--img-tokens 200 must be a square number"),
    (["model", "--min-len", "80"], "--min-len 80 <= --max-len 64 <= --txt-tokens 128"),
    (["muon", "--steps", "0"], "argument --steps: must be in [1, inf), got 0"),
    (["eval", "--warmup", "-1"], "argument --warmup: must be in [0, inf), got -1"),
    (["model", "--preset", "tinny"], "--preset: unknown preset 'tinny'"),
    (["muon", "--preset", ""], "argument --preset: an empty value (an unset shell variable?)"),
    (["loader", ""], "argument dir: an empty value"),  # would have written into the current folder
    (["gpu", "--out", ""], "argument --out: an empty value"),
    (["gpu", "--out", os.devnull], f"bench.py gpu: --out {os.devnull}: exists: pass another file"),
    (["model", "--stepz", "3"], "--stepz is not a flag: did you mean --steps?"),  # a subcommand's flags too
    (["model", "--compile", "--warmup", "0"], "the first call compiles; pass --warmup 1 or more"),
    (["muon", "--preset", "tiny", "--blocks", "5"], "--blocks 5 is more than the 4 blocks of tiny"),
    (["loader", "/nonexistent", "--samples", "20"], "--batch 32 is more than the 20 samples"),
    (["techniques", "--only=--compile", "--only=--tred"], "--only '--tred': --tred is not a flag: did you mean "
                                                          "--tread?"),
    (["techniques", "--only=--tread --sprint"], "--only '--tread --sprint': --tread and --sprint are exclusive")])
def test_bad_numbers_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    captured = capsys.readouterr()
    assert message in captured.err and "bench " not in captured.out  # refused before the header line


def test_gpu_refused_on_cpu(tmp_path):
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit, match="python bench.py gpu"):
        bench.main(["gpu", "--out", str(tmp_path / "gpu.md")])


def test_techniques(capsys, monkeypatch, clock):
    clock({"baseline": 1.0, "--tread": 0.5, "--ema 0.5 --ema-every 1": 2.0})
    emas = []
    monkeypatch.setattr(bench.train, "ema_update", lambda ema, model, decay: emas.append(decay))
    bench.main(["techniques", "--only=--tread", "--only=--ema 0.5 --ema-every 1", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert compared(out, "baseline step", "baseline") == (1000.0, 1000.0, 1.0)
    assert compared(out, "--tread step", "baseline") == (500.0, 1000.0, 0.5)
    assert compared(out, "--ema 0.5 --ema-every 1 step", "baseline") == (2000.0, 1000.0, 2.0)
    assert emas == [0.5] * 3  # as train.py: the EMA variant's step updates its EMA, once a step here


def test_techniques_compiles_a_compile_variant(capsys, monkeypatch):
    """--compile in a variant's flags times its compiled model (as train.py runs it, after train.py's compile warm-up:
    no timed step compiles), the baseline's stays eager."""
    compiled, warm_ups, warm_up = [], [], bench.train.compile_warmup
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    monkeypatch.setattr(bench.train, "compile_warmup", lambda *a: warm_ups.append(a[0].compile) or warm_up(*a))
    bench.main(["techniques", "--only=--compile", "--steps", "1", "--warmup", "0"])
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "PRX" and warm_ups == [True]
    compared(capsys.readouterr().out, "--compile step", "baseline")
