"""
Train a PRX text-to-image model with flow matching. One file, one loop; every technique is a flag.

    python train.py                                   # CPU track: tiny model, built-in shapes, ~5 minutes
    torchrun --nproc_per_node=8 train.py --data /data/mj --model small --batch-size 256 --compile --tread

Conventions (REFERENCE section 3): t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t eps, the network predicts
v = eps - x0 (or x0 with --pred x, JiT). All randomness of a micro-batch (its samples, t, noise, caption dropout,
TREAD routing) is a function of (seed, step, micro-batch index), so a run replays exactly whatever the number of
processes, and a resumed run continues the same sequence.
"""

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from data import TEXT_CONTEXT
from eval import pad_text
from model import PRX, flops_per_sample, preset_config, trim_text

# Defaults of `--data builtin` for the flags you do not set: the tuned CPU track (README: "The CPU record").
CPU_TRACK = dict(model="tiny-pixel", resolution=32, pred="v", batch_size=32, micro_batch=32, lr=2e-3, warmup=100,
                 grad_clip=1.0, uniform_t=1.0, foreground_weight=2.0, max_time=4.3, shift=1.0, sample_steps=20,
                 cfg=3.0, eval_samples=256, ckpt_every=500, log_every=50)

REPA_TEACHERS = {"dinov2": "vit_large_patch14_reg4_dinov2.lvd142m", "dinov3": "vit_large_patch16_dinov3.lvd1689m"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=100_000, help="stop after this many optimizer steps")
    g.add_argument("--max-time", type=float, default=None, help="stop after this many minutes of training time")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines (metrics.jsonl, console)")
    g.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints (and one at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, a run folder, or (no value) the latest one in --out")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="builtin",
                   help="'builtin' (procedural shapes, no download), or prepared datasets with weights and phases: "
                        "'data/mj', 'data/mj:0.7,data/cc:0.3', 'data/mj@0;data/alchemist@90000' (data.py)")
    g.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    g.add_argument("--captions", default="long", help="long, short, or mixed[:p] (long with probability p)")
    g.add_argument("--text-context", type=int, default=TEXT_CONTEXT, help="built-in text encoder: context window "
                   "of each word (0 = word + position only; data.BuiltinTextEncoder)")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="fraction replaced by the empty prompt (CFG)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="small", help="preset: tiny, small, base, or <preset>-pixel (model.py)")
    g.add_argument("--hidden", type=int, default=None, help="override the preset's hidden size")
    g.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    g.add_argument("--patch", type=int, default=None, help="override the preset's patch size")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up is untimed)")
    g = p.add_argument_group("objective")
    g.add_argument("--pred", default="v", choices=["v", "x"], help="network output: velocity, or x0 (JiT)")
    g.add_argument("--shift", type=float, default=1.0, help="timestep shift s: t -> s t / (1 + (s - 1) t)")
    g.add_argument("--uniform-t", type=float, default=0.1, help="fraction of t drawn uniformly, not logit-normal")
    g.add_argument("--foreground-weight", type=float, default=0.0,
                   help="pixel space: extra loss weight on pixels away from the background (0 = plain MSE)")
    g.add_argument("--repa", default=None, choices=sorted(REPA_TEACHERS), help="REPA: align the tokens after "
                   "--repa-layer with a frozen DINO teacher's patch tokens")
    g.add_argument("--repa-layer", type=int, default=None, help="block index (default PRX's 7 of 16, scaled)")
    g.add_argument("--repa-lambda", type=float, default=0.5, help="REPA loss weight")
    g.add_argument("--repa-teacher", default=None, help="another timm model as teacher (default: --repa's)")
    g.add_argument("--repa-weights", default=None, help="the teacher's weights file, for offline machines")
    g.add_argument("--tread", action="store_true", help="TREAD: route tokens around the middle blocks")
    g.add_argument("--sprint", action="store_true", help="SPRINT: TREAD + mask token and fusion layer")
    g.add_argument("--route-ratio", type=float, default=None, help="routed fraction (TREAD 0.5, SPRINT 0.75)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon for block matrices")
    g.add_argument("--batch-size", type=int, default=256, help="global batch, kept by gradient accumulation")
    g.add_argument("--micro-batch", type=int, default=32, help="samples per process per forward")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--eps", type=float, default=1e-15)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps, then constant")
    g.add_argument("--cooldown", type=float, default=0.0, help="final fraction of the run (of --max-steps or "
                   "--max-time, whichever ends it) with the lr decaying linearly to 0 (WSD); 0 = constant to the end")
    g.add_argument("--grad-clip", type=float, default=0.2, help="max gradient norm")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay (0 = off); samples use the EMA weights")
    g.add_argument("--ema-every", type=int, default=10, help="steps between EMA updates")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0 = at the end only)")
    g.add_argument("--eval-minutes", default="", help="also evaluate when the training time passes these minutes, "
                   "e.g. 1,2,5,10,20,30 (the CPU record's curve)")
    g.add_argument("--eval-samples", type=int, default=256, help="held-out samples per evaluation (0 = none)")
    g.add_argument("--sample-steps", type=int, default=50, help="Euler steps")
    g.add_argument("--cfg", type=float, default=3.5, help="classifier-free guidance scale")
    g.add_argument("--eval-ref", help="prepared data: FID reference from `python eval.py ref` (same --eval-samples)")
    g.add_argument("--fid-weights", help="local Inception weights for FID (offline machines)")
    g.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 peak for MFU (H100/H200: 989)")
    args = p.parse_args(argv)
    if args.data == "builtin":  # the CPU track's tuned values, for the flags not given on the command line
        p.set_defaults(**CPU_TRACK)
        args = p.parse_args(argv)
    return args


