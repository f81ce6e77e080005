"""
Sample a trained PRX run on held-out prompts and score the images: FID, CMMD and DINO-MMD against reference
statistics of the real held-out images (REFERENCE section 6), and the caption checker on the built-in dataset.

    python eval.py ref --data data/mj --out ref.npz                          # once: statistics of the real images
    python eval.py --ckpt runs/x --ref ref.npz --num-samples 10000           # -> runs/x/checkpoints/step_N/eval.json
    torchrun --nproc_per_node=8 eval.py --ckpt runs/x --ref ref.npz          # each rank samples its share
    python eval.py --ckpt runs/x --metrics caption                           # built-in dataset: caption checker
    python eval.py --bench                                                   # images/s of each stage

Sampler: Euler on the shifted linspace(1, 0, N + 1) schedule, classifier-free guidance against the encoded empty
prompt, optional TREAD self-guidance. Noise is seeded per sample index: the same image whatever the batch or ranks.
FID (Heusel et al. 2017): torch-fidelity's FeatureExtractorInceptionV3 (TF-compatible resize, 2048-d pool), the
network torchmetrics' FID uses, as PRX did; statistics streamed in float64, tr sqrt(S1 S2) from eigenvalues.
CMMD (Jayasumana et al. 2024, google-research/cmmd): CLIP ViT-L/14-336 image embeddings, Gaussian-RBF MMD.
DINO-MMD (PRX part 2): the same MMD on the CLS token of DINOv2 ViT-L/14 with registers.
"""

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from data import BACKGROUNDS, COLORS, REGIONS, SHAPES, SIZES, TEXT_CONTEXT, draw_shape


EVAL_VERSION = 1  # bump when a preprocessing step or a definition changes: older reference files are then refused
FEATURE_METRICS = ("fid", "cmmd", "dino_mmd")
CLIP_ID = "openai/clip-vit-large-patch14-336"
DINO_ID = "vit_large_patch14_reg4_dinov2.lvd142m"


# ----------------------------------------------------------------------------------------------------------
# Sampling

