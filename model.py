"""
The PRX transformer (Photoroom, 2025), exact to the published architecture and to diffusers'
`PRXTransformer2DModel` (same parameter names, same outputs), plus TREAD/SPRINT token routing and a REPA hook.

Only image tokens make queries; they attend to [text K/V, image K/V]. Text embeddings are projected once by
`txt_in` and each block computes its own text K/V from them: text tokens are never updated.

    python model.py           # parameter count of every preset
    python bench.py model     # forward+backward time against diffusers' PRXTransformer2DModel, and FLOPs
"""

import argparse
import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


@dataclass
class PRXConfig:
    in_channels: int = 16        # 16 for the Flux VAE latent, 3 for pixel space
    patch_size: int = 2
    context_dim: int = 2304      # T5Gemma-2B encoder width
    hidden_size: int = 1792
    depth: int = 16
    num_heads: int = 28
    mlp_ratio: float = 3.5
    axes_dim: tuple = (32, 32)   # RoPE dims for (row, col); sums to the head dim
    theta: int = 10000
    bottleneck_size: int = None  # pixel space: patch -> bottleneck -> hidden (JiT)
    route_start: int = None      # TREAD/SPRINT: routed tokens skip blocks route_start..route_end (inclusive, as PRX)
    route_end: int = None        # default: PRX's 2..12 of 16 blocks, scaled to the depth
    sprint: bool = False         # SPRINT: mask token + Linear(2h -> h) fusion after the sparse middle
    resolution_embeds: bool = False  # the input's (H, W) embedded and added to the timestep vector (PRX-7B)

    def __post_init__(self):
        self.axes_dim = tuple(self.axes_dim)
        # PRX routes blocks 2..12 of 16: dense blocks on both sides (the routed tokens re-enter before the last ones)
        if self.route_start is None:
            self.route_start = max(0, min(self.depth - 2, max(1, self.depth // 8)))
        if self.route_end is None:
            self.route_end = max(self.route_start, min(self.depth - 2, self.depth * 3 // 4))


PRESETS = {
    # CPU tests and the built-in dataset (see train.py for the tuned CPU-track settings)
    "tiny": dict(hidden_size=128, depth=4, num_heads=2, context_dim=64),
    "small": dict(),  # PRX 1.2B: diffusers' PRXTransformer2DModel defaults
    "base": dict(hidden_size=3584, depth=24, num_heads=28, axes_dim=(64, 64)),
}


def preset_config(name, resolution=256, **overrides):
    """`small`, `base`, `tiny`, or `<name>-pixel`: 3 channels, patch 16 below 512 px / 32 from 512 px, bottleneck 256
    (`tiny-pixel`: patch 4 at any resolution, no bottleneck)."""
    base, pixel = name.removesuffix("-pixel"), name.endswith("-pixel")
    if base not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS) + [p + '-pixel' for p in PRESETS]}")
    cfg = dict(PRESETS[base])
    if pixel and base == "tiny":  # 32 px images: patch 4 -> 8x8 tokens; the patch (48 values) needs no bottleneck
        cfg.update(in_channels=3, patch_size=4)
    elif pixel:
        cfg.update(in_channels=3, patch_size=16 if resolution < 512 else 32, bottleneck_size=256)
    cfg.update(overrides)
    return PRXConfig(**cfg)


# ----------------------------------------------------------------------------------------------------------
# Pieces

def timestep_embedding(t, dim=256, time_factor=1000.0, max_period=10000):
    """Sinusoidal embedding of t * 1000, cos first then sin (Flux/PRX); same op order as diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None] * time_factor  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


MAX_POSITIONS = 1024  # RoPE table rows: tokens per image side


def rope_table(axes_dim, theta):
    """Flux-style axial RoPE angles pos * omega, omega = 1/theta^(arange(0, d, 2)/d) per axis, for every position
    < MAX_POSITIONS, as the per-channel factors of apply_rope: cos (MAX_POSITIONS, head_dim) with each angle's cos
    twice, sin with (-sin, +sin) per pair; columns [axis 0 (row) | axis 1 (col)]. Computed once in float64
    (as diffusers) so the graph only indexes it: recomputing cos/sin per block is slow."""
    pos = torch.arange(MAX_POSITIONS, dtype=torch.float64)
    angles = torch.cat([pos[:, None] / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes_dim], 1)
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    return cos.repeat_interleave(2, dim=1), torch.stack([-sin, sin], dim=2).flatten(1)


def rope_at(table, rows, cols, axes_dim):
    """The table's factors for tokens at grid positions (rows, cols) of any shape: (..., head_dim)."""
    return torch.cat([table[rows, :axes_dim[0]], table[cols, axes_dim[0]:]], dim=-1)


def rope_for_grid(table, h, w, axes_dim, device):
    """Rows of the table for an h x w token grid, row-major: (N, head_dim)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    return rope_at(table, rows, torch.arange(w, device=device).repeat(h), axes_dim)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, N, H, D) by their angles: (x0 cos - x1 sin, x1 cos + x0 sin),
    written as x * cos + swap_pairs(x) * sin with the tables of rope_table (., N, 1, D): elementwise, which
    compiles to vectorised loops (indexing the pair halves does not). fp32."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (x32 * cos + swapped * sin).to(x.dtype)


GELU_TANH_2C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x):
    """GELU, tanh approximation (PRX's MLP): 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi).
    Compiled, it is written as x * sigmoid(2c (x + 0.044715 x^3)) (same function: 0.5 (1 + tanh z) = sigmoid(2z)):
    inductor's CPU code evaluates exp faster than tanh, forward and backward. Eager keeps the one fused kernel."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(GELU_TANH_2C * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class MLPEmbedder(nn.Module):
    """Linear(256 -> h), SiLU, Linear(h -> h): PRX's MLPEmbedder, with diffusers' parameter names."""

    def __init__(self, hidden):
        super().__init__()
        self.in_layer = nn.Linear(256, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class TimeEmbedder(MLPEmbedder):
    def forward(self, t):
        return super().forward(timestep_embedding(t))


class ResolutionEmbedder(nn.Module):
    """The input's (H, W), in pixels or latent cells, as a vector added to the timestep's (PRX
    prx/algorithm/resolution_aware.py, mode "vec"; diffusers PRXResolutionEmbedder): 128 sinusoids of H and of W
    (time factor 1), concatenated, through an MLP."""

    def __init__(self, hidden):
        super().__init__()
        self.mlp = MLPEmbedder(hidden)

    def forward(self, B, H, W, device):
        h, w = (timestep_embedding(torch.full((B,), float(n), device=device), 128, time_factor=1.0) for n in (H, W))
        return self.mlp(torch.cat([h, w], dim=-1))


class Modulation(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.lin = nn.Linear(hidden, 6 * hidden)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(6, dim=-1)  # 6 x (B, 1, h)


class Attention(nn.Module):
    """Image queries over [text K/V, image K/V]; per-head RMSNorm on q, k and text k; RoPE on image q, k only."""
    # the CPU's fused attention has no fast bf16 backward (slower than its fp32 one even where bf16 matmuls are
    # faster): under bf16 autocast it runs in fp32 there. bench.py's memory count turns this off to count what CUDA
    # saves, whose attention runs in bf16.
    fp32_on_cpu = True

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.img_qkv_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.txt_kv_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.norm_q = RMSNorm(self.head_dim)
        self.norm_k = RMSNorm(self.head_dim)
        self.norm_added_k = RMSNorm(self.head_dim)
        self.to_out = nn.ModuleList([nn.Linear(hidden, hidden, bias=False)])  # ModuleList: diffusers' key names

    def forward(self, x, txt, cos, sin, attn_mask):
        B, N, _ = x.shape
        L = txt.shape[1]
        q, k, v = self.img_qkv_proj(x).view(B, N, 3, self.heads, self.head_dim).unbind(2)  # (B, N, H, d)
        tk, tv = self.txt_kv_proj(txt).view(B, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, L, d)
        # norm and RoPE in the (B, N, H, d) layout of the projection: channels stay contiguous, which keeps the
        # compiled backward (the RMSNorm weight gradient, a reduction over B, N, H) vectorised on CPU
        q = apply_rope(self.norm_q(q), cos, sin).transpose(1, 2)  # (B, H, N, d)
        k = apply_rope(self.norm_k(k), cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        k = torch.cat([self.norm_added_k(tk), k], dim=2)  # (B, H, L + N, d), text first
        v = torch.cat([tv, v], dim=2)
        if self.fp32_on_cpu and q.device.type == "cpu" and q.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):  # else autocast would cast it back to bf16
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, d)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.attention = Attention(hidden, heads)
        self.gate_proj = nn.Linear(hidden, mlp_hidden, bias=False)
        self.up_proj = nn.Linear(hidden, mlp_hidden, bias=False)
        self.down_proj = nn.Linear(mlp_hidden, hidden, bias=False)
        self.modulation = Modulation(hidden)

    def forward(self, img, txt, vec, cos, sin, attn_mask):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(vec)
        # norms in fp32 (PRX): CUDA's autocast upcasts layer_norm itself, the CPU's would keep bf16
        x = (1 + scale_a) * F.layer_norm(img.float(), img.shape[-1:], eps=1e-6) + shift_a
        img = img + gate_a * self.attention(x, txt, cos, sin, attn_mask)
        x = (1 + scale_m) * F.layer_norm(img.float(), img.shape[-1:], eps=1e-6) + shift_m
        return img + gate_m * self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden, out_dim):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, img, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * F.layer_norm(img.float(), img.shape[-1:], eps=1e-6) + shift)


def trim_text(txt, txt_mask):
    """Cut the batch's text to its longest real caption; drop the mask when nothing is padded (SDPA's fast path).
    Eager only (data-dependent shapes): compiled callers run it before the compiled model. With a mask, both come
    back as new contiguous tensors, cut or not (without one, the text as given): a compiled model guards on strides
    and on whether an input is a view, and a batch that differs there from the warm-up's compiles once more, inside
    the timed run. The two lengths are read in one transfer: each read waits for the device, idle until the next
    micro-batch's kernels are queued."""
    if txt_mask is None:
        return txt, None
    columns = torch.arange(1, txt_mask.shape[1] + 1, device=txt_mask.device)  # (L,)
    last_used = F.pad(columns * txt_mask.any(0), (1, 0)).max()  # the last column any caption uses (left-padded too)
    leading_full = txt_mask.all(0).cumprod(0).sum()  # how many leading columns every caption uses
    longest, full = torch.stack([last_used, leading_full]).tolist()
    txt, txt_mask = txt[:, :longest].clone(), txt_mask[:, :longest].clone()  # clone: dense, and not a view
    return (txt, None) if full >= longest else (txt, txt_mask)


def attention_mask(txt_mask, num_img):
    """Boolean key mask (B, 1, 1, L + N), broadcast over heads and queries; built once per token count."""
    img_ok = torch.ones(txt_mask.shape[0], num_img, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([txt_mask, img_ok], dim=1)[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------
# The model

# PRXConfig's fields -> their names in diffusers' PRXTransformer2DModel config (whose defaults are ours)
DIFFUSERS_NAMES = {name: {"context_dim": "context_in_dim"}.get(name, name) for name in (
    "in_channels", "patch_size", "context_dim", "hidden_size", "mlp_ratio", "num_heads", "depth", "axes_dim", "theta",
    "bottleneck_size", "resolution_embeds")}


class PRX(nn.Module):
    def __init__(self, cfg: PRXConfig):
        super().__init__()
        h, p = cfg.hidden_size, cfg.patch_size
        if h % cfg.num_heads or sum(cfg.axes_dim) != h // cfg.num_heads:
            raise ValueError(f"hidden_size {h} / num_heads {cfg.num_heads} must give a head dim equal to "
                             f"sum(axes_dim) = {sum(cfg.axes_dim)}")
        if cfg.route_start < 0 or cfg.route_end >= cfg.depth or cfg.route_start > cfg.route_end:
            raise ValueError(f"need 0 <= route_start <= route_end < depth, got {cfg.route_start}, {cfg.route_end}, "
                             f"depth {cfg.depth}")
        self.cfg = cfg
        patch_dim = cfg.in_channels * p * p
        if cfg.bottleneck_size:
            self.img_in = nn.Sequential(nn.Linear(patch_dim, cfg.bottleneck_size), nn.Linear(cfg.bottleneck_size, h))
        else:
            self.img_in = nn.Linear(patch_dim, h)
        self.txt_in = nn.Linear(cfg.context_dim, h)
        self.time_in = TimeEmbedder(h)
        if cfg.resolution_embeds:
            self.resolution_embedder = ResolutionEmbedder(h)
        self.blocks = nn.ModuleList(Block(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(h, patch_dim)
        rope_cos, rope_sin = rope_table(cfg.axes_dim, cfg.theta)
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # not in checkpoints: derived from the config
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        if cfg.sprint:  # SPRINT (Park et al. 2025): dropped positions get a learnable token, then fuse dense || deep
            self.sprint_mask_token = nn.Parameter(torch.zeros(1, 1, h))
            self.sprint_fuse = nn.Linear(2 * h, h)
        self.initialize_weights()

    def initialize_weights(self):
        # Linear layers keep torch's default init, as PRX; modulation and output layers start at zero (DiT adaLN-Zero)
        final = self.final_layer
        for layer in [block.modulation.lin for block in self.blocks] + [final.adaLN_modulation[1], final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name, resolution=256, **overrides):
        return cls(preset_config(name, resolution, **overrides))

    def check_inputs(self, x, t, txt, txt_mask, route_ratio, repa_layer):
        cfg, p = self.cfg, self.cfg.patch_size
        if not 0 <= route_ratio < 1:
            raise ValueError(f"route_ratio must be in [0, 1) (the share of image tokens routed), got {route_ratio}")
        if repa_layer is not None and not 0 <= repa_layer < cfg.depth:
            raise ValueError(f"repa_layer must be a block index in [0, {cfg.depth}), got {repa_layer}")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W] with H and W divisible by the patch size {p}, "
                             f"got {list(x.shape)}")
        if max(x.shape[2], x.shape[3]) // p > MAX_POSITIONS:
            raise ValueError(f"{x.shape[2] // p}x{x.shape[3] // p} tokens exceed the RoPE table ({MAX_POSITIONS} per "
                             f"side): raise MAX_POSITIONS")
        B = x.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must be [B] = [{B}] floats in [0, 1], got shape {list(t.shape)}")
        if txt.dim() != 3 or txt.shape[0] != B or txt.shape[2] != cfg.context_dim:
            raise ValueError(f"txt must be [B, L, context_dim] = [{B}, L, {cfg.context_dim}], got {list(txt.shape)}")
        if txt_mask is not None and txt_mask.shape != txt.shape[:2]:
            raise ValueError(f"txt_mask must be [B, L] = {list(txt.shape[:2])} (True = real token), "
                             f"got {list(txt_mask.shape)}")

    def forward(self, x, t, txt, txt_mask=None, route_ratio=0.0, repa_layer=None, route_scores=None):
        """x (B, C, H, W), t (B,) in [0, 1] with 1 = noise, txt (B, L, context_dim), txt_mask (B, L) bool.
        route_ratio > 0 routes that fraction of image tokens around blocks route_start..route_end (training);
        each sample keeps its lowest-scoring tokens, route_scores (B, H/p * W/p), drawn uniformly when None.
        repa_layer=i also returns the image tokens after block i and their positions (None = all tokens)."""
        cfg, p = self.cfg, self.cfg.patch_size
        self.check_inputs(x, t, txt, txt_mask, route_ratio, repa_layer)
        txt_mask = None if txt_mask is None else txt_mask.bool()  # tokenizers give 0/1 integers (diffusers: the same)
        if not torch.compiler.is_compiling():
            txt, txt_mask = trim_text(txt, txt_mask)
        B, C, H, W = x.shape
        h, w = H // p, W // p
        if route_scores is not None and route_scores.shape != (B, h * w):
            raise ValueError(f"route_scores must be [B, H/p * W/p] = [{B}, {h * w}] (one score per image token), "
                             f"got {list(route_scores.shape)}")

        # patchify, channel-major (c, ph, pw) layout as diffusers' img2seq
        img = x.view(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        img = self.img_in(img)                  # (B, N, hidden)
        txt = self.txt_in(txt)                  # (B, L, hidden)
        vec = self.time_in(t)                   # (B, hidden)
        if cfg.resolution_embeds:
            vec = vec + self.resolution_embedder(B, H, W, x.device)
        cos = rope_for_grid(self.rope_cos, h, w, cfg.axes_dim, x.device)[None, :, None]  # (1, N, 1, head_dim)
        sin = rope_for_grid(self.rope_sin, h, w, cfg.axes_dim, x.device)[None, :, None]
        attn_mask = None if txt_mask is None else attention_mask(txt_mask, h * w)
        full_rope, full_mask = (cos, sin), attn_mask

        keep_idx, hidden, hidden_idx = None, None, None
        routing = route_ratio > 0 or cfg.sprint
        for i, block in enumerate(self.blocks):
            if routing and i == cfg.route_start:
                # TREAD (Krause et al. 2025): a random subset of tokens per sample goes through the middle blocks;
                # the rest wait here and re-enter unchanged after route_end.
                dense = img
                num_keep = h * w - int(h * w * route_ratio)
                if route_scores is None:
                    route_scores = torch.rand(B, h * w, device=x.device)
                keep_idx = route_scores.argsort(dim=1)[:, :num_keep].sort(dim=1).values
                img = img.gather(1, keep_idx[..., None].expand(-1, -1, img.shape[-1]))  # (B, N_keep, hidden)
                rope_idx = keep_idx[:, :, None, None].expand(-1, -1, 1, cos.shape[-1])
                cos, sin = cos.expand(B, -1, -1, -1).gather(1, rope_idx), sin.expand(B, -1, -1, -1).gather(1, rope_idx)
                attn_mask = None if txt_mask is None else attention_mask(txt_mask, num_keep)
            img = block(img, txt, vec, cos, sin, attn_mask)
            if i == repa_layer:  # under routing, the visible tokens only, route_end's before reinsertion (PRX)
                hidden = img
                hidden_idx = keep_idx if routing and cfg.route_start <= i <= cfg.route_end else None
            if routing and i == cfg.route_end:
                idx = keep_idx[..., None].expand(-1, -1, img.shape[-1])
                if cfg.sprint:
                    deep = self.sprint_mask_token.to(img.dtype).expand(B, h * w, -1).scatter(1, idx, img)
                    img = self.sprint_fuse(torch.cat([dense, deep], dim=-1))
                else:
                    img = dense.scatter(1, idx, img)
                (cos, sin), attn_mask = full_rope, full_mask

        out = self.final_layer(img, vec)  # (B, N, C * p * p)
        out = out.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return out if repa_layer is None else (out, hidden, hidden_idx)

    # ------------------------------------------------------------------------------------------------------
    # diffusers interop: our parameter names are diffusers' names, so a checkpoint is a state dict + config.json

    def diffusers_config(self):
        if self.cfg.sprint:
            raise ValueError("SPRINT adds layers that diffusers' PRXTransformer2DModel does not have; "
                             "train with --tread instead to export")
        config = {theirs: getattr(self.cfg, ours) for ours, theirs in DIFFUSERS_NAMES.items()}
        return {"_class_name": "PRXTransformer2DModel", **config, "axes_dim": list(self.cfg.axes_dim),
                "time_factor": 1000.0, "time_max_period": 10000}

    @classmethod
    def from_diffusers(cls, path, subfolder=None, **overrides):
        """Load a diffusers PRXTransformer2DModel checkpoint: a local folder or a hub id, safetensors single-file or
        sharded; of a pipeline (a Photoroom PRX repo, a folder save_diffusers wrote), its transformer/ by default."""
        if subfolder is None:  # a pipeline's model_index.json: not every network of the repo downloaded, then refused
            from huggingface_hub import file_exists, try_to_load_from_cache
            if os.path.isdir(path):
                pipeline = os.path.exists(os.path.join(path, "model_index.json"))
            else:  # the cache first: offline (HF_HUB_OFFLINE) a cached repository loads
                cached = try_to_load_from_cache(path, "model_index.json")
                pipeline = isinstance(cached, str) or cached is None and file_exists(path, "model_index.json")
            subfolder = "transformer" if pipeline else None
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download
            pattern = f"{subfolder}/*" if subfolder else "*"
            path = snapshot_download(path, allow_patterns=[pattern.replace("*", "*.json"),
                                                           pattern.replace("*", "*.safetensors")])
        folder = os.path.join(path, subfolder) if subfolder else path
        with open(os.path.join(folder, "config.json")) as f:
            dc = json.load(f)
        if dc.get("time_factor", 1000.0) != 1000.0 or dc.get("time_max_period", 10000) != 10000:
            raise ValueError(f"{folder}/config.json uses options this model does not implement "
                             "(time_factor != 1000, time_max_period != 10000)")
        cfg = PRXConfig(**{**{ours: dc[theirs] for ours, theirs in DIFFUSERS_NAMES.items()
                              if dc.get(theirs) is not None}, **overrides})  # absent or null: the default, both's
        index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["diffusion_pytorch_model.safetensors"]
        state = {}
        for name in files:
            state.update(load_file(os.path.join(folder, name)))
        model = cls(cfg)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model

    def save_diffusers(self, folder, shift=1.0, resolution=256, vae=None, text_encoder=None, tokenizer=None,
                       max_tokens=256, max_shard_bytes=10 * 2**30):
        """Write a folder that diffusers' PRXPipeline.from_pretrained(folder) loads: transformer/ (sharded if large),
        scheduler/ (Euler with the run's shift), model_index.json (default image side `resolution`), and vae/,
        text_encoder/, tokenizer/ from the loaded models given: a model_index.json cannot point into another
        repository. Those not given are null there: pass them to PRXPipeline.from_pretrained(folder, vae=...,
        text_encoder=..., tokenizer=...) instead.
        vae: an AutoencoderKL or AutoencoderDC (the pipeline decodes with its scaling and shift factors, tested for
        both); text_encoder: the T5GemmaEncoderModel prepare.py encodes with (its `.model`); max_tokens: the
        tokenizer's model_max_length, to which the pipeline pads and truncates prompts (prepare.py's --max-tokens).
        Latent v-prediction models only: PRXPipeline has no pixel-space or x0 path. eval.py's sample i of a prompt,
        from the folder (tested):

            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
            latents = pipe(prompt, timesteps=eval.diffusers_timesteps(steps, shift), guidance_scale=cfg_scale,
                           generator=torch.Generator().manual_seed(42 + i), height=R, width=R,
                           use_resolution_binning=False, output_type="latent").images

        The shift is 1 there because the pipeline shifts custom timesteps again; with guidance > 1 a list of prompts
        fails (diffusers 0.42); pass tokenizer_max_length=max_tokens to each call."""
        from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel
        if self.cfg.in_channels == 3:
            raise ValueError("PRXPipeline samples latents through a VAE; a pixel-space model has no pipeline to go to "
                             "(PRXPixelPipeline encodes prompts with Qwen3-VL and starts from noise x 2)")
        if hasattr(vae, "bn"):
            raise ValueError("PRXPipeline decodes with a VAE's scaling and shift factors, not FLUX.2's BatchNorm "
                             "statistics: a --vae flux2 run cannot be exported")
        with torch.device("meta"):  # no memory: the weights are ours, assigned below
            transformer = PRXTransformer2DModel.from_config(
                {k: v for k, v in self.diffusers_config().items() if k != "_class_name"})
        transformer.load_state_dict(self.state_dict(), assign=True)
        if tokenizer is not None:  # a copy: the caller's tokenizer keeps its own length
            tokenizer = copy.copy(tokenizer)
            tokenizer.model_max_length = max_tokens
        pipe = PRXPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder, tokenizer, vae,
                           default_sample_size=resolution)
        pipe.save_pretrained(folder, max_shard_size=max_shard_bytes)
        readable_as_umask(folder)


def flops_per_sample(cfg, num_img, num_txt, route_ratio=0.0):
    """Closed-form forward FLOPs (2 per multiply-add) of the matmuls and attention for one sample; with routing
    (TREAD/SPRINT) blocks route_start..route_end see only the kept tokens."""
    h, p, m = cfg.hidden_size, cfg.patch_size, int(cfg.hidden_size * cfg.mlp_ratio)
    patch_dim = cfg.in_channels * p * p
    img_in = patch_dim * cfg.bottleneck_size + cfg.bottleneck_size * h if cfg.bottleneck_size else patch_dim * h

    def block(n):
        return (6 * h * h                    # modulation
                + n * 3 * h * h              # image qkv
                + num_txt * 2 * h * h        # text kv
                + 2 * n * (num_txt + n) * h  # q k^T and attn v
                + n * h * h                  # out projection
                + n * 3 * h * m)             # gated MLP
    routing = route_ratio > 0 or cfg.sprint
    routed = cfg.route_end - cfg.route_start + 1 if routing else 0
    kept = num_img - int(num_img * route_ratio)
    blocks = (cfg.depth - routed) * block(num_img) + routed * block(kept)
    fuse = num_img * 2 * h * h if cfg.sprint else 0
    embedders = (1 + cfg.resolution_embeds) * (256 * h + h * h)  # the timestep's MLP (and the resolution's)
    macs = num_img * img_in + num_txt * cfg.context_dim * h + embedders + blocks + fuse \
        + 2 * h * h + num_img * h * patch_dim
    return 2 * macs


# ----------------------------------------------------------------------------------------------------------
# Runs and checkpoints: <run>/config.json and <run>/checkpoints/step_<N>/ (train.py writes them)

CHECKSUMS = "sha256.json"  # in every checkpoint folder: the sha256 of each of its files, written before the rename
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "trainer.pt", CHECKSUMS)


UMASK = os.umask(0o022)  # read once, at import: setting it back and forth later would race with threads creating files
os.umask(UMASK)


def readable_as_umask(folder):
    """safetensors writes its files 0600: give every file under folder the mode the others get (0666 less the umask),
    so that whoever reads a run's logs on a shared machine reads its weights too."""
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~UMASK)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_checkpoints(run):
    """The whole checkpoints of a run, oldest first. Only this run's history is there: a resume from an older
    checkpoint moves the newer ones aside (train.py), so step order is history order."""
    folder = os.path.join(run, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    steps = sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())
    return [os.path.join(folder, f"step_{s}") for s in steps]


def run_of(ckpt):
    """<run>/checkpoints/step_N -> <run>."""
    return os.path.dirname(os.path.dirname(ckpt))


def step_of(ckpt):
    """<run>/checkpoints/step_N -> N."""
    return int(os.path.basename(ckpt)[5:])


def verify_checkpoint(ckpt):
    """Raise ValueError if the checkpoint's checksums are unreadable or leave out a file of it (its weights always),
    or a file is missing or its bytes differ from the checksum written with it."""
    earlier = [c for c in list_checkpoints(run_of(ckpt)) if step_of(c) < step_of(ckpt)]
    use = f"the previous checkpoint is {earlier[-1]}: pass it to --resume (or --ckpt)" if earlier else \
        "there is no earlier checkpoint"
    try:
        with open(os.path.join(ckpt, CHECKSUMS)) as f:
            expected = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{os.path.join(ckpt, CHECKSUMS)} cannot be read ({e}); {use}")
    present = [n for n in CHECKPOINT_FILES if n != CHECKSUMS and os.path.exists(os.path.join(ckpt, n))]
    if not isinstance(expected, dict) or any(n not in expected for n in ["model.safetensors", *present]):
        raise ValueError(f"{os.path.join(ckpt, CHECKSUMS)} does not list the sha256 of each file of the checkpoint "
                         f"({', '.join(present) or 'no model.safetensors'}): not as train.py wrote it; {use}")
    for name, digest in expected.items():
        path = os.path.join(ckpt, name)
        if not os.path.exists(path):
            raise ValueError(f"{path} is missing (sha256.json lists it); {use}")
        if file_sha256(path) != digest:
            raise ValueError(f"{path} is corrupt (its sha256 differs from the one written with it); {use}")


def read_config(path):
    """A run's config.json or config.resume-S.json -> its dict; a ValueError naming the file where it is not one (cut
    short, edited)."""
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a run's config, cut short or edited?")
    if not isinstance(config, dict) or not {"args", "model", "sampling"} <= config.keys():
        raise ValueError(f"{path} is not a run's config (train.py writes one with args, model and sampling)")
    return config


def resume_configs(run):
    """-> [(config.resume-S.json, S)]: the flags of each resume of the run, from step S."""
    return [(n, int(m[1])) for n in os.listdir(run) if (m := re.fullmatch(r"config\.resume-(\d+)\.json", n))]


def stage_config(run, ckpt):
    """The config file that trained checkpoint step_N: that of the latest resume from a step before N
    (config.resume-S.json; a later stage may change the resolution, data or lr), else config.json. The highest S is
    the latest: a resume from an older checkpoint moves the configs of the history it abandons aside (train.py)."""
    resumes = [(s, os.path.join(run, n)) for n, s in resume_configs(run) if s < step_of(ckpt)]
    return max(resumes, default=(0, os.path.join(run, "config.json")))[1]


def load_run(path, weights=None):
    """A run folder (its latest checkpoint) or <run>/checkpoints/step_N -> (model in eval mode, the config that
    trained the checkpoint (stage_config), the checkpoint folder). The checkpoint's checksums are verified first."""
    path = os.path.normpath(path)  # a trailing slash (tab completion) names the same folder
    run = path if os.path.exists(os.path.join(path, "config.json")) else run_of(path)
    if not os.path.exists(path):
        raise FileNotFoundError("no such folder")
    if not os.path.exists(os.path.join(run, "config.json")):
        raise FileNotFoundError("not a run folder (with config.json) nor a checkpoint <run>/checkpoints/step_N")
    ckpt = path if run != path else (list_checkpoints(run) or [None])[-1]
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoints/step_N folder yet")
    try:
        verify_checkpoint(ckpt)
        config = read_config(stage_config(run, ckpt))
        model = PRX(PRXConfig(**config["model"]))
        model.load_state_dict(load_file(os.path.join(ckpt, weights_file(ckpt, weights))))
    except (FileNotFoundError, ValueError) as e:  # a file gone: a training run's --keep may prune it while it is read
        if os.path.isdir(ckpt):
            raise
        raise FileNotFoundError(f"{ckpt} was removed while being read (the training run's --keep pruned it): pass a "
                                f"checkpoint the run keeps, or rerun") from e
    return model.eval().requires_grad_(False), config, ckpt


def ema_note(decay, every, step):
    """A note where the EMA weights of `step` (train.py's --ema decay, updated every `every` steps; decay 0: none)
    are still mostly the initial weights they started as (PRX's EMA has no warm-up): their share after n updates is
    decay^n. None at a tenth or less."""
    updates = step // every
    share = decay ** updates if decay else 0.0
    return f"note: these EMA weights have had {updates:,} update{'s' * (updates != 1)} (--ema {decay:g} every " \
        f"{every} steps): {share:.0%} of them are still the initial weights; `python eval.py --ckpt CKPT --weights " \
        f"model` reads a checkpoint's trained weights" if share > 0.1 else None


def weights_file(ckpt, weights=None):
    """The file load_run reads: weights "ema" or "model", or None: the EMA's where the checkpoint keeps one."""
    kept = os.path.exists(os.path.join(ckpt, "ema.safetensors"))
    if weights == "ema" and not kept:
        raise FileNotFoundError(f"{ckpt} keeps no EMA weights (its run trained without --ema): use --weights model")
    return "ema.safetensors" if weights == "ema" or weights is None and kept else "model.safetensors"


if __name__ == "__main__":
    argparse.ArgumentParser(description="Print each preset's parameter count and shape.").parse_args()  # no flags
    for name in [n + s for n in PRESETS for s in ("", "-pixel")]:  # parameter count of every preset
        with torch.device("meta"):
            model = PRX.from_preset(name)
        cfg = model.cfg
        print(f"{name:12s} {sum(p.numel() for p in model.parameters()):>14,d} parameters | hidden "
              f"{cfg.hidden_size} depth {cfg.depth} heads {cfg.num_heads} channels {cfg.in_channels} "
              f"patch {cfg.patch_size} bottleneck {cfg.bottleneck_size}")
