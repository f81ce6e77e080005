"""
Every benchmark of the project, each timed figure next to its baseline measured in the same run: one line per figure
with ours, the baseline's and their ratio. One timer (`timed`): untimed warm-up calls first, then the two sides take
turns call by call (a slow spell of a shared machine hits both; the loader's sides run one after the other, see
there), CUDA synchronised before each clock reading; a time is the median over the timed calls, a loader rate is
over a whole epoch. Three figures are not timed so: a cold-cache batch (the page cache dropped before each side, whose
first batches are the figure: no warm-up), `gpu`'s train.py rows (two whole train.py runs, baseline then record, each
read from the last step line of its own log), and `memory`, counted bytes, not a measurement.

    python bench.py model [--compile]   # PRX forward+backward vs diffusers' PRXTransformer2DModel; FLOPs; MFU
    python bench.py muon                # Muon step vs torch.optim.Muon; Newton-Schulz, Gram form vs plain
    python bench.py loader DIR          # ShardLoader samples/s on one core vs HuggingFace datasets
    python bench.py eval                # metric networks, MMD and sampling vs their reference implementations
    python bench.py memory              # GiB per GPU of each preset under DDP and FSDP2, counted on fake tensors
    python bench.py techniques          # the CPU track's training step of each technique vs the baseline's
    python bench.py gpu [--out FILE]    # CUDA only: the 8gpu record end to end and every GPU figure, one table
    python bench.py gpu --rows train    # its train.py half (--rows components: the rest), for a shorter command limit

Without a GPU every mode but `gpu` runs on the CPU at small sizes (see each mode's defaults). The metric networks have
random weights in the real architectures: their speed does not depend on the weights. Measured figures are in records/.
"""

import argparse
import contextlib
import copy
import functools
import gc
import io
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
from data import (Parser, PreparedDataset, ShardLoader, batch_text, count, nearest_existing, number, pad_text,
                  positive, unwritable)
from eval import (clip_features, dino_features, inception_features, keep_freed_memory, load_dino, load_inception,
                  mmd, sample, timesteps, write_random_inception_weights)
from model import PRX, Attention, flops_per_sample, preset_config, trim_text
from muon import Muon, assign_owners, newton_schulz, ns_cost, split_muon_params
from prepare import to_bits, write_index, write_shard
import train
from train import flow_loss

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def machine():
    """For the headers: the GPU, or the CPU and torch's threads."""
    return torch.cuda.get_device_name() if CUDA else f"cpu, {torch.get_num_threads()} threads"


def timed(fns, warmup, steps, clock=time.perf_counter):
    """{name: fn} -> {name: [seconds of each timed call]}: `warmup` untimed rounds, then `steps` timed ones; in each
    round every fn is called once, in turn."""
    sync = torch.cuda.synchronize if CUDA else lambda: None  # wait for the GPU before reading the clock
    times = {name: [] for name in fns}
    for step in range(warmup + steps):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            if step >= warmup:
                times[name].append(clock() - start)
    return times


def median_ms(times):
    """timed's {name: [seconds]} -> {name: the median in milliseconds}."""
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def compare(what, ours, base_name, base, unit, fmt=",.1f"):
    """The line every figure gets: ours | the baseline measured in the same run | ours / baseline."""
    print(f"{what}: ours {ours:{fmt}} {unit} | {base_name} {base:{fmt}} {unit} | ours/{base_name} {ours / base:.3f}")


def mfu_percent(cfg, img_tokens, text_lengths, ms, peak_tflops):
    """{side: ms a training step of the batch} -> {side: % of the peak}: every side credited with the same useful
    FLOPs, 3x the forward's closed form (the backward costs two forwards) over the real text tokens only."""
    useful = 3 * sum(flops_per_sample(cfg, img_tokens, int(n)) for n in text_lengths)
    return {name: 100 * useful / (v / 1e3) / (peak_tflops * 1e12) for name, v in ms.items()}


def prx_pair(preset):
    """Our PRX and diffusers' PRXTransformer2DModel with the same random weights; no layer left at its zero init, so
    no gradient or output is trivially zero on either side."""
    from diffusers import PRXTransformer2DModel
    torch.manual_seed(0)
    ours = PRX.from_preset(preset)
    for p in ours.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=0.02)
    theirs = PRXTransformer2DModel(**{k: v for k, v in ours.diffusers_config().items() if k != "_class_name"})
    theirs.load_state_dict(ours.state_dict())
    return ours.to(DEVICE), theirs.to(DEVICE)


# ----------------------------------------------------------------------------------------------------------
# model: forward + backward against diffusers

def bench_model(args):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    ours, theirs = prx_pair(args.preset)
    cfg = ours.cfg
    side = math.isqrt(args.img_tokens) * cfg.patch_size
    batch = synthetic_batch(cfg, dict(vars(args), side=side), 0)
    x, _, t, txt, mask = batch
    lengths = mask.sum(1)

    print(f"preset {args.preset} | batch {args.batch} | {args.img_tokens} image tokens | text {args.txt_tokens} "
          f"padded, real lengths {args.min_len}..{args.max_len}")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # math: attention matmuls counted
        ours(x[:1], t[:1], txt[:1], mask[:1])
    real = int(lengths[0])
    compare(f"forward of sample 0 ({real} text tokens), flop counter", counter.get_total_flops(), "closed form",
            flops_per_sample(cfg, args.img_tokens, real), "FLOPs", ".4g")
    for mode in ["eager", "compiled"] if args.compile else ["eager"]:
        a, b = (ours, theirs) if mode == "eager" else (torch.compile(ours), torch.compile(theirs))
        steps = {"ours": lambda: training_step(a, None, batch, CUDA),  # bf16 autocast on CUDA
                 "diffusers": lambda: training_step(b, None, batch, CUDA, diffusers=True)}
        ms = median_ms(timed(steps, args.warmup, args.steps))
        compare(f"{mode} fwd+bwd, median of {args.steps}", ms["ours"], "diffusers", ms["diffusers"], "ms")
        if CUDA:
            mfu = mfu_percent(cfg, args.img_tokens, lengths, ms, args.peak_tflops)
            compare(f"{mode} MFU at {args.peak_tflops:g} TFLOP/s peak", mfu["ours"], "diffusers", mfu["diffusers"], "%")