def timesteps(steps, shift=1.0):
    """linspace(1, 0, steps + 1), shifted towards noise as in training: t -> s t / (1 + (s - 1) t) (SD3)."""
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def pad_text(txt, mask, length):
    """Right-pad text (B, L, D) and its mask (B, L) to `length` tokens; the padding is masked out."""
    extra = length - txt.shape[1]
    return F.pad(txt, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


@torch.no_grad()
def sample(model, txt, txt_mask, null_txt, null_mask, seeds, shape, steps=50, cfg=3.5, shift=1.0, pred="v",
           self_guidance=0.0, route_ratio=0.5):
    """Euler from t = 1 (noise) to t = 0 (data) -> x0 (B, *shape) float32. txt (B, L, D), txt_mask (B, L);
    null_txt (1, L0, D), null_mask (1, L0): the encoded empty prompt. Guidance u + cfg (c - u); cfg <= 1 runs the
    conditional pass only. Sample i draws its starting noise, then (with self-guidance) each step's TREAD route,
    from its own CPU torch.Generator().manual_seed(seeds[i]): it does not depend on the batch, the ranks or the
    device."""
    B, device = txt.shape[0], txt.device
    if pred not in ("v", "x"):
        raise ValueError(f"pred must be 'v' (velocity) or 'x' (x0, JiT), got {pred!r}")
    if len(seeds) != B:
        raise ValueError(f"need one seed per sample: got {len(seeds)} seeds for {B} captions")
    if null_txt.shape[0] != 1 or null_txt.shape[2] != txt.shape[2]:
        raise ValueError(f"null_txt must be [1, L0, {txt.shape[2]}] (the encoded empty prompt), "
                         f"got {list(null_txt.shape)}")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    guided = cfg > 1
    if guided:  # one forward for [cond; uncond], text padded to a common length
        L = max(txt.shape[1], null_txt.shape[1])
        txt, txt_mask = pad_text(txt, txt_mask, L)
        null_txt, null_mask = pad_text(null_txt, null_mask, L)
        txt, txt_mask = torch.cat([txt, null_txt.expand(B, -1, -1)]), torch.cat([txt_mask, null_mask.expand(B, -1)])

    def velocity(x, t, route_ratio=0.0, route_scores=None):
        xx = torch.cat([x, x]) if guided else x
        if route_scores is not None and guided:  # cond and uncond take the same route
            route_scores = torch.cat([route_scores, route_scores])
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            out = model(xx, torch.full((len(xx),), t, device=device), txt, txt_mask, route_ratio=route_ratio,
                        route_scores=route_scores).float()
        if pred == "x":  # JiT (Li & He 2025): x0 prediction -> velocity
            out = (xx - out) / max(t, 0.05)
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg * (cond - uncond)

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


def save_grid(images, captions, path, nrow=8):
    """uint8 (B, 3, H, W) -> one PNG: the images in a grid (small ones enlarged), their captions listed beside it,
    numbered in row-major order."""
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
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------------
# Feature extractors: uint8 images (B, 3, H, W) in, float32 features (B, D) out

def fingerprint(weight):
    """sha256 prefix of a weight tensor's bytes: tells checkpoints apart in the reference's settings."""
    return hashlib.sha256(weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:8]


def missing_weights(what, where):
    return RuntimeError(f"{what}: not on this machine, and the download failed. On a machine with internet, {where}")


def load_inception(weights=None):
    """torch-fidelity's FeatureExtractorInceptionV3 ('inception-v3-compat', 2048-d pool features): the TF Inception
    of the original FID. weights: the .pth file; default the torch hub cache, downloaded on first use."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if weights is None and not os.path.exists(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, cached)
        except OSError as e:
            raise missing_weights("FID Inception weights", f"download {URL_INCEPTION_V3} and put it at "
                                  f"{cached}, or pass --fid-weights PATH") from e
    weights = weights or cached
    if not os.path.exists(weights):
        raise FileNotFoundError(f"--fid-weights {weights}: no such file; it should be "
                                f"{os.path.basename(URL_INCEPTION_V3)} from {URL_INCEPTION_V3}")
    torch.load(weights, weights_only=True)  # torch-fidelity unpickles with weights_only=False: refuse non-tensors
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)


def write_random_inception_weights(path):
    """Randomly initialised weights for load_inception (tests, and --bench without the real file). He-initialised
    convolutions keep the features away from zero through the 94 layers."""
    from unittest import mock
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    with mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict"), \
            mock.patch.object(fi, "load_state_dict_from_url"):  # build the network without any weights
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
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
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(name)
    except OSError as e:
        raise missing_weights(f"CLIP {name}", f"run `hf download {name}` and copy the Hugging Face cache "
                              f"(~/.cache/huggingface, or $HF_HOME) here, or pass --clip <that folder>") from e
    return model.eval().requires_grad_(False)


def clip_features(model, images):
    """L2-normalised image_embeds, preprocessing as CMMD: crop, bicubic to 336, CLIP mean/std."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    device = next(model.parameters()).device
    x = normalize(crop_resize(images, model.config.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, device)
    return F.normalize(model(pixel_values=x).image_embeds.float(), dim=-1)


def load_dino(name=DINO_ID, pretrained=True, **timm_kwargs):
    """DINOv2 ViT-L/14 with registers through timm, frozen: DINO-MMD and the REPA teacher. An offline file:
    pretrained_cfg_overlay=dict(file=PATH); another input size: img_size=224 or dynamic_img_size=True."""
    import timm
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    except OSError as e:
        raise missing_weights(f"timm/{name}", f"run `hf download timm/{name} model.safetensors` and pass "
                              f"--dino-weights <that file>") from e
    return model.eval().requires_grad_(False)


def dino_features(model, images):
    """L2-normalised CLS token after the final norm; bicubic to the model's size (518), ImageNet mean/std."""
    cfg, device = model.pretrained_cfg, next(model.parameters()).device
    x = normalize(crop_resize(images, model.patch_embed.img_size[0]), cfg["mean"], cfg["std"], device)
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


def all_reduce(x):
    if distributed():
        dist.all_reduce(x)
    return x


def gather_rows(x):
    """(n_rank, D) on each rank -> (sum of n_rank, D) on every rank; all_gather wants equal sizes, so pad."""
    if not distributed():
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    padded = x.new_zeros(max(int(c) for c in counts), x.shape[1])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)])


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

