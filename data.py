"""
Everything that turns data into tensors.

Built-in dataset: captioned shapes drawn on the fly from (seed, split, index), with a held-out set of
colour-shape pairs that training never sees (compositional generalisation), and a frozen text encoder for the
caption grammar with the interface the real T5Gemma encoder has:
encoder(captions) -> (emb (B, L, D) float32, mask (B, L) bool).

Real datasets: encode once into memory-mapped shards before the clock, then feed the GPUs from them.

    python data.py prepare --out data/mj --source brivangl/midjourney-v6-llava --captions long=llava,short=prompt
    torchrun --nproc-per-node 8 data.py prepare ...     # each rank encodes its own part of the source files
    python data.py --bench /tmp/bench                    # loader samples/s on one core, next to `datasets` (Arrow)

Prepared directory (format "prx-shards/1"):

    index.json                   counts, schema, versions, settings, latent normalisation, skipped ids and reasons
    null_txt.npy                 (L0, D) encoded empty prompt, for caption dropout
    train/shard-r{rank}-{k}/     written as <name>.tmp and renamed when complete: a shard that exists is whole
    eval/shard-r{rank}-{k}/      the held-out split (a seeded hash of the sample id), same layout
        meta.json                count, source position after this shard (for resume), skipped ids
        image.npy                (N, 3, R, R) uint8, centre crop, antialiased bicubic resize
        latent.npy               (N, C, R/8, R/8) bf16 bits, normalised (normalize_latent); absent for --vae none
        txt_{name}.npy           (sum of lengths, D) bf16 bits: T5Gemma tokens of every sample, unpadded, concatenated
        caption_{name}.npy, id.npy   utf-8 bytes, concatenated
        {ragged}_offsets.npy     (N + 1,) int64: sample i is rows offsets[i]:offsets[i + 1] of a ragged array

bf16 is stored as its raw 16 bits in int16 (numpy has no bfloat16): torch.from_numpy(a).view(torch.bfloat16).
Every .npy opens with np.load(mmap_mode="r"); a sample is one slice per field, no decoding.

Loader throughput (--bench: 16x32x32 latent + ~120 tokens x 2304 of text, batch 32, one core of a shared 2-core
VM): 6,400-8,800 samples per CPU second, against 470-1,300 for the same samples read through `datasets`.
"""

import argparse
import collections
import copy
import functools
import glob
import hashlib
import html
import importlib.metadata
import io
import itertools
import json
import math
import os
import re
import resource
import shutil
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------
# Built-in dataset: captioned shapes

# Object colours near six corners of the RGB cube, backgrounds on its black-white diagonal: every two of them
# are >= 150 apart in RGB, so the nearest one still names a generated colour that is ~75 off.
COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 230),
          "yellow": (240, 220, 30), "magenta": (220, 40, 220), "cyan": (30, 210, 220)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "cross")  # four different silhouettes, still apart at 32 px
SIZES = {"small": 0.6, "large": 0.9}                 # extent of a shape as a fraction of its grid cell
REGIONS = ("top left", "top middle", "top right",    # the 3x3 grid of cells, row-major
           "middle left", "center", "middle right",
           "bottom left", "bottom middle", "bottom right")
# Never drawn in training; each of these colours and shapes still appears with its other partners.
HELDOUT_PAIRS = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
TRAIN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
SPLITS = ("train", "heldout")
SUPERSAMPLE = 4  # draw at 4x the resolution, then box-filter down: antialiased edges


@dataclass
class SceneObject:
    color: str
    shape: str
    size: str
    region: str
    x: float  # centre, as a fraction of the image width
    y: float  # centre, as a fraction of the image height


@dataclass
class Scene:
    background: str
    objects: list  # of SceneObject, in reading order of their regions