# ----------------------------------------------------------------------------------------------------------
# muon: the optimizer step against torch.optim.Muon

def bench_muon(args):
    with torch.device("meta"):  # shapes only, no memory
        model = PRX.from_preset(args.preset)
    shapes = [tuple(p.shape) for p in split_muon_params(model)[0]]  # block by block
    costs = [ns_cost(s) for s in shapes]
    owners = assign_owners(costs, 8)
    largest = max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(8))
    print(f"{args.preset}: {len(shapes)} block matrices, {sum(math.prod(s) for s in shapes):,} weights")
    compare("largest Newton-Schulz share of 8 ranks", 100 * largest / sum(costs), "ideal", 12.5, "% of the FLOPs",
            ".2f")
    blocks = args.blocks  # (check_args' default: all on a GPU, 1 on a CPU)
    shapes = shapes[:blocks * len(shapes) // model.cfg.depth]
    torch.manual_seed(0)
    weights = [torch.randn(s, device=DEVICE) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=DEVICE) for s in shapes]

    def fresh_params():  # the same weights and gradients for both optimizers
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g
        return params

    print(f"first {blocks} block(s): {len(shapes)} matrices, {sum(math.prod(s) for s in shapes):,} weights")
    forms = {name: lambda plain=plain: [newton_schulz(g, dtype=torch.float32, plain=plain) for g in grads]
             for name, plain in (("gram", False), ("plain", True))}
    ms = median_ms(timed(forms, 1, args.steps))
    compare(f"fp32 Newton-Schulz (Muon's on a CPU), Gram form where cheaper, median of {args.steps}", ms["gram"],
            "plain iteration", ms["plain"], "ms")
    # PRX's settings, which are also torch's with these arguments; Newton-Schulz in bf16 on both sides, as torch's
    # always is (ours' CPU default, fp32, is the line above)
    ours = Muon(fresh_params(), ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(fresh_params(), lr=1e-4, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    ms = median_ms(timed({"ours": ours.step, "torch": theirs.step}, 1, args.steps))
    compare(f"step, bf16 Newton-Schulz, median of {args.steps}", ms["ours"], "torch.optim.Muon", ms["torch"], "ms")


# ----------------------------------------------------------------------------------------------------------
# loader: ShardLoader against HuggingFace datasets

SYNTHETIC_BYTES = 16 * 32 * 32 * 2 + 120 * 2304 * 2  # a synthetic sample's latent and mean text, bf16 (write_synthetic)


def write_synthetic(root, samples, images=False, quiet=False):
    """A prepared directory of realistic 256 px sizes, in shards of 1024: a 16x32x32 bf16 latent and 60..180 (mean
    120) text tokens of 2304 bf16 values per sample; images: also the 3x256x256 uint8 image a REPA teacher reads.
    quiet: without write_index's summary line (it would split gpu's table)."""
    root = Path(root)
    rng, pool = np.random.default_rng(0), to_bits(torch.randn(4096, 2304))  # text rows reused at random offsets
    for k, start in enumerate(range(0, samples, 1024)):
        n = min(1024, samples - start)
        offsets, lengths = rng.integers(0, 3900, n), rng.integers(60, 181, n)
        columns = {"latent": list(to_bits(torch.randn(n, 16, 32, 32))),
                   "txt_long": [pool[o:o + length] for o, length in zip(offsets, lengths)],
                   "caption_long": [f"synthetic caption {start + j}" for j in range(n)],
                   "id": [str(start + j) for j in range(n)]}
        if images:
            columns["image"] = list(rng.integers(0, 256, (n, 3, 256, 256), dtype=np.uint8))
        write_shard(root / "train" / f"shard-r000-{k:05d}", columns, {"count": n, "skipped": {}})
    np.save(root / "null_txt.npy", pool[:1])
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        write_index(root, {"synthetic": samples})


def arrow_rows(root, field):  # the samples as a user would put them into `datasets`
    prepared = PreparedDataset(root)
    for i in range(len(prepared)):
        shard, r = prepared.locate(i)
        yield {"latent": shard.arrays["latent"][r], "txt": shard.ragged(field, r)}


def bench_loader(args):
    import datasets
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for the process, reader thread included
    torch.set_num_threads(1)
    root, B = Path(args.dir), args.batch
    if not (root / "index.json").exists():  # main checked: a new or empty folder, room for it
        new = [p for p in (root.absolute(), *root.absolute().parents) if not p.exists()]  # the folders to make
        try:
            write_synthetic(root, args.samples)
        except BaseException:  # a full disk, ^C: the part written goes (a rerun would refuse a folder holding it)
            for p in new[-1:] or list(root.iterdir()):  # the topmost folder made, or what went into the empty one
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)  # missing: it failed before writing
            raise
    ds = PreparedDataset(root)
    caption = ds.index["captions"][0]
    field, schema, steps = "txt_" + caption, ds.index["schema"], len(ds) // B
    with tempfile.TemporaryDirectory(prefix="bench-arrow-", dir=root) as cache:  # datasets' copy: removed after
        features = datasets.Features({"latent": datasets.Array3D(schema["latent"]["shape"], "int16"),
                                      "txt": datasets.Array2D((None, *schema[field]["shape"]), "int16")})
        arrow = datasets.Dataset.from_generator(arrow_rows, features=features, cache_dir=cache,
                                                gen_kwargs=dict(root=str(root), field=field)).with_format("numpy")
        order = itertools.cycle(np.random.default_rng(0).permutation(len(arrow))[:steps * B].reshape(steps, B))

        def arrow_batch():  # what ShardLoader returns: float latents, padded bf16 text and its mask
            b = arrow[next(order).tolist()]
            return torch.from_numpy(b["latent"]).view(torch.bfloat16).float(), batch_text(list(b["txt"]))

        loader = ShardLoader(str(root), B, captions=caption)
        sides, rates = {"datasets": arrow_batch, "ShardLoader": lambda: next(loader)}, {}
        for name, fn in sides.items():  # one side at a time, datasets first: ShardLoader's reader thread, started by
            # its first batch, keeps filling its read-ahead after its side's last call
            wall = timed({name: fn}, steps, steps)[name]  # after an untimed epoch: page cache and allocators warm
            cpu = timed({name: fn}, 0, steps, time.process_time)[name]  # this process's CPU, reader thread included
            rates[name] = steps * B / sum(wall), steps * B / sum(cpu)
        tokens = sum(len(shard.arrays[field]) for shard in ds.shards) / len(ds)
        print(f"{len(ds)} samples, {steps} batches of {B}: latent {schema['latent']['shape']} bf16 + text {tokens:.0f} "
              f"tokens x {schema[field]['shape'][0]} bf16 (mean), one CPU core")
        for i, per in enumerate(["wall", "CPU"]):  # the CPU second is steady on a shared machine, the wall one is not
            compare(f"samples per {per} second", rates["ShardLoader"][i], "datasets", rates["datasets"][i], "samples/s")
        loader.worker.shutdown(wait=True)
        del loader, ds, arrow  # their maps: the kernel drops no page a process maps
    cold = cold_batch_ms(root, B, caption)
    compare("ms a batch out of the page cache (a first epoch; data beyond memory)", cold["advised"], "unadvised",
            cold["unadvised"], "ms")


def cold_batch_ms(root, B, caption, batches=8):
    """{"advised", "unadvised": ms a batch of a new ShardLoader, its files dropped from the page cache first}: its
    reads of a batch advised at once (data.will_need), or left to page faults one after another."""
    advise, ms = data.will_need, {}
    try:
        for name, fn in (("unadvised", lambda *a: None), ("advised", advise)):
            data.will_need = fn
            os.sync()  # dirty pages stay cached
            for path in Path(root).rglob("*.npy"):
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            loader = ShardLoader(str(root), B, captions=caption)
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            ms[name] = (time.perf_counter() - start) * 1000 / batches
            loader.worker.shutdown(wait=True)
            del loader  # its maps, before the next side drops the pages
            gc.collect()
    finally:
        data.will_need = advise
    return ms


# ----------------------------------------------------------------------------------------------------------
# eval: metric networks, MMD, sampling

CLIP_CONFIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   patch_size=14, image_size=336, projection_dim=768, hidden_act="quick_gelu")  # ViT-L/14-336's
DINO_KWARGS = {}  # load_dino's timm arguments: none is the real ViT-L/14 with registers at 518 px


