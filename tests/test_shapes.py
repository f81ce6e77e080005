import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from shapes import (BACKGROUNDS, COLORS, GRID, HELDOUT_PAIRS, MAX_COLOR_DISTANCE, PALETTE, PALETTE_NAMES, REGIONS,
                    SHAPES, SIZES, TRAIN_PAIRS, BuiltinTextEncoder, HeldoutShapes, Scene, SceneObject, ShapesDataset,
                    ShapesLoader, caption_accuracy, check_scene, color_labels, draw_shape, long_caption, render,
                    short_caption)


def scenes(split, n, seed=0):
    ds = ShapesDataset(seed, split)
    return [ds.scene(i) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Dataset

def test_samples_are_a_function_of_seed_and_index():
    images, captions = ShapesDataset(seed=3).batch([7, 2, 7], resolution=32)
    again, captions_again = ShapesDataset(seed=3).batch([2, 7], resolution=32)
    assert torch.equal(images[0], again[1]) and torch.equal(images[1], again[0]) and torch.equal(images[0], images[2])
    assert captions[:2] == captions_again[::-1]
    other, _ = ShapesDataset(seed=4).batch([7, 2, 7], resolution=32)
    assert not torch.equal(images, other)
    heldout, _ = ShapesDataset(seed=3, split="heldout").batch([7, 2, 7], resolution=32)
    assert not torch.equal(images, heldout)


def test_batch_tensors():
    images, captions = ShapesDataset().batch(range(5), resolution=48)
    assert images.shape == (5, 3, 48, 48) and images.dtype == torch.uint8 and len(captions) == 5
    for image, scene in zip(images, scenes("train", 5)):  # the renders, channels first
        assert torch.equal(image, torch.tensor(render(scene, 48)).permute(2, 0, 1))
    _, short = ShapesDataset().batch(range(5), resolution=48, p_long=0.0)
    assert all(len(s) < len(c) for s, c in zip(short, captions))
    assert captions == [long_caption(s) for s in scenes("train", 5)]
    with pytest.raises(ValueError, match="probability of the long caption"):
        ShapesDataset().batch(range(2), p_long=1.5)
    with pytest.raises(ValueError, match="split must be"):
        ShapesDataset(split="test")


def test_mixed_captions_draw_long_with_probability_p_per_sample():
    n, dataset = 400, ShapesDataset(seed=2)
    _, mixed = dataset.batch(range(n), p_long=0.25)
    _, again = dataset.batch(range(n - 1, -1, -1), p_long=0.25)  # a sample's draw depends on its index only
    assert again[::-1] == mixed
    is_long = [c == long_caption(s) for c, s in zip(mixed, (dataset.scene(i) for i in range(n)))]
    is_short = [c == short_caption(dataset.scene(i)) for i, c in enumerate(mixed)]
    assert all(a != b for a, b in zip(is_long, is_short))  # each caption is the sample's long or its short one
    assert abs(sum(is_long) / n - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5  # binomial: 4 sd
    _, half = dataset.batch(range(n), p_long=0.5)  # the same uniform draw: long at 0.25 stays long at 0.5
    assert all(c == long_caption(dataset.scene(i)) for i, (c, l) in enumerate(zip(half, is_long)) if l)


def test_the_long_or_short_draw_is_independent_of_the_scene():
    """Sample i's caption draw has a seed of its own: at p_long 0.5, half the scenes of one object and half of two
    get the long caption (one stream for both would tie the draw to the scene's)."""
    n, dataset = 1000, ShapesDataset(seed=5)
    _, captions = dataset.batch(range(n), p_long=0.5)
    drawn = [(len(s.objects), c == long_caption(s)) for s, c in zip((dataset.scene(i) for i in range(n)), captions)]
    for k in (1, 2):
        is_long = [long for count, long in drawn if count == k]
        assert abs(np.mean(is_long) - 0.5) < 4 * (0.25 / len(is_long)) ** 0.5  # binomial: 4 sd


def test_heldout_pairs_never_in_training_and_in_every_heldout_scene():
    train_pairs = {(o.color, o.shape) for s in scenes("train", 3000) for o in s.objects}
    assert train_pairs == set(TRAIN_PAIRS) and not train_pairs & set(HELDOUT_PAIRS)
    # every colour and every shape is still seen in training, with other partners
    assert {c for c, _ in train_pairs} == set(COLORS) and {s for _, s in train_pairs} == set(SHAPES)
    for s in scenes("heldout", 500):
        assert any((o.color, o.shape) in HELDOUT_PAIRS for o in s.objects)
    import shapes  # the REPA teacher's training scenes, recoloured as train_teacher does: training pairs only, all
    recoloured = [shapes.recolor(s, np.random.default_rng([0, i])) for i, s in enumerate(scenes("train", 3000))]
    assert {(o.color, o.shape) for s in recoloured for o in s.objects} == set(TRAIN_PAIRS)
    assert all(len({o.color for o in s.objects}) == len(s.objects) for s in recoloured)  # colours still differ


def test_scene_layout():
    all_scenes = scenes("train", 1000)
    assert {len(s.objects) for s in all_scenes} == {1, 2}
    assert {s.background for s in all_scenes} == set(BACKGROUNDS)
    assert {o.size for s in all_scenes for o in s.objects} == set(SIZES)
    assert {o.region for s in all_scenes for o in s.objects} == set(REGIONS)
    for s in all_scenes:
        assert len({o.region for o in s.objects}) == len({o.color for o in s.objects}) == len(s.objects)
        cells = [REGIONS.index(o.region) for o in s.objects]
        assert cells == sorted(cells)  # reading order of the regions
        for o in s.objects:  # the whole shape lies inside its cell
            row, col = divmod(REGIONS.index(o.region), GRID)
            half = SIZES[o.size] / (2 * GRID)
            assert col / GRID <= o.x - half and o.x + half <= (col + 1) / GRID
            assert row / GRID <= o.y - half and o.y + half <= (row + 1) / GRID


def test_render_is_antialiased_and_places_the_object():
    s = scenes("train", 50)[0]
    s = dataclasses.replace(s, objects=s.objects[:1])
    image = render(s, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    o = s.objects[0]
    assert tuple(image[int(o.y * 64), int(o.x * 64)]) == COLORS[o.color]
    palette = {COLORS[o.color], BACKGROUNDS[s.background]}
    assert any(tuple(p) not in palette for p in image.reshape(-1, 3))  # blended edge pixels


@pytest.mark.parametrize("shape, fraction", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5),
                                             ("cross", 5 / 9)])
def test_each_shape_fills_its_box_as_its_silhouette(shape, fraction):
    """draw_shape in the box of half-side r = 60 around (80, 80): the shape spans the whole box, covers its share of
    it (the cross: two arms a third of the box wide, 2 x 1/3 - 1/9 = 5/9), and the triangle points up (a quarter of
    its area in the box's upper half)."""
    import shapes
    image = Image.new("L", (160, 160), 0)
    shapes.draw_shape(ImageDraw.Draw(image), shape, 80, 80, 60, 255)
    mask = np.asarray(image) > 0
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 140, 20, 140)
    assert mask.sum() / 120 ** 2 == pytest.approx(fraction, rel=0.04)  # PIL's boxes take both ends: 121 px
    if shape == "triangle":
        assert mask[:80].sum() / mask.sum() == pytest.approx(0.25, abs=0.03)


