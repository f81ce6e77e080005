"""
Caption checker for the built-in shapes dataset: reads a generated image and says, for each object its caption
names, whether an object of that colour, kind and region is there.

Each pixel takes the nearest palette colour (object and background colours) if it is within MAX_COLOR_DISTANCE;
the pixels of the named colour are split into connected components; a component counts if its centroid lies in
the named cell, its area is plausible for a shape at this resolution, it holds at least half of the cell's
object-coloured pixels, and its mask, stretched to a common box, overlaps one of the four shape templates well.
Its kind is the template it overlaps most.
"""

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from data import BACKGROUNDS, COLORS, REGIONS, SHAPES, SIZES, draw_shape

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
