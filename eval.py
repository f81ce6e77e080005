"""
Sample a trained PRX run on held-out prompts and score the images: FID, CMMD and DINO-MMD against reference
statistics of the real held-out images (FID: Heusel et al. 2017, torch-fidelity's network, as PRX; CMMD: Jayasumana
et al. 2024, google-research/cmmd; DINO-MMD: PRX part 2), and the caption checker on the built-in dataset.

    python eval.py ref --data data/mj --out ref.npz                          # once: statistics of the real images
    python eval.py --ckpt runs/x --ref ref.npz --num-samples 10000           # -> runs/x/checkpoints/step_N/eval.json
    torchrun --nproc_per_node=8 eval.py --ckpt runs/x --ref ref.npz          # each rank samples its share
    python eval.py --ckpt runs/x --num-samples 256                           # built-in data: the caption checker
    python eval.py sample --ckpt runs/x --prompt "a red circle in the top left"   # your prompts -> a PNG grid
    python eval.py export --ckpt runs/x --out prx-x                          # a folder diffusers' PRXPipeline loads
"""

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import itertools
import json
import os
import shutil
import sys
import uuid
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import ENCODERS, NOT_WEIGHTS, NotOnThisMachine, Parser, count, data_dirs, denormalize_latent, \
    die_with_launcher, errors_of_rank_0_first, exit_on, from_hub, heldout_caption, load_vae, number, one_line, \
    open_heldout, pad_to_common, quiet_unless_rank_0, read_index, seed_number, side, space_differences, unwritable, \
    whole, write_whole
from model import ema_note, load_run, step_of, weights_file
from prepare import T5GemmaTextEncoder
from shapes import BuiltinTextEncoder


EVAL_VERSION = 2  # bump when a preprocessing step or a definition changes: older reference files are then refused
FEATURE_METRICS = ("fid", "cmmd", "dino_mmd")
CLIP_ID = "openai/clip-vit-large-patch14-336"
DINO_ID = "vit_large_patch14_reg4_dinov2.lvd142m"


# ----------------------------------------------------------------------------------------------------------
# Sampling

X_PRED_MIN_T = 0.05  # x-prediction divides by t: JiT clamps it here, in training's loss and in the sampler alike


def shift_t(t, shift):
    """The timestep shift towards noise, t -> s t / (1 + (s - 1) t) (SD3), of training's t and the sampler's grid."""
    return shift * t / (1 + (shift - 1) * t)


def x0_to_velocity(x_t, x0, t):
    """JiT (Li & He 2025): an x0 prediction as the velocity eps - x0 = (x_t - x0) / t, t clamped to X_PRED_MIN_T.
    t: a float or a tensor broadcastable to x_t."""
    return (x_t - x0) / (t.clamp_min(X_PRED_MIN_T) if torch.is_tensor(t) else max(t, X_PRED_MIN_T))


def timesteps(steps, shift=1.0):
    """linspace(1, 0, steps + 1), shifted as in training (PRX's evaluation grid)."""
    return shift_t(torch.linspace(1, 0, steps + 1), shift)


def diffusers_timesteps(steps, shift=1.0):
    """timesteps(steps, shift) as PRXPipeline's `timesteps` argument: t * 1000, the final 0 left out (its scheduler
    appends it). The pipeline gives these to the transformer as they are but shifts its scheduler's copy again, so
    they reproduce sample() only with a scheduler whose shift is 1 (README)."""
    return (timesteps(steps, shift)[:-1] * 1000).tolist()


@torch.no_grad()
def sample(model, txt, txt_mask, null_txt, null_mask, seeds, shape, steps=50, cfg_scale=3.5, shift=1.0, pred="v",
           route_ratio=0.5, self_guidance=0.0):
    """Euler from t = 1 (noise) to t = 0 (data) -> x0 (B, *shape) float32. txt (B, L, D), txt_mask (B, L);
    null_txt (1, L0, D), null_mask (1, L0): the encoded empty prompt. Guidance u + w (c - u), w = cfg_scale, for every w
    >= 0 (0: unconditional); w = 1 is the conditional pass alone (diffusers skips guidance for any w <= 1).
    Self-guidance s: routed + s (full - routed), of the guided predictions; with w = 1 PRX's (tread.py), which replaces
    CFG, but with a new route each step (PRX keeps one per batch). Sample i draws its starting noise, then (with
    self-guidance) each step's TREAD route, from its own CPU torch.Generator().manual_seed(seeds[i]): it does not depend
    on the batch, the ranks or the device."""
    B, device = txt.shape[0], txt.device
    if pred not in ("v", "x"):
        raise ValueError(f"pred must be 'v' (velocity) or 'x' (x0, JiT), got {pred!r}")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    guided = cfg_scale != 1
    if guided:  # one forward for [cond; uncond], text padded to a common length
        txt, txt_mask, null_txt, null_mask = pad_to_common(txt, txt_mask, null_txt, null_mask)
        txt, txt_mask = torch.cat([txt, null_txt.expand(B, -1, -1)]), torch.cat([txt_mask, null_mask.expand(B, -1)])

    def velocity(x, t, route_ratio=0.0, route_scores=None):
        xx = torch.cat([x, x]) if guided else x
        if route_scores is not None and guided:  # cond and uncond take the same route
            route_scores = torch.cat([route_scores, route_scores])
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            out = model(xx, torch.full((len(xx),), t, device=device), txt, txt_mask, route_ratio=route_ratio,
                        route_scores=route_scores).float()
        if pred == "x":
            out = x0_to_velocity(xx, out, t)
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    ts = timesteps(steps, shift).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t)
        if self_guidance > 0:  # TREAD self-guidance: extrapolate from the routed (weaker) network to the full one
            num_tokens = shape[-2] * shape[-1] // model.cfg.patch_size ** 2
            scores = torch.stack([torch.rand(num_tokens, generator=g) for g in generators]).to(device)
            routed = velocity(x, t, route_ratio, scores)
            v = routed + self_guidance * (v - routed)
        x = x + (t_next - t) * v  # dx/dt = v = eps - x0
    return x


def to_uint8(x):
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


GRID_FORMATS = (".png", ".jpg", ".jpeg", ".webp")  # what a grid may be written as (sample --out)