def sample_scene(rng, split="train"):
    """One or two objects of different colours in different cells. Training scenes use only TRAIN_PAIRS;
    held-out scenes contain one of HELDOUT_PAIRS (and maybe a training pair)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    first = HELDOUT_PAIRS if split == "heldout" else TRAIN_PAIRS
    pairs = [first[rng.integers(len(first))]]
    if rng.integers(2):  # different colours: two same-coloured shapes in touching cells would read as one blob
        others = [p for p in TRAIN_PAIRS if p[0] != pairs[0][0]]
        pairs.append(others[rng.integers(len(others))])
    cells = rng.choice(len(REGIONS), size=len(pairs), replace=False).tolist()
    objects = []
    for cell, (color, shape) in sorted(zip(cells, pairs)):
        size = list(SIZES)[rng.integers(len(SIZES))]
        slack = (1 - SIZES[size]) / 2  # jitter keeps the shape inside its cell, so two objects never overlap
        row, col = divmod(cell, 3)
        x, y = (col + 0.5 + rng.uniform(-slack, slack)) / 3, (row + 0.5 + rng.uniform(-slack, slack)) / 3
        objects.append(SceneObject(color, shape, size, REGIONS[cell], x, y))
    return Scene(list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], objects)


def draw_shape(draw, shape, cx, cy, r, fill):
    """Draw `shape` filling the square box of half-side r centred at (cx, cy), in pixels."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":  # arms a third of the box wide: thicker ones read as a circle at 32 px
        a = r / 3
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render(scene, resolution=32):
    """The scene as uint8 (resolution, resolution, 3)."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        draw_shape(draw, o.shape, o.x * big, o.y * big, SIZES[o.size] * big / 6, COLORS[o.color])
    return np.asarray(image.reduce(SUPERSAMPLE))


def long_caption(scene):
    """Every attribute of every object and the background, e.g.
    'a gray background with a large red circle in the top left and a small blue cross in the center'."""
    objects = " and ".join(f"a {o.size} {o.color} {o.shape} in the {o.region}" for o in scene.objects)
    return f"a {scene.background} background with {objects}"


def short_caption(scene):
    """A few words, e.g. 'red circle and blue cross'."""
    return " and ".join(f"{o.color} {o.shape}" for o in scene.objects)


class ShapesDataset:
    """Sample i is a pure function of (seed, split, i): any rank, or a resumed run, redraws the same image.
    Rendering is cheap enough to do inside the training loop, so there is no cache."""

    def __init__(self, seed=0, split="train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.seed, self.split = seed, split

    def scene(self, index):
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        return sample_scene(np.random.default_rng([self.seed, SPLITS.index(self.split), index]), self.split)

    def batch(self, indices, resolution=32, caption="long"):
        """-> images float32 (B, 3, H, W) in [-1, 1], captions (list of B strings, 'long' or 'short')."""
        if caption not in ("long", "short"):
            raise ValueError(f"caption must be 'long' or 'short', got {caption!r}")
        scenes = [self.scene(int(i)) for i in indices]
        images = torch.from_numpy(np.stack([render(s, resolution) for s in scenes]))  # (B, H, W, 3) uint8
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1                       # (B, 3, H, W)
        captions = [(long_caption if caption == "long" else short_caption)(s) for s in scenes]
        return images, captions


# ----------------------------------------------------------------------------------------------------------
# Built-in frozen text encoder

START = "<start>"  # every caption begins with it, so the empty caption still has one token (caption dropout)
GRAMMAR_WORDS = "a background with and in the".split()
VOCAB = (START,) + tuple(sorted(set(GRAMMAR_WORDS + " ".join(
    [*COLORS, *BACKGROUNDS, *SHAPES, *SIZES, *REGIONS]).split())))


def sinusoidal_positions(length, dim):
    """(length, dim): sin on the first half of the channels, cos on the second (Transformer, Vaswani 2017)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2))
    angles = torch.arange(length)[:, None] * freqs[None]  # (length, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


TEXT_CONTEXT = 5  # the built-in encoder's context window (words each side): the default of train.py and eval.py


class BuiltinTextEncoder(nn.Module):
    """Frozen encoder of the caption grammar: token = seeded random word vector + sinusoidal position, plus
    tanh(W @ [the 2k+1 tokens around it]) with a seeded random W (context=k).

    PRX never updates text tokens (image tokens only read their keys and values), so which colour goes with
    which shape and region must be readable from the embedding. The context window puts a word's neighbours into
    its own vector: with k=5 a region word ("left" in "a large red circle in the top left") holds its object's
    colour and kind. Measured on the CPU track (1,350 steps, 256 held-out captions, one thread, seed 0): colour +
    region 0.883 without context (0.871 with seed 1), 0.980 with k=3, 0.984 with k=5; the misses without context
    were two-object scenes (0.79 against 0.99 for one object). Weights are buffers: no optimizer ever sees them."""

    def __init__(self, dim=64, seed=0, max_len=64, context=TEXT_CONTEXT):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even (sinusoidal positions), got {dim}")
        self.dim, self.max_len, self.context = dim, max_len, context
        self.index = {word: i for i, word in enumerate(VOCAB)}
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("words", torch.randn(len(VOCAB), dim, generator=g))  # (V, D)
        self.register_buffer("positions", sinusoidal_positions(max_len, dim))       # (max_len, D)
        if context:
            window = (2 * context + 1) * dim
            self.register_buffer("mix", torch.randn(window, dim, generator=g) / math.sqrt(window))  # (window, D)

    def tokenize(self, caption):
        words = [START] + caption.lower().replace(",", " ").replace(".", " ").split()
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"words {unknown} are not in the built-in caption grammar ({caption!r}); "
                             f"the built-in encoder knows only {VOCAB[1:]}")
        if len(words) > self.max_len:
            raise ValueError(f"caption has {len(words)} tokens, more than max_len={self.max_len}: {caption!r}; "
                             f"raise max_len")
        return [self.index[w] for w in words]

    @torch.no_grad()
    def forward(self, captions):
        """captions: list of B strings -> emb float32 (B, L, dim), mask bool (B, L), L = longest caption."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got one string; wrap it: encoder([caption])")
        if len(captions) == 0:
            raise ValueError("captions is empty; pass at least one caption ('' is the empty prompt)")
        tokens = [self.tokenize(c) for c in captions]
        L = max(map(len, tokens))
        ids = torch.tensor([t + [0] * (L - len(t)) for t in tokens], device=self.words.device)  # (B, L)
        lengths = torch.tensor([len(t) for t in tokens], device=ids.device)
        mask = torch.arange(L, device=ids.device)[None] < lengths[:, None]                         # (B, L)
        x = (self.words[ids] + self.positions[:L]) * mask[..., None]  # (B, L, D), zero past the caption
        if self.context:
            k = self.context
            window = F.pad(x, (0, 0, k, k)).unfold(1, 2 * k + 1, 1)  # (B, L, D, 2k+1): padding reads as zeros
            x = x + torch.tanh(window.transpose(2, 3).flatten(2) @ self.mix)
        return x * mask[..., None], mask


FORMAT = "prx-shards/1"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VAES = {  # --vae: (diffusers class, hub id, subfolder)
    "flux": ("AutoencoderKL", "black-forest-labs/FLUX.1-schnell", "vae"),   # Apache-2.0, same AE as FLUX.1-dev
    "flux2": ("AutoencoderKLFlux2", "black-forest-labs/FLUX.2-klein-4B", "vae"),  # Apache-2.0 FLUX.2 AE
    "repa-e": ("AutoencoderKL", "REPA-E/e2e-flux-vae", None),
}


def stable_hash(*parts):
    """63-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def in_eval_split(seed, sample_id, fraction):
    return stable_hash("eval", seed, sample_id) % 1_000_000 < fraction * 1_000_000