def feature_extractors():
    """{name: (ours: uint8 images -> features, baseline name, baseline)}: each metric network called as eval.py
    calls it, and through the pipeline of the library it comes from."""
    import timm.data
    from torch_fidelity.utils import get_featuresdict_from_dataset
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    with tempfile.TemporaryDirectory() as folder:  # read whole by load_inception: 96 MB not left behind
        weights = os.path.join(folder, "random-inception.pth")
        write_random_inception_weights(weights)
        inception = load_inception(weights).to(DEVICE)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_CONFIG)).to(DEVICE).eval()
    size = clip.config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size)
    dino = load_dino(pretrained=False, **DINO_KWARGS).to(DEVICE)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(dino))

    def fidelity(images):  # torch-fidelity's loop: a DataLoader over the images (no workers), features to the CPU
        subset = torch.utils.data.Subset(images, range(len(images)))
        return get_featuresdict_from_dataset(subset, inception, len(images), CUDA, True, False)["2048"]

    def hf_clip(images):  # transformers' processor (resize, crop, CLIP mean/std), then the same network
        pixels = processor(list(images), return_tensors="pt").pixel_values.to(DEVICE)
        return F.normalize(clip(pixel_values=pixels).image_embeds.float(), dim=-1)

    def timm_dino(images):  # timm's evaluation transform on PIL images, then the model's head (the CLS token)
        x = torch.stack([transform(Image.fromarray(im)) for im in images.permute(0, 2, 3, 1).numpy()])
        return F.normalize(dino(x.to(DEVICE)).float(), dim=-1)

    return {"Inception (FID)": (lambda im: inception_features(inception, im), "torch-fidelity", fidelity),
            "CLIP ViT-L/14-336 (CMMD)": (lambda im: clip_features(clip, im), "CLIPImageProcessor", hf_clip),
            "DINOv2 ViT-L/14 (DINO-MMD)": (lambda im: dino_features(dino, im), "timm", timm_dino)}