class Metrics:
    """update(images uint8 (B, 3, H, W)) on each rank, then compute() -> {"fid", "cmmd", "dino_mmd"} against the
    reference file (gathered over ranks when torch.distributed is initialised), or save_reference(path).
    clip / dino: a hub id or folder to load, or a loaded model."""

    def __init__(self, ref_path=None, metrics=FEATURE_METRICS, fid_weights=None, clip=CLIP_ID, dino=DINO_ID,
                 device="cpu"):
        unknown = set(metrics) - set(FEATURE_METRICS)
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {sorted(unknown)}: choose from {FEATURE_METRICS}")
        if ref_path and not os.path.exists(ref_path):
            raise FileNotFoundError(f"{ref_path}: no such reference; make it with `python eval.py ref --data <eval "
                                    f"data> --out {ref_path}`")
        self.metrics, self.device = tuple(metrics), torch.device(device)
        self.settings = {"eval_version": EVAL_VERSION}
        if "fid" in metrics:
            import torch_fidelity
            self.inception = load_inception(fid_weights).to(self.device)
            self.settings["fid"] = (f"torch-fidelity {torch_fidelity.__version__} inception-v3-compat 2048 "
                                    f"{fingerprint(self.inception.Conv2d_1a_3x3.conv.weight)}")
        if "cmmd" in metrics:
            self.clip = (load_clip(clip) if isinstance(clip, str) else clip).to(self.device)
            self.settings["cmmd"] = (f"{type(self.clip).__name__} {self.clip.config.image_size}px "
                                     f"{fingerprint(self.clip.vision_model.embeddings.patch_embedding.weight)}")
        if "dino_mmd" in metrics:
            self.dino = (load_dino(dino) if isinstance(dino, str) else dino).to(self.device)
            self.settings["dino_mmd"] = (f"{self.dino.pretrained_cfg['architecture']} "
                                         f"{self.dino.patch_embed.img_size[0]}px "
                                         f"{fingerprint(self.dino.patch_embed.proj.weight)}")
        self.ref = self.load_reference(ref_path) if ref_path else None
        self.reset()

    def reset(self):
        """Forget the images seen so far (the networks and the reference stay): before each evaluation."""
        self.count, self.resolution = 0, None
        self.fid_stats = GaussianStats(2048, self.device) if "fid" in self.metrics else None
        self.clip_emb, self.dino_emb = [], []

    def load_reference(self, path):
        ref = dict(np.load(path))
        saved = json.loads(str(ref["settings"]))
        for key, value in self.settings.items():
            if saved.get(key) != value:
                raise ValueError(f"{path} was made with other settings: {key} is {saved.get(key, 'absent')!r} "
                                 f"there, {value!r} here. Rebuild it: python eval.py ref --data <data> --out {path}")
        return ref

    def check_reference(self, count, resolution):
        """FID is biased by the sample count and every metric moves with resolution: compare like with like."""
        n, r = int(self.ref["count"]), int(self.ref["resolution"])
        if (count, resolution) != (n, r):
            raise ValueError(f"the reference holds {n} images at {r} px but this evaluation has {count} at "
                             f"{resolution} px; use --num-samples {n}, or build a matching reference with "
                             f"`python eval.py ref --data <eval data> --num-samples {count} --out <file>`")

    @torch.no_grad()
    def update(self, images):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {list(images.shape)}; "
                             f"from [-1, 1] floats use eval.to_uint8(x)")
        if self.resolution not in (None, images.shape[-1]):
            raise ValueError(f"images of {images.shape[-1]} px after {self.resolution} px: one resolution per run")
        self.resolution = images.shape[-1]
        self.count += len(images)
        if "fid" in self.metrics:
            self.fid_stats.update(inception_features(self.inception, images))
        if "cmmd" in self.metrics:
            self.clip_emb.append(clip_features(self.clip, images))
        if "dino_mmd" in self.metrics:
            self.dino_emb.append(dino_features(self.dino, images))

    def features(self):
        """What compute() compares, summed or gathered over ranks: numpy arrays and the settings."""
        out = {"count": int(all_reduce(torch.tensor(self.count, device=self.device))),
               "resolution": self.resolution, "settings": json.dumps(self.settings)}
        if "fid" in self.metrics:
            out["fid_mu"], out["fid_cov"] = self.fid_stats.mean_cov()
        for name, emb in (("cmmd", "clip_emb"), ("dino_mmd", "dino_emb")):
            if name in self.metrics:
                out[emb] = gather_rows(torch.cat(getattr(self, emb))).cpu().numpy()
        return out

    def save_reference(self, path):
        features = self.features()  # every rank takes part in the gathering; rank 0 writes
        if not distributed() or dist.get_rank() == 0:
            np.savez(path, **features)

    def compute(self):
        if self.ref is None:
            raise ValueError("no reference: pass ref_path (made by `python eval.py ref`)")
        f = self.features()
        self.check_reference(f["count"], f["resolution"])
        result = {}
        if "fid" in self.metrics:
            result["fid"] = frechet_distance(f["fid_mu"], f["fid_cov"], self.ref["fid_mu"], self.ref["fid_cov"])
        for name, emb in (("cmmd", "clip_emb"), ("dino_mmd", "dino_emb")):
            if name in self.metrics:
                x, y = (torch.from_numpy(a).to(self.device) for a in (f[emb], self.ref[emb]))
                result[name] = mmd(x, y)
        return result


