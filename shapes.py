"""
The built-in world of the CPU track: captioned shapes drawn on the fly, a frozen text encoder for their caption
grammar, a loader with the interface of data.ShardLoader, the held-out split, and the caption checker that reads
generated images back. Nothing is downloaded.

A scene is 1 or 2 coloured shapes in a 2x2 grid on a plain background; sample i is a pure function of
(seed, split, i). Four colour-shape pairs never appear in training and every held-out scene contains one, so the
caption checker measures compositional generalisation.
"""

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from scipy import ndimage

# ----------------------------------------------------------------------------------------------------------
# Built-in dataset: captioned shapes

# Object colours near six corners of the RGB cube, backgrounds on its black-white diagonal: every two of them
# are >= 150 apart in RGB, so the nearest one still names a generated colour that is ~75 off.
COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 230),
          "yellow": (240, 220, 30), "magenta": (220, 40, 220), "cyan": (30, 210, 220)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "cross")  # four different silhouettes, still apart at 32 px
SIZES = {"small": 0.6, "large": 0.9}                 # extent of a shape as a fraction of its grid cell
GRID = 2  # cells per side: at 32 px a cell is 16 px, so a shape spans 2-4 of the denoiser's 4 px patches
REGIONS = ("top left", "top right", "bottom left", "bottom right")  # the GRID x GRID cells, row-major
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
        row, col = divmod(cell, GRID)
        x, y = (col + 0.5 + rng.uniform(-slack, slack)) / GRID, (row + 0.5 + rng.uniform(-slack, slack)) / GRID
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


def half_side(o, big):
    """Half the side of the box object `o` fills, in pixels of a `big`-pixel image: SIZES of its GRID cell."""
    return SIZES[o.size] * big / (2 * GRID)