def check_args(args, world):
    """Incompatible flags fail here, before any work."""
    if args.tread and args.sprint:
        raise SystemExit("error: --tread and --sprint are exclusive (SPRINT already routes tokens)")
    if args.route_ratio is not None and not 0 <= args.route_ratio < 1:
        raise SystemExit(f"error: --route-ratio must be in [0, 1), got {args.route_ratio}")
    chunks = args.batch_size // args.micro_batch
    if args.batch_size % args.micro_batch or chunks % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be a multiple of --micro-batch "
                         f"{args.micro_batch} x {world} processes")
    if args.data == "builtin" and args.captions not in ("long", "short"):
        raise SystemExit(f"error: --captions {args.captions}: the built-in dataset has long and short captions only")
    for path in ([] if args.data == "builtin" else re.split(r"[,;]", args.data)):
        path = path.split("@")[0].rsplit(":", 1)[0]
        if not os.path.exists(os.path.join(path, "index.json")):
            raise SystemExit(f"error: --data {path}: no prepared dataset there (no index.json); "
                             f"prepare one with `python data.py prepare --out {path} ...`")
    if args.foreground_weight and "pixel" not in args.model:
        raise SystemExit("error: --foreground-weight needs pixel-space data and a -pixel model (latents have no "
                         "background colour)")
    if args.text_context < 0:
        raise SystemExit(f"error: --text-context must be >= 0 words, got {args.text_context}")
    if not 0 <= args.cooldown <= 1:
        raise SystemExit(f"error: --cooldown must be a fraction of the run in [0, 1], got {args.cooldown}")
    if args.ema and not 0 < args.ema < 1:
        raise SystemExit(f"error: --ema must be a decay in (0, 1), got {args.ema}")


# ----------------------------------------------------------------------------------------------------------
# Flow matching (REFERENCE section 3)

def sample_t(n, shift, uniform_frac, g, device):
    """Logit-normal t, shifted towards noise by s, with a fraction drawn uniformly; clamped away from 0 and 1."""
    t = torch.sigmoid(torch.randn(n, generator=g, device=device))
    t = shift * t / (1 + (shift - 1) * t)
    t = torch.where(torch.rand(n, generator=g, device=device) < uniform_frac, torch.rand(n, generator=g, device=device), t)
    return t.clamp(1e-3, 1 - 1e-3)