# ----------------------------------------------------------------------------------------------------------
# Held-out data, checkpoints, and the evaluation loop (shared with train.py)

class EvalSplit:
    """Held-out captions, encoded text and real images: the built-in shapes (the held-out scenes train.py
    evaluates on) or the eval split of a directory prepared by `python data.py prepare`."""

    def __init__(self, data, num_samples, caption="long", resolution=32, data_seed=0, text_context=TEXT_CONTEXT):
        self.data, self.caption, self.resolution = data, caption, resolution
        if data == "builtin":
            from data import BuiltinTextEncoder, ShapesDataset
            self.shapes = ShapesDataset(seed=10_000 + data_seed, split="heldout")
            self.encoder = BuiltinTextEncoder(context=text_context)
            self.null = self.encoder([""])
            return
        from data import PreparedDataset
        self.prepared = PreparedDataset(data, "eval")
        if num_samples > len(self.prepared):
            raise ValueError(f"{data} has {len(self.prepared)} held-out samples, fewer than {num_samples}: "
                             f"lower --num-samples")
        null = torch.from_numpy(np.load(os.path.join(data, "null_txt.npy"))).view(torch.bfloat16).float()[None]
        self.null = null, torch.ones(null.shape[:2], dtype=torch.bool)  # (1, L0, D), (1, L0)

    def rows(self, indices):
        return map(self.prepared.locate, indices)  # (shard, row) pairs

    def scenes(self, indices):  # built-in: what the caption checker looks for
        return [self.shapes.scene(i) for i in indices]

    def captions(self, indices):
        if self.data == "builtin":
            from data import long_caption, short_caption
            return [(long_caption if self.caption == "long" else short_caption)(s) for s in self.scenes(indices)]
        return [shard.string(f"caption_{self.caption}", row) for shard, row in self.rows(indices)]

    def encode(self, indices):
        """-> txt (B, L, D) float32, mask (B, L) bool."""
        if self.data == "builtin":
            return self.encoder(self.captions(indices))
        from data import batch_text
        txt, mask = batch_text([shard.ragged(f"txt_{self.caption}", row) for shard, row in self.rows(indices)])
        return txt.float(), mask

    def images(self, indices):
        """-> uint8 (B, 3, R, R)."""
        if self.data == "builtin":
            from data import render
            images = np.stack([render(s, self.resolution) for s in self.scenes(indices)])  # (B, R, R, 3)
            return torch.from_numpy(images).permute(0, 3, 1, 2)
        return torch.from_numpy(np.stack([shard.arrays["image"][row] for shard, row in self.rows(indices)]))