def to_bits(x):
    return x.to(torch.bfloat16).cpu().view(torch.int16).numpy()


# ----------------------------------------------------------------------------------------------------------
# Frozen encoders

def clean_caption(text):
    """Lower-case and tidy a caption; PRX cleans prompts DeepFloyd-style, these are its main steps."""
    text = html.unescape(html.unescape(urllib.parse.unquote_plus(str(text)))).lower()
    text = re.sub(r"\b(?:https?://|www\.)\S+", "", text)  # urls
    text = re.sub(r"@\w+", "", text)                       # @handles
    text = re.sub(r"[`´«»“”¨]", '"', text)
    text = re.sub(r"[‘’]", "'", text)
    return re.sub(r"\s+", " ", text).strip()


class T5GemmaTextEncoder:
    """captions -> (emb (B, L, D), mask (B, L) bool): T5Gemma encoder last_hidden_state, as PRX (REFERENCE 2)."""

    def __init__(self, model, tokenizer, max_tokens=256):
        self.model, self.tokenizer, self.max_tokens = model.eval().requires_grad_(False), tokenizer, max_tokens
        self.tokenizer.padding_side = "right"  # real tokens keep positions 0..L-1, as when encoded alone
        self.dim = model.config.encoder.hidden_size

    @classmethod
    def from_pretrained(cls, name="google/t5gemma-2b-2b-ul2", device="cpu", max_tokens=256):
        from transformers import AutoTokenizer, T5GemmaEncoderModel
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # bf16 as PRX on GPU
        # transformers 5.x: the encoder is built from config.encoder of the composite T5GemmaConfig
        model = T5GemmaEncoderModel.from_pretrained(name, is_encoder_decoder=False, dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(name), max_tokens)

    @torch.no_grad()
    def __call__(self, captions):
        tokens = self.tokenizer([clean_caption(c) for c in captions], padding=True, truncation=True,
                                max_length=self.max_tokens, return_tensors="pt").to(self.model.device)
        emb = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return emb, tokens.attention_mask.bool()


def load_vae(name, path=None, device="cpu"):
    """-> (vae, shift, scale): the frozen VAE and its latent normalisation (see latent_stats)."""
    import diffusers
    if name not in VAES:
        raise ValueError(f"unknown VAE {name!r}; choose from {sorted(VAES)} (or 'none' for pixel space)")
    class_name, hub_id, subfolder = VAES[name]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    vae = getattr(diffusers, class_name).from_pretrained(path or hub_id, subfolder=subfolder, torch_dtype=dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    return (vae, *latent_stats(vae))


def latent_stats(vae):
    """(shift, scale), each (C, p, p), with z_normalised = (z - shift) * scale at each position of a p x p patch.
    Flux / REPA-E: the config's shift_factor and scaling_factor (Flux.1: 0.1159, 0.3611; REFERENCE 2).
    FLUX.2: the AE's BatchNorm running statistics over 2x2-patchified latents (diffusers Flux2Pipeline)."""
    C = vae.config.latent_channels
    if hasattr(vae, "bn"):
        p = vae.config.patch_size[0]
        shift = vae.bn.running_mean.float().view(C, p, p)
        scale = (vae.bn.running_var.float() + vae.config.batch_norm_eps).rsqrt().view(C, p, p)
        return shift, scale
    device = vae.device
    shift = torch.full((C, 1, 1), float(getattr(vae.config, "shift_factor", None) or 0.0), device=device)
    return shift, torch.full((C, 1, 1), float(vae.config.scaling_factor), device=device)


def latent_affine(z, mul, add):
    B, C, H, W = z.shape
    p = mul.shape[-1]
    z = z.reshape(B, C, H // p, p, W // p, p)  # the (C, p, p) statistics repeat over the patch grid
    return (z * mul[:, None, :, None, :] + add[:, None, :, None, :]).reshape(B, C, H, W)


def normalize_latent(z, shift, scale):
    """VAE latent -> the training target space. The one place latents are normalised."""
    return latent_affine(z, scale, -shift * scale)


def denormalize_latent(z, shift, scale):
    """Inverse of normalize_latent, before vae.decode."""
    return latent_affine(z, 1 / scale, shift)


@torch.no_grad()
def encode_latents(vae, images, seeds, shift, scale):
    """images (B, 3, R, R) uint8 -> normalised latents (B, C, R/8, R/8) float32. The posterior is sampled as PRX
    does, with noise seeded per sample (seeds) so that preparation is reproducible: z = mean + std * eps."""
    x = images.to(vae.device, vae.dtype) / 127.5 - 1
    posterior = vae.encode(x).latent_dist
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(s))
                       for s in seeds]).to(vae.device)
    z = posterior.mean.float() + posterior.std.float() * eps
    return normalize_latent(z, shift, scale)


# ----------------------------------------------------------------------------------------------------------
# Preparation