def render(scene, resolution=32):
    """The scene as uint8 (resolution, resolution, 3)."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        draw_shape(draw, o.shape, o.x * big, o.y * big, half_side(o, big), COLORS[o.color])
    return np.asarray(image.reduce(SUPERSAMPLE))


def long_caption(scene):
    """Every attribute of every object and the background, e.g.
    'a gray background with a large red circle in the top left and a small blue cross in the bottom right'."""
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
        return sample_scene(np.random.default_rng([self.seed, SPLITS.index(self.split), index]), self.split)

    def batch(self, indices, resolution=32, p_long=1.0):
        """-> images uint8 (B, 3, H, W), captions (list of B strings): sample i's long caption with probability
        p_long (1: long, 0: short, between: PRX's mixed captions), drawn from i alone so that a resume redraws it."""
        if not 0 <= p_long <= 1:
            raise ValueError(f"p_long is the probability of the long caption, in [0, 1]; got {p_long!r}")
        scenes = [self.scene(int(i)) for i in indices]
        images = torch.from_numpy(np.stack([render(s, resolution) for s in scenes])).permute(0, 3, 1, 2)
        long = [np.random.default_rng([self.seed, SPLITS.index(self.split), int(i), 1]).random() < p_long
                for i in indices]
        return images, [(long_caption if use else short_caption)(s) for s, use in zip(scenes, long)]


# ----------------------------------------------------------------------------------------------------------
# Built-in frozen text encoder

START = "<start>"  # every caption begins with it, so the empty caption still has one token (caption dropout)
VOCAB = (START,) + tuple(sorted(set(" ".join(["a background with and in the", *COLORS, *BACKGROUNDS, *SHAPES, *SIZES,
                                              *REGIONS]).split())))


def sinusoidal_positions(length, dim):
    """(length, dim): sin on the first half of the channels, cos on the second (Transformer, Vaswani 2017)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2))
    angles = torch.arange(length)[:, None] * freqs[None]  # (length, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


TEXT_CONTEXT = 5  # the built-in encoder's context window (words each side); a run stores the one it used


class BuiltinTextEncoder(nn.Module):
    """Frozen encoder of the caption grammar: token = seeded random word vector + sinusoidal position, plus
    tanh(W @ [the 2k+1 tokens around it]) with a seeded random W (context=k); weights are buffers, no optimizer's.
    PRX never updates text tokens (image tokens only read their keys and values), so the context must put which
    colour goes with which shape and region into each word's own vector (records/2026-11-23_cpu-track-context5)."""

    def __init__(self, dim=64, seed=0, max_len=64, context=TEXT_CONTEXT):
        super().__init__()
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
        if unknown := [w for w in words if w not in self.index]:
            raise ValueError(f"words {unknown} are not in the built-in caption grammar ({caption!r}); "
                             f"the built-in encoder knows only {VOCAB[1:]}")
        if len(words) > self.max_len:
            raise ValueError(f"a caption of {len(words)} words ({caption[:60]!r}...): the built-in encoder reads at "
                             f"most {self.max_len}")
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


# ----------------------------------------------------------------------------------------------------------
# Caption checker for the built-in shapes dataset: reads a generated image and says, for each object its caption
# names, whether an object of that colour, kind and region is there.
# Each pixel takes the nearest palette colour (object and background colours) if it is within MAX_COLOR_DISTANCE;
# the pixels of the named colour are split into connected components; a component counts if its centroid lies in
# the named cell, its area is plausible for a shape at this resolution and at least half the count of the cell's
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
    """Kinds of the shape-like components of `color` centred in `region` whose area (inside the cell or not) is at
    least half the count of that cell's object-coloured pixels (an image sprayed with coloured specks names nothing)."""
    H, W = labels.shape
    row, col = divmod(REGIONS.index(region), GRID)
    cell = labels[row * H // GRID:(row + 1) * H // GRID, col * W // GRID:(col + 1) * W // GRID]
    object_pixels = np.count_nonzero((cell >= 0) & (cell < len(COLORS)))
    components, _ = ndimage.label(labels == PALETTE_NAMES.index(color))
    kinds = []
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        mask = components[box] == k
        area = mask.sum()
        if not MIN_AREA <= area / (H * W / GRID ** 2) <= MAX_AREA or area < object_pixels / 2:
            continue
        ys, xs = np.nonzero(mask)
        cy, cx = box[0].start + ys.mean() + 0.5, box[1].start + xs.mean() + 0.5  # centroid, in pixels
        if (min(int(GRID * cy / H), GRID - 1), min(int(GRID * cx / W), GRID - 1)) != (row, col):
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
    kinds = [kinds_in_cell(labels, o.color, o.region) for o in objects]
    return [{"full": o.shape in k, "color_region": len(k) > 0} for o, k in zip(objects, kinds)]


def caption_accuracy(images, scenes):
    """Fraction of images in which every named object is found: {"full": colour + kind + region,
    "color_region": ignoring kind}, and "object": the fraction of an image's named objects found with colour, kind
    and region, averaged over images (it moves with each object drawn right, where "full" needs all of them).
    images: uint8 (B, H, W, 3) array or a list of (H, W, 3) arrays."""
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; pass one scene per image")
    results = [check_scene(image, scene.objects) for image, scene in zip(images, scenes)]
    accuracy = {key: float(np.mean([all(r[key] for r in rs) for rs in results])) for key in ("full", "color_region")}
    return accuracy | {"object": float(np.mean([np.mean([r["full"] for r in rs]) for rs in results]))}


# ----------------------------------------------------------------------------------------------------------
# The built-in data as a data source: a training loader and a held-out split with the interfaces of data.py's

class ShapesLoader:
    """Training batches for one rank, with data.ShardLoader's interface: next(loader) -> {"image" uint8 (B, 3, R, R),
    "txt" float32 (B, L, D), "txt_mask" (B, L) bool, "caption" list[str], "id" list[str] (sample indices)};
    null_txt / null_mask, the encoded empty prompt; state_dict(). Call b of the run reads samples
    (b * world_size + rank) * B ... of the training scenes: every rank reads its own slice of the same global
    batch, and a resumed run redraws the same samples."""

    def __init__(self, batch_size, rank=0, world_size=1, seed=0, resolution=32, p_long=1.0,
                 text_context=TEXT_CONTEXT, device="cpu"):
        if not 0 <= p_long <= 1:
            raise ValueError(f"p_long is the probability of the long caption, in [0, 1]; got {p_long!r}")
        self.dataset, self.encoder = ShapesDataset(seed), BuiltinTextEncoder(context=text_context).to(device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.resolution, self.p_long, self.device = resolution, p_long, torch.device(device)
        self.null_txt, self.null_mask = self.encoder([""])  # (1, L0, D), (1, L0)
        self.x0_shape = (3, resolution, resolution)
        self.batches = 0

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]

    def __next__(self):
        first = (self.batches * self.world_size + self.rank) * self.batch_size
        images, captions = self.dataset.batch(range(first, first + self.batch_size), self.resolution, self.p_long)
        txt, mask = self.encoder(captions)
        self.batches += 1
        return {"image": images.to(self.device), "txt": txt, "txt_mask": mask, "caption": captions,
                "id": [str(i) for i in range(first, first + self.batch_size)]}


class HeldoutShapes:
    """The held-out scenes (a seed apart from training's), with data.HeldoutSplit's interface: captions, encode and
    images of sample indices, null (the encoded empty prompt), and score: the caption checker on generated images."""

    def __init__(self, seed=0, caption="long", resolution=32, text_context=TEXT_CONTEXT):
        if caption not in ("long", "short", None):  # None: images only (eval.py ref)
            raise ValueError(f"caption {caption!r}: the built-in scenes have long and short captions only")
        self.shapes = ShapesDataset(seed=10_000 + seed, split="heldout")
        self.caption, self.resolution = caption, resolution
        self.encoder = BuiltinTextEncoder(context=text_context)
        self.null = self.encoder([""])

    def scenes(self, indices):
        return [self.shapes.scene(i) for i in indices]

    def captions(self, indices):
        return [(long_caption if self.caption == "long" else short_caption)(s) for s in self.scenes(indices)]

    def encode(self, indices):
        """-> txt (B, L, D) float32, mask (B, L) bool."""
        return self.encoder(self.captions(indices))

    def images(self, indices):
        """-> uint8 (B, 3, R, R): the renders of the held-out scenes (reference statistics)."""
        return self.shapes.batch(indices, self.resolution)[0]

    def images_id(self, num_samples):
        """Names the reference images (data.HeldoutSplit's): the held-out scenes of any seed, draws of one distribution
        (a reference made with `eval.py ref --data builtin` serves every run's)."""
        return "shapes.py held-out scenes"

    def score(self, images, indices):
        """Generated uint8 (B, 3, R, R) -> {"caption_accuracy", "color_region_accuracy", "object_accuracy"}, means
        over the batch (caption_accuracy)."""
        acc = caption_accuracy(images.permute(0, 2, 3, 1).cpu().numpy(), self.scenes(indices))
        return {"caption_accuracy": acc["full"], "color_region_accuracy": acc["color_region"],
                "object_accuracy": acc["object"]}


# ----------------------------------------------------------------------------------------------------------
# The built-in REPA teacher (--repa builtin): what DINOv2 is to photos, for the built-in world

TEACHER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_teacher.safetensors")
TEACHER_SEED, TEACHER_STEPS = 0, 1200  # `python shapes.py teacher` reproduces TEACHER_FILE with these


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.patch_size = (patch, patch)
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x)  # (B, D, H/p, W/p)


class ShapesTeacher(nn.Module):
    """A small frozen image encoder: 4 px patches embedded, then residual 3x3 convolutions on the token grid, so
    that each token sees its neighbours (an object spans 2-4 tokens at 32 px). Trained once, on recoloured training
    scenes (recolor: the held-out pairs stay unseen), to read in every token the colour, kind and size of the object
    covering it: per-patch attributes the generator's scenes define exactly, where DINOv2 learnt them from photos
    without labels. Having seen no shape in its held-out colour, it reads a kind partly through the colour
    (records/2026-12-05_teacher-heldout), so REPA asks it about training images only. Exposes what
    train.teacher_tokens uses of a timm ViT: pretrained_cfg (mean, std), patch_embed.patch_size, num_prefix_tokens,
    num_features and forward_features -> (B, N, D)."""

    def __init__(self, dim=32, patch=4, depth=4):
        super().__init__()
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # images in [-1, 1]
        self.num_prefix_tokens, self.num_features = 0, dim
        self.patch_embed = PatchEmbed(dim, patch)
        self.blocks = nn.ModuleList(nn.Sequential(nn.GroupNorm(1, dim), nn.Conv2d(dim, dim, 3, padding=1), nn.GELU())
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, x):
        x = self.patch_embed(x)              # (B, D, h, w)
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, D)


