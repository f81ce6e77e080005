"""
Train a PRX text-to-image model with flow matching. One file, one loop; every technique is a flag.

    python train.py                                   # CPU track: tiny model, built-in shapes, ~5 minutes
    torchrun --nproc_per_node=8 train.py --data data/mj --model small --batch-size 256 --compile --tread

Conventions (rectified flow, as PRX and SD3): t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t eps, the
network predicts v = eps - x0 (or x0 with --pred x, JiT). All randomness of a micro-batch (its samples, t, noise,
caption dropout, TREAD routing) is a function of (seed, step, micro-batch index), so a run replays exactly whatever
the number of processes, and a resumed run continues the same sequence.
"""

import argparse
import contextlib
import copy
import datetime
import errno
import fcntl
import functools
import importlib.metadata
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
import timeit

import numpy as np
import torch
import torch._functorch.config  # compile_trainee's (AOTAutograd's settings)
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
    get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from data import NOT_WEIGHTS, NotOnThisMachine, Parser, caption_share, count, data_dirs, errors_of_rank_0_first, \
    exit_on, fraction, heldout_caption, how_to_prepare, number, one_line, open_heldout, open_loader, pad_text, \
    pad_to_common, parse_data_phases, positive, read_index, seed_number, side, space_differences, stop_on_signals, \
    stop_when_another_process_ends, unwritable, write_whole
from eval import DINO_ID, FEATURE_METRICS, Metrics, check_encoders, evaluate, load_decoder, load_dino, \
    main_process, save_grid, setup_distributed, shift_t, x0_to_velocity
from model import CHECKPOINT_FILES, CHECKSUMS, PRESETS, PRX, apply_rope, ema_note, file_sha256, flops_per_sample, \
    list_checkpoints, preset_config, read_config, readable_as_umask, resume_configs, rope_at, rope_table, run_of, \
    stage_config, step_of, trim_text, verify_checkpoint
from muon import Muon, split_muon_params, split_summary
from shapes import TEACHER_FILE, TEXT_CONTEXT, load_teacher

# The tracks (records/RULES.md): a track's values replace the defaults of the flags not given (printed at start, in
# config.json). The GPU tracks train on the prepared speedrun dataset, 1gpu a smaller model. The CPU track's shift (its
# sampler's: its training t is uniform, unshifted) is 1, not pixel space's 3: a 32 px image has 3k values, a 256 px
# latent 16k, and the shift grows with the size (SD3).
CPU_TRACK = dict(model="tiny-pixel", resolution=32, batch_size=32, micro_batch=32, lr=2e-3, warmup=100,
                 grad_clip=1.0, uniform_t=1.0, foreground_weight=2.0, max_time=4.3, sample_steps=20,
                 cfg_scale=3.0, ckpt_every=500, log_every=50, shift=1.0)
SPEEDRUN_DATA, SPEEDRUN_PREPARE = "data/mj", "torchrun --nproc_per_node=8 prepare.py --out data/mj"
TRACKS = {"cpu": dict(data="builtin", **CPU_TRACK), "8gpu": dict(data=SPEEDRUN_DATA),
          "1gpu": dict(data=SPEEDRUN_DATA, hidden=768, depth=12, micro_batch=64)}
# builtin: shapes.ShapesTeacher, trained once on the built-in world (`python shapes.py teacher`), the CPU track's DINO
REPA_TEACHERS = {"builtin": None, "dinov2": DINO_ID, "dinov3": "vit_large_patch16_dinov3.lvd1689m"}
# the perceptual losses' networks (PRX prx/algorithm/lpips.py: lpips_net vgg; perceptual_dino.py: dinov2_vitb14_reg)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16
PDINO_MODEL, PDINO_GRID = "vit_base_patch14_reg4_dinov2.lvd142m", (16, 16)  # PRX resizes to 224 px: 16 x 14 px
# flags a resume may change (a second phase or resolution stage: lr, schedule, data, resolution, auxiliary losses,
# evaluation); any other must equal the checkpoint's
RESUMABLE = {"out", "resume", "max_steps", "max_time", "log_every", "ckpt_every", "keep", "data", "resolution",
             "captions", "caption_dropout", "compile", "lr", "muon_lr", "warmup", "cooldown", "grad_clip", "eval_every",
             "eval_minutes", "eval_samples", "sample_steps", "cfg_scale", "eval_ref", "fid_weights", "peak_tflops",
             "repa_weights", "repa", "repa_layer", "repa_lambda", "repa_stop", "repa_teacher", "irepa", "cfm", "lpips",
             "lpips_weights", "pdino", "pdino_weights", "self_guidance", "eval_data",
             "track", "target",  # the track follows --data, which a second phase may change
             "fsdp",  # checkpoints hold whole tensors: a resume may shard them or not, on any number of processes
             "activation_memory_budget"}  # what the backward recomputes, not what it computes


def minutes_list(text):
    try:
        minutes = [float(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes separated by commas, e.g. 1,2,5,10, got {text!r}")
    if not minutes or any(not m > 0 for m in minutes):  # none: an empty value, which would turn them off unseen
        raise argparse.ArgumentTypeError(f"minutes must be > 0, got {text!r}")
    return sorted(minutes)


def target_spec(text):
    """--target METRIC=VALUE -> (metric, value)."""
    metric, _, value = text.partition("=")
    with contextlib.suppress(ValueError):
        if math.isfinite(float(value)):
            return metric, float(value)
    raise argparse.ArgumentTypeError(f"expected METRIC=VALUE, e.g. fid=20 or object_accuracy=0.416, got {text!r}")


def target_reached(target, result):
    """The feature metrics (FID, CMMD, DINO-MMD) reach a target at or below it, the accuracies at or above it."""
    metric, value = target
    return result[metric] <= value if metric in FEATURE_METRICS else result[metric] >= value


def choose_track(track, data, cuda_available):
    """-> (track or None, why): --track as given; else --data builtin is the CPU track and another --data no track,
    and without --data it is the 8-GPU track where CUDA is, the CPU track where it is not."""
    if track:
        return track, "--track"
    if data:
        return ("cpu", "--data builtin") if data == "builtin" else (None, f"--data {data}")
    return ("8gpu", "CUDA available, no --data") if cuda_available else ("cpu", "no CUDA, no --data")


def get_parser():
    p = Parser(description=__doc__)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<timestamp>); never reused without --resume")
    g.add_argument("--seed", type=seed_number, default=0, help="of every draw: weights, data, t, noise")
    g.add_argument("--max-steps", type=count, default=100_000, help="stop after this many optimizer steps")
    g.add_argument("--max-time", type=positive, default=None, help="stop after this many minutes of training time")
    g.add_argument("--log-every", type=count, default=100, help="steps between log lines (metrics.jsonl, console)")
    g.add_argument("--ckpt-every", type=count, default=5000, help="steps between checkpoints (and one at the end)")
    g.add_argument("--keep", type=count, default=2, help="checkpoints kept on disk (the most recent)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, a run folder, or (no value) the latest one in --out")
    g = p.add_argument_group("data")
    g.add_argument("--track", choices=sorted(TRACKS), default=None, help="the speedrun track whose values replace "
                   "the defaults shown here of the flags not given, as its log's second line lists (records/RULES.md; "
                   "default: see --data)")
    g.add_argument("--data", default=None,
                   help="'builtin' (shapes.py, no download), or prepared datasets with weights and phases: "
                        "'data/mj', 'data/mj:0.7,data/cc:0.3', 'data/mj@0;data/alchemist@90000' (data.py). Default: "
                        f"the track's: {SPEEDRUN_DATA} on CUDA (8gpu track), else builtin (cpu track)")
    g.add_argument("--resolution", type=side, default=256, help="image side in pixels")
    g.add_argument("--captions", default="long", help="long, short, or mixed[:p] (long with probability p)")
    g.add_argument("--text-context", type=number(int, 0, 64), default=TEXT_CONTEXT,
                   help="built-in text encoder: context window of each word (0 = word + position only)")
    g.add_argument("--caption-dropout", type=fraction, default=0.1, help="fraction trained on the empty prompt")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="small", choices=[n + s for n in PRESETS for s in ("", "-pixel")],
                   help="preset (model.py); -pixel: on images, not latents")
    g.add_argument("--hidden", type=count, default=None, help="override the preset's hidden size (heads = hidden/64)")
    g.add_argument("--depth", type=count, default=None, help="override the preset's depth")
    g.add_argument("--patch", type=count, default=None, help="override the preset's patch size")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up is untimed)")
    g.add_argument("--activation-memory-budget", type=fraction, default=1.0, help="--compile: the share of the "
                   "activations the backward reads that the forward keeps, the rest recomputed in the backward "
                   "(AOTAutograd's min-cut partitioner; PRX's activation_memory_budget, 1: keep all): less memory, "
                   "more compute")
    g.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="bf16: fp32 weights, bf16 autocast "
                   "(PRX; the default on CUDA; on a CPU fast with AMX or AVX512-BF16, the attention kept in fp32); "
                   "fp32: no autocast (the default on CPU)")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP (torchrun): weights, gradients and "
                   "optimizer state sharded over the processes, a block's weights gathered (in bf16 under bf16) while "
                   "it runs")
    g.add_argument("--resolution-embeds", action="store_true", help="add an embedding of the input's (H, W) to the "
                   "timestep vector (PRX-7B; diffusers' resolution_embeds=True): one model across resolution stages")
    g = p.add_argument_group("objective")
    g.add_argument("--pred", default="v", choices=["v", "x"], help="network output: velocity, or x0 (JiT)")
    g.add_argument("--shift", type=positive, default=None, help="timestep shift s: t -> s t / (1 + (s - 1) t) of the "
                   "logit-normal training t and of the sampler's steps (default PRX's: 3 in pixel space, 1 on latents)")
    g.add_argument("--uniform-t", type=fraction, default=0.1, help="fraction of t drawn uniformly (unshifted), not "
                   "logit-normal")
    g.add_argument("--foreground-weight", type=number(float, 0), default=0.0,
                   help="pixel space: extra loss weight on pixels away from the background (0 = plain MSE)")
    add_technique_flags(p.add_argument_group("techniques"))
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon for block matrices")
    g.add_argument("--muon-lr", type=positive, default=None, help="Muon's lr, on --lr's schedule (default --lr, "
                   "PRX's: Muon's update RMS is matched to AdamW's)")
    g.add_argument("--muon-ns-steps", type=count, default=5, help="Newton-Schulz iterations of --optimizer muon "
                   "(PRX's 5): fewer cost less and orthogonalise less")
    g.add_argument("--batch-size", type=count, default=256, help="global batch, kept by gradient accumulation")
    g.add_argument("--micro-batch", type=count, default=32, help="samples per process per forward")
    g.add_argument("--lr", type=positive, default=1e-4, help="peak learning rate (AdamW's)")
    g.add_argument("--betas", type=fraction, nargs=2, default=(0.9, 0.95), help="AdamW's")
    g.add_argument("--eps", type=positive, default=None, help="AdamW eps (default PRX's: 1e-15, 1e-8 with muon)")
    g.add_argument("--weight-decay", type=number(float, 0), default=0.0, help="decoupled, as AdamW's")
    g.add_argument("--warmup", type=number(int, 0), default=1000, help="linear warm-up steps, then constant")
    g.add_argument("--cooldown", type=fraction, default=0.0, help="final fraction of the run (of --max-steps or "
                   "--max-time, whichever ends it) with the lr decaying linearly to 0 (WSD); 0 = constant to the end")
    g.add_argument("--grad-clip", type=positive, default=0.2, help="max gradient norm")
    g.add_argument("--ema", type=number(float, 0, 1, high_open=True), default=0.0, help="EMA decay in (0, 1) "
                   "applied once per update, as PRX (0.999 every 10 steps; 0 = off); samples use the EMA weights")
    g.add_argument("--ema-every", type=count, default=10, help="steps between EMA updates")
    add_evaluation_flags(p.add_argument_group("evaluation"))
    return p