def to_rgb(img):
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 16-bit grey (PNG): PIL's convert would clip to 255, so rescale
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:  # composite on white
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def open_image(value):
    """A PIL image, encoded bytes, a path, or datasets' Image(decode=False) dict {"bytes", "path"}."""
    if isinstance(value, dict):
        value = value.get("bytes") or value["path"]
    if not isinstance(value, Image.Image):
        value = Image.open(io.BytesIO(value) if isinstance(value, bytes) else value)
    value.load()  # decode now, so that a truncated file fails here and is counted
    return value


def read_field(row, field):
    for key in field.split("."):  # "json.caption" reaches into a webdataset .json
        row = row[key]
    return row


def load_sample(row, position, args, fields, rank):
    """One source row -> dict(id, image (3, R, R) uint8, captions) or dict(id, reason) when it must be skipped."""
    sample_id = str(row.get(args.id_field) or row.get("__key__") or f"r{rank}-{position}")
    try:
        captions = {name: str(read_field(row, field) or "") for name, field in fields.items()}
    except (KeyError, TypeError):
        return dict(id=sample_id, reason=f"missing caption field: row has {sorted(row)}")
    if empty := [name for name, c in captions.items() if not clean_caption(c)]:
        return dict(id=sample_id, reason=f"empty caption: {empty}")
    try:
        img = to_rgb(open_image(row[args.image_field]))
    except Exception as e:  # PIL raises many types for bad files
        return dict(id=sample_id, reason=f"undecodable image: {type(e).__name__}: {e}")
    if min(img.size) < args.min_size:
        return dict(id=sample_id, reason=f"image smaller than --min-size {args.min_size}: {img.size}")
    img = ImageOps.fit(img, (args.resolution, args.resolution), Image.Resampling.BICUBIC)  # centre crop + resize
    return dict(id=sample_id, image=np.asarray(img).transpose(2, 0, 1), captions=captions)


def folder_rows(files, root):
    for path in files:
        row = {"id": path.relative_to(root).as_posix(), "image": {"bytes": None, "path": str(path)}}
        if path.with_suffix(".txt").exists():
            row["txt"] = path.with_suffix(".txt").read_text()
        if path.with_suffix(".json").exists():
            row.update(json.loads(path.with_suffix(".json").read_text()))
        yield row


def open_source(source, image_field, rank, world_size):
    """-> (rows, total): a streamed datasets.IterableDataset over this rank's files, or (None, 0).
    Sources: a folder of images with .txt/.json captions, a glob of local .parquet/.tar files, a hub dataset id."""
    import datasets
    root = Path(source)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if root.is_dir() else []
    if images:
        mine = images[rank::world_size]
        rows = datasets.IterableDataset.from_generator(folder_rows, gen_kwargs=dict(files=mine, root=root))
        return (rows if mine else None), len(mine)
    if source.endswith((".parquet", ".tar")):
        builder = datasets.load_dataset_builder("parquet" if source.endswith(".parquet") else "webdataset",
                                                data_files=sorted(glob.glob(source)))
    else:  # a hub id or a folder of parquet/tar files: file list resolved, nothing downloaded
        builder = datasets.load_dataset_builder(source)
    files = list(builder.config.data_files["train"])
    mine = files[rank::world_size]  # whole files per rank: no rank downloads another's data
    splits = builder.info.splits
    total = splits["train"].num_examples * len(mine) // len(files) if splits and "train" in splits else None
    if not mine:
        return None, 0
    rows = datasets.load_dataset(builder.name, data_files=mine, split="train", streaming=True)
    if isinstance((rows.features or {}).get(image_field), datasets.Image):
        rows = rows.cast_column(image_field, datasets.Image(decode=False))  # we decode, so bad images are counted
    return rows, total


def encode_samples(samples, encoder, vae, shift, scale, seed):
    """Decoded samples -> the stored columns: image, id, latent (unless pixel space), txt_ and caption_ per field."""
    columns = {"image": [s["image"] for s in samples], "id": [s["id"] for s in samples]}
    if vae is not None:
        seeds = [stable_hash("latent", seed, s["id"]) for s in samples]
        latents = encode_latents(vae, torch.from_numpy(np.stack(columns["image"])), seeds, shift, scale)
        columns["latent"] = list(to_bits(latents))
    for name in samples[0]["captions"]:
        emb, mask = encoder([s["captions"][name] for s in samples])  # right-padded
        bits, lengths = to_bits(emb), mask.sum(1).tolist()
        columns[f"txt_{name}"] = [bits[j, :n].copy() for j, n in enumerate(lengths)]  # real length, no padding
        columns[f"caption_{name}"] = [s["captions"][name] for s in samples]
    return columns