def token_labels(scene, grid=8):
    """Per token of a grid x grid image: (colour, kind, size) class indices of the object covering most of it
    (over a quarter of its area), else (background colour, -100, -100): (3, grid * grid) int64. Colours 0..5 are
    objects', 6..8 backgrounds'; -100 is cross_entropy's ignore_index: kind and size are learnt on object tokens.
    numpy, not torch: the teacher labels 64 scenes a step, and torch's per-call cost on tensors this small adds up."""
    big = grid * 8  # coverage to 1/64 of a token
    background = [len(COLORS) + list(BACKGROUNDS).index(scene.background), -100, -100]
    labels = np.repeat(np.array(background, dtype=np.int64)[:, None], grid * grid, axis=1)  # (3, grid^2)
    best = np.full(grid * grid, 0.25, dtype=np.float32)
    for o in scene.objects:
        mask = Image.new("L", (big, big), 0)
        draw_shape(ImageDraw.Draw(mask), o.shape, o.x * big, o.y * big, half_side(o, big), 255)
        cover = (np.asarray(mask.reduce(big // grid), dtype=np.float32) / 255).ravel()  # (grid^2,)
        mine = cover > best
        labels[:, mine] = np.array([list(COLORS).index(o.color), SHAPES.index(o.shape),
                                    list(SIZES).index(o.size)])[:, None]
        best = np.maximum(best, cover)
    return torch.from_numpy(labels)


def recolor(scene, rng):
    """The scene with its objects in other random colours, still different from each other and each a training pair
    with its shape (the held-out pairs stay unseen): the teacher's colour augmentation, as DINO's colour jitter, so
    that it reads a kind in more than one colour."""
    objects = []
    for o in scene.objects:
        free = [c for c, s in TRAIN_PAIRS if s == o.shape and c not in {p.color for p in objects}]
        objects.append(dataclasses.replace(o, color=free[rng.integers(len(free))]))
    return Scene(scene.background, objects)


def train_teacher(steps=TEACHER_STEPS, seed=TEACHER_SEED, batch_size=64, lr=2e-3):
    """The teacher and its three linear heads (colour, kind, size) trained with cross-entropy on the tokens of
    recoloured training scenes of ShapesDataset(seed=1000 + seed); one thread, so that the same seed gives the same
    weights.
    -> the teacher (frozen), the heads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    teacher = ShapesTeacher()
    splits = (len(COLORS) + len(BACKGROUNDS), len(SHAPES), len(SIZES))
    heads = nn.Linear(teacher.num_features, sum(splits))
    opt = torch.optim.AdamW([*teacher.parameters(), *heads.parameters()], lr=lr)
    data = ShapesDataset(seed=1000 + seed)
    for step in range(steps):
        scenes = [recolor(data.scene(i), np.random.default_rng([seed, i]))
                  for i in range(step * batch_size, (step + 1) * batch_size)]
        images = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2)  # (B, 3, 32, 32)
        labels = torch.stack([token_labels(s) for s in scenes])                                # (B, 3, N)
        logits = heads(teacher.forward_features(images.float() / 127.5 - 1)).split(splits, dim=-1)
        loss = sum(F.cross_entropy(l.flatten(0, 1), y.flatten()) for l, y in zip(logits, labels.unbind(1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:  # steps done, as train.py counts them
            print(f"teacher step {step + 1}/{steps} | loss {loss.item():.4f}", flush=True)
    torch.set_num_threads(threads)
    return teacher.eval().requires_grad_(False), heads


def load_teacher(path=TEACHER_FILE):
    """The committed teacher, or another file of its weights (train.py's --repa-weights)."""
    make = "`python shapes.py teacher" + (f" --out {path}`" if path != TEACHER_FILE else "`") + " (about a minute)"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; " + ("the built-in REPA teacher is missing: make it with "
                                if path == TEACHER_FILE else "a built-in teacher's weights: ") + make)
    teacher = ShapesTeacher()
    try:
        teacher.load_state_dict(load_file(path))
    except RuntimeError:  # torch's message lists every key and size: one line says it
        raise ValueError(f"{path}: not the built-in teacher's weights (ShapesTeacher's), which {make} makes") from None
    return teacher.eval().requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the built-in REPA teacher (--repa builtin) and save it.",
                                     allow_abbrev=False)  # as data.Parser's: --ou is not --out
    parser.add_argument("command", choices=["teacher"])
    parser.add_argument("--out", default=TEACHER_FILE)
    parser.add_argument("--steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--seed", type=int, default=TEACHER_SEED)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"argument --steps: must be 1 or more, got {args.steps}")
    if not 0 <= args.seed < 2**64:  # torch.manual_seed's range
        parser.error(f"argument --seed: must be in [0, 2**64 - 1], got {args.seed}")
    if os.path.exists(args.out):  # the committed teacher by default: records name its sha256
        parser.error(f"--out {args.out} exists; pass --out NEW.safetensors, or delete it first to remake it")
    if not args.out:  # as data.Parser's: `--out "$OUT"` with OUT unset
        parser.error("argument --out: an empty value (an unset shell variable?): give one, or leave the flag out")
    folder = os.path.dirname(args.out) or "."
    if not os.path.isdir(folder):  # before the minute of training, not after it
        parser.error(f"--out {args.out}: no folder {folder} to write it in; make it first, or pass --out "
                     f"NEW.safetensors in a folder that exists")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out {args.out}: cannot write in {folder} (no permission, or a read-only file system)")
    teacher, _ = train_teacher(args.steps, args.seed)
    save_file(teacher.state_dict(), args.out + ".tmp")  # atomic: a killed run leaves no half-written teacher
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