def add_evaluation_flags(g):
    """When and how a run evaluates itself, and when it stops at a target."""
    g.add_argument("--eval-every", type=number(int, 0), default=0, help="steps between evaluations (0 = at the end)")
    g.add_argument("--eval-minutes", type=minutes_list, default=[], help="also evaluate when the training time "
                   "passes these minutes, e.g. 1,2,5,10,20,30 (the CPU record's curve)")
    g.add_argument("--target", type=target_spec, default=None, help="METRIC=VALUE: stop when an evaluation reaches "
                   "it, e.g. fid=20 (at or below) or object_accuracy=0.416 (at or above)")
    g.add_argument("--eval-samples", type=number(int, 0), default=256, help="held-out samples per evaluation "
                   "(0 = none)")
    g.add_argument("--sample-steps", type=count, default=50, help="Euler steps")
    g.add_argument("--cfg-scale", type=number(float, 0), default=3.5, help="classifier-free guidance scale")
    g.add_argument("--self-guidance", type=number(float, 0), default=0.0, help="TREAD self-guidance scale w: "
                   "routed + w (full - routed) (0 = off; needs --tread or --sprint)")
    g.add_argument("--eval-data", default=None, help="a prepared evaluation-only set (its eval split) instead of "
                   "--data's held-out samples, e.g. real photos: `python prepare.py --eval-fraction 1 ...`")
    g.add_argument("--eval-ref", help="prepared data: FID reference from `python eval.py ref` (same --eval-samples)")
    g.add_argument("--fid-weights", help="local Inception weights for FID (offline machines)")
    g.add_argument("--peak-tflops", type=positive, default=989.0, help="GPU bf16 peak for MFU (H100/H200: 989)")


def add_technique_flags(g):
    """The techniques of the PRX ablations: REPA and iREPA, CFM, the perceptual losses, TREAD and SPRINT."""
    g.add_argument("--repa", default=None, choices=sorted(REPA_TEACHERS), help="REPA: align the tokens after "
                   "--repa-layer with a frozen teacher's patch tokens (builtin: shapes.py's, for --data builtin)")
    g.add_argument("--repa-layer", type=number(int, 0), default=None, help="block index (default PRX's 7 of 16, "
                   "scaled to the depth)")
    g.add_argument("--repa-lambda", type=positive, default=0.5, help="REPA loss weight")
    g.add_argument("--repa-teacher", default=None, help="another timm model as teacher (default: --repa's)")
    g.add_argument("--repa-weights", default=None, help="the teacher's weights file, for offline machines")
    g.add_argument("--repa-stop", type=count, default=None, help="drop REPA (loss, teacher, projector) from this "
                   "step on (PRX: after ~200k steps)")
    g.add_argument("--irepa", action="store_true", help="iREPA: 3x3 conv projector on the token grid (attention "
                   "with 2D RoPE under --tread/--sprint) and spatially normalised teacher tokens")
    g.add_argument("--cfm", type=positive, default=None, help="contrastive flow matching weight lambda (PRX 0.1, "
                   "its ablation 0.05): minus lambda x the error against another sample's target")
    g.add_argument("--lpips", type=positive, default=None, help="LPIPS weight (PRX 0.1): VGG LPIPS between the "
                   "predicted clean image and the image (pixel space)")
    g.add_argument("--lpips-weights", default=None, help=f"torchvision's VGG16 weights {VGG16_FILE}, LPIPS's "
                   "backbone, for offline machines (LPIPS's linear heads come with the lpips package)")
    g.add_argument("--pdino", type=positive, default=None, help="P-DINO weight (PRX 0.01): 1 - mean cosine of "
                   "DINOv2 ViT-B/14 patch tokens of the predicted clean image and the image (pixel space)")
    g.add_argument("--pdino-weights", default=None, help="P-DINO's DINOv2 weights file, for offline machines")
    g.add_argument("--tread", action="store_true", help="TREAD: route tokens around the middle blocks")
    g.add_argument("--sprint", action="store_true", help="SPRINT: TREAD + mask token and fusion layer")
    g.add_argument("--route-ratio", type=number(float, 0, 1, low_open=True, high_open=True), default=None,
                   help="routed fraction in (0, 1) (default TREAD 0.5, SPRINT 0.75)")


def get_args(argv=None, files=True):
    """Parse, apply the track's values to the flags not given (choose_track), resolve the settings that depend on
    other flags, and check every combination and (files) the files the flags name: an error here names the flag,
    before any work. speedrun.sh checks its runs' flags with files=False, before it prepares the track's data."""
    argv = sys.argv[1:] if argv is None else argv
    parser = get_parser()
    args = parser.parse_args(argv)
    given = parser.given(argv)
    args.given = sorted(given)  # stored in config.json: the flags typed (verify.py: a calibration's are speedrun.sh's)
    args.track, args.track_why = choose_track(args.track, args.data, torch.cuda.is_available())
    values = TRACKS.get(args.track, {})
    args.track_values = sorted(k for k in values if k not in given)  # stored in config.json: what the track set
    for key in args.track_values:
        setattr(args, key, values[key])
    check_combinations(parser, args, given)
    # PRX's defaults that depend on other flags: the shift on the space (SD3: larger inputs, more noise), Adam's eps
    # on the optimizer
    args.route_ratio = args.route_ratio or (0.75 if args.sprint else 0.5 if args.tread else None)
    args.shift = args.shift or (3.0 if args.model.endswith("-pixel") else 1.0)
    args.eps = args.eps or (1e-8 if args.optimizer == "muon" else 1e-15)
    args.muon_lr = (args.muon_lr or args.lr) if args.optimizer == "muon" else None
    args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if 0 < args.eval_samples < world:
        parser.error(f"--eval-samples {args.eval_samples}: the {world} processes each sample a share of an evaluation, "
                     f"and one with none would wait forever for the others' collectives: use at least {world}, or 0 "
                     f"(no evaluations)")
    if args.fsdp:  # what cannot work sharded
        if "RANK" not in os.environ:
            parser.error("--fsdp shards over the processes that torchrun starts (torchrun --nproc_per_node=N train.py "
                         "--fsdp ...); a single process holds the whole model anyway: drop --fsdp")
        if args.eval_samples % world:
            parser.error(f"--fsdp: a sharded model's forward is collective, so every process must sample as many "
                         f"batches: --eval-samples {args.eval_samples} must be a multiple of the {world} processes")
        if args.precision == "bf16" and args.eval_samples and not torch.cuda.is_available():
            parser.error("--fsdp --precision bf16 on the CPU: the weights are gathered in bf16, and the CPU samples "
                         "without autocast (eval.sample): add --eval-samples 0, or use --precision fp32")
    if files:
        check_files(parser, args)
    return args


def check_combinations(parser, args, given):
    """The flags that need or exclude others; `given`: the flags typed (a dependent flag typed at its default is
    refused too, a track's value is not)."""
    if args.tread and args.sprint:
        parser.error("--tread and --sprint are exclusive (SPRINT already routes tokens)")
    if args.route_ratio is not None and not (args.tread or args.sprint):
        parser.error("--route-ratio needs --tread or --sprint")
    if max(args.betas) >= 1:
        parser.error(f"--betas {args.betas[0]:g} {args.betas[1]:g}: each must be below 1 (AdamW's averages of the "
                     f"gradient and its square would never move)")
    needs = [(("muon_ns_steps", "muon_lr"), args.optimizer == "muon", "is Muon's: it needs --optimizer muon"),
             (("repa_stop", "irepa", "repa_layer", "repa_lambda", "repa_teacher", "repa_weights"), args.repa,
              "needs --repa (builtin, dinov2 or dinov3)"),
             (("ema_every",), args.ema, "sets how often the EMA updates: it needs --ema DECAY"),
             (("activation_memory_budget",), args.compile, "is the compiled graph's: it needs --compile"),
             (("eval_every", "eval_minutes", "eval_ref", "eval_data", "self_guidance"), args.eval_samples,
              "shapes the run's evaluations; --eval-samples 0 turns them off"),
             (("lpips_weights",), args.lpips, "needs --lpips"), (("pdino_weights",), args.pdino, "needs --pdino"),
             (("fid_weights",), args.eval_ref and args.eval_samples, "is FID's network: it needs --eval-ref"),
             (("text_context",), args.data == "builtin", "is the built-in text encoder's: prepared --data holds "
                                                         "its text encoded")]
    for names, needed, why in needs:
        for name in names:
            if name in given and not needed:
                parser.error(f"--{name.replace('_', '-')} {why}")
    if args.hidden and args.hidden % 64:
        parser.error(f"--hidden {args.hidden}: attention heads are 64 wide (heads = hidden / 64): use a multiple of 64")
    if args.self_guidance and not (args.tread or args.sprint):
        parser.error("--self-guidance extrapolates from the routed network: it needs --tread or --sprint")
    if args.repa == "builtin" and args.data != "builtin":
        parser.error("--repa builtin: the built-in teacher reads the built-in shapes only; use dinov2 or dinov3")
    if args.repa == "builtin" and args.repa_teacher:
        parser.error("--repa-teacher names a timm model: not with --repa builtin")
    try:
        caption_share(args.captions)
    except ValueError as e:
        parser.error(f"--captions: {e}")
    if args.lpips and args.resolution < 16:  # below, VGG16's four poolings leave its last stage no pixel
        parser.error(f"--lpips: VGG16's feature maps need images of at least 16 px; --resolution {args.resolution}")
    if args.cfm and args.micro_batch < 2:
        parser.error("--cfm contrasts each sample with another of its micro-batch: it needs --micro-batch 2 or more")
    if args.target and not (args.eval_samples and (args.eval_every or args.eval_minutes)):
        parser.error("--target needs evaluations during the run: --eval-every or --eval-minutes, --eval-samples > 0")