def write_shard(path, columns, meta):
    """Fixed-shape columns are stacked, ragged ones (text, strings) concatenated with offsets; then the rename."""
    tmp = Path(f"{path}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, values in columns.items():
        if name in ("image", "latent"):
            np.save(tmp / f"{name}.npy", np.stack(values))
        else:
            chunks = [np.frombuffer(v.encode(), np.uint8) if isinstance(v, str) else v for v in values]
            np.save(tmp / f"{name}.npy", np.concatenate(chunks))
            np.save(tmp / f"{name}_offsets.npy", np.cumsum([0] + [len(c) for c in chunks]))
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.rename(tmp, path)  # atomic: a reader or a resumed run sees no shard or a whole one


def resume_point(out, rank, world_size):
    """Completed shards of this rank -> (next shard number, rows done, source state); partial shards removed."""
    name = f"shard-r{rank:03d}-"
    for partial in out.glob(f"*/{name}*.tmp"):
        shutil.rmtree(partial)
    done = sorted(out.glob(f"train/{name}?????"))
    for orphan in out.glob(f"eval/{name}?????"):  # eval shard written just before a crash: it is written again
        if int(orphan.name[-5:]) >= len(done):
            shutil.rmtree(orphan)
    if not done:
        return 0, 0, None
    meta = json.loads((done[-1] / "meta.json").read_text())
    if meta["world_size"] != world_size:
        raise ValueError(f"{out} was being prepared by {meta['world_size']} processes; resume with the same "
                         f"number (torchrun --nproc-per-node {meta['world_size']}) or choose a new --out")
    return len(done), meta["rows_done"], meta["source_state"]


def prepare(args, rank=0, world_size=1):
    out, fields = Path(args.out), parse_caption_fields(args.captions)
    out.mkdir(parents=True, exist_ok=True)
    args.min_size = args.min_size or args.resolution // 2
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    rows, total = open_source(args.source, args.image_field, rank, world_size)
    shard, rows_done, source_state = resume_point(out, rank, world_size)
    encoder = T5GemmaTextEncoder.from_pretrained(args.text_encoder, device, args.max_tokens)
    vae, shift, scale = load_vae(args.vae, args.vae_path, device) if args.vae != "none" else (None, None, None)
    if rank == 0:
        emb, mask = encoder([""])
        np.save(out / "null_txt.tmp.npy", to_bits(emb[0, mask[0]]))
        os.replace(out / "null_txt.tmp.npy", out / "null_txt.npy")
    if rows is not None and source_state is not None:
        rows.load_state_dict(source_state)
    columns = {"train": {}, "eval": {}}
    skipped, pending = {}, 0
    bar = tqdm(total=total, initial=rows_done, unit="img", desc=f"prepare rank {rank}", disable=rank != 0)
    it = iter(rows if rows is not None else [])
    with ThreadPoolExecutor(args.workers) as pool:  # PIL decodes and resizes outside the GIL
        while True:
            chunk = list(itertools.islice(it, args.batch_size))
            positions = range(rows_done, rows_done + len(chunk))
            samples = list(pool.map(functools.partial(load_sample, args=args, fields=fields, rank=rank), chunk,
                                    positions))
            skipped.update({s["id"]: s["reason"] for s in samples if "reason" in s})
            good = [s for s in samples if "reason" not in s]
            if good:
                encoded = encode_samples(good, encoder, vae, shift, scale, args.seed)
                for j, s in enumerate(good):
                    split = "eval" if in_eval_split(args.seed, s["id"], args.eval_fraction) else "train"
                    for key, values in encoded.items():
                        columns[split].setdefault(key, []).append(values[j])
            rows_done, pending = rows_done + len(chunk), pending + len(chunk)
            bar.update(len(chunk))
            if pending and (not chunk or len(columns["train"].get("id", [])) >= args.shard_size):
                name = f"shard-r{rank:03d}-{shard:05d}"
                if columns["eval"]:
                    write_shard(out / "eval" / name, columns["eval"], {"count": len(columns["eval"]["id"])})
                meta = {"count": len(columns["train"].get("id", [])), "rank": rank, "world_size": world_size,
                        "rows_done": rows_done, "source_state": rows.state_dict(), "skipped": skipped}
                write_shard(out / "train" / name, columns["train"], meta)
                columns, skipped, pending, shard = {"train": {}, "eval": {}}, {}, 0, shard + 1
            if not chunk:
                break
    bar.close()
    (out / "train" / f"done-r{rank:03d}").write_text(str(world_size))
    if rank == 0:
        while not all((out / "train" / f"done-r{r:03d}").exists() for r in range(world_size)):
            time.sleep(10)  # the other ranks are still encoding
        write_index(out, vars(args), shift, scale)


def write_index(out, settings, shift=None, scale=None):
    shards = {split: [p for p in sorted((out / split).glob("shard-r*")) if p.suffix != ".tmp"]
              for split in ("train", "eval")}
    metas = {split: [json.loads((p / "meta.json").read_text()) for p in paths] for split, paths in shards.items()}
    skipped = {k: v for m in metas["train"] for k, v in m["skipped"].items()}
    reasons = collections.Counter(r.split(":")[0] for r in skipped.values())
    first = next((p for p, m in zip(shards["train"], metas["train"]) if m["count"]), None)
    if first is None:
        raise ValueError(f"{out}: no sample was prepared; skipped: {dict(reasons)}")
    schema = {p.stem: {"dtype": str(a.dtype), "shape": list(a.shape[1:])}
              for p in sorted(first.glob("*.npy")) for a in [np.load(p, mmap_mode="r")]}
    index = {split: {"count": sum(m["count"] for m in metas[split]),
                     "shards": [{"path": f"{split}/{p.name}", "count": m["count"]}
                                for p, m in zip(shards[split], metas[split])]} for split in shards}
    index.update(
        format=FORMAT, skipped={"count": len(skipped), "by_reason": reasons, "ids": skipped},
        captions=sorted(k.removeprefix("caption_") for k in schema
                        if k.startswith("caption_") and not k.endswith("_offsets")),
        schema=schema, latent_norm=None if shift is None else {
            "shift": shift.tolist(), "scale": scale.tolist(), "formula": "(z - shift) * scale, (C, p, p) per patch"},
        versions={m: importlib.metadata.version(m)
                  for m in ("torch", "diffusers", "transformers", "datasets", "numpy", "pillow")},
        settings=settings)
    (out / "index.tmp.json").write_text(json.dumps(index, indent=1))
    os.replace(out / "index.tmp.json", out / "index.json")
    print(f"{out}: {index['train']['count']} train, {index['eval']['count']} eval, {len(skipped)} skipped "
          f"{dict(reasons)}")


def parse_caption_fields(spec):
    """'long=llava,short=prompt' -> {"long": "llava", "short": "prompt"} (our name -> the source's field)."""
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if not fields or len(fields) != len(spec.split(",")) or not all(re.fullmatch(r"\w+", k) for k in fields):
        raise ValueError(f"--captions {spec!r}: expected name=field pairs such as long=llava,short=prompt")
    return fields


# ----------------------------------------------------------------------------------------------------------
# Loading

class Shard:
    """One shard directory, every array memory-mapped (offsets read into memory)."""

    def __init__(self, path):
        self.arrays = {p.stem: np.load(p, mmap_mode=None if p.stem.endswith("_offsets") else "r")
                       for p in Path(path).glob("*.npy")}

    def ragged(self, name, i):
        offsets = self.arrays[name + "_offsets"]
        return self.arrays[name][offsets[i]:offsets[i + 1]]

    def string(self, name, i):
        return bytes(self.ragged(name, i)).decode()


class PreparedDataset:
    """The samples of one split of a prepared directory, numbered 0..N-1 across its shards."""

    def __init__(self, root, split="train"):
        self.root = Path(root)
        if not (self.root / "index.json").exists():
            raise FileNotFoundError(f"{self.root / 'index.json'} not found: prepare it first with "
                                    f"`python data.py prepare --out {root} ...`")
        self.index = json.loads((self.root / "index.json").read_text())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # each memory map holds a file descriptor
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        entries = [s for s in self.index[split]["shards"] if s["count"]]
        self.shards = [Shard(self.root / s["path"]) for s in entries]
        counts = [s["count"] for s in entries]
        self.shard_of = np.repeat(np.arange(len(counts)), counts)
        self.row_of = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, np.int64)

    def __len__(self):
        return len(self.row_of)

    def locate(self, i):
        return self.shards[self.shard_of[i]], self.row_of[i]