def load_checkpoint(path, weights="ema"):
    """A run folder (its latest checkpoint) or <run>/checkpoints/step_N -> (model, the run's train args, folder)."""
    from safetensors.torch import load_file
    from model import PRX, PRXConfig
    from train import list_checkpoints
    run = path if os.path.exists(os.path.join(path, "config.json")) else os.path.dirname(os.path.dirname(path))
    if not os.path.exists(os.path.join(run, "config.json")):
        raise FileNotFoundError(f"--ckpt {path}: expected a run folder with config.json or <run>/checkpoints/step_N")
    ckpt = path if run != path else (list_checkpoints(run) or [None])[-1]
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoints/step_N folder yet")
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    model = PRX(PRXConfig(**config["model"]))
    file = os.path.join(ckpt, "ema.safetensors")
    if weights != "ema" or not os.path.exists(file):
        file = os.path.join(ckpt, "model.safetensors")
    model.load_state_dict(load_file(file))
    print(f"loaded {file}")
    return model.eval().requires_grad_(False), config["args"], ckpt


def load_decoder(cfg, data, resolution, device):
    """-> (shape of x0, decode: x0 -> uint8 images): pixel models directly, latent models through the data's VAE."""
    if cfg.in_channels == 3:
        return (3, resolution, resolution), to_uint8
    from data import denormalize_latent, load_vae
    with open(os.path.join(data, "index.json")) as f:
        index = json.load(f)
    vae, shift, scale = load_vae(index["settings"]["vae"], index["settings"].get("vae_path"), device)
    decode = lambda z: to_uint8(vae.decode(denormalize_latent(z, shift, scale).to(vae.dtype)).sample.float())
    return tuple(index["schema"]["latent"]["shape"]), decode


def my_batches(num_samples, batch_size):
    """This rank's indices of 0..num_samples-1 (every world-th), in batches."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    mine = range(rank, num_samples, world)
    return tqdm([mine[i:i + batch_size] for i in range(0, len(mine), batch_size)], disable=rank != 0, unit="batch")


@torch.no_grad()
def evaluate(model, split, num_samples, shape, decode=to_uint8, metrics=None, check_captions=False, seed=42,
             batch_size=32, grid=None, **sampling):
    """Sample held-out prompts 0..num_samples-1 (sample i from the noise of seed + i), score the images.
    metrics: a Metrics (reset here) or None; check_captions: the built-in data's caption checker; grid: a PNG of
    the first batch. sampling: steps, cfg, shift, pred, self_guidance, route_ratio (see sample)."""
    device = next(model.parameters()).device
    if metrics is not None:
        metrics.reset()
    null_txt, null_mask = (t.to(device) for t in split.null)
    found = torch.zeros(3, dtype=torch.float64, device=device)  # caption checker: full, colour + region, images
    for i, idx in enumerate(my_batches(num_samples, batch_size)):
        txt, mask = split.encode(idx)
        x = sample(model, txt.to(device), mask.to(device), null_txt, null_mask, [seed + j for j in idx], shape,
                   **sampling)
        images = decode(x)  # (B, 3, R, R) uint8
        if metrics is not None:
            metrics.update(images)
        if check_captions:
            acc = caption_accuracy(images.permute(0, 2, 3, 1).cpu().numpy(), split.scenes(idx))
            found += len(idx) * torch.tensor([acc["full"], acc["color_region"], 1.0], dtype=torch.float64,
                                             device=device)
        if i == 0 and grid and (not distributed() or dist.get_rank() == 0):
            save_grid(images[:64], split.captions(idx[:64]), grid)
    result = metrics.compute() if metrics is not None else {}
    if check_captions:
        full, color_region, n = all_reduce(found).tolist()
        result.update(caption_accuracy=full / n, color_region_accuracy=color_region / n)
    return result


# ----------------------------------------------------------------------------------------------------------
# Caption checker for the built-in shapes dataset: reads a generated image and says, for each object its caption
# names, whether an object of that colour, kind and region is there.
# 
# Each pixel takes the nearest palette colour (object and background colours) if it is within MAX_COLOR_DISTANCE;
# the pixels of the named colour are split into connected components; a component counts if its centroid lies in
# the named cell, its area is plausible for a shape at this resolution, it holds at least half of the cell's
# object-coloured pixels, and its mask, stretched to a common box, overlaps one of the four shape templates well.
# Its kind is the template it overlaps most.

PALETTE_NAMES = list(COLORS) + list(BACKGROUNDS)
PALETTE = np.array([*COLORS.values(), *BACKGROUNDS.values()], dtype=np.float32)  # (P, 3)
MAX_COLOR_DISTANCE = 100.0  # further than this from every palette colour, a pixel is no colour at all
MIN_SHAPE_IOU = 0.5         # below this overlap with every template the component is not a shape (noise, smear)
TEMPLATE_SIZE = 16          # masks and templates are compared on a 16x16 grid after aligning bounding boxes
# Plausible area, in units of a grid cell's area: from 0.3x the smallest shape (small triangle, half its box)
# to 1.5x the largest (large square, its whole box; pixel rounding at 32 px adds up to 30%).
MIN_AREA = 0.3 * 0.5 * min(SIZES.values()) ** 2
MAX_AREA = 1.5 * max(SIZES.values()) ** 2


def shape_template(shape):
    """(TEMPLATE_SIZE, TEMPLATE_SIZE) float coverage of `shape` filling the whole box, antialiased."""
    big = 4 * TEMPLATE_SIZE
    image = Image.new("L", (big, big), 0)
    draw_shape(ImageDraw.Draw(image), shape, big / 2, big / 2, big / 2, 255)
    return np.asarray(image.reduce(4), dtype=np.float32) / 255


TEMPLATES = np.stack([shape_template(s) for s in SHAPES])  # (4, T, T)


def color_labels(image):
    """(H, W) index into PALETTE_NAMES of each pixel's nearest palette colour, -1 where none is close enough."""
    distance = np.linalg.norm(image[:, :, None, :].astype(np.float32) - PALETTE, axis=-1)  # (H, W, P)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > MAX_COLOR_DISTANCE] = -1
    return labels