def check_files(parser, args):
    """The prepared datasets and files the flags name exist and suit the run."""
    try:
        dirs = data_dirs(args.data)
    except ValueError as e:
        parser.error(f"--data: {e}")
    if args.data == "builtin" and not args.model.endswith("-pixel") and not args.patch and not args.resume:
        # (a resume takes the run's model: a resume without the run's --data is told so by check_resume_flags)
        parser.error(other_space(args.model, False, "builtin draws images"))
    perceptual = [flag for flag, weight in (("--lpips", args.lpips), ("--pdino", args.pdino)) if weight]
    for path in dirs:
        if not os.path.exists(os.path.join(path, "index.json")):
            how = how_to_prepare(path) if "data" not in args.track_values else \
                f"prepare one with `{SPEEDRUN_PREPARE}` (the {args.track} track's dataset: {args.track_why}), or " \
                f"train the CPU track with --track cpu"
            parser.error(f"--data {path}: no prepared dataset there (no index.json); {how}")
        try:
            schema = read_index(path)["schema"]
        except ValueError as e:  # a file cut short
            parser.error(f"--data {path}: {e}")
        if ("latent" in schema) == args.model.endswith("-pixel") and not args.patch and path == dirs[0]:
            # the first dataset's space: a mixture of spaces is refused by the loader, naming them
            parser.error(other_space(args.model, "latent" in schema, f"{path} holds latents" if "latent" in schema
                                     else f"{path} holds images (--vae none)"))
        if args.foreground_weight and "latent" in schema:
            whose = f"the {args.track} track's value; " * ("foreground_weight" in args.track_values)
            parser.error(f"--foreground-weight {args.foreground_weight:g}: {path} holds latents, which have no "
                         f"background colour to weigh against ({whose}pass --foreground-weight 0)")
        if perceptual and "latent" in schema:
            parser.error(f"{' and '.join(perceptual)}: {path} holds latents; the perceptual losses compare images, "
                         f"and decoding the prediction with the VAE at every step is too costly: use pixel data "
                         f"(`python prepare.py --vae none ...`)")
    if args.eval_data and not os.path.exists(os.path.join(args.eval_data, "index.json")):
        parser.error(f"--eval-data {args.eval_data}: no prepared dataset there (no index.json); "
                     f"{how_to_prepare(args.eval_data, '--eval-fraction 1 ')}")
    if args.eval_data and not dirs:
        parser.error(f"--eval-data {args.eval_data}: a prepared dataset, whose text and images a model of the built-in "
                     f"shapes (--data builtin) cannot read: leave --eval-data out")
    if args.eval_data:  # the model is sampled in --data's space and decoded with --eval-data's VAE: the same one
        try:
            differ = space_differences(args.eval_data, dirs[0])
        except ValueError as e:  # a file cut short
            parser.error(f"--eval-data {args.eval_data}: {e}")
        if differ:
            verb = "differ" if len(differ) > 1 else "differs"
            parser.error(f"--eval-data {args.eval_data}: its {' and '.join(differ)} {verb} from --data {args.data}'s; "
                         f"prepare it as --data was (the same --resolution, --vae and --text-encoder)")
    if args.eval_ref and not os.path.exists(args.eval_ref):
        parser.error(f"--eval-ref {args.eval_ref}: no such file; make it with `python eval.py ref --data <data> "
                     f"--num-samples {args.eval_samples} --out {args.eval_ref}`")
    scores = ["fid"] * bool(args.eval_ref) + ["caption_accuracy", "color_region_accuracy", "object_accuracy"] * \
        ((args.eval_data or args.data) == "builtin")  # what the run's evaluations give
    if args.target and args.target[0].endswith("accuracy") and args.target[1] > 1:
        parser.error(f"--target {args.target[0]}={args.target[1]:g}: an accuracy is at most 1, so the run would never "
                     f"stop there")
    if args.target and args.target[0] not in scores:
        parser.error(f"--target {args.target[0]}: this run's evaluations give {', '.join(scores) or 'nothing'}"
                     + (" (FID needs --eval-ref FILE, from `python eval.py ref`)" * (args.data != "builtin"
                                                                                   and not args.eval_ref)))


def other_space(model, latent, data):
    """The error for a preset of the other space than the data's: its patch size and default shift are that space's
    (--patch: the user's own choice)."""
    return (f"--model {model}: a preset for {'images' if latent else 'latents'}, and --data {data}: use --model "
            f"{model.removesuffix('-pixel') if latent else model + '-pixel'} (or choose --patch)")


# ----------------------------------------------------------------------------------------------------------
# Flow matching (rectified flow, Liu et al. 2022; logit-normal t and the shift, SD3, Esser et al. 2024)

def sample_t(n, shift, uniform_frac, g, device):
    """Logit-normal t, shifted towards noise by s, with a fraction drawn uniformly; clamped away from 0 and 1."""
    t = shift_t(torch.sigmoid(torch.randn(n, generator=g, device=device)), shift)
    uniform = torch.rand(n, generator=g, device=device) < uniform_frac
    t = torch.where(uniform, torch.rand(n, generator=g, device=device), t)
    return t.clamp(1e-3, 1 - 1e-3)