def host_buffer(shape, dtype, pin):
    """Batch memory: pinned for CUDA (torch caches it); numpy's for CPU, about 2x faster to fill here than a fresh
    torch.empty, which faults in new pages on every large allocation."""
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return torch.from_numpy(np.empty(shape, dtype={torch.int16: np.int16, torch.uint8: np.uint8}[dtype]))


def batch_text(chunks, pin=False):
    """list of (L_i, D) bf16-bit arrays -> (txt (B, L, D) bf16 padded with zeros to the longest, mask (B, L))."""
    lengths = torch.tensor([len(c) for c in chunks])
    txt = host_buffer((len(chunks), int(lengths.max()), chunks[0].shape[1]), torch.int16, pin)
    out = txt.numpy()
    for j, c in enumerate(chunks):
        out[j, :len(c)] = c
        out[j, len(c):] = 0
    return txt.view(torch.bfloat16), torch.arange(txt.shape[1]) < lengths[:, None]


def parse_data_phases(spec):
    """'A:0.7,B:0.3@0;C:1@90000' -> [(0, {"A": 0.7, "B": 0.3}), (90000, {"C": 1.0})]: from optimizer step N on,
    draw each sample from these prepared directories with these weights. 'A' alone is 'A:1@0'."""
    phases = []
    for part in spec.split(";"):
        mix, _, start = part.partition("@")
        weights = {}
        for item in mix.split(","):
            path, _, weight = item.rpartition(":") if re.search(r":[\d.]+$", item) else (item, "", "1")
            weights[path] = float(weight)
        if not all(weights) or min(weights.values()) <= 0:
            raise ValueError(f"data spec {spec!r}: expected DIR[:weight],...[@step];... with weights > 0")
        phases.append((int(start or 0), weights))
    if phases[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(phases, phases[1:])):
        raise ValueError(f"data spec {spec!r}: the first phase starts at step 0 and the steps increase")
    return phases