def save_grid(images, captions, path, nrow=8):
    """uint8 (B, 3, H, W) -> one image file (PNG, or a GRID_FORMATS one by its suffix): the images in a grid (small
    ones enlarged), their captions listed beside it, numbered in row-major order."""
    from torchvision.utils import make_grid
    scale = max(1, 96 // images.shape[-1])  # 32 px samples become 96 px: something to look at
    images = images.cpu().repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = Image.fromarray(make_grid(images, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy())
    lines = [f"{i + 1:3d}. {c}" for i, c in enumerate(captions)]
    line_height, char_width = 12, 6  # PIL's built-in bitmap font
    canvas = Image.new("RGB", (grid.width + 10 + char_width * max(map(len, lines)),
                               max(grid.height, line_height * len(lines) + 10)), "white")
    canvas.paste(grid, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((grid.width + 10, 5 + i * line_height), line, fill="black")
    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")  # sample --out x.jpg: a JPEG
    write_whole(path, lambda f: canvas.save(f, format=kind))


def write_new(folder, name, write, out=None):
    """write(path) to a temporary file beside folder/name (`out` if given), then linked to that name, or name_1,
    name_2, ... (before the extension): the first free, taken atomically once the result is whole (os.link refuses a
    name that exists: another evaluation of this checkpoint meanwhile, or a file put at --out, takes the next), so that
    a result written before is never replaced and a killed evaluation leaves no empty or partial file under those
    names. -> the path written"""
    folder, name = os.path.split(out) if out else (folder, name)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f"{stem}.tmp-{uuid.uuid4().hex[:12]}{ext}")  # the extension: save_grid's format
    try:
        write(tmp)
        for k in itertools.count():
            path = os.path.join(folder, f"{stem}_{k}{ext}" if k else name)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                return path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# Feature extractors: uint8 images (B, 3, H, W) in, float32 features (B, D) out

def fingerprint(weight):
    """sha256 prefix of a weight tensor's bytes: tells checkpoints apart in the reference's settings."""
    return hashlib.sha256(weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:8]


def load_inception(weights=None):
    """torch-fidelity's FeatureExtractorInceptionV3 ('inception-v3-compat', 2048-d pool features): the TF Inception
    of the original FID. weights: the .pth file; default the torch hub cache, downloaded on first use. Read with
    torch.load(weights_only=True) only: torch-fidelity's own loading unpickles any object (weights_only=False)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if weights is None and not os.path.exists(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, cached)
        except OSError as e:
            raise NotOnThisMachine(f"FID Inception weights: not on this machine, and the download failed. On a "
                                   f"machine with internet, download {URL_INCEPTION_V3} to {cached}, or pass "
                                   f"--fid-weights PATH") from e
    name = f"--fid-weights {weights}" if weights else f"the cached {cached}"
    weights = weights or cached
    should = f"it should be {os.path.basename(URL_INCEPTION_V3)} from {URL_INCEPTION_V3}"
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{name}: no such file; {should}")
    net = inception_without_weights()
    try:
        net.load_state_dict(torch.load(weights, weights_only=True))
    except NOT_WEIGHTS as e:
        raise ValueError(f"{name}: not the Inception's weights ({type(e).__name__}: {one_line(e)}); {should}")
    return net


def inception_without_weights():
    """FeatureExtractorInceptionV3 with its layers initialised by torch, built without reading or downloading any
    weights (its constructor loads them, so that step is stubbed out)."""
    from unittest import mock
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    with mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict"), \
            mock.patch.object(fi, "load_state_dict_from_url"):
        return fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


def write_random_inception_weights(path):
    """Randomly initialised weights for load_inception (tests, and bench.py without the real file). He-initialised
    convolutions keep the features away from zero through the 94 layers."""
    net = inception_without_weights()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def inception_features(net, images):
    return net(images.to(next(net.parameters()).device))[0]  # (B, 2048); the TF1-style resize to 299 is inside


def crop_resize(images, size):
    """Centre square crop, then bicubic resize to size x size, on the CPU in uint8 (B, 3, size, size): there torch's
    antialiased kernel rounds between its two passes as PIL does, within 2 levels of Image.resize(BICUBIC) (CMMD)."""
    H, W = images.shape[-2:]
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    images = images[..., top:top + side, left:left + side].cpu()
    if side == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True)


def normalize(images, mean, std, device):
    x = images.to(device).float() / 255
    return (x - torch.tensor(mean, device=device)[:, None, None]) / torch.tensor(std, device=device)[:, None, None]


def load_clip(name=CLIP_ID):
    """CLIP ViT-L/14-336 vision tower with its projection (transformers), from the hub or a local folder."""
    from transformers import CLIPVisionModelWithProjection
    model = from_hub(lambda: whole(CLIPVisionModelWithProjection.from_pretrained(name, output_loading_info=True),
                                   "a CLIP vision model with projection", "--clip", name), f"CLIP {name}", name,
                     "--clip", name=name)
    return model.eval().requires_grad_(False)


def clip_features(model, images):
    """L2-normalised image_embeds, preprocessing as CMMD: crop, bicubic to 336, CLIP mean/std."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    device = next(model.parameters()).device
    x = normalize(crop_resize(images, model.config.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, device)
    return F.normalize(model(pixel_values=x).image_embeds.float(), dim=-1)


def load_dino(name=DINO_ID, weights=None, flag="--dino-weights", pretrained=True, **timm_kwargs):
    """DINOv2 ViT-L/14 with registers through timm, frozen: DINO-MMD, the REPA teacher and P-DINO. weights: an offline
    file of the hub id's weights, which `flag` (the caller's command-line flag) names in errors; another input size:
    img_size=224 or dynamic_img_size=True."""
    import timm
    from huggingface_hub import hf_hub_download
    overlay = {**timm_kwargs.pop("pretrained_cfg_overlay", {}), **({"file": weights} if weights else {})}
    file, repo = overlay.get("file"), getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if file is not None and not os.path.isfile(file):
        raise FileNotFoundError(f"{flag} {file}: no such file; it should be model.safetensors of {repo or name} "
                                f"(`hf download {repo or name} model.safetensors`)")
    if pretrained and file is None and repo:  # fetch the weights before building the network (ViT-L: seconds)
        files = f"{repo} model.safetensors"
        overlay["file"] = from_hub(lambda: hf_hub_download(repo, "model.safetensors"), files, files, flag,
                                   "DIR/model.safetensors")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay,
                                  **timm_kwargs)
    except NOT_WEIGHTS as e:
        if file is None:  # not a file the user named
            raise
        raise ValueError(f"{flag} {file}: not model.safetensors of {repo or name} ({type(e).__name__}: "
                         f"{one_line(e)})")
    return model.eval().requires_grad_(False)


def dino_features(model, images):
    """L2-normalised CLS token after the final norm; as PRX's DINOFeatureExtractor: bicubic to the model's size (518)
    in float (no antialiasing, no rounding to uint8, unlike CMMD's), ImageNet mean/std."""
    cfg, device, size = model.pretrained_cfg, next(model.parameters()).device, model.patch_embed.img_size[0]
    x = F.interpolate(images.to(device).float(), size=(size, size), mode="bicubic", align_corners=False)
    x = normalize(x, cfg["mean"], cfg["std"], device)  # in [0, 255] still: divided by 255 there
    return F.normalize(model.forward_features(x)[:, 0].float(), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Statistics

class GaussianStats:
    """Mean and covariance of a stream of feature rows, from float64 sums of x and x x^T (no features kept)."""

    def __init__(self, dim, device):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x):  # x (B, D)
        x = x.double()
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def mean_cov(self):
        """-> (mu (D,), unbiased covariance (D, D)) float64 numpy, summed over all ranks."""
        n, s, outer = (all_reduce(v.clone()) for v in (self.n, self.sum, self.outer))
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {int(n)}")
        mu = s / n
        return mu.cpu().numpy(), ((outer - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()


def distributed():
    return dist.is_available() and dist.is_initialized()


def main_process():
    """Rank 0 under torchrun, or the only process: the one that writes shared files."""
    return not distributed() or dist.get_rank() == 0


def setup_distributed(tf32):
    """-> rank, world size, device: under torchrun NCCL on CUDA, gloo on CPU. `tf32`: TF32 matmuls on CUDA (train.py;
    its weights stay fp32); the metric networks run without it (full_fp32)."""
    if "RANK" in os.environ:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's
            die_with_launcher()
        # an hour for a collective (NCCL's default: 10 minutes): while rank 0 writes a checkpoint (a large model's takes
        # minutes), the other ranks wait in the next step's all-reduce
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=1))
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
        quiet_unless_rank_0(rank)
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
    return rank, world, device


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory(limit=1 << 30):
    """glibc malloc's mmap and trim thresholds to `limit`: the next step reuses this step's freed activation memory
    instead of faulting its pages in again. -> whether libc took both settings (False where it is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return [libc.mallopt(option, limit) for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)] == [1, 1]


def all_reduce(x):
    if distributed():
        dist.all_reduce(x)
    return x


def gather_rows(x):
    """(n_rank, ...) on each rank -> (sum of n_rank, ...) on every rank, in rank order (the ranks' counts may differ)."""
    if not distributed():
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts).to(x.device)


def first_samples(images, idx, n):
    """Samples 0..n-1 of an evaluation, n at most the batch size, from every rank's first batch (rank r of w holds r,
    r + w, ...: my_batches) -> (images, their indices), in index order, on every rank: the grid is the same whatever
    the number of ranks."""
    world = dist.get_world_size() if distributed() else 1
    k = -(-n // world)  # each rank's first k cover samples 0..k w - 1
    images, idx = gather_rows(images[:k]), gather_rows(torch.tensor(idx[:k], device=images.device))
    order = idx.argsort()[:n]
    return images[order], idx[order].tolist()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), float64. S1 S2 is similar to an SPD matrix, so
    tr sqrt(S1 S2) = sum sqrt(eigenvalues); their tiny negative or complex parts are round-off (as torch-fidelity)."""
    diff = mu1 - mu2
    tr_sqrt = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def mmd(x, y, sigma=10.0, scale=1000.0, chunk=2048):
    """scale * MMD^2 of Gaussian-RBF kernels exp(-|a - b|^2 / (2 sigma^2)), the biased estimator (means over all
    pairs, diagonal included), as CMMD. Kernel blocks of chunk rows keep 30k x 30k in bounded memory."""
    x, y = x.double(), y.double()

    def mean_kernel(a, b):
        total = 0.0
        for i in range(0, len(a), chunk):
            block = a[i:i + chunk]
            d2 = (block.square().sum(1)[:, None] + b.square().sum(1)[None] - 2 * block @ b.T).clamp_min(0)
            total += torch.exp(-d2 / (2 * sigma ** 2)).sum().item()
        return total / (len(a) * len(b))

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


# ----------------------------------------------------------------------------------------------------------
# Metrics: stream images in, compare with a reference file

REFERENCE_KEYS = ("settings", "count", "resolution")  # what save_reference writes beside the metrics' statistics


def read_reference(path, flag="--ref"):
    """A reference file's arrays, or an error that says how to make one: missing, damaged (a write cut short: rebuild
    it), or not a reference at all (a folder, another file: nothing to remove, the flag names the wrong path)."""
    path = os.fspath(path)
    make = f"`python eval.py ref --data <eval data> --out {path if path.endswith('.npz') else '<file>.npz'}`"
    if not os.path.exists(path):
        hint = f"did you mean {path}.npz? " if os.path.exists(f"{path}.npz") else ""
        raise FileNotFoundError(f"{flag} {path}: no such reference; {hint}make it with {make}")
    not_one = f"{flag} {path}: not a reference, which is the .npz file that {make} writes"
    if os.path.isdir(path):
        raise ValueError(f"{not_one} (this is a folder)")
    try:
        with np.load(path) as f:
            ref = dict(f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError) as e:  # TypeError: a .npy's array
        if not path.endswith(".npz"):
            raise ValueError(f"{not_one} ({type(e).__name__})") from None
        raise ValueError(f"{flag} {path} is not a readable reference ({type(e).__name__}: {one_line(e)}); remove it "
                         f"and rebuild it with {make}") from None
    if missing := [key for key in REFERENCE_KEYS if key not in ref]:
        raise ValueError(f"{not_one} (an .npz without {', '.join(missing)})")
    return ref


def check_reference_size(ref, count, resolution, flag="--num-samples"):
    """FID is biased by the sample count and every metric moves with resolution: compare like with like."""
    n, r = int(ref["count"]), int(ref["resolution"])
    if (count, resolution) != (n, r):
        fixes = [f"use {flag} {n}"] * (count != n) + [
            f"build a matching reference with `python eval.py ref --data <eval data> --num-samples {count} --out "
            f"<file>`" + f" from eval data at {resolution} px (the built-in data: add --resolution {resolution})"
            * (r != resolution)]
        raise ValueError(f"the reference holds {n} images at {r} px but this evaluation has {count} at "
                         f"{resolution} px; {', or '.join(fixes)}")


def check_reference_images(path, ref, data, images_id):
    """A reference of another dataset's images (or of other held-out images of this one) gives a distance between two
    datasets, not a measure of the model: refused."""
    made = json.loads(str(ref["images"])) if "images" in ref else None
    if made is not None and made["id"] == images_id:
        return
    rebuild = f"`python eval.py ref --data {data} --num-samples {int(ref['count'])} --out <file>`"
    if made is None:
        raise ValueError(f"{path} does not name the images it holds statistics of (made before references did): "
                         f"remove it and rebuild it with {rebuild.replace('<file>', str(path))}")
    held = "other images of it (prepared again?)" if made["data"] == data else f"those of --data {made['data']}"
    raise ValueError(f"{path} holds statistics of {held}, not of the held-out images of {data} this evaluation "
                     f"compares with: build a reference of those with {rebuild}")


FEATURES = {"fid": inception_features, "cmmd": clip_features, "dino_mmd": dino_features}
EMBEDDINGS = {"cmmd": "clip_emb", "dino_mmd": "dino_emb"}  # the reference file's arrays of the MMD metrics


@contextlib.contextmanager
def full_fp32(device_type):
    """The metric networks in fp32 whatever the caller set: autocast off, and no TF32 in CUDA's matmuls and cuDNN's
    convolutions (train.py turns both on, and cuDNN's default is TF32), so that a reference and an evaluation agree
    whichever script made them."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


class Metrics:
    """update(images uint8 (B, 3, H, W)) on each rank, then compute() -> {"fid", "cmmd", "dino_mmd"} against the
    reference file (gathered over ranks when torch.distributed is initialised), or save_reference(path).
    metrics None: those the reference holds. clip / dino: a hub id or folder to load, or a loaded model; dino_weights:
    a local file of the hub id's weights (--dino-weights). count, resolution, images: this evaluation's, which the
    reference must match (count_flag: the caller's flag for the count, named in the error), checked before any network
    loads; images: (--data, its held-out split's images_id(count)), the real images the reference holds or will hold."""

    def __init__(self, ref_path=None, metrics=FEATURE_METRICS, fid_weights=None, clip=CLIP_ID, dino=DINO_ID,
                 dino_weights=None, device="cpu", count=None, resolution=None, count_flag="--num-samples", images=None,
                 ref_flag="--ref"):
        self.ref = read_reference(ref_path, ref_flag) if ref_path else None
        saved = json.loads(str(self.ref["settings"])) if self.ref is not None else {}  # the reference's settings
        if self.ref is not None:
            held = [m for m in FEATURE_METRICS if m in saved]
            if metrics is not None and (missing := [m for m in metrics if m not in held]):
                raise ValueError(f"{ref_path} holds {','.join(held) or 'no metric'}, not {','.join(missing)}: pass "
                                 f"--metrics {','.join(held)}, or build a reference of {','.join(metrics)} with "
                                 f"`python eval.py ref --metrics {','.join(metrics)} ...`")
            metrics = held if metrics is None else metrics
            if count is not None:
                check_reference_size(self.ref, count, resolution, count_flag)
            if images is not None:
                check_reference_images(ref_path, self.ref, *images)
        elif metrics is None:
            raise ValueError("metrics=None takes the reference's own: pass ref_path, or the metrics")
        # the reference checked: the networks load next, each named in the settings by its weights' fingerprint
        self.metrics, self.device, self.images = tuple(metrics), torch.device(device), images
        self.settings, self.nets = {"eval_version": EVAL_VERSION}, {}
        if "fid" in metrics and count is not None and count < 2048 and main_process():
            print(f"note: FID of {count} images ({count_flag}): fewer than Inception's 2048 features, so the "
                  f"covariances are singular and the FID biased upward; compare FIDs of one count only")
        if "fid" in metrics:
            import torch_fidelity
            net = self.nets["fid"] = load_inception(fid_weights).to(self.device)
            self.settings["fid"] = (f"torch-fidelity {torch_fidelity.__version__} inception-v3-compat 2048 "
                                    f"{fingerprint(net.Conv2d_1a_3x3.conv.weight)}")
        if "cmmd" in metrics:
            net = self.nets["cmmd"] = (load_clip(clip) if isinstance(clip, str) else clip).to(self.device)
            self.settings["cmmd"] = (f"{type(net).__name__} {net.config.image_size}px "
                                     f"{fingerprint(net.vision_model.embeddings.patch_embedding.weight)}")
        if "dino_mmd" in metrics:
            net = load_dino(dino, dino_weights) if isinstance(dino, str) else dino
            net = self.nets["dino_mmd"] = net.to(self.device)
            self.settings["dino_mmd"] = (f"{net.pretrained_cfg['architecture']} {net.patch_embed.img_size[0]}px "
                                         f"{fingerprint(net.patch_embed.proj.weight)}")
        if self.ref is not None:  # made by these networks and this version of the metrics
            for key, value in self.settings.items():
                if saved.get(key) != value:
                    raise ValueError(f"{ref_path} was made with other settings: {key} is "
                                     f"{saved.get(key, 'absent')!r} there, {value!r} here. Remove it and rebuild it: "
                                     f"python eval.py ref --data <data> --num-samples {int(self.ref['count'])} "
                                     f"--metrics {','.join(self.metrics)} --out {ref_path}")
        self.reset()

    def reset(self):
        """Forget the images seen so far (the networks and the reference stay): before each evaluation."""
        self.count, self.resolution = 0, None
        self.fid_stats = GaussianStats(2048, self.device) if "fid" in self.metrics else None
        self.embeddings = {name: [] for name in EMBEDDINGS if name in self.metrics}

    @torch.no_grad()
    def update(self, images):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {list(images.shape)}; "
                             f"from [-1, 1] floats use eval.to_uint8(x)")
        self.resolution = images.shape[-1]
        self.count += len(images)
        with full_fp32(self.device.type):
            for name, net in self.nets.items():
                features = FEATURES[name](net, images)
                if name == "fid":
                    self.fid_stats.update(features)
                else:
                    self.embeddings[name].append(features)

    def features(self):
        """What compute() compares, summed or gathered over ranks: numpy arrays and the settings."""
        out = {"count": int(all_reduce(torch.tensor(self.count, device=self.device))),
               "resolution": self.resolution, "settings": json.dumps(self.settings)}
        if self.images is not None:
            out["images"] = json.dumps(dict(zip(("data", "id"), self.images)))
        if self.fid_stats is not None:
            out["fid_mu"], out["fid_cov"] = self.fid_stats.mean_cov()
        for name, emb in self.embeddings.items():
            out[EMBEDDINGS[name]] = gather_rows(torch.cat(emb)).cpu().numpy()
        return out

    def save_reference(self, path):
        """-> the path rank 0 wrote: `path`, or path_1, ... where a file took that name meanwhile (write_new)."""
        features = self.features()  # every rank takes part in the gathering; rank 0 writes
        if main_process():
            return write_new(None, None, lambda new: write_whole(new, lambda f: np.savez(f, **features)), str(path))

    def compute(self):
        f = self.features()
        check_reference_size(self.ref, f["count"], f["resolution"])
        result = {}
        if self.fid_stats is not None:
            result["fid"] = frechet_distance(f["fid_mu"], f["fid_cov"], self.ref["fid_mu"], self.ref["fid_cov"])
        for name in self.embeddings:
            x, y = (torch.from_numpy(a[EMBEDDINGS[name]]).to(self.device) for a in (f, self.ref))
            result[name] = mmd(x, y)
        return result


# ----------------------------------------------------------------------------------------------------------
# The evaluation loop (train.py calls it too)

def check_data_fits(model, split, data, flag):
    """The evaluation data's text and images are what the model reads: a set prepared with another text encoder or
    VAE is refused here, before any network loads, not at the first forward."""
    width = split.encode([0])[0].shape[-1]  # (1, L, D)
    schema = {} if data == "builtin" else read_index(data_dirs(data)[0])["schema"]
    channels = schema["latent" if "latent" in schema else "image"]["shape"][0] if schema else 3
    if (width, channels) != (model.cfg.context_dim, model.cfg.in_channels):
        raise SystemExit(f"error: {flag}: gives {width}-wide text and {channels}-channel inputs, the model reads "
                         f"{model.cfg.context_dim}-wide text and {model.cfg.in_channels} channels: evaluate on data "
                         f"prepared like its training data (the same --vae and --text-encoder)")


def check_encoders(data, trained_on, flag="--data"):
    """Data other than the one a model trained on must come from the same VAE and text encoder (where that data is on
    this machine to compare with): a text encoder of the same width would otherwise be read as if it were the run's.
    Used by eval.py's commands and by a resume onto new data (train.py)."""
    if data == trained_on or "builtin" in (data, trained_on) or not os.path.isdir(data_dirs(trained_on)[0]):
        return
    with exit_on(f"{flag} {data}"):  # an index or encoding cut short or missing: named
        differ = space_differences(data_dirs(data)[0], data_dirs(trained_on)[0], ENCODERS)
    if differ:
        verb = "differ" if len(differ) > 1 else "differs"
        raise SystemExit(f"error: {flag} {data}: its {' and '.join(differ)} {verb} from the data the model trained on "
                         f"({trained_on}): use data prepared with the same --vae and --text-encoder")


def load_named_in_index(data, what, field, load):
    """load() of the network a prepared dataset's index.json names (settings.<field>); where it cannot be loaded here,
    one line saying which field to point at this machine's copy."""
    try:
        return load()
    except (OSError, ValueError, NotOnThisMachine) as e:
        raise SystemExit(f"error: the {what} that {data}/index.json names cannot be loaded ({e}); set "
                         f"settings.{field} there to this machine's copy, or bring the hub id into its cache")


def data_vae(data, index, device):
    """The VAE a prepared dataset was encoded with (its index.json's settings) -> (vae, shift, scale)."""
    return load_named_in_index(data, "VAE", "vae_path", lambda: load_vae(
        index["settings"]["vae"], index["settings"].get("vae_path"), device))


def load_decoder(cfg, data, resolution, device):
    """-> (shape of x0 at `resolution`, the run's: decode: x0 -> uint8 images): pixel models directly, latent models
    through the data's VAE."""
    if cfg.in_channels == 3:
        return (3, resolution, resolution), to_uint8
    index = read_index(data_dirs(data)[0])
    vae, shift, scale = data_vae(data, index, device)
    decode = lambda z: to_uint8(vae.decode(denormalize_latent(z, shift, scale).to(vae.dtype)).sample.float())
    latent = index["schema"]["latent"]["shape"]  # (C, h, w) of the data's images, which prepare.py stores beside
    down = index["schema"]["image"]["shape"][-1] // latent[-1]  # the VAE's factor: 8, DC-AE's 32
    return (latent[0], resolution // down, resolution // down), decode


def my_batches(num_samples, batch_size):
    """This rank's indices of 0..num_samples-1 (every world-th), in batches."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    mine = range(rank, num_samples, world)
    return tqdm((mine[i:i + batch_size] for i in range(0, len(mine), batch_size)), total=-(-len(mine) // batch_size),
                disable=rank != 0, unit="batch")  # made one by one: a list of a mistyped count's would fill the memory


@torch.no_grad()
def evaluate(model, split, num_samples, shape, decode=to_uint8, metrics=None, seed=42, batch_size=32, grid=None,
             **sampling):
    """Sample held-out prompts 0..num_samples-1 (sample i from the noise of seed + i) and score the images: the
    split's own score (the caption checker on the built-in data) and, given a Metrics (reset here), its feature
    metrics. grid(images, captions): called with the first batch on the main process (saves it). sampling: steps,
    cfg_scale, shift, pred, route_ratio, self_guidance."""
    device = next(model.parameters()).device
    if metrics is not None:
        metrics.reset()
    null_txt, null_mask = (t.to(device) for t in split.null)
    sums, seen = {}, 0
    for i, idx in enumerate(my_batches(num_samples, batch_size)):
        txt, mask = split.encode(idx)
        x = sample(model, txt.to(device), mask.to(device), null_txt, null_mask, [seed + j for j in idx], shape,
                   **sampling)
        images = decode(x)  # (B, 3, R, R) uint8
        if metrics is not None:
            metrics.update(images)
        for key, value in split.score(images, idx).items():
            sums[key] = sums.get(key, 0.0) + value * len(idx)
        seen += len(idx)
        if i == 0:  # every rank: each gives its share of the grid's samples
            shown, shown_idx = first_samples(images, idx, min(64, batch_size, num_samples))
            if grid and main_process():
                grid(shown, split.captions(shown_idx))
    result = metrics.compute() if metrics is not None else {}
    if sums:
        totals = all_reduce(torch.tensor([*sums.values(), seen], dtype=torch.float64, device=device)).tolist()
        result.update({key: total / totals[-1] for key, total in zip(sums, totals)})
    return result


# ----------------------------------------------------------------------------------------------------------
# Command line

def get_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("command", nargs="?", default="eval", choices=["eval", "ref", "sample", "export"],
                   help="eval: sample a checkpoint and score it; ref: reference statistics of the real images; "
                        "sample: the checkpoint's images of --prompt captions; export: the checkpoint as a folder "
                        "diffusers' PRXPipeline.from_pretrained loads")
    g = p.add_argument_group("what")
    g.add_argument("--ckpt", help="run folder (its latest checkpoint) or <run>/checkpoints/step_N")
    g.add_argument("--weights", choices=["ema", "model"], help="default: the EMA's when the run keeps them")
    g.add_argument("--ref", help="reference statistics (.npz) from `python eval.py ref`")
    g.add_argument("--data", help="'builtin' or a prepared directory (eval: default the run's --eval-data, else its "
                   "--data)")
    g.add_argument("--caption", choices=["long", "short"], help="caption field (default: short for a run whose last "
                   "--data phase or --captions is short, else long)")
    g.add_argument("--resolution", type=side, help="ref on the built-in data: image side (default 32); other "
                   "commands sample at the run's resolution")
    g.add_argument("--out", help="ref: the .npz to write; eval: the JSON (default <checkpoint>/eval.json, or "
                   "eval_1.json, ...: never one written before); sample: the image, .png, .jpg or .webp (default "
                   "<checkpoint>/prompts.png, likewise); export: a new folder")
    g.add_argument("--prompt", action="append", help="sample: a caption to draw, repeatable (image i from the noise "
                   "of --seed + i); encoded by the run's text encoder (the built-in one, or the data's T5Gemma)")
    g.add_argument("--num-samples", type=count, default=10_000, help="held-out prompts / reference images")
    g.add_argument("--metrics", type=metric_list, help="comma-separated from fid,cmmd,dino_mmd (default: all "
                   "three on prepared data; none on the built-in data, which the caption checker scores)")
    g.add_argument("--batch-size", type=count, default=32, help="images per rank per step")
    g = p.add_argument_group("sampling (defaults: the run's own, config.json 'sampling')")
    g.add_argument("--steps", type=count, help="Euler steps")
    g.add_argument("--cfg-scale", type=number(float, 0), help="classifier-free guidance scale")
    g.add_argument("--self-guidance", type=number(float, 0),
                   help="TREAD self-guidance weight (0 = off; default the run's)")
    g.add_argument("--seed", type=seed_number, default=42, help="sample i starts from the noise of seed + i")
    g = p.add_argument_group("metric networks (offline machines: local copies)")
    g.add_argument("--fid-weights", help="weights-inception-2015-12-05-6726825d.pth (default: downloaded)")
    g.add_argument("--clip", default=CLIP_ID, help="CLIP hub id or local folder")
    g.add_argument("--dino-weights", help=f"model.safetensors of timm/{DINO_ID} (default: downloaded)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    for name in sorted(p.given(argv) - COMMAND_FLAGS[args.command]):  # a forgotten `sample` would evaluate
        takes = [c for c, flags in COMMAND_FLAGS.items() if name in flags]
        p.error(f"--{name.replace('_', '-')} is not a flag of `{args.command}`: it is {' and '.join(takes)}'s "
                f"(python eval.py {takes[0]} ...)")
    return args


# the flags each command reads
COMMAND_FLAGS = {
    "eval": {"ckpt", "weights", "ref", "data", "caption", "out", "num_samples", "metrics", "batch_size", "steps",
             "cfg_scale", "self_guidance", "seed", "fid_weights", "clip", "dino_weights"},
    "ref": {"data", "resolution", "out", "num_samples", "metrics", "batch_size", "fid_weights", "clip",
            "dino_weights"},
    "sample": {"ckpt", "weights", "data", "out", "prompt", "batch_size", "steps", "cfg_scale", "self_guidance", "seed"},
    "export": {"ckpt", "weights", "data", "out"}}


def metric_list(text):
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in FEATURE_METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: " + (f"unknown {','.join(unknown)}; " if unknown else "") +
                                         f"choose from {','.join(FEATURE_METRICS)}, comma-separated (the caption "
                                         f"checker needs no flag: it always runs on the built-in data)")
    return names


def build_metrics(args, names, device, count=None, resolution=None, images=None):
    """names None: the metrics the --ref file holds. count, resolution, images: this evaluation's, which the reference
    must match (checked before any network loads)."""
    if names == []:
        return None
    if not args.ref and args.command == "eval":
        which = f"--metrics {','.join(names)}" if args.metrics else f"on prepared data the evaluation computes " \
            f"{','.join(names)} (--metrics chooses), which"
        raise SystemExit(f"error: {which} needs reference statistics: --ref ref.npz (from `python eval.py ref`)")
    # a reference or network missing or unfit: each names its own flag
    with exit_on(errors=(ValueError, FileNotFoundError, NotOnThisMachine)):
        return Metrics(args.ref, names, args.fid_weights, args.clip, dino_weights=args.dino_weights, device=device,
                       count=count, resolution=resolution, images=images)


def make_reference(args, device):
    if not (args.data and args.out):
        raise SystemExit("error: ref needs --data (builtin or a prepared directory) and --out <file>.npz")
    if args.resolution and args.data != "builtin":  # its images are stored at one resolution
        raise SystemExit(f"error: --resolution {args.resolution}: {args.data} holds its images at the resolution it "
                         f"was prepared at; leave --resolution out (it sizes the built-in shapes)")
    names = args.metrics or list(FEATURE_METRICS)
    if "fid" in names and args.num_samples < 2:
        raise SystemExit(f"error: --num-samples {args.num_samples}: FID's covariance needs at least 2 images")
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # the name np.savez would give it
    if os.path.exists(out):  # runs and records name a reference by the images it holds: never replaced unasked
        raise SystemExit(f"error: --out {out} exists; remove it to rebuild it, or write another file")
    with exit_on(f"--data {args.data} --num-samples {args.num_samples}"):  # before any network loads
        split = open_heldout(args.data, args.num_samples, None, args.resolution or 32, 0, 0)  # images only
    metrics = build_metrics(args, names, device, images=(args.data, split.images_id(args.num_samples)))
    for idx in my_batches(args.num_samples, args.batch_size):
        metrics.update(split.images(idx))
    if written := metrics.save_reference(out):
        print(f"wrote {written}: {args.num_samples} images, {json.dumps(metrics.settings)}")


def main(argv=None):
    args = get_args(argv)
    parent = os.path.dirname(os.path.normpath(args.out)) if args.out else ""
    if parent and not os.path.isdir(parent):
        raise SystemExit(f"error: --out {args.out}: there is no folder {parent}; create it, or write elsewhere")
    if args.out and (why := unwritable(os.path.dirname(os.path.abspath(args.out)))):  # before the work, not after
        raise SystemExit(f"error: --out {args.out}: {why}")
    if args.out and args.command in ("eval", "ref", "sample") and args.out.endswith(os.sep):
        raise SystemExit(f"error: --out {args.out} names a folder; {args.command} writes a file: name it")
    if args.out and args.command in ("eval", "sample") and os.path.exists(args.out):  # a result is never replaced
        raise SystemExit(f"error: --out {args.out} exists; write another file (without --out, {args.command} writes "
                         f"a new one beside the checkpoint)")
    if args.command == "sample" and args.out and not args.out.lower().endswith(GRID_FORMATS):
        raise SystemExit(f"error: --out {args.out}: sample writes an image: end the name in {', '.join(GRID_FORMATS)}")
    if args.command == "eval" and args.out and not args.out.lower().endswith(".json"):
        raise SystemExit(f"error: --out {args.out}: the evaluation writes JSON: end the name in .json")
    device = setup_distributed(tf32=False)[2]
    try:
        if distributed() and args.command in ("sample", "export"):
            raise SystemExit(f"error: {args.command} runs in one process: python eval.py {args.command} ...")
        if distributed() and args.num_samples < dist.get_world_size():
            raise SystemExit(f"error: --num-samples {args.num_samples} is fewer than the {dist.get_world_size()} "
                             f"processes (each samples its share): ask for more, or start fewer")
        {"ref": make_reference, "eval": evaluate_checkpoint, "sample": sample_prompts,
         "export": export_pipeline}[args.command](args, device)
    finally:
        if distributed():
            dist.destroy_process_group()


def run_data(args, train_args, evaluation=False):
    """The data eval.py reads: --data, else the run's (its --eval-data, for an evaluation), which must be here and
    come from the VAE and text encoder the run trained with (check_encoders)."""
    data = args.data or (evaluation and train_args["eval_data"]) or train_args["data"]
    if not args.data and data != "builtin" and not os.path.isdir(data_dirs(data)[0]):
        raise SystemExit(f"error: --ckpt {args.ckpt}: the run's data {data} is not here (a path relative to where "
                         f"train.py ran?): pass --data <its folder on this machine>")
    check_encoders(data, train_args["data"], "--data" if args.data else "the run's --eval-data")
    return data


def load_checkpoint(args):
    """--ckpt -> (model, the run's args, the checkpoint folder, sampling: the run's with --steps, --cfg-scale and
    --self-guidance over it); args.weights becomes the weights read, "ema" or "model"."""
    if not args.ckpt:
        raise SystemExit("error: pass --ckpt <run or checkpoint> (or `ref`)")
    with exit_on(f"--ckpt {args.ckpt}"):
        model, run, ckpt = load_run(args.ckpt, args.weights)
    args.weights = weights_file(ckpt, args.weights).removesuffix(".safetensors")
    train_args = run["args"]
    if args.weights == "ema" and main_process():
        note = ema_note(train_args["ema"], train_args["ema_every"], step_of(ckpt))
        if note:
            print(note)
    if args.self_guidance and not (train_args["tread"] or train_args["sprint"]):
        raise SystemExit(f"error: --self-guidance {args.self_guidance} extrapolates from the routed network, and "
                         f"{args.ckpt} was trained without --tread or --sprint")
    given = dict(steps=args.steps, cfg_scale=args.cfg_scale, self_guidance=args.self_guidance)
    return model, train_args, ckpt, dict(run["sampling"], **{k: v for k, v in given.items() if v is not None})


def evaluate_checkpoint(args, device):
    model, train_args, ckpt, sampling = load_checkpoint(args)
    beside = os.path.dirname(os.path.abspath(args.out)) if args.out else ckpt  # eval.json's folder, and its grid's
    if not args.out and (why := unwritable(ckpt)):  # found before sampling, not when the grid is written
        raise SystemExit(f"error: --ckpt {args.ckpt}: {why}; the evaluation writes eval.json and its grid there: "
                         f"write them elsewhere with --out FILE.json")
    data = run_data(args, train_args, evaluation=True)
    caption = args.caption or heldout_caption(train_args["captions"], train_args["data"])
    where = f"--data {data}" if args.data else f"the run's data ({data})"  # the flags typed, in its errors
    with exit_on(f"{where}{f' --caption {caption}' * bool(args.caption)} --num-samples {args.num_samples}"):
        split = open_heldout(data, args.num_samples, caption, train_args["resolution"], train_args["seed"],
                             train_args["text_context"])  # before any network loads
    check_data_fits(model, split, data, where)
    names = args.metrics if args.metrics is not None or args.ref else [] if data == "builtin" else list(FEATURE_METRICS)
    # --ref without --metrics: the metrics it holds, of as many images at the resolution as are sampled
    metrics = build_metrics(args, names, device, args.num_samples, train_args["resolution"],
                            (data, split.images_id(args.num_samples)) if args.ref else None)
    shape, decode = load_decoder(model.cfg, data, train_args["resolution"], device)
    grid = []  # its name, once written

    def save_new_grid(images, captions):
        with contextlib.suppress(FileNotFoundError):  # the checkpoint pruned meanwhile: said when eval.json is written
            grid.append(write_new(beside, "eval_samples.png", lambda path: save_grid(images, captions, path)))
    result = evaluate(model.to(device), split, args.num_samples, shape, decode, metrics, args.seed, args.batch_size,
                      save_new_grid, **sampling)
    if main_process():
        record = {"metrics": result, "data": data, "num_samples": args.num_samples, "seed": args.seed, "ref": args.ref,
                  "ref_images": metrics.images[1] if args.ref else None,  # what the reference holds (checked)
                  "sampling": sampling, "settings": metrics.settings if metrics else {},
                  "checkpoint": os.path.basename(ckpt), "weights": args.weights,
                  "grid": grid and os.path.relpath(grid[0], beside)}
        line = " | ".join(f"{k} {v:.4f}" for k, v in result.items())
        try:
            out = write_new(ckpt, "eval.json", lambda path: write_whole(
                path, lambda f: f.write(json.dumps(record, indent=2).encode())), args.out)
        except OSError as e:  # a full disk: the result, on the console at least
            if isinstance(e, FileNotFoundError) and not args.out and not os.path.isdir(ckpt):
                raise SystemExit(f"error: {ckpt} was removed during the evaluation (the training run's --keep pruned "
                                 f"it), so eval.json has no folder: {line}; evaluate a checkpoint the run keeps, or "
                                 f"pass --out") from None
            raise SystemExit(f"error: writing eval.json failed ({e.strerror or e}): {line}") from None
        print(f"{line} -> {out}")


def prompt_encoder(data, text_context, device):
    """The text encoder that encoded the run's data: the built-in one, or the T5Gemma of the prepared data's
    index.json (its hub id or local copy, its token cap)."""
    if data == "builtin":
        return BuiltinTextEncoder(context=text_context).to(device)
    settings = read_index(data_dirs(data)[0])["settings"]
    return load_named_in_index(data, "text encoder", "text_encoder", lambda: T5GemmaTextEncoder.from_pretrained(
        settings["text_encoder"], device, settings["max_tokens"]))


@torch.no_grad()
def sample_prompts(args, device):
    """`eval.py sample`: the checkpoint's image of each --prompt (image i from the noise of --seed + i), with the
    run's sampling, in one grid with the prompts (PNG, or --out's format)."""
    if not args.prompt:
        raise SystemExit('error: sample needs at least one --prompt "a caption"')
    model, train_args, ckpt, sampling = load_checkpoint(args)
    if not args.out and (why := unwritable(ckpt)):
        raise SystemExit(f"error: --ckpt {args.ckpt}: {why}; write the image elsewhere with --out")
    model, data = model.to(device), run_data(args, train_args)
    with exit_on(f"--prompt (the text encoder of --data {data})"):  # a bad --data spec too
        # the built-in grammar's words or T5Gemma's text: a run reads its own kind (a folder of neither: said below)
        builtin, trained_builtin = data == "builtin", train_args["data"] == "builtin"
        if builtin != trained_builtin and (builtin or os.path.isfile(os.path.join(data_dirs(data)[0], "index.json"))):
            raise SystemExit(f"error: --data {data}: the run trained on {train_args['data']}, whose text encoder its "
                             f"prompts need: leave --data out (or name where its data is on this machine)")
        encoder = prompt_encoder(data, train_args["text_context"], device)
        txt, mask = encoder(args.prompt)  # on the GPU T5Gemma gives bf16; training reads text as float32
    if txt.shape[-1] != model.cfg.context_dim:
        raise SystemExit(f"error: --data {data}: its text encoder gives {txt.shape[-1]}-wide tokens, the model reads "
                         f"{model.cfg.context_dim}: name the data the run was trained on (or leave --data out)")
    shape, decode = load_decoder(model.cfg, data, train_args["resolution"], device)
    null_txt, null_mask = encoder([""])
    txt, null_txt = txt.float(), null_txt.float()
    seeds, batches = [args.seed + i for i in range(len(txt))], range(0, len(txt), args.batch_size)
    images = torch.cat([decode(sample(model, txt[i:i + args.batch_size], mask[i:i + args.batch_size], null_txt,
                                      null_mask, seeds[i:i + args.batch_size], shape, **sampling)) for i in batches])
    out = write_new(ckpt, "prompts.png", lambda path: save_grid(images, args.prompt, path), args.out)
    print(f"{len(images)} image{'s' * (len(images) > 1)}, {sampling['steps']} steps, guidance {sampling['cfg_scale']} "
          f"-> {out}")


def export_pipeline(args, device):
    """`eval.py export`: the checkpoint (EMA weights when the run has them) as a folder PRXPipeline.from_pretrained
    loads whole: the run's shift and resolution, the VAE, T5Gemma and token cap its prepared data was encoded with
    (model.PRX.save_diffusers, whose docstring shows the call that reproduces eval.py's samples)."""
    if not args.out:
        raise SystemExit("error: export needs --out FOLDER (a new folder)")
    if os.path.exists(args.out):
        raise SystemExit(f"error: --out {args.out} exists; export writes a new folder")
    model, train_args, ckpt, sampling = load_checkpoint(args)
    data = run_data(args, train_args)
    with exit_on(f"the run's data {data} (--data: where it is on this machine)"):
        index = None if data == "builtin" else read_index(data_dirs(data)[0])
    if index is None or sampling["pred"] != "v" or "latent" not in index["schema"]:
        trained = "the built-in shapes" if index is None else "images" if "latent" not in index["schema"] else \
            f"{data} with --pred {sampling['pred']}"
        raise SystemExit(f"error: --ckpt {args.ckpt}: diffusers' PRXPipeline samples latents with v-prediction; this "
                         f"run trained on {trained}: sample it with eval.py")
    if model.cfg.sprint or index["settings"]["vae"] == "flux2":
        raise SystemExit(f"error: --ckpt {args.ckpt}: PRXPipeline has no SPRINT layers and no FLUX.2 BatchNorm "
                         f"decoding: sample this run with eval.py")
    vae = data_vae(data, index, "cpu")[0]
    encoder = prompt_encoder(data, train_args["text_context"], "cpu")
    tmp = f"{os.path.normpath(args.out)}.tmp-{os.getpid()}"  # whole or not at all
    try:
        model.save_diffusers(tmp, shift=sampling["shift"], resolution=train_args["resolution"], vae=vae,
                             text_encoder=encoder.model, tokenizer=encoder.tokenizer, max_tokens=encoder.max_tokens)
        os.replace(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{ckpt} ({args.weights}.safetensors) -> {args.out}: PRXPipeline.from_pretrained"
          + (f"; the run samples with self-guidance {sampling['self_guidance']:g}, which PRXPipeline has not"
             if sampling["self_guidance"] else ""))


if __name__ == "__main__":
    with errors_of_rank_0_first():
        main()