def foreground_weights(x0, weight):
    """(B, 1, H, W): 1 + weight on pixels away from the image's background, estimated as its per-channel median
    (the background covers most of a built-in image), normalised to mean 1 per image. Small objects are a few
    percent of the pixels: unweighted, the loss barely sees their shape."""
    background = x0.flatten(2).median(dim=2).values[..., None, None]                 # (B, C, 1, 1)
    w = 1 + weight * ((x0 - background).abs().amax(dim=1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
    return w / w.mean(dim=(2, 3), keepdim=True)


def flow_loss(pred, x0, eps, x_t, t, pred_type, weights=None, cfm=0.0):
    """Weighted MSE on velocity. With x-prediction (JiT) the prediction becomes a velocity through
    x0_to_velocity, and so does the target, which then equals eps - x0 where t >= X_PRED_MIN_T. With cfm = lambda
    (contrastive flow matching, PRX ContrastiveFlowMatching): minus lambda x the error against the target of the
    previous sample in the batch (target.roll(1)), skipped for a batch of one."""
    if pred_type == "v":
        pred_v, target = pred.float(), eps - x0
    else:
        tt = t[:, None, None, None]
        pred_v, target = x0_to_velocity(x_t, pred.float(), tt), x0_to_velocity(x_t, x0, tt)
    err = (pred_v - target).square()
    if cfm and len(pred) > 1:
        err = err - cfm * (pred_v - target.roll(1, dims=0)).square()
    return (err if weights is None else err * weights).mean()


def micro_batch(args, loader, step, chunk, device):
    """Chunk k of the global batch of `step` -> x0, eps, t, x_t, txt, mask, images ([-1, 1] pixels, or None): t,
    noise and caption dropout come from the chunk's own seed; the loader gives the samples."""
    seed = int(np.random.SeedSequence([args.seed, step, chunk]).generate_state(1)[0])
    g = torch.Generator(device).manual_seed(seed)
    batch = next(loader)
    images = batch["image"].float() / 127.5 - 1 if "image" in batch else None  # (B, 3, R, R)
    x0 = batch["latent"] if "latent" in batch else images                      # (B, C, h, w)
    # caption dropout: the encoded empty prompt with its own mask (PRX), not zeros
    keep = torch.rand(len(x0), generator=g, device=device) >= args.caption_dropout
    txt, mask, null_txt, null_mask = pad_to_common(batch["txt"].float(), batch["txt_mask"], loader.null_txt,
                                                   loader.null_mask)
    txt, mask = torch.where(keep[:, None, None], txt, null_txt), torch.where(keep[:, None], mask, null_mask)
    t = sample_t(len(x0), args.shift, args.uniform_t, g, device)
    eps = torch.randn(x0.shape, generator=g, device=device)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    torch.manual_seed(seed + 1)  # the routing draw inside the model
    return x0, eps, t, x_t, txt, mask, images


# ----------------------------------------------------------------------------------------------------------
# REPA (Yu et al. 2025; PRX part 2: DINOv3 after block 8 of 16, lambda 0.5) and iREPA (PRX iREPALoss)

class AttentionProjector(nn.Module):
    """iREPA's projector where routing leaves the token grid incomplete (PRX AttentionProjector): self-attention
    over the tokens present, 4 heads, 2D RoPE on their grid coordinates, then linear out to the teacher's width."""

    def __init__(self, hidden, dim, heads=4, theta=10000.0):
        super().__init__()
        head_dim = hidden // heads  # a multiple of 4 (2 rotated axes): hidden is a multiple of 64 (check_combinations)
        self.heads, self.axes_dim = heads, (head_dim // 2, head_dim // 2)
        self.qkv, self.out_proj, self.output = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden), \
            nn.Linear(hidden, dim)
        cos, sin = rope_table(self.axes_dim, theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, pos, width):
        """x (B, N', h) tokens at flat grid positions pos (B, N') of a grid `width` tokens wide -> (B, N', dim)."""
        B, N, _ = x.shape
        rows, cols = pos // width, pos % width
        cos = rope_at(self.rope_cos, rows, cols, self.axes_dim)[:, :, None]  # (B, N', 1, head_dim)
        sin = rope_at(self.rope_sin, rows, cols, self.axes_dim)[:, :, None]
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).unbind(2)                       # (B, N', heads, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.output(self.out_proj(out.transpose(1, 2).flatten(2)))


def repa_projector(kind, hidden, dim):
    """PRX's projectors to the teacher's width D: 'mlp' h -> D -> D -> D with SiLU (REPA; 1024 wide for ViT-L),
    'conv' a 3x3 convolution on the token grid (iREPA), 'attention' (iREPA with routing)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    return nn.Conv2d(hidden, dim, 3, padding=1) if kind == "conv" else AttentionProjector(hidden, dim)


class Trainee(nn.Module):
    """What DDP wraps and the optimizer trains: the PRX model and, with --repa, the projector of the tokens after
    block repa_layer. Checkpoints keep the two apart, so that a resume can add or drop REPA. `repa_teacher`: the
    name of the teacher whose features the projector learns. `perceptual`: the frozen networks of --lpips and
    --pdino, a plain dict: outside the state dict, DDP and the optimizer."""

    def __init__(self, model, repa_kind=None, repa_dim=None, repa_layer=None, perceptual=None, repa_teacher=None):
        super().__init__()
        self.model, self.repa_kind, self.repa_layer, self.repa_teacher = model, repa_kind, repa_layer, repa_teacher
        self.perceptual = perceptual or {}
        self.patch_size = model.cfg.patch_size
        self.repa_proj = repa_projector(repa_kind, model.cfg.hidden_size, repa_dim) if repa_kind else None

    def forward(self, x_t, t, txt, mask, route_ratio):
        if self.repa_proj is None:
            return self.model(x_t, t, txt, mask, route_ratio=route_ratio), None, None
        pred, hidden, idx = self.model(x_t, t, txt, mask, route_ratio=route_ratio, repa_layer=self.repa_layer)
        h, w = x_t.shape[2] // self.patch_size, x_t.shape[3] // self.patch_size
        if self.repa_kind == "conv":  # (B, N, hidden) -> (B, hidden, h, w) -> (B, N, D)
            proj = self.repa_proj(hidden.transpose(1, 2).unflatten(2, (h, w))).flatten(2).transpose(1, 2)
        elif self.repa_kind == "attention":
            pos = idx if idx is not None else torch.arange(h * w, device=x_t.device).expand(len(x_t), -1)
            proj = self.repa_proj(hidden, pos, w)
        else:
            proj = self.repa_proj(hidden)
        return pred, proj, idx  # (B, C, H, W), (B, N', D_teacher), (B, N') or None


def teacher_tokens(teacher, images, grid):
    """Patch tokens after the final norm, prefix tokens dropped, (B, h*w, D) float32, of images [-1, 1] resized to a
    grid of patches (REPA: the denoiser's token grid; P-DINO: 16x16), bicubic with antialiasing as REPA's preprocessing
    (PRX's nearest drops rows when shrinking). In the teacher's dtype; differentiable for P-DINO's prediction."""
    pretrained, patch = teacher.pretrained_cfg, teacher.patch_embed.patch_size[0]
    x = F.interpolate((images.float() + 1) / 2, size=(grid[0] * patch, grid[1] * patch), mode="bicubic",
                      align_corners=False, antialias=True)
    x = (x - x.new_tensor(pretrained["mean"])[:, None, None]) / x.new_tensor(pretrained["std"])[:, None, None]
    dtype = next(teacher.parameters()).dtype
    with torch.autocast(x.device.type, enabled=False):
        return teacher.forward_features(x.to(dtype))[:, teacher.num_prefix_tokens:].float()


def spatial_normalize(f):
    """iREPA's normalisation of teacher tokens f (B, T, D) over the token axis (PRX iREPALoss): remove the
    token-mean scaled by each token's channel mean, then divide by the per-channel std over tokens."""
    f = f - f.mean(dim=2, keepdim=True) * f.mean(dim=1, keepdim=True)
    return f / (f.std(dim=1, keepdim=True) + 1e-6)


def repa_on(args, step):
    """Whether REPA trains at this step: --repa, until --repa-stop."""
    return bool(args.repa) and not (args.repa_stop and step >= args.repa_stop)


def repa_loss(proj, target, idx):
    """-mean cosine similarity; under TREAD only the visible tokens (idx), as PRX."""
    if idx is not None:
        target = target.gather(1, idx[..., None].expand(-1, -1, target.shape[-1]))
    return -F.cosine_similarity(proj.float(), target, dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------
# Perceptual losses on the predicted clean image (PRX part 3: LPIPS 0.1, P-DINO 0.01; prx/algorithm/lpips.py and
# perceptual_dino.py, both with t_threshold 1: every sample)

def load_lpips(weights=None):
    """LPIPS with PRX's VGG16 backbone, frozen. Its linear heads come with the lpips package; the backbone is
    torchvision's ImageNet VGG16: the `weights` file (VGG16_FILE), else torchvision's cache or a download."""
    import lpips
    from torchvision.models import VGG16_Weights
    url = VGG16_Weights.IMAGENET1K_V1.url
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"--lpips-weights {weights}: no such file; it should be torchvision's {url}")
    if weights:
        try:
            vgg = torch.load(weights, map_location="cpu", weights_only=True)
        except NOT_WEIGHTS as e:
            raise ValueError(f"--lpips-weights {weights}: not a weights file ({type(e).__name__}: {one_line(e)}); "
                             f"it should be torchvision's {url}")
    else:
        try:
            vgg = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except OSError as e:  # no connection (URLError)
            raise NotOnThisMachine(f"LPIPS's backbone {VGG16_FILE} is not in torch's cache and cannot be downloaded "
                                   f"({e}); on an offline machine pass --lpips-weights PATH to a copy of {url}")
    net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    # lpips splits torchvision's features.<i> layers into slices: features.<i>.weight -> slice<k>.<i>.weight
    where = {i: f"{name}.{i}" for name, part in net.net.named_children() for i, _ in part.named_children()}
    try:
        net.net.load_state_dict({f"{where[k.split('.')[1]]}.{k.split('.')[2]}": v for k, v in vgg.items()
                                 if k.startswith("features.")})
    except (KeyError, IndexError, RuntimeError) as e:  # another network's weights (or another torchvision's)
        raise ValueError(f"{f'--lpips-weights {weights}' if weights else f'torchvision cache {VGG16_FILE}'}: not "
                         f"VGG16's weights ({type(e).__name__}: {one_line(e)}); it should be torchvision's {url}")
    return net.eval().requires_grad_(False)


def lpips_loss(net, x0_hat, x0):
    """Mean LPIPS between the predicted and the clean image, both in [-1, 1] (LPIPS's range). From 128 px up both
    are halved first (bilinear), as PRX's pixel-space config (JIT-benchmark/LPIPS.yaml: resize_factor 0.5); smaller
    images stay whole: halved, the CPU track's 32 px would leave VGG's deepest stage 1x1."""
    if min(x0.shape[-2:]) >= 128:
        x0_hat, x0 = (F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False) for x in (x0_hat, x0))
    return net(x0_hat, x0).mean()


def pdino_loss(net, x0_hat, x0):
    """P-DINO: 1 - mean cosine of the DINOv2 patch tokens of the predicted and the clean image, through REPA's
    preprocessing (teacher_tokens) at 16x16 patches, PRX's 224 px; the prediction is not clamped to [-1, 1] (PRX
    clamps), which would stop its gradient outside that range."""
    with torch.no_grad():
        target = teacher_tokens(net, x0, PDINO_GRID)
    return 1 - F.cosine_similarity(teacher_tokens(net, x0_hat, PDINO_GRID), target, dim=-1).mean()


def train_step(args, step, lr, model, opt, loader, teacher, rank, world):
    """One optimizer step over the global batch (this rank's micro-batches, gradients accumulated, one all-reduce)
    -> mean loss, grad norm (device tensors), mean text length, and the host seconds spent outside the model: in
    the data (loading, text encoding, noise) and in the optimizer (on CUDA its kernels run on and count as model)."""
    trainee = model.module if isinstance(model, DDP) else model
    device, patch, nets = loader.null_mask.device, trainee.patch_size, trainee.perceptual
    chunks = args.batch_size // args.micro_batch // world
    for o in opt:
        for group in o.param_groups:
            group["lr"] = lr * (args.muon_lr / args.lr) if isinstance(o, Muon) else lr  # --muon-lr: same schedule
    loss_sum, txt_len, data_s = torch.zeros((), device=device), 0, 0.0
    for i in range(chunks):
        t0 = time.perf_counter()
        x0, eps, t, x_t, txt, mask, images = micro_batch(args, loader, step, rank + i * world, device)
        data_s += time.perf_counter() - t0
        txt, mask = trim_text(txt, mask)  # eager, before a compiled model
        if args.compile:  # one graph for every text length from the warm-up on; dynamo would specialise on the first
            for tensor in (txt, mask) if mask is not None else (txt,):
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        sync = world == 1 or i == chunks - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), \
                torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            pred, repa_proj, repa_idx = model(x_t, t, txt, mask, args.route_ratio or 0.0)
            weights = foreground_weights(x0, args.foreground_weight) if args.foreground_weight else None
            loss = flow_loss(pred, x0, eps, x_t, t, args.pred, weights, args.cfm)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher_tokens(teacher, images, (x0.shape[2] // patch, x0.shape[3] // patch))
                target = spatial_normalize(target) if args.irepa else target
                loss = loss + args.repa_lambda * repa_loss(repa_proj, target, repa_idx)
            if nets:  # pixel space: x0 is the image; x0_hat the predicted one, x_t - t v where the output is v
                x0_hat = pred.float() if args.pred == "x" else x_t - t[:, None, None, None] * pred.float()
                if args.lpips:
                    loss = loss + args.lpips * lpips_loss(nets["lpips"], x0_hat, x0)
                if args.pdino:
                    loss = loss + args.pdino * pdino_loss(nets["pdino"], x0_hat, x0)
            loss = loss / chunks
        loss.backward()
        loss_sum += loss.detach()
        txt_len += txt.shape[1] / chunks
    t0 = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP2's: replicated
    for o in opt:
        o.step()
        o.zero_grad(set_to_none=True)
    opt_s = time.perf_counter() - t0
    if world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum, grad_norm, txt_len, data_s, opt_s


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema = decay ema + (1 - decay) w, the decay applied once per update whatever --ema-every (PRX/Composer)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


class StepLog:
    """The step lines (console, log.txt, metrics.jsonl) over the steps since the last one: samples/s, training FLOP/s
    and their share of the peak (mfu) per process, the loader's and the optimizer's shares of the training time (eval
    and checkpoints excluded), the ETA. The peak: --peak-tflops on CUDA, measured on a CPU (logged at start)."""

    def __init__(self, args, cfg, loader, world, device, train_time, log):
        self.args, self.cfg, self.world, self.log = args, cfg, world, log
        self.num_img = math.prod(loader.x0_shape[1:]) // cfg.patch_size ** 2  # image tokens per sample
        if device.type == "cuda":
            self.peak, how = args.peak_tflops * 1e12, "--peak-tflops (bf16)"
        else:  # in the precision of the products the run computes
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
            self.peak, how = matmul_peak(device, dtype), f"{args.precision} matmul 1024^3, measured"
        log(f"peak {self.peak:.3g} FLOP/s per process: {how}")
        self.since, self.samples, self.flops, self.data_s, self.opt_s = train_time, 0, 0.0, 0.0, 0.0

    def add(self, data_s, opt_s, txt_len):
        """One step: its time in the loader and the optimizer, its text length (its FLOPs)."""
        self.samples += self.args.batch_size
        # per process; the backward costs two forwards
        self.flops += 3 * flops_per_sample(self.cfg, self.num_img, txt_len, self.args.route_ratio or 0.0) * \
            self.args.batch_size / self.world
        self.data_s += data_s
        self.opt_s += opt_s

    def __call__(self, step, loss, norm, lr, train_time, max_time):
        args, elapsed = self.args, train_time - self.since
        speed, flops = self.samples / elapsed, self.flops / elapsed
        record = {"step": step, "loss": loss, "grad_norm": norm, "lr": lr, "samples_per_s": speed,
                  "flops_per_s": flops, "mfu": flops / self.peak, "data_share": self.data_s / elapsed,
                  "optimizer_share": self.opt_s / elapsed, "train_time_s": train_time}
        eta = min((args.max_steps - step) * args.batch_size / speed, max_time - train_time)
        self.log(f"step {step}/{args.max_steps} | loss {loss:.4f} | grad_norm {norm:.3f} | lr {lr:.2e} | "
                 f"samples/s {speed:.0f} | flops/s {flops:.3g} | mfu {record['mfu']:.1%} | "
                 f"data {record['data_share']:.0%} | optimizer {record['optimizer_share']:.0%} | "
                 f"train_time {train_time * 1000:.0f}ms | step_avg {train_time * 1000 / step:.2f}ms | "
                 f"eta {datetime.timedelta(seconds=int(max(0, eta)))}", record)
        self.since, self.samples, self.flops, self.data_s, self.opt_s = train_time, 0, 0.0, 0.0, 0.0


def matmul_peak(device, dtype, n=1024, reps=8):
    """FLOP/s of an n x n matrix product in `dtype` (the run's precision: bf16 runs ~3x fp32's on a CPU with AMX),
    the best of `reps` (a shared machine only ever slows it), measured once at start, untimed: the peak of the log's
    mfu on the CPU (on CUDA: --peak-tflops)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / min(timeit.repeat(lambda: a @ b, number=1, repeat=reps + 1))  # the first: a warm-up


def learning_rate(args, step, train_time):
    """Linear warm-up, constant, and with --cooldown a linear decay to 0 over the final fraction of the run (its
    progress: the step or the clock, whichever is nearer its budget)."""
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    if args.cooldown:
        progress = max(step / args.max_steps, train_time / (args.max_time * 60) if args.max_time else 0.0)
        lr *= max(0.0, min(1.0, (1 - progress) / args.cooldown))
    return lr


# ----------------------------------------------------------------------------------------------------------
# Setup

def build_model(args, loader, device, start_step):
    """-> (PRX config, model, EMA copy or None, Trainee, REPA teacher or None: none from --repa-stop on). Input
    channels and text width come from the data; the REPA layer defaults to PRX's 7 of 16 blocks, scaled to the depth."""
    overrides = {k: v for k, v in dict(hidden_size=args.hidden, depth=args.depth, patch_size=args.patch).items() if v}
    if args.hidden:
        overrides.update(num_heads=args.hidden // 64, axes_dim=(32, 32))  # a multiple of 64: check_combinations
    cfg = preset_config(args.model, args.resolution, in_channels=loader.x0_shape[0],
                        context_dim=loader.null_txt.shape[-1], sprint=args.sprint,
                        resolution_embeds=args.resolution_embeds, **overrides)
    if loader.resolution != args.resolution:
        raise SystemExit(f"error: --resolution {args.resolution}: the data {args.data} holds {loader.resolution} px "
                         f"images; pass --resolution {loader.resolution}")
    if loader.x0_shape[-1] % cfg.patch_size or loader.x0_shape[-2] % cfg.patch_size:
        raise SystemExit(f"error: --resolution {args.resolution} gives inputs of {list(loader.x0_shape)}, whose "
                         f"sides are not multiples of the patch size {cfg.patch_size} (--patch, --model)")
    tokens = loader.x0_shape[-1] * loader.x0_shape[-2] // cfg.patch_size**2
    if args.route_ratio and int(tokens * args.route_ratio) == 0:  # model.PRX routes int(N r) tokens: none
        raise SystemExit(f"error: --route-ratio {args.route_ratio:g} of {tokens} image tokens routes none (int(N r) = "
                         f"0), and the run would train without {'--tread' if args.tread else '--sprint'}: use at least "
                         f"{math.ceil(1e4 / tokens) / 1e4:g}")  # rounded up: a rounded 1 / N may still route none
    if args.repa:
        args.repa_layer = cfg.depth * 7 // 16 if args.repa_layer is None else args.repa_layer
        if not args.repa_layer < cfg.depth:
            raise SystemExit(f"error: --repa-layer {args.repa_layer} must be a block index in [0, {cfg.depth})")
    torch.manual_seed(args.seed)
    model = PRX(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema else None
    frozen = torch.bfloat16 if device.type == "cuda" else None  # PRX runs the frozen teacher and DINOv2 in bf16
    teacher, nets = None, {}  # nets: the frozen networks of --lpips and --pdino, for Trainee.perceptual
    repa = repa_on(args, start_step)  # a resume past --repa-stop: nothing to load
    if repa:
        given = f"--repa-weights {args.repa_weights}" if args.repa == "builtin" and args.repa_weights else ""
        with exit_on(given or f"--repa {args.repa}", (FileNotFoundError, ValueError, RuntimeError, SafetensorError)):
            teacher = load_teacher(args.repa_weights or TEACHER_FILE) if args.repa == "builtin" else \
                load_dino(args.repa_teacher or REPA_TEACHERS[args.repa], args.repa_weights, "--repa-weights",
                          dynamic_img_size=True)
            teacher = teacher.to(device, frozen)
    with exit_on("perceptual loss", (FileNotFoundError, ValueError, RuntimeError)):
        if args.lpips:
            nets["lpips"] = load_lpips(args.lpips_weights).to(device)
        if args.pdino:
            nets["pdino"] = load_dino(PDINO_MODEL, args.pdino_weights, "--pdino-weights",
                                      dynamic_img_size=True).to(device, frozen)
    kind = ("attention" if args.tread or args.sprint else "conv") if args.irepa else "mlp"
    trainee = Trainee(model, kind if repa else None, teacher and teacher.num_features, args.repa_layer, nets,
                      args.repa_teacher or REPA_TEACHERS[args.repa] or args.repa if repa else None)
    return cfg, model, ema, trainee.to(device), teacher


def build_optimizers(args, trainee):
    """AdamW (PRX part 2), or Muon on the 2D weights inside the blocks and AdamW for the rest (muon.py); the REPA
    projector last, on an AdamW of its own, so that REPA can be added or dropped on resume. -> (optimizers, with Muon
    a line for the log saying which weights each takes, else None)."""
    adamw = dict(lr=args.lr, betas=args.betas, eps=args.eps, weight_decay=args.weight_decay,
                 fused=True)  # one kernel for all tensors, on CUDA and on the CPU
    projector = [torch.optim.AdamW(trainee.repa_proj.parameters(), **adamw)] if trainee.repa_proj else []
    if args.optimizer == "adamw":
        return [torch.optim.AdamW(trainee.model.parameters(), **adamw)] + projector, None
    muon_params, adam_params = split_muon_params(trainee.model)
    ns_dtype = torch.bfloat16 if args.precision == "bf16" else None  # None: the device's (bf16 CUDA, fp32 CPU)
    return [Muon(muon_params, lr=args.muon_lr, weight_decay=args.weight_decay, ns_steps=args.muon_ns_steps,
                 ns_dtype=ns_dtype),
            torch.optim.AdamW(adam_params, **adamw)] + projector, split_summary(muon_params, adam_params)


def setup_eval(args, cfg, device):
    """-> a function (model, grid path or None) -> metrics dict, or None with --eval-samples 0: held-out prompts of
    --eval-data or --data, the caption checker on the built-in data, FID against --eval-ref on prepared data."""
    if not args.eval_samples:
        return None
    data = args.eval_data or args.data
    with exit_on(f"evaluation (--eval-samples {args.eval_samples}, --eval-ref {args.eval_ref})",
                 (ValueError, FileNotFoundError, RuntimeError)):
        split = open_heldout(data, args.eval_samples, heldout_caption(args.captions, args.data), args.resolution,
                             args.seed, args.text_context)
        metrics = Metrics(args.eval_ref, ["fid"], fid_weights=args.fid_weights, device=device, ref_flag="--eval-ref",
                          count=args.eval_samples, resolution=args.resolution, count_flag="--eval-samples",
                          images=(data, split.images_id(args.eval_samples))) if args.eval_ref else None
    shape, decode = load_decoder(cfg, data, args.resolution, device)
    def save_run_grid(grid, images, captions):
        with writing_in(os.path.dirname(grid)):  # the run folder's
            save_grid(images, captions, grid)
    return lambda model, grid: evaluate(model, split, args.eval_samples, shape, decode, metrics, batch_size=64,
                                        grid=grid and functools.partial(save_run_grid, grid),
                                        **sampling_settings(args))


def shard(trainee, ema, precision, compile_blocks):
    """--fsdp: FSDP2 over all processes, each block a unit, then the root (torchtitan); under bf16 weights gathered in
    bf16 over fp32 shards, gradients reduced in fp32; the EMA and the projector alike. Before the optimizers (DTensors).
    --compile compiles each block: dynamo skips FSDP's hooks, so a whole compiled model breaks at every block."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)  # t, the sampler: fp32
    for model in (m for m in (trainee.model, ema) if m is not None):
        for block in model.blocks:
            if compile_blocks and model is trainee.model:
                block.compile()
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    if trainee.repa_proj is not None:
        fully_shard(trainee.repa_proj, mp_policy=policy)  # a root of its own: a resume may add or drop it


def wrap_ddp(trainee, world, device):
    """DDP over the processes (NCCL on CUDA, gloo on CPU), or the trainee itself: in one process, or sharded."""
    if world == 1:
        return trainee
    if any(isinstance(m, FSDPModule) for m in trainee.modules()):
        # FSDP2 reduce-scatters each micro-batch's gradients into the shards (train_step's no_sync does nothing):
        # holding them unreduced until the last micro-batch would keep whole gradients, the memory FSDP saves
        trainee.no_sync = contextlib.nullcontext
        return trainee
    if device.type == "cuda":
        return DDP(trainee, device_ids=[device.index])
    # gloo: DDP's reducer keeps its group alive to the process's end, and a gloo group alive at interpreter exit can
    # abort the process (SIGABRT) while dropping a finished collective's Python tensor; a group of its own leaves
    # the world group, which our collectives use, to destroy_process_group
    return DDP(trainee, process_group=dist.new_group())


class LongerCaptions:
    """A loader's batches with the text one token longer than the batch's (and than the empty prompt's): a length
    the steps before did not meet. full: every caption fills it (mask all True), the model's unmasked graph
    (trim_text); else the first caption alone does, and the masked graph meets the new length."""

    def __init__(self, loader, full):
        self.loader, self.full, self.null_txt, self.null_mask = loader, full, loader.null_txt, loader.null_mask

    def __next__(self):
        batch = next(self.loader)
        txt, mask = pad_text(batch["txt"], batch["txt_mask"], max(batch["txt"].shape[1], self.null_txt.shape[1]) + 1)
        mask = torch.ones_like(mask) if self.full else torch.cat([torch.ones_like(mask[:1]), mask[1:]])
        return {**batch, "txt": txt, "txt_mask": mask}


def compile_warmup(args, model, trainee, opt, loader, teacher, rank, world):
    """Compile on real batches, untimed, then restore the initial state (modded-nanogpt): it trains nothing and costs
    no training time. -> (the graph breaks dynamo counted, each a slower step; seconds)."""
    start = time.perf_counter()
    initial = copy.deepcopy((trainee.state_dict(), [o.state_dict() for o in opt], loader.state_dict()))
    warmup_steps(args, model, opt, loader, teacher, rank, world)
    if teacher is not None and args.repa_stop and args.repa_stop < args.max_steps:  # the model without REPA's hook,
        projector, trainee.repa_proj = trainee.repa_proj, None  # as the loop runs it from --repa-stop on
        warmup_steps(args, wrap_ddp(trainee, world, loader.null_mask.device), opt[:-1], loader, None, rank, world)
        trainee.repa_proj = projector
    trainee.load_state_dict(initial[0])
    for o, state in zip(opt, initial[1]):
        o.load_state_dict(state)
    loader.load_state_dict(initial[2])
    return sum(torch._dynamo.utils.counters["graph_break"].values()), time.perf_counter() - start


def warmup_steps(args, model, opt, loader, teacher, rank, world):
    """The compile warm-up's steps: three of real batches, then two of text one token longer than any before, none
    dropped: masked, then every caption full (the unmasked graph, which real data meets only at the token cap); else a
    timed step would compile the unmasked graph and, under --fsdp, each block at a new text length (train_step's
    dynamic mark does not reach a block's input)."""
    for step in range(3):
        train_step(args, step, args.lr, model, opt, loader, teacher, rank, world)
    no_dropout = argparse.Namespace(**{**vars(args), "caption_dropout": 0.0})
    for step, full in ((3, False), (4, True)):
        train_step(no_dropout, step, args.lr, model, opt, LongerCaptions(loader, full), teacher, rank, world)


def compile_trainee(args, trainee):
    """--compile: torch.compile's settings, read when a graph compiles (the warm-up): eager's random numbers (TREAD's
    route draw is inside the graph: a compiled run trains what the eager run of its seed trains), and the share of the
    activations the backward reads that the forward keeps (--activation-memory-budget); then the model compiled whole,
    or with --fsdp block by block, as shard() did."""
    torch._inductor.config.fallback_random = True
    torch._functorch.config.activation_memory_budget = args.activation_memory_budget
    if not args.fsdp:
        trainee.model = torch.compile(trainee.model)


def compiled_graphs(args):
    """Graphs dynamo has compiled in this process; 0 without --compile (which leaves dynamo unimported: an import on
    the clock)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] if args.compile else 0


def sampling_settings(args):
    """How this run samples: stored in config.json, read as is by eval.py."""
    return dict(steps=args.sample_steps, cfg_scale=args.cfg_scale, shift=args.shift, pred=args.pred,
                route_ratio=args.route_ratio or 0.5, self_guidance=args.self_guidance)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoints/step_<N>/ holds model.safetensors (ema.safetensors), trainer.pt and sha256.json,
# written into step_<N>.tmp and renamed when complete

def full_state(model, opts=()):
    """-> (model state dict, [optimizer state dicts]) of whole tensors on rank 0's CPU, empty dicts on the other
    ranks; every rank calls it: under FSDP2 it gathers the shards. Optimizer states are keyed by parameter name
    (torch.distributed.checkpoint.state_dict), so that they load on any number of processes, sharded or not."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), [get_optimizer_state_dict(model, o, options=full) for o in opts]


def load_full(model, weights, opts=(), states=()):
    """full_state's inverse; every rank calls it: rank 0's tensors are broadcast, and each rank keeps its shard (or
    the whole tensor, unsharded). The other ranks' weights and states are ignored."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, weights, options=options)
    for o, state in zip(opts, states, strict=True):
        set_optimizer_state_dict(model, o, state, options=options)


def save_checkpoint(out, step, model, ema, opt, extra, keep):
    """Atomic and verified: a step_<N> folder is whole, with the sha256 of each file. The `keep` most recent stay.
    A failed write (disk full) leaves the earlier checkpoints as they were and says so. Every rank calls it (the
    shards are gathered: full_state), rank 0 writes."""
    weights, optimizers = full_state(model, opt)
    ema_weights = full_state(ema)[0] if ema is not None else None
    if not main_process():
        return
    final = os.path.join(out, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
        if ema_weights is not None:
            save_file({k: v.contiguous() for k, v in ema_weights.items()}, os.path.join(tmp, "ema.safetensors"))
        torch.save({"optimizer": optimizers, "step": step, **extra}, os.path.join(tmp, "trainer.pt"))
        checksums = {name: file_sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, CHECKSUMS), "w") as f:
            json.dump(checksums, f, indent=1)
        readable_as_umask(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors' write errors are SafetensorErrors
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or shutil.disk_usage(out).free < 2**20
        reason = "no space left on the device" if full else str(e)
        raise SystemExit(f"error: writing checkpoint {final} failed: {reason}. The earlier checkpoints are intact; "
                         f"free space, then: {where_to_resume(out)}")
    os.rename(tmp, final)  # atomic
    for old in list_checkpoints(out)[:-keep]:
        prune_checkpoint(old)


def prune_checkpoint(ckpt):
    """Remove a checkpoint's own files; what eval.py wrote into it (eval.json, sample grids) stays, in
    step_<N>.evals. Renamed to step_<N>.pruned first: an eval.py writing into it meanwhile finds no folder and says
    so. Also ends a prune that a kill cut short (claim_run_folder passes its step_<N>.pruned)."""
    pruned = ckpt if ckpt.endswith(".pruned") else ckpt + ".pruned"
    if pruned != ckpt:
        os.rename(ckpt, pruned)
    for name in CHECKPOINT_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(pruned, name))
    if not os.listdir(pruned):
        os.rmdir(pruned)
        return
    evals = pruned.removesuffix(".pruned") + ".evals"
    if os.path.exists(evals):  # the step's evaluations of an earlier life of the run: keep both
        evals += datetime.datetime.now().strftime("-%Y%m%d-%H%M%S-%f")
    os.rename(pruned, evals)


def resolve_resume(resume, out):
    """--resume [PATH] -> the checkpoint folder to continue from, verified."""
    if resume == "latest" or any(os.path.exists(os.path.join(resume, n)) for n in ("checkpoints", "config.json")):
        if resume == "latest" and not out:
            raise SystemExit("error: --resume without a path continues the run in --out: pass --out <run folder>, "
                             "or --resume <run folder or checkpoint>")
        run = out if resume == "latest" else resume
        found = list_checkpoints(run)
        if not os.path.isdir(run):
            raise SystemExit(f"error: --resume: no run folder {run}: pass --out <run folder> (or --resume <it>)")
        if not found:
            raise SystemExit(f"error: --resume: {run} has no checkpoint yet (stopped before its first, --ckpt-every, "
                             f"or still running): start the run again with another --out, or delete {run} once it "
                             f"has ended")
        ckpt = found[-1]
    elif os.path.exists(os.path.join(resume, "trainer.pt")):
        ckpt = os.path.normpath(resume)
    else:
        raise SystemExit(f"error: --resume {resume}: " + ("not a checkpoint folder (expected trainer.pt inside)"
                                                          if os.path.exists(resume) else "no such folder"))
    if not os.path.exists(os.path.join(run_of(ckpt), "config.json")):
        raise SystemExit(f"error: --resume {ckpt}: a checkpoint resumes from <run>/checkpoints/step_N, beside its "
                         f"run's config.json, which this one is not; move it back there (an abandoned one too: "
                         f"checkpoints/abandoned-<time>/step_N -> checkpoints/step_N)")
    run, rank_0 = run_of(ckpt), os.environ.get("RANK", "0") == "0"  # rank 0's lock, once taken, is the run's own
    # every rank stops alike (the others would meet rank 0's exit in their next collective)
    holder = from_rank_0(lock_holder(run) if rank_0 and (out is None or os.path.abspath(out) == os.path.abspath(run))
                         else None)
    if holder:
        raise SystemExit(busy(run, holder))  # now, not a checkpoint it prunes meanwhile read as missing
    with exit_on("--resume"):
        verify_checkpoint(ckpt)
    return ckpt


def lock_holder(run):
    """Who holds <run>/.lock ('host H pid P'): a train.py training the run; None when no one does."""
    with contextlib.suppress(OSError), open(os.path.join(run, ".lock")) as f:  # none, or no flock: claimed later
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared, let go as the file closes
        except BlockingIOError:
            return f.read().strip() or "?"
    return None


def busy(out, holder):
    return f"error: --out {out}: another train.py ({holder}) is training this run; let it end or stop it, then --resume"


def check_resume_flags(args, ckpt):
    """A resume continues the same run: flags outside RESUMABLE must equal those the checkpoint was trained with
    (a flag newer than the run: its default). A resolution stage keeps the model, so its patch size too. -> the args
    of the stage that trained the checkpoint (model.stage_config), for resume_changes."""
    config = read_config(os.path.join(run_of(ckpt), "config.json"))
    if "data" in args.track_values and args.data != config["args"]["data"]:
        raise SystemExit(f"error: --resume {ckpt}: the run trained on --data {config['args']['data']}; without --data "
                         f"this resume takes the {args.track} track's values: pass the run's flags again")
    parser = get_parser()  # its flags, not what get_args derived (the track's note)
    # --patch: compared as the model's patch below (a pixel preset's default follows the resolution)
    changed = flag_changes(config["args"], args, {a.dest for a in parser._actions} - RESUMABLE - {"patch"}, parser)
    if changed:
        raise SystemExit(f"error: --resume {ckpt}: these flags differ from the run's and cannot change on resume: "
                         f"{'; '.join(changed)}. Pass the run's values, or start a new run with another --out")
    stage = read_config(stage_config(run_of(ckpt), ckpt))["args"]
    check_encoders(args.data, stage["data"], f"--resume {ckpt} --data")  # a new stage's data: the same encoders
    patch, had = args.patch or preset_config(args.model, args.resolution).patch_size, config["model"]["patch_size"]
    if patch != had:
        why = f"--patch {patch}" if args.patch else f"--resolution {args.resolution}: the preset {args.model} takes " \
            f"patch {patch} at {args.resolution} px (the pixel presets switch from 16 to 32 at 512 px)"
        raise SystemExit(f"error: --resume {ckpt} {why}, the run's model has {had}: pass --patch {had}")
    return stage


def check_budget(args, ckpt, step, train_time, evaluated_step):
    """A resume with nothing left to train (its checkpoint at or past --max-steps or --max-time) is refused before
    the run folder is touched: it would only evaluate and stop (eval.py does that), unless a stop cut short the run's
    final evaluation (evaluated_step: its log's last), which the resume then makes."""
    if args.eval_samples and evaluated_step < step:
        return
    spent = []
    for flag, limit, at, where in (("max_steps", args.max_steps, step, f"step {step}"),
                                   ("max_time", args.max_time and args.max_time * 60, train_time,
                                    f"{train_time / 60:.2f} minutes")):
        if limit and at >= limit:  # as the loop ends
            whose = f"the {args.track} track's; " * (flag in args.track_values)
            spent.append(f"--{flag.replace('_', '-')} {getattr(args, flag):g} ({whose}it is at {where})")
    if spent:
        raise SystemExit(f"error: --resume: {ckpt} has nothing left to train under {' and '.join(spent)}: raise it "
                         f"to go on, or evaluate the checkpoint with `python eval.py --ckpt {ckpt}`")


def flag_changes(before, args, names, parser):
    """The flags of `names` whose values in args differ from `before` (a stored config's args; a flag newer than the
    run: its default) -> ['--flag old -> new']. --data specs compare as parsed: 'data/mj/' is data/mj."""
    now = json.loads(json.dumps(vars(args)))  # tuples as lists, as stored

    def value(k, v):
        return parse_data_phases(v) if k in ("data", "eval_data") and v not in (None, "builtin") else v
    was = {k: before.get(k, json.loads(json.dumps(parser.get_default(k)))) for k in set(names) & set(now)}
    return [f"--{k.replace('_', '-')} {was[k]} -> {now[k]}" for k in sorted(was)
            if value(k, was[k]) != value(k, now[k])]


def late_phases(args, loader):
    """A note naming the --data phases that start at or after --max-steps (a typo, @90000 for @9000?): they train only
    if a resume raises --max-steps. None where there are none."""
    late = [f"@{start}" for start, _, _ in getattr(loader, "phases", []) if start >= args.max_steps]
    return f"note: --data's phase {', '.join(late)} starts at or after --max-steps {args.max_steps}: it trains only " \
        f"if a resume raises --max-steps" if late else None


def resume_changes(args, stage):
    """The RESUMABLE flags this resume sets otherwise than `stage` (the args of the stage that trained the checkpoint:
    a second phase, a raised budget, or flags left off the command line, which take their defaults: the log says
    so) -> a note, or None."""
    changed = flag_changes(stage, args, RESUMABLE - {"out", "resume"}, get_parser())
    return f"flags set otherwise than the checkpoint's stage (a flag left out takes its default): " \
           f"{'; '.join(changed)}" if changed else None


def split_metrics(path, step):
    """metrics.jsonl's whole lines (a torn last one in neither) -> (those up to `step`, those after it); ([], [])
    without the file. A line that is not a record of train.py's (edited) stays with the first."""
    kept, later = [], []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            if line.endswith("}\n"):
                try:
                    after = json.loads(line).get("step", 0) > step
                except (ValueError, AttributeError):
                    after = False
                (later if after else kept).append(line)
    return kept, later


def last_evaluation(out, step):
    """(step, train time) of the last evaluation metrics.jsonl holds up to `step`, or (0, 0.0), as rank 0 reads it,
    on every rank. A checkpoint comes before its step's evaluation, so a stop may have cut that one short: the resume
    makes it first."""
    evaluated = (0, 0.0)
    for line in split_metrics(os.path.join(out, "metrics.jsonl"), step)[0]:
        with contextlib.suppress(ValueError, TypeError, KeyError):  # an edited line
            if "loss" not in (record := json.loads(line)):  # an evaluation's (StepLog's have a loss)
                evaluated = (int(record["step"]), float(record["train_time_s"]))
    return from_rank_0(evaluated)


def set_aside_newer(ckpt, args, changes):
    """A resume's abandoned history (later checkpoints and pruned ones' evaluations, resume configs from its step on,
    later grids and eval.json, metrics.jsonl's later lines: copied, RunLog cuts them) -> checkpoints/abandoned-<time>/,
    where nothing takes it as the latest (model.stage_config) or overwrites it. Before the resume's config is written.
    changes: resume_changes' note (flags set otherwise than the checkpoint's stage), or None. -> a note, or None."""
    run, step = run_of(ckpt), step_of(ckpt)
    newer = [c for c in list_checkpoints(run) if step_of(c) > step]
    newer += [os.path.join(run, name) for name, s in resume_configs(run)
              if s > step or s == step and (newer or not same_flags(os.path.join(run, name), args))]
    later = split_metrics(os.path.join(run, "metrics.jsonl"), step)[1]
    if not newer and not (later and changes):
        return None  # a resume from the latest checkpoint with its stage's flags: what a killed run wrote after it,
        # this one rewrites alike
    newer += [os.path.join(run, "checkpoints", name) for name in sorted(os.listdir(os.path.join(run, "checkpoints")))
              if (m := re.fullmatch(r"step_(\d+)\.evals.*", name)) and int(m[1]) > step]  # prune_checkpoint's
    newer += [os.path.join(run, name) for name in sorted(os.listdir(run))
              if (m := re.fullmatch(r"samples_(\d+)\.png", name)) and int(m[1]) > step]
    with contextlib.suppress(FileNotFoundError, ValueError), open(os.path.join(run, "eval.json")) as f:
        newer += [os.path.join(run, "eval.json")] * (json.load(f)["step"] > step)
    aside = os.path.join(run, "checkpoints", "abandoned-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
    os.makedirs(aside)
    if later:
        with open(os.path.join(aside, "metrics.jsonl"), "w") as f:
            f.writelines(later)
    for c in newer:
        os.rename(c, os.path.join(aside, os.path.basename(c)))
    moved = [os.path.basename(c) for c in newer] + [f"metrics.jsonl's {len(later)} later lines"] * bool(later)
    return f"moved {', '.join(moved)} (a history after step {step}) to {aside}"


def same_flags(config, args):
    """Whether a run's config file holds these flags (a resume killed, then made again as it was)."""
    try:
        return not flag_changes(read_config(config)["args"], args, vars(args), get_parser())
    except (OSError, ValueError):  # unreadable: another history, kept aside
        return False


def restore(ckpt, model, ema, trainee, opt, loader, chunks_per_rank):
    """Load a checkpoint into the run, sharded or not, on any number of processes -> (step, training time, a note
    when REPA was added or dropped or a dataset starts afresh, else None). Mismatches of shapes or optimizer say what
    differs."""
    weights = lambda name: load_file(os.path.join(ckpt, name)) if main_process() else {}
    try:
        # every rank maps trainer.pt (its tensors stay on disk until read: rank 0's are, by load_full), rank 0 weights
        state = torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=True, mmap=True)
        projector, repa, note = trainee.repa_proj, state.get("repa"), None  # "repa": only REPA checkpoints have it
        load_full(model, weights("model.safetensors"), opt[:-1] if projector else opt, state["optimizer"])
        if ema is not None:
            load_full(ema, weights("ema.safetensors"))
        taught = repa and repa.get("teacher", trainee.repa_teacher)  # checkpoints before 2026-12-08 do not say
        if projector and repa and repa["kind"] == trainee.repa_kind and taught == trainee.repa_teacher:
            load_full(projector, repa["projector"], opt[-1:], [repa["optimizer"]])
        elif projector:
            note = f"REPA's {trainee.repa_kind} projector starts fresh (the checkpoint has " + \
                   ("none)" if not repa else f"a {repa['kind']} one)" if repa["kind"] != trainee.repa_kind else
                    f"one learnt from the teacher {taught})")
        elif repa:
            note = "REPA dropped: the checkpoint's projector is left out"
        # the loader counts this rank's micro-batches; a step is chunks_per_rank of them on any number of processes
        # (chunks_per_rank x world is the global batch's), so the position carries over to another world size
        if fresh := loader.load_state_dict({**state["loader"], "batches": state["step"] * chunks_per_rank}):
            note = (note + "; " if note else "") + f"--data: {', '.join(fresh)} start(s) at the first sample (the " \
                f"checkpoint read {', '.join(state['loader']['cursors'])}: a moved dataset is new)"
    except FileNotFoundError as e:  # verified at start: gone since (a branch off a run that trains on)
        raise SystemExit(f"error: --resume {ckpt}: {e.filename or one_line(e)} is gone since the resume started (the "
                         f"running train.py's --keep pruned it?): resume from a checkpoint it keeps, or a copy")
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --resume {ckpt} does not fit this model, optimizer or loader ({type(e).__name__}: "
                         f"{one_line(e, 300)}); resume with the flags the run was started with")
    return state["step"], state["train_time"], note


# ----------------------------------------------------------------------------------------------------------
# The run folder: config.json (every resolved flag, versions, commit), log.txt (opens with the source of every
# file), metrics.jsonl (one object per log line and evaluation), samples_<step>.png, eval.json, checkpoints/

def devices(device):
    """Where the run ran, for the log's header: the machine's name, and every visible GPU and the driver or the CPU
    and torch's threads (records/verify.py: the runs beside a record ran on its machine)."""
    host = {"host": socket.gethostname()}
    if device.type == "cuda":
        driver = nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
        return {**host, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "driver": (driver or "unknown").split("\n")[0], "cuda": torch.version.cuda}
    cpu, flags = "unknown", []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0].splitlines()  # the first core's entry
        info = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first if ":" in line)}
        cpu, flags = info.get("model name", cpu), info.get("flags", "").split()
    # the vector units that set the matmuls' speed: bf16 (--precision bf16) is fast with AMX or AVX512-BF16, emulated
    # with AVX2 alone
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return {**host, "cpu": cpu, "cpu_flags": units, "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def nvidia_smi(*flags):
    """nvidia-smi's output, stripped; None without nvidia-smi. No flags: its table (GPUs, driver, clocks, memory, other
    processes), which log.txt holds as modded-nanogpt's logs do."""
    path = shutil.which("nvidia-smi")
    return path and subprocess.run([path, *flags], capture_output=True, text=True).stdout.strip() or None


@contextlib.contextmanager
def writing_in(out):
    """The run folder's writes but checkpoints' (save_checkpoint): one that fails (a full disk, a read-only folder)
    stops the run with one line naming the last good checkpoint, not a traceback."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"error: writing in {out} failed ({e.strerror or e}); make room, or make it writable, then: "
                         f"{where_to_resume(out)}") from None


class RunLog:
    """Rank 0's console, log.txt and metrics.jsonl; other ranks stay silent. `with log:` writes into log.txt too why
    the run stopped (a signal, an error) as it passes."""

    def __init__(self, out, master, config, start_step, resumed):
        self.master, self.out, self.config = master, out, config
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        if not master:
            return
        config_path = os.path.join(out, f"config.resume-{start_step}.json" if resumed else "config.json")
        with writing_in(out):
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2)
            self.file = open(os.path.join(out, "log.txt"), "a")
            if not resumed:
                here = os.path.dirname(os.path.abspath(__file__))
                for name in sorted(n for n in os.listdir(here) if n.endswith(".py")):
                    with open(os.path.join(here, name)) as f:
                        self.file.write(f"=== {name}\n{f.read()}\n")
            if config["device"] != "cpu" and (smi := nvidia_smi()):  # each start: a resume may run on other GPUs
                self.file.write(f"=== nvidia-smi\n{smi}\n")
            self.file.write(f"=== {os.path.basename(config_path)}\n" + json.dumps(config, indent=2) + "\n")
            if os.path.exists(self.metrics_path):  # a killed run may have logged past its checkpoint, or torn a line
                kept = split_metrics(self.metrics_path, start_step)[0]
                write_whole(self.metrics_path, lambda f: f.write("".join(kept).encode()))

    def __call__(self, text, record=None):
        if not self.master:
            return
        print(text, flush=True)
        with writing_in(self.out):
            self.file.write(text + "\n")
            self.file.flush()
            if record is not None:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        why = error.code if isinstance(error, SystemExit) else "stopped (Ctrl-C)" * (kind is KeyboardInterrupt) or \
            (error and f"{kind.__name__}: {error}")
        if self.master and isinstance(why, str) and why.strip():
            with contextlib.suppress(OSError):  # a full disk: the console has said it
                self.file.write(why.strip() + "\n")
                self.file.flush()


def run_folder(args):
    """-> (out, or None without --out and --resume: claim_run_folder names it; checkpoint to resume or None, whether
    out is that checkpoint's run, the args of its stage or None: check_resume_flags). A folder that holds a run is
    never reused but by a resume of its own checkpoints; --resume CKPT --out NEW branches the run into NEW, a run
    folder of its own (config.json, the sources), leaving CKPT's run as it was."""
    out, ckpt, stage = args.out, None, None
    if not (out or args.resume):
        return out, ckpt, False, stage
    if args.resume:
        ckpt = resolve_resume(args.resume, out)
        with exit_on("--resume"):
            stage = check_resume_flags(args, ckpt)
        run = run_of(ckpt)
        out = args.out or run
        if os.path.abspath(out) == os.path.abspath(run):
            return out, ckpt, True, stage
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a file; name a folder for the run")
    if why := unwritable(out):
        raise SystemExit(f"error: --out {out}: {why}; name a folder for the run elsewhere")
    entries = sorted(set(os.listdir(out)) - {".lock"}) if os.path.isdir(out) else []
    if entries and not {"config.json", "metrics.jsonl", "checkpoints"} & set(entries):
        raise SystemExit(f"error: --out {out} holds other files ({', '.join(entries[:3])}"
                         f"{', ...' * (len(entries) > 3)}), not a run: name a new folder, e.g. --out "
                         f"{os.path.join(out, 'run1')}")
    if entries:
        if not list_checkpoints(out):
            raise SystemExit(f"error: --out {out} holds a run with no checkpoint yet (stopped before its first, or "
                             f"still running): choose another --out, or delete {out} once it has ended to start again")
        raise SystemExit(f"error: --out {out} holds a run already; continue it with --resume (--out {out} --resume), "
                         f"or choose another --out" + (f" to branch from {ckpt}" if ckpt else ""))
    return out, ckpt, False, stage


def claim_run_folder(out, new):
    """A lock on <out>/.lock (the OS releases it however the process ends) refuses a second train.py on the run. new:
    the folder is made here, so two runs on one --out cannot both take it (out None: the first free runs/<time>[-K]).
    Under the lock, a killed save's leftovers (step_N.tmp) go. -> (the lock's open file, the run folder)."""
    named = out is not None
    base = out = out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    for k in itertools.count(2):
        try:
            os.makedirs(out, exist_ok=not new)
            break
        except FileExistsError:
            if named:
                raise SystemExit(f"error: --out {out}: another train.py has made this folder since this one "
                                 f"started; choose another --out")
            out = f"{base}-{k}"
    with writing_in(out):
        lock = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(busy(out, lock_holder(out) or "?"))
    except OSError as e:  # a file system without flock (NFSv3 without lockd, Lustre without -o flock)
        print(f"warning: {out}: no lock ({e}): a second train.py on this run would not be refused", flush=True)
    with writing_in(out):
        lock.truncate(0)
        lock.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        lock.flush()
    checkpoints = os.path.join(out, "checkpoints")
    for name in os.listdir(checkpoints) if os.path.isdir(checkpoints) else []:
        if re.fullmatch(r"step_\d+\.tmp", name):
            shutil.rmtree(os.path.join(checkpoints, name))
        elif re.fullmatch(r"step_\d+\.pruned", name):
            prune_checkpoint(os.path.join(checkpoints, name))
    return lock, out


def claim_on_rank_0(out, new, master):
    """claim_run_folder on rank 0; every rank learns its outcome and the run folder, so that a refusal stops them all
    here, not in their next collective. -> (the lock on rank 0, else None; the run folder)."""
    lock, refused = None, None
    if master:
        try:
            lock, out = claim_run_folder(out, new)
        except SystemExit as e:
            refused = e.code
    refused, out = from_rank_0((refused, out))
    if refused:
        raise SystemExit(refused if master else 1)
    return lock, out


def from_rank_0(value):
    """Rank 0's value on every rank: a choice all must make alike (an exit, or a collective that follows)."""
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, 0)
        value = box[0]
    return value


def where_to_resume(run):
    """For messages: the run's newest whole checkpoint and how to continue from it, or that it has none."""
    found = list_checkpoints(run)
    return f"the last checkpoint is {found[-1]}: continue with the run's flags and --resume --out {run}" if found else \
        f"no checkpoint was written: delete {run} (or choose another --out) and start again"


def weight_files(args):
    """The sha256 of each local weights file the run loads (the built-in REPA teacher's, or a flag's), by flag: a
    record's logs name the networks it trained with (verify.py checks the built-in teacher's against its commit)."""
    files = {"--repa builtin": args.repa_weights or TEACHER_FILE} if args.repa == "builtin" else \
        {"--repa-weights": args.repa_weights}  # each flag is refused without the one it needs (check_combinations)
    files.update({"--lpips-weights": args.lpips_weights, "--fid-weights": args.fid_weights,
                  "--pdino-weights": args.pdino_weights})
    return {flag: file_sha256(path) for flag, path in files.items() if path}


def config_of(args, cfg, world, n_params, device):
    libraries = ("torch", "numpy", "diffusers", "transformers", "timm", "torch-fidelity", "safetensors", "pillow")
    return {"args": vars(args), "model": vars(cfg), "sampling": sampling_settings(args), "world_size": world,
            "parameters": n_params,
            "versions": {"python": sys.version.split()[0], **{n: importlib.metadata.version(n) for n in libraries}},
            "weights_sha256": weight_files(args),
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "devices": devices(device),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------------------------------------

def open_training_data(args, rank, world, device, start_step):
    """-> (this rank's loader of --data, micro-batches per rank and step); errors name the flags."""
    if args.batch_size % (args.micro_batch * world):
        fits = [m for m in range(args.micro_batch, 0, -1) if args.batch_size % (m * world) == 0]
        worlds = [n for n in range(1, args.batch_size // args.micro_batch + 1)
                  if args.batch_size % (args.micro_batch * n) == 0]  # a resume keeps its --micro-batch
        raise SystemExit(f"error: --batch-size {args.batch_size} must be a multiple of --micro-batch "
                         f"{args.micro_batch} x {world} processes: " + (
                             f"resume on {' or '.join(map(str, worlds))} process(es)" if args.resume else
                             f"use --micro-batch {fits[0]}" if fits else f"use a --batch-size divisible by {world}"))
    chunks_per_rank = args.batch_size // args.micro_batch // world
    with exit_on(f"--data {args.data} --captions {args.captions}"):
        return open_loader(args.data, args.micro_batch, rank, world, args.seed, args.captions, device,
                           chunks_per_rank, args.resolution, args.text_context, images=repa_on(args, start_step)), \
            chunks_per_rank


def log_start(log, args, n_params, world, device, chunks_per_rank, out, ckpt):
    """The run's first lines: the model and batch, the track and the values it set, a warning for emulated bf16."""
    log(f"model {args.model}: {n_params:,} parameters | {world} process(es) on {device.type} | global batch "
        f"{args.batch_size} = {args.micro_batch} x {world} x {chunks_per_rank} accumulation | shift {args.shift} | "
        f"AdamW eps {args.eps:g} | out {out}"
        + (f" | resumed from {ckpt}" if ckpt else ""))
    values = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in args.track_values)
    log(f"track {args.track or 'none (a free run)'} ({args.track_why})" +
        (f": its values for the flags not given: {values}" if values else ""))
    if args.eval_samples and args.data != "builtin" and not args.eval_ref:
        log("evaluations draw sample grids only: FID needs --eval-ref FILE (from `python eval.py ref`)")
    if device.type == "cpu" and args.precision == "bf16":
        units = log.config["devices"]["cpu_flags"]  # config_of's reading of the CPU
        if not {"avx512_bf16", "amx_bf16"} & set(units):
            log(f"warning: --precision bf16 on a CPU without bf16 units ({' '.join(units) or 'none known'}): its "
                f"bf16 matmuls are emulated, slower than fp32's; --precision fp32 runs faster here")


def evaluate_and_log(args, run_eval, eval_model, raw_model, step, train_time, last, out, master, log):
    """One evaluation of eval_model (the EMA weights when the run keeps them), logged; -> whether the run ends here
    (it was the last step, or --target is reached). The last evaluation is also written to eval.json."""
    result = run_eval(eval_model.eval(), os.path.join(out, f"samples_{step}.png") if master else None)
    for module in eval_model.modules():  # FSDP2 keeps the root's weights gathered after a forward with no backward:
        if isinstance(module, FSDPModule):  # gathered, they would meet the EMA update and the checkpoint unsharded
            module.reshard()  # (in bf16 under --precision bf16)
    raw_model.train()
    note = ema_note(args.ema, args.ema_every, step)
    if note:
        log(note)
    log(" | ".join([f"eval step {step}", *(f"{k} {v:.4f}" for k, v in result.items()),
                    f"train_time {train_time * 1000:.0f}ms"]), {"step": step, "train_time_s": train_time, **result})
    if args.target and target_reached(args.target, result):
        last = True
        log(f"target {args.target[0]} {args.target[1]:g} reached at step {step}: stopping")
    if last and master:
        record = {"step": step, "train_time_s": round(train_time, 1), "data": args.eval_data or args.data, **result}
        with writing_in(out):
            write_whole(os.path.join(out, "eval.json"), lambda f: f.write(json.dumps(record, indent=2).encode()))
    return last


def save_run_checkpoint(out, step, raw_model, ema, trainee, opt, loader, train_time, finite, keep):
    """The checks before a checkpoint (fp32 weights, finite loss and weights), then save_checkpoint with the training
    time, the loader's position and REPA's projector. Every rank calls it (FSDP2 gathers the shards), rank 0 writes;
    the loader's position is global: rank 0's is all's."""
    assert all(p.dtype == torch.float32 for p in raw_model.parameters()), "weights must stay fp32 (PRX part 2)"
    if not (bool(finite) and all(bool(torch.isfinite(p).all()) for p in raw_model.parameters())):
        raise SystemExit(f"error: loss, gradient norm or weights not finite at step {step}; checkpoint not written; "
                         f"{where_to_resume(out)} (lower --lr or raise --warmup)")
    extra = {"train_time": train_time, "loader": loader.state_dict()}
    if trainee.repa_proj is not None:
        projector, (projector_opt,) = full_state(trainee.repa_proj, opt[-1:])
        extra["repa"] = {"kind": trainee.repa_kind, "teacher": trainee.repa_teacher, "projector": projector,
                         "optimizer": projector_opt}
    save_checkpoint(out, step, raw_model, ema, opt[:-1] if trainee.repa_proj else opt, extra, keep)


def stop_repa(trainee, opt, loader, world, device):
    """--repa-stop: the projector and its AdamW (the last optimizer, build_optimizers) go, and prepared latents' images
    (the teacher's input) are no longer read -> the model to train on, wrapped anew: DDP's reducer would wait for the
    projector's gradients."""
    trainee.repa_proj = None
    opt.pop()
    if getattr(loader, "has_latent", False):  # ShardLoader; built-in or pixel data: the images are x0
        loader.images = False
    return wrap_ddp(trainee, world, device)


def rank_0_time(train_time, device):
    """Rank 0's training time on every rank, so that they agree on when the budget ends and a timed evaluation (a
    collective) starts. A tensor broadcast, not from_rank_0's pickled one: it runs every step."""
    budget = torch.tensor([train_time], dtype=torch.float64, device=device)
    dist.broadcast(budget, 0)
    return budget.item()


def main(argv=None):
    args = get_args(argv)
    handlers = stop_on_signals(lambda: "nothing trained yet: run the same command again",  # until the run folder's
                               os.environ.get("RANK", "0") == "0")  # files are written: the same command redoes all
    rank, world, device = setup_distributed(tf32=True)
    master = rank == 0
    out, ckpt, same_run, stage = run_folder(args)
    existing = out is not None and os.path.isdir(out)  # else made once the run's errors are past
    lock = claim_on_rank_0(out, False, master)[0] if existing else None  # held open to the end
    ckpt_step = step_of(ckpt) if ckpt else 0
    loader, chunks_per_rank = open_training_data(args, rank, world, device, ckpt_step)
    cfg, raw_model, ema, trainee, teacher = build_model(args, loader, device, ckpt_step)
    run_eval = setup_eval(args, cfg, device)  # its errors before the run folder is written
    n_params = sum(p.numel() for p in raw_model.parameters())
    if args.fsdp:  # before the optimizers, which then take the shards
        shard(trainee, ema, args.precision, args.compile)
    opt, muon_split = build_optimizers(args, trainee)
    # a checkpoint that does not fit stops the resume here, before the run folder is touched
    start_step, train_time, note = restore(ckpt, raw_model, ema, trainee, opt, loader, chunks_per_rank) if ckpt \
        else (0, 0, None)
    evaluated_step, evaluated_time = last_evaluation(out, start_step) if same_run else (start_step, train_time)
    check_budget(args, ckpt, start_step, train_time, evaluated_step)  # a fresh run starts at 0, inside any budget
    if world > 1:
        dist.barrier()  # every rank has read the run folder and the checkpoint before rank 0 moves or writes anything
    if not existing:
        lock, out = claim_on_rank_0(out, True, master)
    changes = resume_changes(args, stage) if ckpt else None
    moved = set_aside_newer(ckpt, args, changes) if same_run and master else None  # before this resume's config
    # from here a stop names where to resume (`handlers` keeps the process's own, put back at the end)
    stop_on_signals(lambda: where_to_resume(out), master, from_rank_0((socket.gethostname(), os.getpid())))
    log = RunLog(out, master, config_of(args, cfg, world, n_params, device), start_step, resumed=same_run)
    for line in (muon_split, note, moved, changes, late_phases(args, loader)):
        if line:
            log(line)
    if args.compile:
        compile_trainee(args, trainee)
    model = wrap_ddp(trainee, world, device)
    log_start(log, args, n_params, world, device, chunks_per_rank, out, ckpt)
    with log, stop_when_another_process_ends(lambda: where_to_resume(out)):  # why the run stops, in log.txt too
        if args.compile:  # also on resume: the first steps would compile on the clock
            breaks, seconds = compile_warmup(args, model, trainee, opt, loader, teacher, rank, world)
            log(f"compile warm-up done (untimed steps, state restored): {breaks} graph breaks, {seconds:.0f} s")

        # the loop: occasional work first (checkpoint, evaluation), then the one training step
        raw_model.train()
        step, finite = start_step, torch.ones((), dtype=torch.bool, device=device)
        max_time = args.max_time * 60 if args.max_time else math.inf
        eval_times = [60 * m for m in args.eval_minutes if 60 * m > evaluated_time]
        step_log = StepLog(args, cfg, loader, world, device, train_time, log)
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # the clock waits for the device
        while True:
            if teacher is not None and not repa_on(args, step):
                teacher, model = None, stop_repa(trainee, opt, loader, world, device)
                log(f"REPA stopped at step {step} (--repa-stop): no teacher, projector or REPA loss from here on")
            last = step >= args.max_steps or train_time >= max_time
            timed_eval = bool(eval_times) and train_time >= eval_times[0]
            eval_times = [t for t in eval_times if t > train_time]
            # the checkpoint before the evaluation, which a stop may cut short (minutes of FID: steps are not lost)
            saved = (last or step % args.ckpt_every == 0) and step > start_step
            if saved:
                save_run_checkpoint(out, step, raw_model, ema, trainee, opt, loader, train_time, finite, args.keep)
            periodic = args.eval_every and step % args.eval_every == 0 and step > evaluated_step
            if run_eval and (last or timed_eval or periodic):
                last = evaluate_and_log(args, run_eval, ema if ema is not None else raw_model, raw_model, step,
                                        train_time, last, out, master, log)
            if last and step > start_step and not saved:  # --target reached off the checkpoints' grid
                save_run_checkpoint(out, step, raw_model, ema, trainee, opt, loader, train_time, finite, args.keep)
            if last:
                if train_time >= max_time:  # (--max-steps shows in the step line, --target in its own line)
                    log(f"--max-time {args.max_time:g}: the training time is spent at step {step}: stopping")
                break

            sync()
            t0, graphs = time.perf_counter(), compiled_graphs(args)
            lr = learning_rate(args, step, train_time)
            loss, grad_norm, txt_len, data_s, opt_s = train_step(args, step, lr, model, opt, loader, teacher, rank,
                                                                 world)
            step_log.add(data_s, opt_s, txt_len)
            if ema is not None and (step + 1) % args.ema_every == 0:
                ema_update(ema, raw_model, args.ema)
            finite &= torch.isfinite(loss) & torch.isfinite(grad_norm)  # an infinite norm clips every update to 0
            step += 1
            sync()
            train_time += time.perf_counter() - t0
            if world > 1 and (args.max_time or args.eval_minutes):  # a sync, only where the time decides
                train_time = rank_0_time(train_time, device)
            if compiled_graphs(args) > graphs:  # an input the compile warm-up did not see
                log(f"warning: step {step} compiled a new graph (another input shape, stride or model): on the clock")

            if step % args.log_every == 0 or step == args.max_steps or train_time >= max_time:
                loss_value, norm = loss.item(), grad_norm.item()  # waits for the device: only on log steps
                if not (math.isfinite(loss_value) and math.isfinite(norm)):
                    raise SystemExit(f"error: loss {loss_value}, grad_norm {norm} at step {step}: not finite; "
                                     f"stopping: {where_to_resume(out)} (lower --lr or raise --warmup)")
                step_log(step, loss_value, norm, lr, train_time, max_time)

    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    with errors_of_rank_0_first():
        main()
    if "RANK" in os.environ:
        # a torchrun rank leaves without the interpreter's teardown, in which gloo sometimes aborts the process after
        # the run is done and written (SIGABRT, "terminate called without an active exception"), a run torchrun
        # would report failed. The run's files are closed or flushed line by line; the console is flushed here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