def foreground_weights(x0, weight):
    """(B, 1, H, W): 1 + weight on pixels away from the image's background, estimated as its per-channel median
    (the background covers most of a built-in image), normalised to mean 1 per image. Small objects are a few
    percent of the pixels: unweighted, the loss barely sees their shape (README, "The CPU record")."""
    background = x0.flatten(2).median(dim=2).values[..., None, None]                 # (B, C, 1, 1)
    w = 1 + weight * ((x0 - background).abs().amax(dim=1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
    return w / w.mean(dim=(2, 3), keepdim=True)


def flow_loss(pred, x0, eps, x_t, t, pred_type, weights=None):
    """Weighted MSE on velocity. With x-prediction (JiT, Li & He 2025) both sides become velocities through
    v = (x_t - x0) / max(t, 0.05), which for the target equals eps - x0 when t >= 0.05."""
    if pred_type == "v":
        err = (pred.float() - (eps - x0)).square()
    else:
        tt = t.clamp_min(0.05)[:, None, None, None]
        err = ((x_t - pred.float()) / tt - (x_t - x0) / tt).square()
    return (err if weights is None else err * weights).mean()


def drop_captions(txt, mask, keep, null_txt, null_mask):
    """Rows where keep is False get the encoded empty prompt with its own mask (PRX), not zeros."""
    length = max(txt.shape[1], null_txt.shape[1])
    txt, mask = pad_text(txt, mask, length)
    null_txt, null_mask = pad_text(null_txt, null_mask, length)
    return torch.where(keep[:, None, None], txt, null_txt), torch.where(keep[:, None], mask, null_mask)


def library_versions():
    names = ("torch", "numpy", "diffusers", "transformers", "timm", "torch-fidelity", "safetensors", "pillow")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def chunk_seed(seed, step, chunk):
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------
# REPA (Yu et al. 2025; PRX part 2: DINOv3 at block 8 of 16, lambda 0.5)

class Trainee(nn.Module):
    """What DDP wraps and the optimizer trains: the PRX model and, with --repa, the projector MLP h -> 1024 -> 1024
    -> teacher width (SiLU) on the tokens after block repa_layer. Checkpoints keep the two apart."""

    def __init__(self, model, repa_dim=None):
        super().__init__()
        self.model = model
        self.repa_proj = nn.Sequential(nn.Linear(model.cfg.hidden_size, 1024), nn.SiLU(), nn.Linear(1024, 1024), nn.SiLU(),
                                       nn.Linear(1024, repa_dim)) if repa_dim else None

    def forward(self, x_t, t, txt, mask, route_ratio, repa_layer):
        if self.repa_proj is None:
            return self.model(x_t, t, txt, mask, route_ratio=route_ratio), None, None
        pred, hidden, idx = self.model(x_t, t, txt, mask, route_ratio=route_ratio, repa_layer=repa_layer)
        return pred, self.repa_proj(hidden), idx  # (B, C, H, W), (B, N', D_teacher), (B, N') or None


@torch.no_grad()
def teacher_tokens(teacher, images, grid):
    """Patch tokens after the final norm, (B, h*w, D): the clean image [-1, 1] resized so that the teacher's patch
    grid equals the denoiser's token grid (256 px, patch-2 latents: 16x16 tokens -> 224 px for DINOv2's 14 px)."""
    cfg, patch = teacher.pretrained_cfg, teacher.patch_embed.patch_size[0]
    x = F.interpolate((images.float() + 1) / 2, size=(grid[0] * patch, grid[1] * patch), mode="bicubic",
                      align_corners=False, antialias=True)
    x = (x - x.new_tensor(cfg["mean"])[:, None, None]) / x.new_tensor(cfg["std"])[:, None, None]
    return teacher.forward_features(x)[:, teacher.num_prefix_tokens:].float()


def repa_loss(proj, target, idx):
    """-mean cosine similarity; under TREAD only the visible tokens (idx), as PRX."""
    if idx is not None:
        target = target.gather(1, idx[..., None].expand(-1, -1, target.shape[-1]))
    return -F.cosine_similarity(proj.float(), target, dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoints/step_<N>/{model,ema}.safetensors + trainer.pt, written to .tmp then renamed

def list_checkpoints(out):
    folder = os.path.join(out, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    steps = sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())
    return [os.path.join(folder, f"step_{s}") for s in steps]


def save_checkpoint(out, step, model, ema, opt, extra, keep):
    final = os.path.join(out, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    torch.save({"optimizer": [o.state_dict() for o in opt], "step": step, **extra}, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)  # atomic: a checkpoint folder without .tmp is complete
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def resolve_resume(resume, out):
    if resume == "latest" or os.path.isdir(os.path.join(resume, "checkpoints")):
        run = out if resume == "latest" else resume
        found = list_checkpoints(run)
        if not found:
            raise SystemExit(f"error: --resume: no checkpoint in {run}/checkpoints (pass --out <run folder>)")
        return found[-1]
    if not os.path.exists(os.path.join(resume, "trainer.pt")):
        raise SystemExit(f"error: --resume {resume}: not a checkpoint folder (expected trainer.pt inside)")
    return resume


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    check_args(args, world)
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    master = rank == 0
    # run folder, resume point
    out = args.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    ckpt = resolve_resume(args.resume, out) if args.resume else None
    if ckpt and not args.out:
        out = os.path.dirname(os.path.dirname(ckpt))

    # data and text encoder
    chunks_per_rank = args.batch_size // args.micro_batch // world
    if args.data == "builtin":
        from data import BuiltinTextEncoder, ShapesDataset
        dataset, encoder = ShapesDataset(seed=args.seed), BuiltinTextEncoder(context=args.text_context).to(device)
        null_txt, null_mask = encoder([""])
        channels = 3
    else:
        from data import ShardLoader
        loader = ShardLoader(args.data, args.micro_batch, rank, world, args.seed, args.captions, device,
                             grad_accum=chunks_per_rank, images=bool(args.repa))
        null_txt, null_mask = loader.null_txt.float(), loader.null_mask
        channels = loader.datasets[0].index["schema"]["latent"]["shape"][0] if loader.has_latent else 3
    context_dim = null_txt.shape[-1]

    # model, EMA, optimizer
    overrides = {k: v for k, v in dict(hidden_size=args.hidden, depth=args.depth, patch_size=args.patch).items() if v}
    if args.hidden:
        overrides["num_heads"] = max(1, args.hidden // 64)
        overrides["axes_dim"] = (32, 32)
    cfg = preset_config(args.model, args.resolution, in_channels=channels, context_dim=context_dim,
                        sprint=args.sprint, **overrides)  # channels and text width come from the data
    repa_layer = None if not args.repa else cfg.depth * 7 // 16 if args.repa_layer is None else args.repa_layer
    if repa_layer is not None and not 0 <= repa_layer < cfg.depth:
        raise SystemExit(f"error: --repa-layer {repa_layer} must be a block index in [0, {cfg.depth})")
    route_ratio = 0.0 if not (args.tread or args.sprint) else args.route_ratio or (0.75 if args.sprint else 0.5)
    torch.manual_seed(args.seed)
    raw_model = PRX(cfg).to(device)
    ema = PRX(cfg).to(device).eval().requires_grad_(False) if args.ema else None
    if ema is not None:
        ema.load_state_dict(raw_model.state_dict())
    teacher = None
    if args.repa:
        from eval import load_dino
        overlay = dict(pretrained_cfg_overlay=dict(file=args.repa_weights)) if args.repa_weights else {}
        teacher = load_dino(args.repa_teacher or REPA_TEACHERS[args.repa], dynamic_img_size=True, **overlay).to(device)
    trainee = Trainee(raw_model, teacher.num_features if teacher else None).to(device)
    if args.optimizer == "muon":
        from muon import Muon, split_muon_params, split_summary
        muon_params, adam_params = split_muon_params(trainee)
        if master:
            print(split_summary(muon_params, adam_params))
        opt = [Muon(muon_params, lr=args.lr, weight_decay=args.weight_decay),
               torch.optim.AdamW(adam_params, lr=args.lr, betas=args.betas, eps=args.eps,
                                 weight_decay=args.weight_decay, fused=device.type == "cuda")]
    else:
        opt = [torch.optim.AdamW(trainee.parameters(), lr=args.lr, betas=args.betas, eps=args.eps,
                                 weight_decay=args.weight_decay, fused=device.type == "cuda")]
    start_step, train_time = 0, 0.0
    if ckpt:
        raw_model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors"), device=str(device)))
        if ema is not None:
            ema.load_state_dict(load_file(os.path.join(ckpt, "ema.safetensors"), device=str(device)))
        state = torch.load(os.path.join(ckpt, "trainer.pt"), map_location=device, weights_only=True)
        for o, s in zip(opt, state["optimizer"]):
            o.load_state_dict(s)
        start_step, train_time = state["step"], state["train_time"]
        if args.data != "builtin":
            loader.load_state_dict(state["loader"])
        if teacher is not None:
            trainee.repa_proj.load_state_dict(state["repa_proj"])
    if args.compile:
        trainee.model = torch.compile(raw_model)
    model = DDP(trainee, device_ids=[local] if device.type == "cuda" else None) if distributed else trainee
    n_params = sum(p.numel() for p in raw_model.parameters())

    # run folder: config.json, log.txt opening with the source, metrics.jsonl (cut back to the resume point)
    metrics_path = os.path.join(out, "metrics.jsonl")
    log_file = None
    if master:
        os.makedirs(out, exist_ok=True)
        config = {"args": vars(args), "model": vars(cfg), "world_size": world, "parameters": n_params,
                  "versions": {"python": sys.version.split()[0], **library_versions()},
                  "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        log_file = open(os.path.join(out, "log.txt"), "a")
        if not ckpt:
            here = os.path.dirname(os.path.abspath(__file__))
            for name in sorted(n for n in os.listdir(here) if n.endswith(".py")):
                with open(os.path.join(here, name)) as f:
                    log_file.write(f"=== {name}\n{f.read()}\n")
            log_file.write("=== config\n" + json.dumps(config, indent=2) + "\n")
        if os.path.exists(metrics_path):  # a killed run may have logged past its last checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= start_step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)

    def log(text, record=None):
        if not master:
            return
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()
        if record is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    log(f"model {args.model}: {n_params:,} parameters | {world} process(es) on {device.type} | global batch "
        f"{args.batch_size} = {args.micro_batch} x {world} x {args.batch_size // args.micro_batch // world} "
        f"accumulation | out {out}" + (f" | resumed from {ckpt}" if ckpt else ""))

    num_img = (args.resolution // cfg.patch_size) ** 2

    def micro_batch(step, chunk):
        """Chunk k of the global batch of `step`: t, noise, caption dropout (and, built-in, the samples) all come
        from its own seed."""
        g = torch.Generator(device).manual_seed(chunk_seed(args.seed, step, chunk))
        if args.data == "builtin":
            first = (step * args.batch_size) + chunk * args.micro_batch
            x0, captions = dataset.batch(range(first, first + args.micro_batch), args.resolution, args.captions)
            txt, mask = encoder(captions)
            x0 = images = x0.to(device)
        else:
            batch = next(loader)
            images = batch["image"].float() / 127.5 - 1 if "image" in batch else None  # (B, 3, R, R) in [-1, 1]
            x0 = batch["latent"] if "latent" in batch else images
            txt, mask = batch["txt"].float(), batch["txt_mask"]
        keep = torch.rand(args.micro_batch, generator=g, device=device) >= args.caption_dropout
        txt, mask = drop_captions(txt, mask, keep, null_txt, null_mask)
        t = sample_t(args.micro_batch, args.shift, args.uniform_t, g, device)
        eps = torch.randn(x0.shape, generator=g, device=device)
        torch.manual_seed(chunk_seed(args.seed, step, chunk) + 1)  # the routing draw inside the model
        return x0, eps, t, txt, mask, images

    max_time = args.max_time * 60 if args.max_time else float("inf")

    def train_step(step):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if args.cooldown:  # progress: the step or the clock, whichever is nearer its budget
            progress = max(step / args.max_steps, train_time / max_time)
            lr *= max(0.0, min(1.0, (1 - progress) / args.cooldown))
        for o in opt:
            for group in o.param_groups:
                group["lr"] = lr
        loss_sum, txt_len = torch.zeros((), device=device), 0
        for i in range(chunks_per_rank):
            x0, eps, t, txt, mask, images = micro_batch(step, rank + i * world)
            x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
            txt, mask = trim_text(txt, mask)  # eager, before a compiled model
            sync = not distributed or i == chunks_per_rank - 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                pred, repa_proj, repa_idx = model(x_t, t, txt, mask, route_ratio, repa_layer)
                weights = foreground_weights(x0, args.foreground_weight) if args.foreground_weight else None
                loss = flow_loss(pred, x0, eps, x_t, t, args.pred, weights)
                if teacher is not None:
                    grid = (x0.shape[2] // cfg.patch_size, x0.shape[3] // cfg.patch_size)
                    loss = loss + args.repa_lambda * repa_loss(repa_proj, teacher_tokens(teacher, images, grid), repa_idx)
                loss = loss / chunks_per_rank
            loss.backward()
            loss_sum += loss.detach()
            txt_len += txt.shape[1] / chunks_per_rank
        grad_norm = torch.nn.utils.clip_grad_norm_(trainee.parameters(), args.grad_clip)
        for o in opt:
            o.step()
            o.zero_grad(set_to_none=True)
        if ema is not None and (step + 1) % args.ema_every == 0:
            torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - args.ema ** args.ema_every)
        if distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        return loss_sum, grad_norm, lr, txt_len

    if args.compile and not ckpt:  # compile on real batches, untimed, then restore the initial state (modded-nanogpt)
        initial = copy.deepcopy((trainee.state_dict(), [o.state_dict() for o in opt]))
        loader_state = loader.state_dict() if args.data != "builtin" else None
        for step in range(3):
            train_step(step)
        trainee.load_state_dict(initial[0])
        for o, s in zip(opt, initial[1]):
            o.load_state_dict(s)
        if loader_state:
            loader.load_state_dict(loader_state)
        log("compile warm-up done (3 untimed steps, state restored)")

    # evaluation (eval.py): held-out prompts; the caption checker on the built-in data, FID against --eval-ref
    builtin = args.data == "builtin"
    eval_data = "builtin" if builtin else re.split(r"[,;]", args.data)[0].split("@")[0].rsplit(":", 1)[0]
    if args.eval_samples:
        from eval import EvalSplit, Metrics, evaluate, load_decoder
        split = EvalSplit(eval_data, args.eval_samples, "short" if args.captions == "short" else "long",
                          args.resolution, args.seed, args.text_context)
        shape, decode = load_decoder(cfg, eval_data, args.resolution, device)
        metrics = Metrics(args.eval_ref, ["fid"], fid_weights=args.fid_weights, device=device) if args.eval_ref \
            else None
        if metrics is not None:
            metrics.check_reference(args.eval_samples, args.resolution)

    def run_eval(step, train_time):
        eval_model = ema if ema is not None else raw_model
        eval_model.eval()
        result = evaluate(eval_model, split, args.eval_samples, shape, decode, metrics, check_captions=builtin,
                          batch_size=64, grid=os.path.join(out, f"samples_{step}.png") if master else None,
                          steps=args.sample_steps, cfg=args.cfg, shift=args.shift, pred=args.pred)
        raw_model.train()
        log(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()) +
            f" | train {datetime.timedelta(seconds=int(train_time))}", {"step": step, "train_time_s": train_time, **result})
        return result

    # the loop: occasional work first (eval, checkpoint), then the one training step
    raw_model.train()
    step, finite = start_step, torch.ones((), dtype=torch.bool, device=device)
    eval_times = sorted(60 * float(m) for m in args.eval_minutes.split(",") if m)
    time_at_log, samples_since = train_time, 0
    while True:
        last = step >= args.max_steps or train_time >= max_time
        timed_eval = bool(eval_times) and train_time >= eval_times[0]
        while eval_times and train_time >= eval_times[0]:
            eval_times.pop(0)
        if args.eval_samples and (last or timed_eval or (args.eval_every and step % args.eval_every == 0
                                                         and step > start_step)):
            result = run_eval(step, train_time)
            if last and master:
                with open(os.path.join(out, "eval.json"), "w") as f:
                    json.dump({"step": step, "train_time_s": round(train_time, 1), **result}, f, indent=2)
        if (last or step % args.ckpt_every == 0) and step > start_step:
            assert all(p.dtype == torch.float32 for p in raw_model.parameters()), "weights must stay fp32 (PRX part 2)"
            weights_ok = all(bool(torch.isfinite(p).all()) for p in raw_model.parameters())
            if not (bool(finite) and weights_ok):
                raise SystemExit(f"error: loss or weights not finite at step {step}; checkpoint not written, the "
                                 f"last good one is {(list_checkpoints(out) or ['(none)'])[-1]}")
            if master:
                extra = {"train_time": train_time}
                if args.data != "builtin":
                    extra["loader"] = loader.state_dict()
                if teacher is not None:
                    extra["repa_proj"] = trainee.repa_proj.state_dict()  # the position is global: rank 0's state is every rank's
                save_checkpoint(out, step, raw_model, ema, opt, extra, args.keep)
        if last:
            break

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, grad_norm, lr, txt_len = train_step(step)
        finite &= torch.isfinite(loss)
        step += 1
        samples_since += args.batch_size
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        if distributed and args.max_time:  # every rank must agree on when the time budget ends (a sync: only then)
            budget = torch.tensor([train_time], dtype=torch.float64, device=device)
            dist.broadcast(budget, 0)
            train_time = budget.item()

        if step % args.log_every == 0 or step == args.max_steps:
            loss_value = loss.item()  # waits for the device: only on log steps
            if not math.isfinite(loss_value):
                raise SystemExit(f"error: loss not finite ({loss_value}) at step {step}; stopping. The last good "
                                 f"checkpoint is {(list_checkpoints(out) or ['(none)'])[-1]}; lower --lr or raise --warmup")
            speed = samples_since / (train_time - time_at_log)  # training time only: eval and checkpoints excluded
            eta = min((args.max_steps - step) * args.batch_size / speed, max_time - train_time)
            line = f"step {step}/{args.max_steps} | loss {loss_value:.4f} | grad norm {grad_norm.item():.3f} | " \
                   f"lr {lr:.2e} | {speed:.0f} samples/s"
            if device.type == "cuda":
                mfu = 3 * flops_per_sample(cfg, num_img, txt_len) * speed / (world * args.peak_tflops * 1e12)
                line += f" | MFU {mfu:.1%}"
            line += f" | train {datetime.timedelta(seconds=int(train_time))} | eta " \
                    f"{datetime.timedelta(seconds=int(max(0, eta)))}"
            log(line, {"step": step, "loss": loss_value, "grad_norm": grad_norm.item(), "lr": lr,
                       "samples_per_s": speed, "train_time_s": train_time})
            time_at_log, samples_since = train_time, 0

    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