def test_captions_name_every_attribute():
    for s in scenes("train", 200) + scenes("heldout", 50):
        long, short = long_caption(s), short_caption(s)
        assert s.background in long
        for o in s.objects:
            assert f"{o.size} {o.color} {o.shape} in the {o.region}" in long
            assert f"{o.color} {o.shape}" in short


def test_shapes_py_is_the_task_the_cpu_target_was_calibrated_on():
    """records/verify.py's task probe (the scenes, renders, captions and the checker's readings; the loader's and the
    held-out split's) gives this shapes.py the fingerprint of the calibration's: a change to what the task draws or
    reads fails every record against the target, and needs its own calibration (speedrun.sh --calibrate)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "records"))
    import verify
    track = verify.TRACKS["cpu"]
    calibration = verify.load_runs(verify.ROOT / track["target_from"])[0]["sources"]  # its every source: data.py's
    ours = {name: open(os.path.join(root, name)).read() for name in os.listdir(root) if name.endswith(".py")}  # too
    files = lambda sources: tuple(sorted(sources.items()))  # noqa: E731
    calibrated = verify.fingerprint(verify.TASK_PROBE, files(calibration), track["resolution"])
    assert verify.fingerprint(verify.TASK_PROBE, files(ours), track["resolution"]) == calibrated
    # the checker's thresholds, and its reading of generated-looking (blurred, noisy) images, which clean renders do
    # not tell apart: another task
    for old, new in (("MAX_COLOR_DISTANCE = 100.0", "MAX_COLOR_DISTANCE = 90.0"),
                     ("area < object_pixels / 2", "area < object_pixels / 3")):
        changed = {**ours, "shapes.py": ours["shapes.py"].replace(old, new, 1)}
        assert changed != ours
        assert verify.fingerprint(verify.TASK_PROBE, files(changed), track["resolution"]) != calibrated


# ----------------------------------------------------------------------------------------------------------
# Text encoder

def test_encoder_is_deterministic_and_frozen():
    captions = [long_caption(s) for s in scenes("train", 8)]
    emb, mask = BuiltinTextEncoder(dim=32, seed=1)(captions)
    emb2, mask2 = BuiltinTextEncoder(dim=32, seed=1)(captions)
    assert torch.equal(emb, emb2) and torch.equal(mask, mask2)
    assert not torch.equal(emb, BuiltinTextEncoder(dim=32, seed=2)(captions)[0])
    encoder = BuiltinTextEncoder()
    assert list(encoder.parameters()) == [] and encoder.dim == 64
    assert encoder(captions)[0].requires_grad is False


@pytest.mark.parametrize("context", [0, 2, 5])
def test_encoder_shapes_mask_and_padding(context):
    encoder = BuiltinTextEncoder(context=context)
    captions = ["a red circle", "", "A gray background with a large blue cross in the top left."]
    emb, mask = encoder(captions)
    lengths = [4, 1, 13]  # words + the start token: the empty prompt is one real token
    assert emb.shape == (3, 13, 64) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()
    for caption, n, row in zip(captions, lengths, emb):  # padding never changes a caption's own tokens
        alone, alone_mask = encoder([caption])
        assert alone.shape[1] == n and alone_mask.all()
        torch.testing.assert_close(alone[0], row[:n])
    # case, commas and full stops are no words
    torch.testing.assert_close(encoder(["A red circle, a cyan cross."])[0], encoder(["a red circle a cyan cross"])[0])


def test_sinusoidal_positions_closed_form():
    """Row p: sin(p f_i) on the first half of the channels, cos(p f_i) on the second, f_i = 10000^(-i / (dim / 2))."""
    import shapes
    p, freqs = torch.arange(50.0)[:, None], 10000.0 ** (-torch.arange(4.0) / 4)
    torch.testing.assert_close(shapes.sinusoidal_positions(50, 8), torch.cat([(p * freqs).sin(), (p * freqs).cos()], 1))


def test_encoder_closed_form():
    """Token i = word vector + position + tanh([tokens i-k .. i+k, zeros past the caption] @ W): the word vectors,
    then W ((2k+1) D, D) scaled by 1 / sqrt((2k+1) D), drawn from the seed."""
    import shapes
    k, dim, caption = 2, 8, "a red circle in the top left"
    g = torch.Generator().manual_seed(3)
    words = torch.randn(len(shapes.VOCAB), dim, generator=g)
    mix = torch.randn((2 * k + 1) * dim, dim, generator=g) / math.sqrt((2 * k + 1) * dim)
    ids = [0] + [shapes.VOCAB.index(w) for w in caption.split()]
    x = words[ids] + shapes.sinusoidal_positions(len(ids), dim)
    padded = torch.cat([torch.zeros(k, dim), x, torch.zeros(k, dim)])
    expected = x + torch.tanh(torch.stack([padded[i:i + 2 * k + 1].flatten() for i in range(len(ids))]) @ mix)
    emb, _ = BuiltinTextEncoder(dim=dim, seed=3, context=k)([caption])
    torch.testing.assert_close(emb[0], expected)


def test_encoder_tells_apart_swapped_colours():
    a = "a black background with a large red circle in the top left and a large blue square in the bottom right"
    b = "a black background with a large blue circle in the top left and a large red square in the bottom right"
    circle = a.split().index("circle") + 1
    emb, _ = BuiltinTextEncoder(context=0)([a, b])
    assert (emb[0] - emb[1]).norm() > 1
    assert torch.equal(emb[0, circle], emb[1, circle])  # same word, same position: without context, the same vector
    emb, _ = BuiltinTextEncoder(context=2)([a, b])  # the context layer puts the colour into the shape's vector
    assert (emb[0, circle] - emb[1, circle]).norm() > 0.5
    assert torch.equal(emb[:, -1], emb[:, -1].flip(0))  # "right" is more than 2 words from any colour
    emb, _ = BuiltinTextEncoder()([a, b])  # the default window (5) reaches from a region word to its colour
    for region_word in (a.split().index("left") + 1, -1):
        assert (emb[0, region_word] - emb[1, region_word]).norm() > 0.5


def test_encoder_rejects_bad_input():
    encoder = BuiltinTextEncoder(max_len=8)
    with pytest.raises(ValueError, match="not in the built-in caption grammar"):
        encoder(["a purple circle"])
    with pytest.raises(ValueError, match="the built-in encoder reads at most 8"):
        encoder(["a red circle and a blue square in the top left"])
    assert encoder(["a red circle and a blue square"])[1].shape == (1, 8)  # max_len tokens, the start one with them
    with pytest.raises(TypeError, match="list of strings"):
        encoder("a red circle")
    with pytest.raises(ValueError, match="empty"):
        encoder([])


# ----------------------------------------------------------------------------------------------------------
# Caption checker

def test_shape_templates_are_antialiased_silhouettes():
    """Each template: its shape filling the 16 x 16 box as coverage (fractional along the edges), its mean the shape's
    share of the box (the circle's pi / 4, the cross's 5 / 9)."""
    import shapes
    for template, fraction in zip(shapes.TEMPLATES, (math.pi / 4, 1.0, 0.5, 5 / 9)):
        assert template.shape == (16, 16) and template.mean() == pytest.approx(fraction, rel=0.05)
        assert template.min() >= 0 and template.max() == 1
    for shape in ("circle", "triangle", "cross"):
        template = shapes.TEMPLATES[SHAPES.index(shape)]
        assert ((template > 0.05) & (template < 0.95)).sum() >= 16, shape


@pytest.mark.parametrize("resolution", [32, 48, 64])
def test_checker_reads_the_dataset_renders(resolution):
    train, heldout = scenes("train", 150, seed=5), scenes("heldout", 50, seed=5)
    acc = caption_accuracy([render(s, resolution) for s in train + heldout], train + heldout)
    assert acc["full"] >= 0.98 and acc["color_region"] >= 0.98


@pytest.mark.parametrize("resolution", [32, 64])
def test_checker_rejects_blank_and_noise(resolution):
    some = scenes("train", 200, seed=6)
    blank = [np.full((resolution, resolution, 3), BACKGROUNDS[s.background], np.uint8) for s in some[:100]]
    blank += [np.full((resolution, resolution, 3), COLORS[s.objects[0].color], np.uint8) for s in some[100:]]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (200, resolution, resolution, 3), dtype=np.uint8)
    # specks: 12x12 blocks of random colours, several per cell; a colour alone must not be taken for an object
    specks = [np.asarray(Image.fromarray(x).resize((resolution, resolution), Image.NEAREST))
              for x in rng.integers(0, 256, (200, 12, 12, 3), dtype=np.uint8)]
    for images in (blank, noise, specks):
        acc = caption_accuracy(images, some)
        assert acc["full"] <= 0.05 and acc["color_region"] <= 0.05


def test_a_shape_is_named_only_with_half_of_its_cells_object_pixels():
    """A shape holding exactly half of its cell's object-coloured pixels is named; one pixel fewer than half is not
    (shapes.py: at least half), the rest being background pixels of the cell painted in another object colour."""
    obj = SceneObject("red", "square", "small", "top left", 0.25, 0.25)
    image = render(Scene("gray", [obj]), 48)
    labels = color_labels(image)
    area = int((labels[:24, :24] == PALETTE_NAMES.index("red")).sum())
    others = int(((labels[:24, :24] >= 0) & (labels[:24, :24] < len(COLORS))).sum()) - area  # antialiased edges
    free = np.argwhere(labels[:24, :24] == PALETTE_NAMES.index("gray"))  # the cell's background, row by row
    for painted, named in ((area - others, True), (area - others + 1, False)):
        assert len(free) >= painted
        sprayed = image.copy()
        sprayed[free[:painted, 0], free[:painted, 1]] = COLORS["blue"]
        assert check_scene(sprayed, [obj]) == [{"full": named, "color_region": named}]


def test_a_component_like_no_template_names_nothing():
    """A red outline of a square (2 px thick), of a shape's size and centred in its cell, overlaps every template by
    less than MIN_SHAPE_IOU: no kind, so neither the object nor its colour and region are found."""
    obj = SceneObject("red", "square", "large", "top left", 0.25, 0.25)
    image = render(Scene("gray", []), 48).copy()
    image[2:22, 2:22] = COLORS["red"]
    image[4:20, 4:20] = BACKGROUNDS["gray"]
    assert check_scene(image, [obj]) == [{"full": False, "color_region": False}]
    image[4:20, 4:20] = COLORS["red"]  # filled, the same component is a square
    assert check_scene(image, [obj]) == [{"full": True, "color_region": True}]


def test_a_cell_with_two_shapes_of_one_colour_names_either_kind():
    """Two red components in the top-left cell, a square (first in scan order) and a circle: each is found, whichever
    of the two the caption names."""
    image = Image.fromarray(render(Scene("gray", []), 64))
    draw = ImageDraw.Draw(image)
    draw_shape(draw, "square", 26, 8, 6, COLORS["red"])
    draw_shape(draw, "circle", 16, 23, 7, COLORS["red"])
    for kind in ("square", "circle"):
        obj = SceneObject("red", kind, "small", "top left", 0.25, 0.25)
        assert check_scene(np.asarray(image), [obj]) == [{"full": True, "color_region": True}], kind


def test_a_shape_across_two_cells_belongs_to_the_cell_of_its_centre():
    """Pixel i covers [i, i + 1): a 15 px square over columns 16-30 of a 48 px image has its centre at 23.5, in the
    left cell (x < 24); 16 px wide, its centre is on the boundary, 24.0, which the right cell holds."""
    left, right = (SceneObject("red", "square", "large", region, 0.25, 0.25) for region in ("top left", "top right"))
    for width, cell in ((15, left), (16, right)):
        image = render(Scene("gray", []), 48).copy()
        image[4:4 + width, 16:16 + width] = COLORS["red"]
        assert [r["full"] for r in check_scene(image, [left, right])] == [cell is left, cell is right]


def test_a_speck_smaller_than_any_shape_names_nothing():
    """A red 5 x 5 px square in a 24 x 24 px cell (0.043 of it) is below MIN_AREA (0.054: 0.3 x the smallest shape,
    a small triangle, half of its 0.6 x 0.6 box): no object. 6 x 6 px (0.0625) is a square."""
    obj = SceneObject("red", "square", "small", "top left", 0.25, 0.25)
    for side, named in ((5, False), (6, True)):
        image = render(Scene("gray", []), 48).copy()
        image[10:10 + side, 10:10 + side] = COLORS["red"]
        assert check_scene(image, [obj]) == [{"full": named, "color_region": named}]


def test_a_colour_far_from_every_palette_colour_is_no_colour():
    """An orange square, red its nearest palette colour but further than MAX_COLOR_DISTANCE from it, is not a red
    square: its pixels are no colour at all."""
    orange = np.array([200, 125, 0])
    distances = np.linalg.norm(PALETTE - orange, axis=1)
    assert PALETTE_NAMES[distances.argmin()] == "red" and distances.min() > MAX_COLOR_DISTANCE
    obj = SceneObject("red", "square", "large", "top left", 0.25, 0.25)
    for colour, named in ((orange, False), (COLORS["red"], True)):
        image = render(Scene("gray", []), 48).copy()
        image[4:19, 4:19] = colour
        assert check_scene(image, [obj]) == [{"full": named, "color_region": named}]


def test_checker_notices_a_wrong_kind_region_or_colour():
    rng = np.random.default_rng(0)
    for s in scenes("train", 40, seed=7):
        o = s.objects[0]
        free = [r for r in REGIONS if r not in {p.region for p in s.objects}]
        wrong_kind = dataclasses.replace(o, shape=rng.choice([k for k in SHAPES if k != o.shape]))
        row, col = divmod(REGIONS.index(free[0]), GRID)
        wrong_place = dataclasses.replace(o, region=free[0], x=(col + 0.5) / GRID, y=(row + 0.5) / GRID)
        wrong_color = dataclasses.replace(o, color=rng.choice([c for c in COLORS if c not in
                                                               {p.color for p in s.objects}]))
        for changed, expected in ((wrong_kind, dict(full=False, color_region=True)),
                                  (wrong_place, dict(full=False, color_region=False)),
                                  (wrong_color, dict(full=False, color_region=False))):
            image = render(Scene(s.background, [changed] + s.objects[1:]), 48)
            assert check_scene(image, s.objects)[0] == expected


def test_object_accuracy_counts_each_object():
    """Two-object scenes with one object drawn wrong: no image is fully right, half of the objects are."""
    pairs = [s for s in scenes("train", 200, seed=8) if len(s.objects) == 2][:20]
    images = []
    for s in pairs:
        first = s.objects[0]
        wrong = dataclasses.replace(first, shape=SHAPES[(SHAPES.index(first.shape) + 1) % len(SHAPES)])
        images.append(render(Scene(s.background, [wrong, s.objects[1]]), 48))
    acc = caption_accuracy(images, pairs)
    assert acc["full"] == 0 and acc["color_region"] == 1 and acc["object"] == 0.5
    ones = [s for s in scenes("train", 40, seed=8) if len(s.objects) == 1][:5]
    acc = caption_accuracy(images[:5] + [render(s, 48) for s in ones], pairs[:5] + ones)
    assert acc["object"] == pytest.approx((5 * 0.5 + 5 * 1) / 10) and acc["full"] == 0.5


def test_checker_rejects_float_images():
    s = scenes("train", 1)[0]
    with pytest.raises(ValueError, match="uint8"):
        check_scene(render(s, 32).astype(np.float32), s.objects)
    with pytest.raises(ValueError, match="one scene per image"):
        caption_accuracy([render(s, 32)], [s, s])


# ----------------------------------------------------------------------------------------------------------
# The built-in data as a data source: training loader and held-out split

def test_loader_call_b_of_rank_r_reads_its_slice_of_the_global_batch():
    B, world, encoder = 3, 2, BuiltinTextEncoder(context=2)
    ranks = [ShapesLoader(B, r, world, seed=4, resolution=32, p_long=0.0, text_context=2) for r in range(world)]
    dataset, seen = ShapesDataset(seed=4), []
    for b in range(3):
        for r, loader in enumerate(ranks):
            batch = next(loader)
            first = (b * world + r) * B
            images, captions = dataset.batch(range(first, first + B), 32, p_long=0.0)
            txt, mask = encoder(captions)
            assert torch.equal(batch["image"], images) and batch["caption"] == captions
            assert torch.equal(batch["txt"], txt) and torch.equal(batch["txt_mask"], mask)
            seen += map(int, batch["id"])
    assert sorted(seen) == list(range(3 * world * B))  # ranks disjoint, no sample skipped
    # the formula of train.py before the loader: optimizer step s, accumulation chunk i of rank r
    step, i, r, accumulation = 1, 1, 1, 2
    loader = ShapesLoader(B, r, world, seed=4)
    loader.load_state_dict({"batches": step * accumulation + i})
    first = step * B * world * accumulation + (r + i * world) * B
    assert next(loader)["id"] == [str(j) for j in range(first, first + B)]
    null_txt, null_mask = loader.null_txt, loader.null_mask
    assert torch.equal(null_txt, BuiltinTextEncoder()([""])[0]) and null_mask.all() and loader.x0_shape == (3, 32, 32)


def test_loader_resumes_from_its_state():
    loader = ShapesLoader(2, rank=1, world_size=2, seed=1)
    next(loader), next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(2)]
    assert state == {"batches": 2}  # a copy: reading on does not change it
    resumed = ShapesLoader(2, rank=1, world_size=2, seed=1)
    resumed.load_state_dict(state)
    loader.load_state_dict(state)  # also after reading on (warm-up, then restore)
    for want in expected:
        for got in (next(resumed), next(loader)):
            assert got["id"] == want["id"] and torch.equal(got["image"], want["image"])
            assert torch.equal(got["txt"], want["txt"])
    with pytest.raises(ValueError, match="probability of the long caption"):
        ShapesLoader(2, p_long=-0.5)


def test_heldout_split_score_is_the_caption_checker():
    split = HeldoutShapes(seed=3, resolution=32)
    idx = [4, 0, 7, 2]
    held = [ShapesDataset(seed=10_003, split="heldout").scene(i) for i in idx]  # a seed apart from training's
    assert split.scenes(idx) == held and split.captions(idx) == [long_caption(s) for s in held]
    images = split.images(idx)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert torch.equal(images[1], torch.tensor(render(held[1], 32)).permute(2, 0, 1))
    at_48 = HeldoutShapes(seed=3, resolution=48).images(idx[:1])[0]  # at the run's resolution
    assert torch.equal(at_48, torch.tensor(render(held[0], 48)).permute(2, 0, 1))
    images[2:] = torch.from_numpy(np.array(BACKGROUNDS["gray"], np.uint8))[:, None, None]  # two blank images
    images[0, :, :16] = torch.tensor(render(held[3], 32)).permute(2, 0, 1)[:, :16]  # half of another scene
    expected = caption_accuracy(images.permute(0, 2, 3, 1).numpy(), held)
    assert 0 < expected["full"] < 1
    assert split.score(images, idx) == {"caption_accuracy": expected["full"],
                                        "color_region_accuracy": expected["color_region"],
                                        "object_accuracy": expected["object"]}
    short = HeldoutShapes(seed=3, caption="short")
    assert short.captions(idx) == [short_caption(s) for s in held]
    with pytest.raises(ValueError, match="long and short"):
        HeldoutShapes(caption="medium")


def test_heldout_split_encodes_with_the_runs_text_context():
    idx = [0, 1, 2]
    encoded = {}
    for k in (0, 5):
        split = HeldoutShapes(text_context=k)
        encoded[k], mask = split.encode(idx)
        reference, reference_mask = BuiltinTextEncoder(context=k)(split.captions(idx))
        assert torch.equal(encoded[k], reference) and torch.equal(mask, reference_mask)
        assert torch.equal(split.null[0], BuiltinTextEncoder(context=k)([""])[0])
    assert not torch.equal(encoded[0], encoded[5])


def centre_token_kinds(teacher, split, n, seed=77):
    """Teacher tokens at each object's centre and the object's kind, over n scenes of a split: (M, D), (M,)."""
    import shapes
    data = shapes.ShapesDataset(seed=seed, split=split)
    images, _ = data.batch(range(n))
    with torch.no_grad():
        tokens = teacher.forward_features(images.float() / 127.5 - 1)  # (n, 64, D) on the 8x8 grid
    rows, kinds = [], []
    for i in range(n):
        for o in data.scene(i).objects:
            rows.append(tokens[i, int(o.y * 8) * 8 + int(o.x * 8)])
            kinds.append(SHAPES.index(o.shape))
    return torch.stack(rows), torch.tensor(kinds)


def test_builtin_teacher_tokens_encode_the_kinds():
    """A linear probe fitted on training scenes reads the kind of the object in a cell from its centre token, on
    other training scenes (on held-out scenes less well: the teacher never saw their pairs, shapes.ShapesTeacher)."""
    import shapes
    teacher = shapes.load_teacher()
    assert sum(p.numel() for p in teacher.parameters()) == 38_880  # the README's figure
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())  # frozen
    x, y = centre_token_kinds(teacher, "train", 400)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], len(SHAPES))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = centre_token_kinds(teacher, "train", 300, seed=78)
    assert (probe(x).argmax(1) == y).float().mean() >= 0.95
    # the same probe on an untrained teacher's tokens: the accuracy comes from training, not from the architecture
    x, y = centre_token_kinds(shapes.ShapesTeacher(), "train", 300, seed=78)
    assert (probe(x).argmax(1) == y).float().mean() < 0.6


def test_train_reads_the_builtin_teacher_as_it_was_trained():
    """train.teacher_tokens, through timm's interface (pretrained_cfg, patch size, prefix tokens), feeds the teacher
    images in [-1, 1] as train_teacher did, and keeps all 8 x 8 of its tokens of a 32 px image."""
    import shapes
    import train
    teacher = shapes.load_teacher()
    images = ShapesDataset(seed=1).batch(range(4))[0].float() / 127.5 - 1
    with torch.no_grad():
        torch.testing.assert_close(train.teacher_tokens(teacher, images, (8, 8)), teacher.forward_features(images),
                                   rtol=0, atol=1e-4)


@pytest.mark.slow
def test_builtin_teacher_file_is_what_its_command_trains():
    """`python shapes.py teacher` (seed, steps, one thread) reproduces the committed weights: exactly on the kind of
    CPU that made them (AVX-512 with AMX); another CPU rounds differently and its 1,200 steps end up to 27% away in a
    tensor (relative Frobenius distance, seen: AVX-512 against AVX2), where another seed is about 200% away."""
    import shapes
    from safetensors.torch import load_file
    teacher, _ = shapes.train_teacher()
    committed = load_file(shapes.TEACHER_FILE)
    assert committed.keys() == teacher.state_dict().keys()
    distance = {k: ((v - committed[k]).norm() / committed[k].norm()).item() for k, v in teacher.state_dict().items()}
    assert max(distance.values()) < 0.3, distance
    units = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx512f" in units and "amx_bf16" in units:  # the kind of CPU that made the file: bit for bit
        assert all(torch.equal(v, committed[k]) for k, v in teacher.state_dict().items()), distance


def test_teacher_command_overwrites_no_file(tmp_path, monkeypatch):
    """`python shapes.py teacher` refuses an --out that exists (by default the committed teacher) before training, and
    writes a new one whole."""
    import shapes
    from safetensors.torch import load_file
    before = open(shapes.TEACHER_FILE, "rb").read()
    with monkeypatch.context() as m:  # refused before training (a regression would not write over the teacher)
        m.setattr(shapes, "train_teacher", lambda *a, **k: pytest.fail("trained"))
        with pytest.raises(SystemExit):
            shapes.main(["teacher", "--steps", "1"])
    assert open(shapes.TEACHER_FILE, "rb").read() == before
    shapes.main(["teacher", "--steps", "1", "--out", str(tmp_path / "t.safetensors")])
    assert os.listdir(tmp_path) == ["t.safetensors"]
    assert load_file(tmp_path / "t.safetensors").keys() == load_file(shapes.TEACHER_FILE).keys()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be 1 or more, got 0"),  # an untrained teacher
    (["--steps", "-5"], "argument --steps: must be 1 or more, got -5"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**64 - 1], got -1"),
    (["--seed", str(2**64)], f"argument --seed: must be in [0, 2**64 - 1], got {2**64}"),
    (["--out", ""], "argument --out: an empty value"),
    (["--out", "/nonexistent/t.safetensors"], "--out /nonexistent/t.safetensors: no folder /nonexistent to write it"),
    (["--out", "locked/t.safetensors"], "--out locked/t.safetensors: cannot write in locked (no permission, or a "
                                        "read-only file system)"),
    (["--ou", "t.safetensors"], "unrecognized arguments: --ou"),  # not --out: the committed teacher would be refused
    ])
def test_teacher_command_refuses_bad_flags_before_training(argv, message, tmp_path, monkeypatch, capsys):
    import shapes
    monkeypatch.chdir(tmp_path)  # where `--out ""` left its '.tmp'
    monkeypatch.setattr(shapes, "train_teacher", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "locked").mkdir()  # as for a user without write permission (root has it)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: path != "locked" and access(path, mode, **k))
    with pytest.raises(SystemExit):
        shapes.main(["teacher", *argv])
    assert message in capsys.readouterr().err and os.listdir(tmp_path) == ["locked"] and not os.listdir("locked")


def test_token_labels_follow_the_objects():
    import shapes
    scene = shapes.Scene("gray", [shapes.SceneObject("red", "square", "large", "top left", 0.25, 0.25)])
    labels = shapes.token_labels(scene).view(3, 8, 8)  # the square covers 0.025..0.475 of the image: tokens 0..3
    assert (labels[0, :4, :4] == 0).all() and (labels[1, :4, :4] == SHAPES.index("square")).all()
    assert labels[0, 7, 7] == len(COLORS) + list(BACKGROUNDS).index("gray") and labels[1, 7, 7] == -100


def test_a_token_is_the_objects_where_it_covers_over_a_quarter_of_it():
    """grid 10 (80 px, 8 a token): a small square (half-side 12 px) centred on (22, 20) px covers pixels 10..34 across,
    8..32 down: three eighths of the tokens of column 4 (the square's), one eighth of those of row 4 (background's)."""
    import shapes
    scene = shapes.Scene("black", [shapes.SceneObject("red", "square", "small", "top left", 22 / 80, 20 / 80)])
    expected = torch.full((10, 10), len(COLORS) + list(BACKGROUNDS).index("black"))
    expected[1:4, 1:5] = list(COLORS).index("red")
    assert torch.equal(shapes.token_labels(scene, grid=10)[0].view(10, 10), expected)


def test_a_shape_is_placed_by_the_centre_of_its_pixels():
    """Pixel j covers [j, j + 1): a square over columns 12..19 of a 32 px image is centred on 16.0, the border of the
    two cells, which the checker gives to the right-hand cell (as int(GRID * 16 / 32)); rows 4..11 (centre 8)."""
    image = np.full((32, 32, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    image[4:12, 12:20] = COLORS["red"]
    found = [check_scene(image, [SceneObject("red", "square", "large", region, 0.5, 0.25)])[0]["full"]
             for region in ("top right", "top left")]
    assert found == [True, False]