def template_overlaps(mask):
    """Soft IoU of a component's boolean mask, stretched to the template box, with each template: (4,)."""
    stretched = Image.fromarray(mask.astype(np.float32), "F").resize((TEMPLATE_SIZE, TEMPLATE_SIZE),
                                                                      Image.BILINEAR)
    stretched = np.clip(np.asarray(stretched), 0, 1)
    return np.minimum(stretched, TEMPLATES).sum((1, 2)) / np.maximum(stretched, TEMPLATES).sum((1, 2))


def kinds_in_cell(labels, color, region):
    """Kinds of the shape-like components of `color` centred in `region` that hold at least half of the
    object-coloured pixels of that cell (an image sprayed with coloured specks names nothing)."""
    H, W = labels.shape
    row, col = divmod(REGIONS.index(region), 3)
    cell = labels[row * H // 3:(row + 1) * H // 3, col * W // 3:(col + 1) * W // 3]
    object_pixels = np.count_nonzero((cell >= 0) & (cell < len(COLORS)))
    components, _ = ndimage.label(labels == PALETTE_NAMES.index(color))
    kinds = []
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        mask = components[box] == k
        area = mask.sum()
        if not MIN_AREA <= area / (H * W / 9) <= MAX_AREA or area < object_pixels / 2:
            continue
        ys, xs = np.nonzero(mask)
        cy, cx = box[0].start + ys.mean() + 0.5, box[1].start + xs.mean() + 0.5  # centroid, in pixels
        if (min(int(3 * cy / H), 2), min(int(3 * cx / W), 2)) != (row, col):
            continue
        overlaps = template_overlaps(mask)
        if overlaps.max() >= MIN_SHAPE_IOU:
            kinds.append(SHAPES[overlaps.argmax()])
    return kinds


def check_scene(image, objects):
    """image uint8 (H, W, 3); objects: the SceneObjects its caption names.
    -> one dict per object: {"full": colour, kind and region found, "color_region": colour and region found}."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"image must be a uint8 numpy array (H, W, 3), got {type(image).__name__} "
                         f"{getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}; from a [-1, 1] tensor x "
                         f"(3, H, W) use ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()")
    labels = color_labels(image)
    results = []
    for o in objects:
        kinds = kinds_in_cell(labels, o.color, o.region)
        results.append({"full": o.shape in kinds, "color_region": len(kinds) > 0})
    return results


def caption_accuracy(images, scenes):
    """Fraction of images in which every named object is found: {"full": colour + kind + region,
    "color_region": ignoring kind}. images: uint8 (B, H, W, 3) array or a list of (H, W, 3) arrays."""
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; pass one scene per image")
    results = [check_scene(image, scene.objects) for image, scene in zip(images, scenes)]
    return {key: float(np.mean([all(r[key] for r in rs) for rs in results])) for key in ("full", "color_region")}


# ----------------------------------------------------------------------------------------------------------
# Command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="eval", choices=["eval", "ref"],
                   help="eval: sample a checkpoint and score it; ref: reference statistics of the real images")
    g = p.add_argument_group("what")
    g.add_argument("--ckpt", help="run folder (its latest checkpoint) or <run>/checkpoints/step_N")
    g.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA weights when the run has them")
    g.add_argument("--ref", help="reference statistics (.npz) from `python eval.py ref`")
    g.add_argument("--data", help="'builtin' or a prepared directory (eval: default the run's --data)")
    g.add_argument("--caption", choices=["long", "short"], help="caption field (default the run's --captions)")
    g.add_argument("--resolution", type=int, default=32, help="ref on the built-in data: image side")
    g.add_argument("--out", help="ref: the .npz to write; eval: the JSON (default <checkpoint>/eval.json)")
    g.add_argument("--num-samples", type=int, default=10_000, help="held-out prompts / reference images")
    g.add_argument("--metrics", help="comma-separated from fid,cmmd,dino_mmd,caption "
                                     "(default fid,cmmd,dino_mmd; caption on the built-in data)")
    g.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    g = p.add_argument_group("sampling (defaults: the run's own evaluation settings)")
    g.add_argument("--steps", type=int, help="Euler steps (PRX: 50)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale (PRX: 3.5)")
    g.add_argument("--self-guidance", type=float, default=0.0, help="TREAD self-guidance weight (0 = off)")
    g.add_argument("--seed", type=int, default=42, help="sample i starts from the noise of seed + i")
    g = p.add_argument_group("metric networks (offline machines: local copies)")
    g.add_argument("--fid-weights", help="weights-inception-2015-12-05-6726825d.pth (default: downloaded)")
    g.add_argument("--clip", default=CLIP_ID, help="CLIP hub id or local folder")
    g.add_argument("--dino-weights", help=f"model.safetensors of timm/{DINO_ID} (default: downloaded)")
    p.add_argument("--bench", action="store_true", help="images/s of sampling and of each feature extractor")
    p.add_argument("--bench-model", help="PRX preset to sample with (default: small on GPU, tiny-pixel on CPU)")
    return p.parse_args(argv)


def build_metrics(args, names, device):
    if not set(names) - {"caption"}:
        return None
    dino = load_dino(pretrained_cfg_overlay=dict(file=args.dino_weights)) if args.dino_weights else DINO_ID
    return Metrics(args.ref, [m for m in names if m != "caption"], args.fid_weights, args.clip, dino, device)


def make_reference(args, device):
    if not (args.data and args.out):
        raise SystemExit("error: ref needs --data (builtin or a prepared directory) and --out <file>.npz")
    split = EvalSplit(args.data, args.num_samples, resolution=args.resolution)
    metrics = build_metrics(args, (args.metrics or ",".join(FEATURE_METRICS)).split(","), device)
    for idx in my_batches(args.num_samples, args.batch_size):
        metrics.update(split.images(idx))
    metrics.save_reference(args.out)
    print(f"wrote {args.out}: {args.num_samples} images, {json.dumps(metrics.settings)}")


def main(argv=None):
    args = get_args(argv)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.bench:
        return bench(args, device)
    if args.command == "ref":
        return make_reference(args, device)
    if not args.ckpt:
        raise SystemExit("error: pass --ckpt <run or checkpoint> (or `ref`, or --bench)")

    model, run, ckpt = load_checkpoint(args.ckpt, args.weights)
    model.to(device)
    data = args.data or run["data"]
    names = (args.metrics or ("caption" if data == "builtin" else ",".join(FEATURE_METRICS))).split(",")
    if "caption" in names and data != "builtin":
        raise SystemExit("error: the caption checker reads the built-in shapes only (--data builtin)")
    if set(names) - {"caption"} and not args.ref:
        raise SystemExit(f"error: {names} need reference statistics: --ref ref.npz (from `python eval.py ref`)")
    metrics = build_metrics(args, names, device)
    if metrics is not None:
        metrics.check_reference(args.num_samples, run["resolution"])  # before sampling, not after
    split = EvalSplit(data, args.num_samples, args.caption or run["captions"], run["resolution"], run["seed"],
                      run.get("text_context", 0))  # runs from before the flag trained without context
    shape, decode = load_decoder(model.cfg, data, run["resolution"], device)
    sampling = dict(steps=args.steps or run.get("sample_steps", 50), cfg=run.get("cfg", 3.5) if args.cfg is None
                    else args.cfg, shift=run["shift"], pred=run["pred"], self_guidance=args.self_guidance,
                    route_ratio=run.get("route_ratio") or (0.75 if run.get("sprint") else 0.5))
    result = evaluate(model, split, args.num_samples, shape, decode, metrics, "caption" in names, args.seed,
                      args.batch_size, os.path.join(ckpt, "eval_samples.png"), **sampling)
    if not distributed() or dist.get_rank() == 0:
        out = args.out or os.path.join(ckpt, "eval.json")
        with open(out, "w") as f:
            json.dump({"metrics": result, "num_samples": args.num_samples, "seed": args.seed, "ref": args.ref,
                       "sampling": sampling, "settings": metrics.settings if metrics else {}}, f, indent=2)
        print(" | ".join(f"{k} {v:.4f}" for k, v in result.items()) + f" -> {out}")


# ----------------------------------------------------------------------------------------------------------
# Benchmark. Without the real weights the networks are randomly initialised with the real architectures (speed
# does not depend on the weights), and the output says so.

def images_per_second(fn, n):
    """n / seconds of one call of fn, after one untimed warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # wait for the GPU before reading the clock
    return n / (time.perf_counter() - start)


@torch.no_grad()
def bench(args, device):
    import tempfile
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from model import PRX
    on_gpu = device.type == "cuda"
    B = args.batch_size if on_gpu else 2
    images = torch.randint(0, 256, (B, 3, 256, 256), dtype=torch.uint8)
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}, batch {B}, 256 px uint8 images")
    weights = args.fid_weights or os.path.join(tempfile.mkdtemp(), "random-inception.pth")
    if not args.fid_weights:
        write_random_inception_weights(weights)
    inception = load_inception(weights).to(device)
    print(f"inception-v3-compat ({'real weights' if args.fid_weights else 'random init, real architecture'}): "
          f"{images_per_second(lambda: inception_features(inception, images), B):.2f} img/s")
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(  # openai/clip-vit-large-patch14-336's config.json
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=336, projection_dim=768, hidden_act="quick_gelu")).to(device).eval()
    print(f"CLIP ViT-L/14-336 (random init, real architecture): "
          f"{images_per_second(lambda: clip_features(clip, images), B):.2f} img/s")
    dino = load_dino(pretrained=False).to(device)
    print(f"DINOv2 ViT-L/14-reg4 at 518 px (random init, real architecture): "
          f"{images_per_second(lambda: dino_features(dino, images), B):.2f} img/s")
    emb = F.normalize(torch.randn(4096, 768, device=device), dim=-1)
    chunked = 1 / images_per_second(lambda: mmd(emb[:2048], emb[2048:], chunk=256), 1)
    whole = 1 / images_per_second(lambda: mmd(emb[:2048], emb[2048:], chunk=2048), 1)
    print(f"MMD of 2048 against 2048 embeddings: {chunked:.2f} s in 256-row chunks; baseline one block {whole:.2f} s")

    preset = args.bench_model or ("small" if on_gpu else "tiny-pixel")
    model = PRX.from_preset(preset).to(device).eval()
    shape = (model.cfg.in_channels, 32, 32)  # tiny-pixel: 32 px images; latent presets: 32x32 latents of 256 px
    txt = torch.randn(B, 64, model.cfg.context_dim, device=device)
    mask = torch.ones(B, 64, dtype=torch.bool, device=device)
    steps = args.steps or 50
    rate = images_per_second(lambda: sample(model, txt, mask, txt[:1, :1], mask[:1, :1], list(range(B)), shape,
                                            steps=steps, cfg=3.5), B)
    print(f"sampling PRX {preset} (random init) {shape}, {steps} Euler steps, CFG 3.5: {rate:.3f} img/s")


if __name__ == "__main__":
    main()
