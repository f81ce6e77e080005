"""
Everything that turns data into tensors.

Built-in dataset: captioned shapes drawn on the fly from (seed, split, index), with a held-out set of
colour-shape pairs that training never sees (compositional generalisation), and a frozen text encoder for the
caption grammar with the interface the real T5Gemma encoder has:
encoder(captions) -> (emb (B, L, D) float32, mask (B, L) bool).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

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


class BuiltinTextEncoder(nn.Module):
    """Frozen encoder of the caption grammar: token = seeded random word vector + sinusoidal position.

    PRX never updates text tokens (image tokens only read their keys and values), so which colour goes with
    which shape must be readable from the embedding. The grammar is rigid, so positions suffice: a PRX-like
    reader (learned queries, two layers attending to projected text) binds every attribute of the training
    captions. context=k adds tanh(W @ [the 2k+1 tokens around it]) with a seeded random W, putting a word's
    neighbours into its own vector; with k=2 it did not measurably help that reader on held-out pairs
    (4 seeds, within noise), so it is off by default. Weights are buffers: no optimizer ever sees them."""

    def __init__(self, dim=64, seed=0, max_len=64, context=0):
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