class ShardLoader:
    """Batches of prepared samples for one rank, read ahead by a background thread. `next(loader)` gives
    {"latent" (B, C, h, w) float32 | "image" (B, 3, R, R) uint8, "txt" (B, L, D) bf16, "txt_mask" (B, L) bool,
    "caption" list[str], "id" list[str]}. Every rank draws the same global batch (world_size * batch_size samples)
    and reads its own slice; each dataset is read in a seeded permutation per epoch, so state_dict() (batches drawn,
    per-dataset epoch and position) resumes with the next unseen sample. Steps in `data` (parse_data_phases) count
    optimizer steps of grad_accum loader batches."""

    def __init__(self, data, batch_size, rank=0, world_size=1, seed=0, captions="long", device="cpu",
                 grad_accum=1, images=False, prefetch=4):
        self.phases = parse_data_phases(data)
        self.names = sorted({name for _, weights in self.phases for name in weights})
        self.datasets = [PreparedDataset(name) for name in self.names]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.grad_accum, self.prefetch = torch.device(device), grad_accum, prefetch
        mode, _, p = captions.partition(":")
        self.p_long = float(p or 0.5) if mode == "mixed" else float(mode == "long")
        if mode not in ("long", "short", "mixed") or not 0 <= self.p_long <= 1:
            raise ValueError(f"captions {captions!r}: choose long, short or mixed[:p] (long with probability p)")
        needed = {field for field, p in (("long", self.p_long), ("short", 1 - self.p_long)) if p > 0}
        for name, ds in zip(self.names, self.datasets):
            if needed - set(ds.index["captions"]) or not len(ds):
                raise ValueError(f"{name}: has {len(ds)} samples and captions {ds.index['captions']}; "
                                 f"captions={captions!r} needs {sorted(needed)}")
        schema = self.datasets[0].index["schema"]
        if any(ds.index["schema"].get(k) != schema.get(k) for ds in self.datasets for k in ("latent", "image")):
            raise ValueError(f"datasets {self.names} differ in latent or image shape and cannot be mixed")
        self.has_latent = "latent" in schema
        self.images = images or not self.has_latent
        null = np.load(self.datasets[0].root / "null_txt.npy")
        self.null_txt = torch.from_numpy(null).view(torch.bfloat16)[None].to(self.device)  # (1, L0, D)
        self.null_mask = torch.ones(1, len(null), dtype=torch.bool, device=self.device)
        self.worker, self.perms = ThreadPoolExecutor(1), {}
        self.load_state_dict({"batches": 0, "cursors": {}})

    def state_dict(self):
        return copy.deepcopy(self.state)

    def load_state_dict(self, state):
        """Continue after the batch last returned before that state_dict(); batches read ahead are dropped."""
        self.state = copy.deepcopy(state)
        for name in self.names:
            self.state["cursors"].setdefault(name, [0, 0])  # a dataset that a later phase adds
        for future, _ in getattr(self, "pending", []):
            future.cancel()
        self.planned, self.pending = copy.deepcopy(self.state), collections.deque()

    def permutation(self, d, epoch):
        if self.perms.get(d, (None,))[0] != epoch:  # one cached per dataset: 1M samples take ~20 ms
            rng = np.random.default_rng([self.seed, zlib.crc32(self.names[d].encode()), epoch])
            self.perms[d] = epoch, rng.permutation(len(self.datasets[d]))
        return self.perms[d][1]

    def take(self, state, d, n):
        """The next n sample numbers of dataset d, moving to the next epoch's permutation when one is used up."""
        out, cursor = [], state["cursors"][self.names[d]]
        while n:
            perm = self.permutation(d, cursor[0])
            k = min(n, len(perm) - cursor[1])
            out.append(perm[cursor[1]:cursor[1] + k])
            n, cursor[1] = n - k, cursor[1] + k
            if cursor[1] == len(perm):
                cursor[:] = [cursor[0] + 1, 0]
        return np.concatenate(out)

    def plan(self, state):
        """The global batch after `state` (identical on every rank) -> this rank's (dataset, sample, long) slice."""
        step = state["batches"] // self.grad_accum
        weights = [w for start, w in self.phases if start <= step][-1]
        p = np.array([weights.get(name, 0.0) for name in self.names])
        rng = np.random.default_rng([self.seed, state["batches"]])
        G = self.batch_size * self.world_size
        which, use_long = rng.choice(len(p), size=G, p=p / p.sum()), rng.random(G) < self.p_long
        index = np.empty(G, dtype=np.int64)
        for d in np.unique(which):
            index[which == d] = self.take(state, d, int((which == d).sum()))
        state["batches"] += 1
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return which[mine], index[mine], use_long[mine]

    def load(self, which, index, use_long):
        """Runs in the worker thread: copies out of the memory maps (numpy releases the GIL while copying)."""
        pin, schema = self.device.type == "cuda", self.datasets[0].index["schema"]
        batch, chunks = {"caption": [], "id": []}, []
        for key, dtype in [("latent", torch.int16)] * self.has_latent + [("image", torch.uint8)] * self.images:
            batch[key] = host_buffer((len(index), *schema[key]["shape"]), dtype, pin)
        arrays = {key: batch[key].numpy() for key in ("latent", "image") if key in batch}
        for j, (d, i, long) in enumerate(zip(which, index, use_long)):
            shard, row = self.datasets[d].locate(i)
            field = "long" if long else "short"
            for key, out in arrays.items():
                out[j] = shard.arrays[key][row]
            chunks.append(shard.ragged(f"txt_{field}", row))
            batch["caption"].append(shard.string(f"caption_{field}", row))
            batch["id"].append(shard.string("id", row))
        batch["txt"], batch["txt_mask"] = batch_text(chunks, pin)
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        while len(self.pending) < self.prefetch:  # planned here, read by the worker
            plan = self.plan(self.planned)
            self.pending.append((self.worker.submit(self.load, *plan), copy.deepcopy(self.planned)))
        future, self.state = self.pending.popleft()
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in future.result().items()}
        if "latent" in batch:
            batch["latent"] = batch["latent"].view(torch.bfloat16).float()
        return batch


def load_eval_split(root, caption="long"):
    """The held-out split for the metrics: dict(id, caption list[str], image (N, 3, R, R) uint8 in memory,
    txt list of (L_i, D) bf16-bit arrays (batch them with batch_text))."""
    ds = PreparedDataset(root, "eval")
    rows = [ds.locate(i) for i in range(len(ds))]
    return {"id": [shard.string("id", r) for shard, r in rows],
            "caption": [shard.string(f"caption_{caption}", r) for shard, r in rows],
            "image": np.concatenate([shard.arrays["image"] for shard in ds.shards]) if ds.shards else None,
            "txt": [shard.ragged(f"txt_{caption}", r) for shard, r in rows]}


# ----------------------------------------------------------------------------------------------------------
# Benchmark and command line