def diffusers_sample(transformer, txt, mask, null_txt, null_mask, x, steps, cfg_scale):
    """PRXPipeline's denoising loop from given embeddings and noise on eval.sample's grid (eval.timesteps): the same
    computation as eval.sample. One timestep per row: the pipeline's own loop passes 2 for the 2B rows of a guided
    batch, which fails above batch 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler, B = FlowMatchEulerDiscreteScheduler(), len(x)
    scheduler.set_timesteps(sigmas=timesteps(steps)[:-1].tolist(), device=x.device)  # shift 1: as given
    txt, mask = torch.cat([null_txt.expand(B, -1, -1), txt]), torch.cat([null_mask.expand(B, -1), mask])
    for t in scheduler.timesteps:
        with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):  # as our sampler
            out = transformer(hidden_states=torch.cat([x, x]), timestep=(t.float() / 1000).repeat(2 * B),
                              encoder_hidden_states=txt, attention_mask=mask, return_dict=False)[0].float()
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + cfg_scale * (cond - uncond), t, x).prev_sample
    return x


@torch.no_grad()
def bench_eval(args):
    B = args.batch or (32 if CUDA else 2)
    per_second = lambda times: B / statistics.median(times)
    images = torch.randint(0, 256, (B, 3, 256, 256), dtype=torch.uint8)
    print(f"batch {B} of 256 px uint8 images; metric networks randomly initialised in the real architectures")
    for name, (ours, base_name, base) in feature_extractors().items():
        times = timed({"ours": lambda: ours(images), "base": lambda: base(images)}, args.warmup, args.steps)
        compare(name, per_second(times["ours"]), base_name, per_second(times["base"]), "img/s", ".3f")

    n = args.mmd_rows or (10_000 if CUDA else 4096)
    emb = F.normalize(torch.randn(2 * n, 768, device=DEVICE), dim=-1)
    times = timed({"blocks": lambda: mmd(emb[:n], emb[n:]), "one": lambda: mmd(emb[:n], emb[n:], chunk=n)},
                  args.warmup, args.steps)
    compare(f"MMD of {n} against {n} embeddings in mmd's row blocks", statistics.median(times["blocks"]),
            "one block", statistics.median(times["one"]), "s", ".2f")

    preset = args.preset or ("small" if CUDA else "tiny-pixel")
    ours, theirs = (m.eval() for m in prx_pair(preset))
    side = 32  # tiny-pixel: 32 px images; latent presets: the 32x32 latent of 256 px
    rates = sampling_rates(ours, theirs, B, side, args.sample_steps, args.warmup, args.steps)
    compare(f"sampling PRX {preset} {(ours.cfg.in_channels, side, side)}, {args.sample_steps} Euler steps, CFG 3.5",
            *rates, "img/s", ".3f")


@torch.no_grad()
def sampling_rates(ours, theirs, B, side, steps, warmup, calls):
    """-> (ours, "diffusers", theirs) images/s: eval.sample against diffusers' PRXPipeline loop (diffusers_sample),
    the same weights, noise, 64 text tokens, CFG 3.5."""
    shape = (ours.cfg.in_channels, side, side)
    txt = torch.randn(B, 64, ours.cfg.context_dim, device=DEVICE)
    mask = torch.ones(B, 64, dtype=torch.bool, device=DEVICE)
    null_txt, null_mask = txt[:1, :1], mask[:1, :1]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(B)]).to(DEVICE)
    times = timed({"ours": lambda: sample(ours, txt, mask, null_txt, null_mask, list(range(B)), shape, steps, 3.5),
                   "diffusers": lambda: diffusers_sample(theirs, txt, mask, *pad_text(null_txt, null_mask, 64), noise,
                                                         steps, 3.5)}, warmup, calls)
    return B / statistics.median(times["ours"]), "diffusers", B / statistics.median(times["diffusers"])


# ----------------------------------------------------------------------------------------------------------
# memory: what one GPU holds, on paper

MEMORY_PRESETS = [("small", 256), ("base", 256), ("small-pixel", 512), ("base-pixel", 512)]  # pixel: part 3's 512 px
GPUS, GPU_GIB = 8, 81559 / 1024  # 8 x H100 80 GB: nvidia-smi's total, 81,559 MiB, before the CUDA context


def state_bytes(model):
    """fp32 bytes of the weights, the gradients, AdamW's state (2 moments per parameter) and Muon's (a momentum per
    Muon matrix, AdamW's 2 moments for the rest: muon.split_muon_params)."""
    n = sum(p.numel() for p in model.parameters())
    m = sum(p.numel() for p in split_muon_params(model)[0])
    return {"weights": 4 * n, "grads": 4 * n, "AdamW": 8 * n, "Muon": 4 * m + 8 * (n - m)}


def saved_bytes(cfg, batch, side, txt_tokens, fake=True, param_dtype=torch.float32):
    """Activations: the bytes autograd saves for backward in one eager training forward (v-prediction MSE), once per
    storage (parameters excluded, autocast's bf16 weight copies included), under CPU bf16 autocast with bf16 attention
    as on CUDA, whose kernels and compiled graphs save less. fake: on fake tensors, full size without compute.
    param_dtype bf16: FSDP2's gathered weights (train.py --fsdp), which autocast uses without copies."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from unittest import mock
    with FakeTensorMode() if fake else contextlib.nullcontext(), mock.patch.object(Attention, "fp32_on_cpu", False):
        model = PRX(cfg)
        for p in model.parameters():
            p.data = p.data.to(param_dtype)  # not model.to(): fake parameters cannot be swapped
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        x = torch.randn(batch, cfg.in_channels, side, side)
        t, txt = torch.rand(batch), torch.randn(batch, txt_tokens, cfg.context_dim)
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()  # views of one storage (q, k, v of one projection) count once
            if storage._cdata not in params:
                saved[storage._cdata] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", torch.bfloat16):
            (model(x, t, txt).float() - x).square().mean()
    return sum(saved.values())


def per_gpu(model, act_ddp, act_fsdp):
    """-> {"DDP": parts, "FSDP2": parts}, bytes per GPU. DDP replicates everything, its reducer holding a second copy of
    the gradients (gradient_as_bucket_view=False, train.py's). FSDP2 (train.py --fsdp) divides weights, gradients and
    optimizer state by the GPUs and holds whole only two blocks (running, prefetched) and the root: bf16 weights,
    bf16 gradients and their fp32 copies, 8 bytes a parameter."""
    s = state_bytes(model)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())
    sharded = ("weights", "grads", "AdamW", "Muon")
    ddp = {**{k: s[k] for k in sharded}, "buckets": s["grads"], "units": 0, "activations": act_ddp}
    fsdp = {**{k: s[k] / GPUS for k in sharded}, "buckets": 0, "units": 8 * (2 * block + root), "activations": act_fsdp}
    return {"DDP": ddp, "FSDP2": fsdp}


def total(parts, opt):
    """All parts with one optimizer's state: their sum bounds the peak from above."""
    return sum(v for k, v in parts.items() if k != ("Muon" if opt == "AdamW" else "AdamW"))


def preset_memory(name, resolution, micro_batch, txt_tokens):
    """-> (parameters, per_gpu's parts) of a preset, activations counted for DDP (fp32 weights) and FSDP2 (bf16)."""
    cfg = preset_config(name, resolution)
    with torch.device("meta"):  # shapes only
        model = PRX(cfg)
    side = resolution // 8 if cfg.in_channels == 16 else resolution
    act = [saved_bytes(cfg, micro_batch, side, txt_tokens, param_dtype=d) for d in (torch.float32, torch.bfloat16)]
    return sum(p.numel() for p in model.parameters()), per_gpu(model, *act)


def gib(b, fits=False):
    """Bytes -> GiB; fits: and whether that fits one GPU."""
    return f"{b / 2**30:.1f}" + (f" {'fits' if b / 2**30 <= GPU_GIB else 'over'}" if fits else "")


MEMORY_PARTS = {"weights": "weights (fp32)", "grads": "gradients (fp32)", "buckets": "DDP's gradient buckets",
                "AdamW": "AdamW state (2 moments)", "Muon": "Muon state (momentum; AdamW's off the blocks)",
                "units": "FSDP2's whole units (2 blocks + root)", "activations": "activations"}


def bench_memory(args):
    presets = {p: preset_memory(*p, args.micro_batch, 256) for p in MEMORY_PRESETS}
    print(f"GiB per GPU at micro-batch {args.micro_batch}, 256 text tokens (prepare.py's cap, the worst case), "
          f"{GPUS} x {GPU_GIB:.1f} GiB; activations counted under CPU bf16 autocast (see saved_bytes)")
    print("| preset | px | params | weights | grads | AdamW | Muon | activations DDP | activations FSDP2 | DDP AdamW | "
          "DDP Muon | FSDP2 AdamW | FSDP2 Muon |\n" + "|---" * 13 + "|")
    for (name, resolution), (n, parts) in presets.items():  # the whole model's states, the activations, the totals
        ddp, fsdp = parts["DDP"], parts["FSDP2"]
        cells = [gib(ddp[k]) for k in ("weights", "grads", "AdamW", "Muon", "activations")] + [gib(fsdp["activations"])]
        cells += [gib(total(p, opt), fits=True) for p in (ddp, fsdp) for opt in ("AdamW", "Muon")]
        print(f"| {name} | {resolution} | {n / 1e9:.2f}B | {' | '.join(cells)} |")
    n, parts = presets[("base", 256)]
    print(f"\nbase ({n / 1e9:.2f}B parameters, 256 px), per GPU, DDP against FSDP2 (train.py --fsdp; per_gpu):")
    print("| part | DDP | FSDP2 |\n|---|---|---|")
    for k, label in MEMORY_PARTS.items():
        print(f"| {label} | {gib(parts['DDP'][k])} | {gib(parts['FSDP2'][k])} |")
    for opt in ("AdamW", "Muon"):
        ddp, fsdp = (gib(total(parts[way], opt), fits=True) for way in ("DDP", "FSDP2"))
        print(f"| total with {opt} | {ddp} | {fsdp} |")


# ----------------------------------------------------------------------------------------------------------
# gpu: one check of the CUDA path before a run spends GPU hours

GPU_CHECK = dict(preset="small", batch=32, side=32, txt_tokens=256, min_len=60, max_len=180,  # 256 px: 32x32 latent
                 parity_steps=5, warmup=3, steps=10, loader_samples=1024, sample_steps=50, backend="inductor",
                 train_steps=30, train_samples=512, train_flags=["--compile"],  # as speedrun.sh's TRAIN
                 teacher=None)  # None: the record's own (train.REPA_TEACHERS)


ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-15, fused=True)  # PRX part 2, as train.py


def synthetic_batch(cfg, s, seed):
    """x0, eps, t, txt, mask of the real shapes: text of cfg.context_dim (T5Gemma: 2304) padded to s["txt_tokens"],
    real lengths drawn as write_synthetic's."""
    g, B, L = torch.Generator().manual_seed(seed), s["batch"], s["txt_tokens"]
    x0 = torch.randn(B, cfg.in_channels, s["side"], s["side"], generator=g)
    eps, t = torch.randn(x0.shape, generator=g), torch.rand(B, generator=g)
    txt = torch.randn(B, L, cfg.context_dim, generator=g)
    mask = torch.arange(L)[None] < torch.randint(s["min_len"], s["max_len"] + 1, (B, 1), generator=g)
    return [v.to(DEVICE) for v in (x0, eps, t, txt, mask)]


def training_step(model, opt, batch, bf16=True, diffusers=False):
    """train.py's step on one micro-batch: v-prediction loss (train.flow_loss) under bf16 autocast, backward, clip to
    0.2, optimizer step (none: forward and backward only) -> the loss."""
    x0, eps, t, txt, mask = batch
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    with torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
        if diffusers:
            pred = model(x_t, t, txt, mask, return_dict=False)[0]
        else:
            pred = model(x_t, t, *trim_text(txt, mask))  # trimmed eagerly, before a compiled model
        loss = flow_loss(pred, x0, eps, x_t, t, "v")
    loss.backward()
    if opt is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def parity_row(model, batches):
    """bf16 autocast against fp32 from the same initial weights on the same batches."""
    losses = {}
    for bf16 in (False, True):
        trial = copy.deepcopy(model)  # the model itself stays as it is
        opt = torch.optim.AdamW(trial.parameters(), **ADAMW)
        losses[bf16] = [float(training_step(trial, opt, b, bf16)) for b in batches]
        del trial, opt
    gap = max(abs(a / b - 1) for a, b in zip(losses[True], losses[False]))
    return (f"loss after {len(batches)} AdamW steps, bf16 autocast (largest gap over the steps {100 * gap:.2f}%)",
            losses[True][-1], "fp32", losses[False][-1], "", ".4f")


def step_rows(sides, batch, s, peak_tflops):
    """Training step (fwd + bwd + clip + fused AdamW), compiled, the sides taking turns step by step; then each side's
    peak memory over one more step of its own, the other side's weights and AdamW moments (fp32, 12 bytes a
    parameter, allocated throughout) subtracted -> rows, our step's seconds."""
    steps = {}
    for name, (model, diffusers) in sides.items():
        opt = torch.optim.AdamW(model.parameters(), **ADAMW)
        run = torch.compile(model, backend=s["backend"])
        steps[name] = functools.partial(training_step, run, opt, batch, diffusers=diffusers)
    ms = median_ms(timed(steps, s["warmup"], s["steps"]))
    peak = dict.fromkeys(sides, math.nan)
    if CUDA:
        for name, step in steps.items():
            torch.cuda.reset_peak_memory_stats()
            step()
            others = sum(12 * p.numel() for other, (m, _) in sides.items() if other != name for p in m.parameters())
            peak[name] = (torch.cuda.max_memory_allocated() - others) / 2**30
    cfg = sides["ours"][0].cfg
    mfu = mfu_percent(cfg, (s["side"] // cfg.patch_size) ** 2, batch[4].sum(1), ms, peak_tflops)
    what = f"compiled training step, batch {s['batch']}"
    return [(f"{what}, median of {s['steps']}", ms["ours"], "diffusers", ms["diffusers"], " ms", ",.1f"),
            (f"{what}, MFU at {peak_tflops:g} TFLOP/s", mfu["ours"], "diffusers", mfu["diffusers"], " %", ".1f"),
            (f"{what}, peak memory", peak["ours"], "diffusers", peak["diffusers"], " GiB", ".1f")], ms["ours"] / 1e3


def optimizer_row(model, s):
    """Muon on the block matrices + AdamW on the rest (train.build_optimizers) against AdamW on all, same gradients."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    muon, rest = split_muon_params(model)
    pair = [Muon(muon), torch.optim.AdamW(rest, **ADAMW)]
    adam = torch.optim.AdamW(model.parameters(), **ADAMW)
    ms = median_ms(timed({"muon": lambda: [o.step() for o in pair], "adamw": adam.step}, 1, s["steps"]))
    model.zero_grad(set_to_none=True)
    return "optimizer step, Muon + AdamW", ms["muon"], "AdamW", ms["adamw"], " ms", ",.1f"


def loader_row(s, step_s):
    """ShardLoader over one epoch of bench.py loader's synthetic 256 px shards, after an untimed one, against the
    samples/s our training step consumes."""
    B, n = s["batch"], s["loader_samples"] // s["batch"]
    with tempfile.TemporaryDirectory() as root:
        write_synthetic(root, s["loader_samples"], quiet=True)
        loader = ShardLoader(root, B, device=DEVICE)
        wall = timed({"loader": lambda: next(loader)}, n, n)["loader"]
    return ("ShardLoader, synthetic shards", n * B / sum(wall), "training step", B / step_s, " samples/s", ",.0f")


def speedrun_record(track):
    """The record configuration speedrun.sh trains on `track` (its RECORD line), read from the script itself."""
    script = Path(__file__).with_name("speedrun.sh").read_text()
    return next(m[2].split() for m in re.finditer(r"^ *([\w|]+)\) RECORD=\(([^)]*)\)", script, re.M)
                if track in m[1].split("|"))


def train_run(out, flags):
    """train.py under torchrun, one process -> its config.json and its last metrics line with a speed."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          "train.py", "--out", out, *flags], cwd=Path(__file__).parent, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"error: train.py {' '.join(flags)} exited with {run.returncode}:\n{run.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        speed = [r for r in map(json.loads, f) if "samples_per_s" in r][-1]
    return json.loads(Path(out, "config.json").read_text()), speed


def train_rows(s, peak_tflops):
    """train.py itself, speedrun.sh's 8gpu record configuration against the baseline, one process with one GPU's
    share of the batch: samples/s and MFU end to end from each run's last log line, on synthetic shards with images
    and a teacher of random weights (its speed does not depend on them). On CUDA it runs the branches only a GPU takes
    (NCCL, TF32, fused AdamW, bf16 autocast and teacher, pinned host buffers)."""
    import timm
    from safetensors.torch import save_file
    record = speedrun_record("8gpu")
    with tempfile.TemporaryDirectory() as root:
        write_synthetic(root, s["train_samples"], images=True, quiet=True)
        flags = ["--track", "8gpu", "--data", root, "--model", s["preset"], "--batch-size", str(s["batch"]),
                 "--micro-batch", str(s["batch"]), "--max-steps", str(s["train_steps"]), "--log-every",
                 str(s["train_steps"] // 2), "--eval-samples", "0", "--peak-tflops", str(peak_tflops),
                 *s["train_flags"]]
        teacher = []
        if "--repa" in record:
            name = s["teacher"] or train.REPA_TEACHERS[record[record.index("--repa") + 1]]
            save_file(timm.create_model(name, num_classes=0).state_dict(), f"{root}/teacher.safetensors")
            teacher = ["--repa-teacher", name, "--repa-weights", f"{root}/teacher.safetensors"]
        config, base = train_run(f"{root}/baseline", flags)
        _, ours = train_run(f"{root}/record", flags + record + teacher)
    what = (f"train.py {' '.join(record)}, {s['train_steps']} steps of batch {s['batch']} "
            f"({config['device']}, {config['args']['precision']})")
    return [(f"{what}, data loading included", ours["samples_per_s"], "baseline", base["samples_per_s"],
             " samples/s", ",.1f"),
            (f"{what}, MFU (train.py's: text as trimmed)", 100 * ours["mfu"], "baseline", 100 * base["mfu"], " %",
             ".1f")]


def gpu_check(out, peak_tflops, rows=None):
    """Every GPU figure of the project in one markdown table, each row printed and written to `out`.partial as soon as
    it is measured, which becomes `out` at the end: a failure keeps the rows before it. rows: "train" (train.py end to
    end, the record configuration against the baseline) or "components" (the rest), for a command limit shorter than
    the whole; None: both."""
    s = GPU_CHECK
    with open(f"{out}.partial", "w") as f:
        def emit(*rows):
            for row in rows:
                if not isinstance(row, str):
                    what, a, name, b, unit, fmt = row
                    row = f"| {what} | {a:{fmt}}{unit} | {name} {b:{fmt}}{unit} | {a / b:.3f} |"
                print(row)
                f.write(row + "\n")
                f.flush()

        emit(f"PRX {s['preset']} | batch {s['batch']} | latent {s['side']}x{s['side']} | text {s['txt_tokens']} "
             f"padded, real {s['min_len']}..{s['max_len']} | torch {torch.__version__} | {machine()}", "",
             "| measure | ours | baseline | ours/baseline |", "|---|---|---|---|")
        if rows in (None, "train"):
            emit(*train_rows(s, peak_tflops))  # first: its processes have the GPU to themselves
        if rows in (None, "components"):
            component_rows(s, peak_tflops, emit)
    os.replace(f"{out}.partial", out)


def component_rows(s, peak_tflops, emit):
    """gpu_check's rows of the parts, ours against the baseline: loss parity, sampling, the compiled training step,
    the optimizer, the loader."""
    ours, theirs = prx_pair(s["preset"])
    batches = [synthetic_batch(ours.cfg, s, seed) for seed in range(s["parity_steps"])]
    emit(parity_row(ours, batches))
    rates = sampling_rates(ours.eval(), theirs.eval(), s["batch"], s["side"], s["sample_steps"], 1, 1)
    emit((f"sampling, {s['sample_steps']} Euler steps, CFG 3.5", *rates, " img/s", ".2f"))  # the same weights:
    for model in (ours, theirs):  # before the training rows change them, each its own way
        model.train()
    rows, step_s = step_rows({"ours": (ours, False), "diffusers": (theirs, True)}, batches[0], s, peak_tflops)
    emit(*rows)
    emit(optimizer_row(ours, s))
    emit(loader_row(s, step_s))


def bench_gpu(args):
    if not CUDA:
        raise SystemExit("error: `python bench.py gpu` needs a CUDA GPU and this machine has none "
                         "(`python bench.py memory` runs on the CPU)")
    gpu_check(args.out, args.peak_tflops, args.rows)


# ----------------------------------------------------------------------------------------------------------
# Command line

# the CPU-track ablation's techniques (records/2026-12-02_cpu-ablations), each timed against the baseline
TECHNIQUES = ["--repa builtin", "--repa builtin --irepa", "--tread", "--sprint", "--pred x", "--cfm 0.1",
              "--ema 0.99 --ema-every 1", "--optimizer muon", "--captions short", "--captions mixed",
              "--repa builtin --tread", "--repa builtin --tread --optimizer muon",
              "--repa builtin --tread --optimizer muon --compile"]


def technique_args(flags):
    """train.py's resolved flags of the CPU track with `flags` (a flag string, or "baseline": none)."""
    return train.get_args(["--track", "cpu", "--data", "builtin", "--seed", "0"]
                          + ([] if flags == "baseline" else flags.split()))


def bench_techniques(args):
    """The CPU track's training step (loader, model, optimizer, EMA) with each technique against the baseline's,
    interleaved round-robin in one process so that every variant sees the same machine load: the ratios give a
    technique's equal-minutes step budget even on a busy machine."""
    steps = {}
    for flags in ["baseline"] + (args.only or TECHNIQUES):
        a = technique_args(flags)
        loader = train.open_training_data(a, 0, 1, DEVICE, 0)[0]
        _, raw, ema, trainee, teacher = train.build_model(a, loader, DEVICE, 0)
        opt = train.build_optimizers(a, trainee)[0]
        if a.compile:  # as train.py: compiled for every input a timed step meets (text lengths, no mask), untimed
            train.compile_trainee(a, trainee)
            train.compile_warmup(a, trainee, trainee, opt, loader, teacher, 0, 1)
        counter = itertools.count()

        def step(a=a, trainee=trainee, opt=opt, loader=loader, teacher=teacher, ema=ema, raw=raw, counter=counter):
            i = next(counter)
            train.train_step(a, i, a.lr, trainee, opt, loader, teacher, 0, 1)
            if ema is not None and (i + 1) % a.ema_every == 0:  # as train.py
                train.ema_update(ema, raw, a.ema)
        steps[flags] = step
    ms = median_ms(timed(steps, args.warmup, args.steps))
    for flags in steps:
        compare(f"{flags} step", ms[flags], "baseline", ms["baseline"], "ms")


def check_loader_dir(parser, args):
    """bench.py loader's DIR: a prepared folder, or a new or empty one with room for the synthetic dataset (never the
    user's files or a preparation prepare.py has not finished); at least one batch of samples either way."""
    root = Path(args.dir).absolute()
    above = nearest_existing(root)  # DIR, or the folder it would be made in
    if why := unwritable(root):  # the synthetic shards, or datasets' copy of a prepared DIR, go there
        parser.error(f"bench.py loader: DIR {args.dir}: {why}")
    if (root / "index.json").exists():  # datasets' copy of it goes into DIR for the benchmark: room for it
        n, need = len(PreparedDataset(root)), sum(p.stat().st_size for p in (root / "train").rglob("*") if p.is_file())
        if need > (free := shutil.disk_usage(root).free):
            parser.error(f"bench.py loader: DIR {args.dir}: datasets' copy of it needs about {need / 2**30:.1f} GiB "
                         f"there (removed after), which has {free / 2**30:.1f} GiB free")
    elif not above.is_dir() or above == root and any(root.iterdir()):  # the user's files, a half-prepared DIR
        what = f"{above} is a file" if not above.is_dir() else \
            "holds files but no index.json (not a prepared folder, or one prepare.py has not finished)"
        parser.error(f"bench.py loader: DIR {args.dir}: {what}; give a prepared folder, or a new or empty one for "
                     f"the synthetic dataset")
    else:  # the synthetic shards, then datasets' copy of them: about twice their size
        n, need, free = args.samples, 2 * args.samples * SYNTHETIC_BYTES, shutil.disk_usage(above).free
        if need > free:
            parser.error(f"bench.py loader: --samples {args.samples} needs about {need / 2**30:.1f} GiB in "
                         f"{above}, which has {free / 2**30:.1f} GiB free; pass --samples "
                         f"{free // (2 * SYNTHETIC_BYTES)} or fewer")
    if n < args.batch:
        parser.error(f"bench.py loader: --batch {args.batch} is more than the {n} samples (--samples or DIR)")


def get_parser():
    parser = Parser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model", help="PRX forward+backward against diffusers' PRXTransformer2DModel")
    p.add_argument("--preset", default="tiny", help="PRX preset (model.py)")
    p.add_argument("--batch", type=count, default=16)
    p.add_argument("--img-tokens", type=count, default=256, help="image tokens (a square number)")
    p.add_argument("--txt-tokens", type=count, default=128, help="padded text length")
    p.add_argument("--min-len", type=count, default=8, help="shortest real caption in the batch")
    p.add_argument("--max-len", type=count, default=64, help="longest real caption in the batch")
    p.add_argument("--steps", type=count, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=number(int, 0), default=3, help="untimed steps first (compilation happens there)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile on both sides")
    p.add_argument("--peak-tflops", type=positive, default=989.0, help="GPU bf16 dense peak for MFU (H100: 989)")
    p.set_defaults(run=bench_model)
    p = sub.add_parser("muon", help="Muon step against torch.optim.Muon on a preset's block matrices")
    p.add_argument("--preset", default="small", help="PRX preset whose block matrices are stepped")
    p.add_argument("--blocks", type=number(int, 0), default=0, help="blocks to step (default: all on GPU, 1 on CPU)")
    p.add_argument("--steps", type=count, default=3, help="timed steps after 1 warm-up (median reported)")
    p.set_defaults(run=bench_muon)
    p = sub.add_parser("loader", help="ShardLoader samples/s on one core against HuggingFace datasets")
    p.add_argument("dir", help="a prepared directory (datasets' copy of it made there, removed after), or a new or "
                   "empty one to write a synthetic dataset into")
    p.add_argument("--samples", type=count, default=5000, help="samples of the synthetic dataset (a new DIR)")
    p.add_argument("--batch", type=count, default=32)
    p.set_defaults(run=bench_loader)
    p = sub.add_parser("eval", help="metric networks, MMD and sampling against their references")
    p.add_argument("--batch", type=count, help="images per call (default: 32 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=number(int, 0), default=1, help="untimed calls first")
    p.add_argument("--steps", type=count, default=1, help="timed calls (median reported)")
    p.add_argument("--mmd-rows", type=count, help="embeddings per side of the MMD (default: 10000 on GPU, eval.py's "
                   "default sample count; 4096 on CPU)")
    p.add_argument("--preset", help="PRX preset to sample with (default: small on GPU, tiny-pixel on CPU)")
    p.add_argument("--sample-steps", type=count, default=50, help="Euler steps per sample")
    p.set_defaults(run=bench_eval)
    p = sub.add_parser("memory", help="bytes per GPU of weights, gradients, optimizer state and activations")
    p.add_argument("--micro-batch", type=count, default=32, help="samples per GPU per forward")
    p.set_defaults(run=bench_memory)
    p = sub.add_parser("techniques", help="CPU-track training step of each technique against the baseline")
    p.add_argument("--only", action="append", help="this flag string instead of TECHNIQUES, repeatable: "
                   "--only=--tread --only='--cfm 0.05'")
    p.add_argument("--warmup", type=number(int, 0), default=3, help="untimed rounds first")
    p.add_argument("--steps", type=count, default=20, help="timed rounds (median reported)")
    p.set_defaults(run=bench_techniques)
    p = sub.add_parser("gpu", help="the CUDA path in one table (CUDA only)")
    p.add_argument("--out", default="gpu_check.md", help="where the table is written too")
    p.add_argument("--peak-tflops", type=positive, default=989.0, help="GPU bf16 dense peak for MFU (H100: 989)")
    p.add_argument("--rows", choices=["train", "components"], help="one half of the table: train.py end to end, or "
                   "the parts (loss parity, sampling, training step, optimizer, loader); default both")
    p.set_defaults(run=bench_gpu)
    return parser


def check_args(parser, args):
    """What argparse's types cannot see, refused before any work: a flag against another, a folder or file to write."""
    if args.command == "model" and (math.isqrt(args.img_tokens) ** 2 != args.img_tokens or
                                    not args.min_len <= args.max_len <= args.txt_tokens):
        parser.error(f"bench.py model: --img-tokens {args.img_tokens} must be a square number (a square grid) and "
                     f"--min-len {args.min_len} <= --max-len {args.max_len} <= --txt-tokens {args.txt_tokens}")
    if args.command == "model" and args.compile and not args.warmup:
        parser.error("bench.py model --compile: the first call compiles; pass --warmup 1 or more (untimed)")
    if getattr(args, "preset", None) is not None:
        try:
            depth = preset_config(args.preset).depth
        except ValueError as e:
            parser.error(f"--preset: {e}")
        if args.command == "muon" and args.blocks > depth:
            parser.error(f"bench.py muon: --blocks {args.blocks} is more than the {depth} blocks of {args.preset}")
        if args.command == "muon":  # resolved here, so that the header says what runs
            args.blocks = args.blocks or (depth if CUDA else 1)  # CPUs without bf16 matmul units: --preset tiny
    if args.command == "loader":
        check_loader_dir(parser, args)
    if args.command == "gpu" and os.path.exists(args.out):  # a table measured before is kept
        parser.error(f"bench.py gpu: --out {args.out}: exists: pass another file")
    if args.command == "gpu" and (why := unwritable(args.out)):
        parser.error(f"bench.py gpu: --out {args.out}: {why}")
    for flags in getattr(args, "only", None) or []:  # train.py's refusal, before any variant is built
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                technique_args(flags)
        except SystemExit as e:  # argparse's message on stderr, or train.py's own in the exit
            why = (err.getvalue().strip().splitlines() or [str(e.code)])[-1]
            parser.error(f"--only {flags!r}: {re.sub(r'^.*?error: ', '', why)}")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    config = " ".join(f"{k}={v}" for k, v in vars(args).items() if k not in ("command", "run"))
    print(f"bench {args.command} | torch {torch.__version__} | {machine()} | {config}")
    if not CUDA:
        keep_freed_memory()  # as train.py and eval.py (eval.setup_distributed): both sides of every comparison
    args.run(args)


if __name__ == "__main__":
    main()