def write_synthetic(root, samples, shard_size=1024, seed=0):
    """A prepared directory of realistic 256 px sizes: a 16x32x32 bf16 latent and 60..180 (mean 120) text tokens
    of 2304 bf16 values per sample."""
    rng, pool = np.random.default_rng(seed), to_bits(torch.randn(4096, 2304))  # text rows reused at random offsets
    for k, start in enumerate(range(0, samples, shard_size)):
        n = min(shard_size, samples - start)
        offsets, lengths = rng.integers(0, 3900, n), rng.integers(60, 181, n)
        columns = {"latent": list(to_bits(torch.randn(n, 16, 32, 32))),
                   "txt_long": [pool[o:o + length] for o, length in zip(offsets, lengths)],
                   "caption_long": [f"synthetic caption {start + j}" for j in range(n)],
                   "id": [str(start + j) for j in range(n)]}
        write_shard(root / "train" / f"shard-r000-{k:05d}", columns, {"count": n, "skipped": {}})
    np.save(root / "null_txt.npy", pool[:1])
    write_index(root, {"synthetic": samples})


def bench(root, samples=5000, batch_size=32):
    import datasets
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for the process, reader thread included
    torch.set_num_threads(1)
    root = Path(root)
    if not (root / "index.json").exists():
        write_synthetic(root, samples)
    ds = PreparedDataset(root)
    steps, field = len(ds) // batch_size, "txt_" + ds.index["captions"][0]

    def samples_per_second(next_batch):
        """-> (per wall-clock second, per CPU second of this process): the second is steady on a shared machine."""
        for _ in range(steps):  # one untimed epoch: page cache and allocators warm for both readers
            next_batch()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            next_batch()
        return steps * batch_size / (time.perf_counter() - wall), steps * batch_size / (time.process_time() - cpu)

    loader = ShardLoader(str(root), batch_size, captions=field.removeprefix("txt_"))
    ours = samples_per_second(lambda: next(loader))

    def rows(root, field):  # the same samples, as a user would put them into `datasets`
        prepared = PreparedDataset(root)
        for i in range(len(prepared)):
            shard, r = prepared.locate(i)
            yield {"latent": shard.arrays["latent"][r], "txt": shard.ragged(field, r)}
    schema = ds.index["schema"]
    features = datasets.Features({"latent": datasets.Array3D(schema["latent"]["shape"], "int16"),
                                  "txt": datasets.Array2D((None, *schema[field]["shape"]), "int16")})
    arrow = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(root / "arrow"),
                                            gen_kwargs=dict(root=str(root), field=field)).with_format("numpy")
    order = iter(np.tile(np.random.default_rng(0).permutation(len(arrow))[:steps * batch_size], 2)
                 .reshape(-1, batch_size))

    def arrow_batch():
        b = arrow[next(order).tolist()]
        return torch.from_numpy(b["latent"]).view(torch.bfloat16).float(), batch_text(list(b["txt"]))
    theirs = samples_per_second(arrow_batch)
    tokens = sum(len(shard.arrays[field]) for shard in ds.shards) / len(ds)
    print(f"bench: {len(ds)} samples, batch {batch_size}, latent {schema['latent']['shape']} bf16 + text "
          f"{tokens:.0f} tokens x {schema[field]['shape'][0]} bf16 (mean), one CPU core")
    print(f"{'samples/s':>45} {'per CPU second':>15}")
    print(f"  ShardLoader (memory-mapped .npy)   {ours[0]:9,.0f} {ours[1]:15,.0f}")
    print(f"  datasets (Arrow, numpy format)     {theirs[0]:9,.0f} {theirs[1]:15,.0f}   "
          f"(ShardLoader {ours[1] / theirs[1]:.1f}x per CPU second)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare real datasets into shards; benchmark the loader.")
    parser.add_argument("--bench", metavar="DIR", help="loader samples/s on one CPU core next to `datasets`; "
                        "writes a synthetic dataset of realistic sizes into DIR unless DIR is already prepared")
    parser.add_argument("--bench-samples", type=int, default=5000)
    parser.add_argument("--bench-batch", type=int, default=32)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("prepare", help="encode a dataset into shards (under torchrun: one part per rank)")
    p.add_argument("--out", required=True, help="output directory; an interrupted run resumes there")
    p.add_argument("--source", default="brivangl/midjourney-v6-llava",
                   help="hub dataset id (streamed), image folder with .txt/.json captions, or a *.parquet/*.tar glob")
    p.add_argument("--captions", default="long=llava,short=prompt",
                   help="our caption name=source field, comma separated ('json.caption' reaches into a dict)")
    p.add_argument("--image-field", default="image", help="image column (webdataset tars: the extension, e.g. jpg)")
    p.add_argument("--id-field", default="id", help="sample id column (default: webdataset key or row position)")
    p.add_argument("--vae", default="flux", choices=[*VAES, "none"], help="latent tokenizer; none for pixel space")
    p.add_argument("--vae-path", help="local copy or other hub id of that VAE (default: the hub id in VAES)")
    p.add_argument("--text-encoder", default="google/t5gemma-2b-2b-ul2", help="T5Gemma hub id or local copy")
    p.add_argument("--max-tokens", type=int, default=256, help="text tokens kept per caption (PRX: 256)")
    p.add_argument("--resolution", type=int, default=256, help="stored images are R x R centre crops")
    p.add_argument("--min-size", type=int, help="skip images whose shorter side is smaller (default R / 2)")
    p.add_argument("--shard-size", type=int, default=4096, help="train samples per shard (~4 GB at 256 px)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="held-out share, chosen by hashing the id")
    p.add_argument("--seed", type=int, default=0, help="seeds the eval split and the VAE posterior samples")
    p.add_argument("--device", help="where the encoders run (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() // int(os.environ.get("WORLD_SIZE", 1))),
                   help="image decoding threads per rank")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    elif args.bench:
        bench(args.bench, args.bench_samples, args.bench_batch)
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
