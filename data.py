"""
The prepared-data format that prepare.py writes, and its loader: what train.py and eval.py read with --data DIR
(--data builtin reads shapes.py instead, through the same interface).

Prepared directory (format "prx-shards/1"):

    index.json                   counts, schema, versions, settings, latent normalisation, skipped ids and reasons
    prepare.json                 the settings that decide what a shard holds: a resumed preparation must repeat them
    null_txt.npy                 (L0, D) encoded empty prompt, for caption dropout
    probe_txt.npy                (L1, D) encoded PROBE_CAPTION: with null_txt, which text encoder made the data
    train/shard-r{rank}-{k}/     written as <name>.tmp and renamed when complete: a shard that exists is whole
    eval/shard-r{rank}-{k}/      the held-out split (a seeded hash of the sample id), same layout
        meta.json                count, source position after this shard (for resume), skipped ids
        image.npy                (N, 3, R, R) uint8, centre crop, antialiased bicubic resize
        latent.npy               (N, C, R/f, R/f) bf16 bits (f: the VAE's downsampling), normalised
                                 (normalize_latent); absent for --vae none
        txt_{name}.npy           (sum of lengths, D) bf16 bits: T5Gemma tokens of every sample, unpadded, concatenated
        caption_{name}.npy, id.npy   utf-8 bytes, concatenated
        {ragged}_offsets.npy     (N + 1,) int64: sample i is rows offsets[i]:offsets[i + 1] of a ragged array

bf16 is stored as its raw 16 bits in int16 (numpy has no bfloat16): torch.from_numpy(a).view(torch.bfloat16).
Every .npy opens with np.load(mmap_mode="r"); a sample is one slice per field, no decoding.
"""

import argparse
import collections
import contextlib
import copy
import ctypes
import difflib
import errno
import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import pickle
import re
import resource
import signal
import socket
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

FORMAT = "prx-shards/1"
FIXED = ("image", "latent")  # one row per sample; every other array is ragged, with offsets
PREFETCH = 4  # batches ShardLoader reads ahead
# --vae: (diffusers class, hub id, subfolder, block: the image side is a multiple of it), the tokenizers of PRX part 2
VAES = {
    "flux": ("AutoencoderKL", "black-forest-labs/FLUX.1-schnell", "vae", 8),   # Apache-2.0, same AE as FLUX.1-dev
    "flux2": ("AutoencoderKLFlux2", "black-forest-labs/FLUX.2-klein-4B", "vae", 16),  # 8x down, 2x2 patch statistics
    "repa-e": ("AutoencoderKL", "REPA-E/e2e-flux-vae", None, 8),
    "dc-ae": ("AutoencoderDC", "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", None, 32),  # 32x down, 32 channels
}


def hub_unreachable(timeout=5):
    """None if the Hugging Face hub answers within `timeout` seconds (through huggingface_hub's proxies), else why."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return None
    except Exception:  # DNS failure, refused, timed out: all mean no download
        return f"{constants.ENDPOINT} cannot be reached"


def is_hub_id(source):
    """Whether `source` can name a hub repository (namespace/name, or name); a path such as /data/x or ./x cannot."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(source)
        return True
    except HFValidationError:
        return False


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off for a while (its load report: a table of weights used elsewhere)."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class NotOnThisMachine(RuntimeError):
    """Weights this machine lacks and cannot download; the message says how to bring them here."""


# what torch.load and safetensors raise on a file that is not weights (a saved web page, another format, a folder)
NOT_WEIGHTS = (OSError, EOFError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError)


def from_hub(load, what, files, flag, local="DIR", name=None):
    """load(), a from_pretrained or hf_hub_download call, from the local Hugging Face cache only, then online if the
    hub answers at all. Offline it fails at once, not after the libraries' retries, and says how to bring `what` here:
    `hf download {files}` into the cache, or into a folder whose copy (`local`) is passed with `flag`. name: the hub
    id or folder `flag` gave; one that can only be a folder (not a hub id: is_hub_id) must exist."""
    if name and not is_hub_id(name) and not os.path.exists(name):
        raise FileNotFoundError(f"{flag} {name}: no such folder; pass a folder holding a local copy, or a hub id")
    from huggingface_hub import constants
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub, transformers, diffusers and timm
    try:
        return load()
    except OSError as e:  # not cached (LocalEntryNotFoundError, OfflineModeIsEnabled, transformers' OSError)
        if name and os.path.exists(name):  # a path that is there but is not this model's: not a download to make
            raise FileNotFoundError(f"{flag} {name}: not a folder of {what}: {one_line(e, 300)}") from e
        cache_miss = e
    finally:
        constants.HF_HUB_OFFLINE = offline
    if why := hub_unreachable():
        raise NotOnThisMachine(f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. On a "
                               f"machine with internet, run `hf download {files}` and copy the cache "
                               f"(~/.cache/huggingface, or $HF_HOME) here, or `hf download {files} --local-dir DIR` "
                               f"and pass {flag} {local}") from cache_miss
    return load()


def whole(loaded, what, flag, name):
    """(model, loading info) of a transformers or diffusers from_pretrained(output_loading_info=True) -> the model.
    Both build the named class from any checkpoint, leaving at their initial values the weights it lacks: refused."""
    model, info = loaded
    if missing := sorted(info["missing_keys"]):
        raise ValueError(f"{flag} {name}: not {what}: {len(missing)} of its weights are not in the checkpoint "
                         f"(e.g. {missing[0]}); pass a folder or hub id of {what}")
    return model


def load_vae(name, path=None, device="cpu"):
    """-> (vae, shift, scale): the frozen VAE and its latent normalisation (see latent_stats)."""
    import diffusers
    class_name, hub_id, subfolder, _ = VAES[name]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    files = f"{hub_id} --include '{subfolder}/*'" if subfolder else hub_id
    load = getattr(diffusers, class_name).from_pretrained
    what, flag = f"the {name} VAE", "prepare.py --vae-path"

    def load_whole():
        try:
            loaded = load(path or hub_id, subfolder=subfolder, torch_dtype=dtype, output_loading_info=True)
        except RuntimeError as e:  # weights of other shapes: another VAE's folder
            raise ValueError(f"{flag} {path or hub_id}: not {what}: {one_line(e)}") from e
        return whole(loaded, what, flag, path or hub_id)  # FLUX.2's BatchNorm statistics left at 0 and 1: refused
    vae = from_hub(load_whole, f"{what} ({path or hub_id})", files, flag, name=path).to(device)
    vae = vae.eval().requires_grad_(False)
    return (vae, *latent_stats(vae))


def latent_stats(vae):
    """(shift, scale), each (C, p, p), with z_normalised = (z - shift) * scale at each position of a p x p patch.
    Flux / REPA-E: the config's shift_factor and scaling_factor (Flux.1's VAE config: 0.1159, 0.3611); DC-AE: its
    scaling_factor, no shift.
    FLUX.2: the AE's BatchNorm running statistics over 2x2-patchified latents (diffusers Flux2Pipeline)."""
    C = vae.config.latent_channels
    if hasattr(vae, "bn"):
        p = vae.config.patch_size[0]
        shift = vae.bn.running_mean.float().view(C, p, p)
        scale = (vae.bn.running_var.float() + vae.config.batch_norm_eps).rsqrt().view(C, p, p)
        return shift, scale
    factors = (getattr(vae.config, "shift_factor", None) or 0.0, vae.config.scaling_factor)
    return tuple(torch.full((C, 1, 1), float(f), device=vae.device) for f in factors)


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


# ----------------------------------------------------------------------------------------------------------
# Loading

def repair_hint(root):
    return (f"delete {root} and prepare it again (python prepare.py --out {root} with the settings in its "
            f"prepare.json), or copy it again if it is a copy")


def will_need(array, start, stop):
    """Asks the kernel to read rows start..stop-1 of a memory-mapped array now (madvise WILLNEED): a batch's rows
    asked for together are read from disk together, not one page fault after another in the reader thread."""
    mm = getattr(array, "_mmap", None)  # numpy.memmap's map, which starts at the granularity below its offset
    if mm is None or not hasattr(mmap, "MADV_WILLNEED"):  # not memory-mapped; not Linux
        return
    base = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    first = array.offset - base + start * array.strides[0]
    page = first - first % mmap.PAGESIZE  # madvise takes a page-aligned start
    mm.madvise(mmap.MADV_WILLNEED, page, array.offset - base + stop * array.strides[0] - page)


class DamagedShard(ValueError):
    """A shard whose bytes a read finds wrong (a row not UTF-8 text, a latent not finite): the command stops with
    one line naming the shard and row (errors_of_rank_0_first), not a traceback or a loss that blames --lr."""


class Shard:
    """One shard directory, every array memory-mapped (offsets read into memory), checked against what index.json
    expects: `count` rows and the arrays of `schema`, each ragged array's offsets rising from 0 to its length."""

    def __init__(self, path, count=None, schema=()):
        self.path, self.arrays = Path(path), {}
        self.repair = repair = repair_hint(self.path.parent.parent)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: listed in index.json but missing; {repair}")
        for p in sorted(self.path.glob("*.npy")):
            try:
                self.arrays[p.stem] = np.load(p, mmap_mode=None if p.stem.endswith("_offsets") else "r")
            except (ValueError, OSError, EOFError) as e:  # numpy's words for a file cut short: "mmap length", "EOF"
                if getattr(e, "errno", None) in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # a limit, not the file
                    raise ValueError(f"{p}: cannot be mapped ({e.strerror}): a dataset maps each array of each shard, "
                                     f"one open file each; raise the limits (`ulimit -n`, vm.max_map_count) and "
                                     f"start again") from e
                raise ValueError(f"{p}: unreadable ({e}); the shard is damaged (a file cut short?): {repair}") from e
        if missing := set(schema) - set(self.arrays):
            raise FileNotFoundError(f"{self.path}: {sorted(p + '.npy' for p in missing)} missing; {repair}")
        rows = {name: len(a) - name.endswith("_offsets") for name, a in self.arrays.items()
                if name in FIXED or name.endswith("_offsets")}
        if count is not None and set(rows.values()) - {count}:
            raise ValueError(f"{self.path}: index.json says {count} samples but the arrays hold {rows}; {repair}")
        for name in (n.removesuffix("_offsets") for n in self.arrays if n.endswith("_offsets")):
            offsets, size = self.arrays[name + "_offsets"], len(self.arrays.get(name, ()))
            if len(offsets) and (offsets[0] != 0 or offsets[-1] != size or (np.diff(offsets) < 0).any()):
                raise ValueError(f"{self.path}: {name}_offsets.npy does not index the {size} values of {name}.npy "
                                 f"(the offsets rise from 0 to that length); the shard is damaged: {repair}")

    def ragged(self, name, i):
        offsets = self.arrays[name + "_offsets"]
        return self.arrays[name][offsets[i]:offsets[i + 1]]

    def will_need(self, name, i):
        """will_need of row i of array `name` (of a ragged one, the rows its offsets give row i)."""
        offsets = self.arrays.get(name + "_offsets")
        will_need(self.arrays[name], *((offsets[i], offsets[i + 1]) if offsets is not None else (i, i + 1)))

    def string(self, name, i):
        try:
            return bytes(self.ragged(name, i)).decode()
        except UnicodeDecodeError as e:
            raise DamagedShard(f"{self.path}: row {i} of {name}.npy is not UTF-8 text ({e.reason}); the shard is "
                               f"damaged: {self.repair}") from None


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # an image folder's (prepare)


def how_to_prepare(root, flags=""):
    """What to do with a folder given as prepared data that holds no index.json."""
    root = Path(root)
    if (root / "prepare.json").exists():
        return f"its preparation did not finish: run the same prepare.py command again, which resumes (its settings: " \
               f"{root / 'prepare.json'})"
    if any((root / name).exists() for name in ("config.json", "model.safetensors")):  # (a run's grids are images)
        return "a training run or checkpoint, not data: name the folder prepare.py wrote (the run's config.json)"
    sources = IMAGE_EXTENSIONS | {".parquet", ".tar"}
    if root.is_file() and root.suffix.lower() in sources or root.is_dir() and any(
            p.suffix.lower() in sources for p in itertools.islice(root.rglob("*"), 10_000)):  # subfolders too
        source = root.parent if root.suffix.lower() in IMAGE_EXTENSIONS else root  # prepare.py reads an image's folder
        return f"it holds a source's files: prepare them into a folder of their own (`python prepare.py --source " \
               f"{source} --out NEW {flags}...`) and pass that"
    if not root.exists() and re.search(r"[:=%\s]", str(root)):
        return "no such folder; a mixture is DIR:WEIGHT,DIR:WEIGHT (numbers, e.g. data/a:0.7,data/b:0.3)"
    return f"prepare one with `python prepare.py --out {root} {flags}...`"


def read_index(root):
    """A prepared directory's index.json, or an error that says how to prepare or repair it."""
    path = Path(root) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {how_to_prepare(root)}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError: a file cut short
        raise ValueError(f"{path}: unreadable ({e}); {repair_hint(Path(root))}") from e


class PreparedDataset:
    """The samples of one split of a prepared directory, numbered 0..N-1 across its shards."""

    def __init__(self, root, split="train"):
        self.root, self.index = Path(root), read_index(root)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # each memory map holds a file descriptor
        with contextlib.suppress(ValueError, OSError):  # macOS refuses an unlimited hard limit as the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        entries = [s for s in self.index[split]["shards"] if s["count"]]
        self.shards = [Shard(self.root / s["path"], s["count"], self.index["schema"]) for s in entries]
        counts = [s["count"] for s in entries]
        self.shard_of = np.repeat(np.arange(len(counts)), counts)
        self.row_of = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, np.int64)

    def __len__(self):
        return len(self.row_of)

    def locate(self, i):
        return self.shards[self.shard_of[i]], self.row_of[i]


def host_buffer(shape, dtype, pin):
    """Batch memory: pinned for CUDA (torch caches it); numpy's for CPU (torch.empty faults in fresh pages)."""
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


def pad_text(txt, mask, length):
    """Right-pad text (B, L, D) and its mask (B, L) to `length` tokens; the padding is masked out."""
    extra = length - txt.shape[1]
    return F.pad(txt, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def pad_to_common(txt, mask, other_txt, other_mask):
    """Two text batches (a caption batch and the empty prompt) padded to a common length: the four tensors."""
    length = max(txt.shape[1], other_txt.shape[1])
    return (*pad_text(txt, mask, length), *pad_text(other_txt, other_mask, length))


PROBE_CAPTION = "a red cube on a wooden table beside a window at sunset, seen from above"


def write_whole(path, write):
    """write(f), f a binary file beside `path`, then the rename: a reader, or a process killed midway, sees the old
    file or the whole new one, never part of one (nor a temporary file left behind by an error)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_prompt_text(root, device="cpu", name="null_txt"):
    """A prompt prepare.py encoded beside the shards: the empty prompt (null_txt) or PROBE_CAPTION (probe_txt), as
    float32 (1, L0, D) and its mask (1, L0)."""
    try:
        txt = torch.from_numpy(np.load(Path(root) / f"{name}.npy")).view(torch.bfloat16).float()[None].to(device)
    except (ValueError, OSError, EOFError) as e:  # missing, or cut short
        raise ValueError(f"{Path(root) / f'{name}.npy'}: unreadable ({e}); {repair_hint(root)}") from e
    return txt, torch.ones(txt.shape[:2], dtype=torch.bool, device=device)


def caption_share(captions):
    """--captions long, short or mixed[:p] -> the probability of drawing the long caption."""
    mode, colon, p = captions.partition(":")
    try:
        p_long = float(p if colon else 0.5) if mode == "mixed" else float(mode == "long")
    except ValueError:
        p_long = -1.0
    if mode not in ("long", "short", "mixed") or not 0 <= p_long <= 1 or colon and mode != "mixed":
        raise ValueError(f"captions {captions!r}: choose long, short or mixed[:p] (long with probability p, "
                         f"0 <= p <= 1)")
    return p_long


def heldout_caption(captions, data):
    """The run's caption mode (its last --data phase's, else --captions) -> the caption the held-out prompts are read
    with: short for short, else long (mixed trains on both)."""
    if data != "builtin":
        captions = parse_data_phases(data)[-1][2] or captions
    return "short" if captions == "short" else "long"


def dataset_key(path):
    """What keys a prepared directory's loader position and seeds its shuffle: its path relative to the repository
    (this file's folder) when inside it, whatever the working directory and spelling ('data/mj/', './data/mj' and its
    absolute path are data/mj, in any clone, on any machine), else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(__file__)))
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def parse_data_phases(spec):
    """'A:0.7,B:0.3@0;C:1@90000:mixed' -> [(0, {"A": 0.7, "B": 0.3}, None), (90000, {"C": 1.0}, "mixed")]: from
    optimizer step N on, draw each sample from these prepared directories with these weights, and with this caption
    mode (None: --captions). 'A' alone is 'A:1@0'."""
    phases, expected = [], f"data spec {spec!r}: expected DIR[:weight],...[@step];... with weights > 0"
    if os.path.isdir(spec) and re.search(r"[;,@]|:[-+.\deE]+$", spec.rstrip("/")):
        raise ValueError(f"data spec {spec!r}: a folder whose name holds ; , @ or ends in :number, which --data reads "
                         f"as its syntax: rename it, or pass a symbolic link to it")
    for part in spec.split(";"):
        mix, _, start = part.strip().partition("@")
        start, _, captions = start.partition(":")
        weights = {}
        for item in mix.split(","):
            path, colon, weight = item.strip().rpartition(":")
            if not colon or not re.fullmatch(r"[-+.\deE]+|[-+]?(nan|inf|infinity)", weight, re.I):  # a path, whole
                path, weight = item.strip(), "1"
            path = os.path.normpath(path) if path else path  # 'data/mj/' and './data/mj' are data/mj
            if path == "builtin":
                raise ValueError(f"data spec {spec!r}: builtin (the built-in shapes) is not a prepared directory and "
                                 f"takes no mixture or phases: --data builtin, with --captions for its caption mode "
                                 f"(a later phase: --resume with another --captions)")
            if os.path.abspath(path) in map(os.path.abspath, weights):  # 'd' and '/abs/d' too (a link: another name)
                raise ValueError(f"data spec {spec!r}: {path} is named twice in one phase")
            try:
                weights[path] = float(weight)
            except ValueError:
                raise ValueError(f"{expected}, got the weight {weight!r}") from None
        if not all(weights) or not all(0 < w < math.inf for w in weights.values()):
            raise ValueError(expected)
        if captions:
            caption_share(captions)
        if not re.fullmatch(r"\d*", start):
            raise ValueError(f"data spec {spec!r}: a phase starts at a whole optimizer step, e.g. @90000, got @{start}")
        phases.append((int(start or 0), weights, captions or None))
    if phases[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(phases, phases[1:])):
        raise ValueError(f"data spec {spec!r}: the first phase starts at step 0 and the steps increase")
    return phases


class LatentNorm:
    """index.json's latent normalisation, equal to another within 1% (FLUX.2's BatchNorm statistics are read in bf16
    on a GPU, in fp32 on a CPU)."""

    def __init__(self, norm):
        self.norm = norm and {k: np.asarray(norm[k], dtype=np.float64) for k in ("shift", "scale")}

    def __eq__(self, other):
        if self.norm is None or other.norm is None:
            return self.norm is other.norm
        return all(a.shape == b.shape and np.allclose(a, b, rtol=1e-2) for a, b in
                   ((self.norm[k], other.norm[k]) for k in ("shift", "scale")))


class TextEncodings:
    """A prepared directory's encodings of the empty prompt and of PROBE_CAPTION (data prepared before the probe has
    the first only), equal to another's when one text encoder made both: each encoding they both hold has the same
    shape and a cosine similarity over 0.99 (bf16 on a GPU and fp32 on a CPU differ in the last bits)."""

    def __init__(self, root):
        names = ["null_txt"] + ["probe_txt"] * (Path(root) / "probe_txt.npy").exists()
        self.encodings = {name: load_prompt_text(root, name=name)[0].flatten() for name in names}

    def __eq__(self, other):
        pairs = [(self.encodings[k], other.encodings[k]) for k in self.encodings.keys() & other.encodings.keys()]
        return all(a.shape == b.shape and F.cosine_similarity(a, b, dim=0).item() > 0.99 for a, b in pairs)


def sample_space(root):
    """What the datasets of one run must share: the shapes the model sees, the VAE and its normalisation (a latent of
    another space would be decoded by the first one's), the text encoder (its width, its encodings)."""
    index = read_index(root)
    schema, settings = index["schema"], index.get("settings", {})
    return {"latent shape": schema.get("latent"), "image shape": schema.get("image"), "VAE": settings.get("vae"),
            "latent normalisation": LatentNorm(index.get("latent_norm")),
            "text width": sorted({v["shape"][-1] for k, v in schema.items()
                                  if k.startswith("txt_") and not k.endswith("_offsets")}),
            "text encoder": TextEncodings(root)}


ENCODERS = ("VAE", "latent normalisation", "text width", "text encoder")  # what a resolution stage keeps


def space_differences(root, other, keys=None):
    """The entries of sample_space (all, or `keys`) in which two prepared directories differ."""
    space, others = sample_space(root), sample_space(other)
    return [key for key, value in space.items() if key in (keys or space) and value != others[key]]


class ShardLoader:
    """Batches of prepared samples for one rank, read ahead by a background thread. `next(loader)` gives
    {"latent" (B, C, h, w) float32 | "image" (B, 3, R, R) uint8, "txt" (B, L, D) bf16, "txt_mask" (B, L) bool,
    "caption" list[str], "id" list[str]}. Every rank draws the same global batch (world_size * batch_size samples)
    and reads its own slice; each dataset is read in a seeded permutation per epoch, so state_dict() (batches drawn,
    per-dataset epoch and position) resumes with the next unseen sample. Steps in `data` (parse_data_phases) count
    optimizer steps of grad_accum loader batches."""

    def __init__(self, data, batch_size, rank=0, world_size=1, seed=0, captions="long", device="cpu",
                 grad_accum=1, images=False):
        self.phases = parse_data_phases(data)
        self.names = sorted({name for _, weights, _ in self.phases for name in weights}, key=dataset_key)
        self.keys = [dataset_key(name) for name in self.names]  # of the positions and shuffles: spelling aside
        self.datasets = [PreparedDataset(name) for name in self.names]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.grad_accum = torch.device(device), grad_accum
        self.p_long = [caption_share(mode or captions) for _, _, mode in self.phases]  # per phase
        for name, ds in zip(self.names, self.datasets):  # the caption fields of the phases that draw from it
            needed = {field for (_, weights, _), p_long in zip(self.phases, self.p_long) if name in weights
                      for field, p in (("long", p_long), ("short", 1 - p_long)) if p > 0}
            if not len(ds):
                raise ValueError(f"{name}: has no training samples (prepared with --eval-fraction 1: a set for "
                                 f"--eval-data)")
            if needed - set(ds.index["captions"]):
                raise ValueError(f"{name}: has {len(ds)} samples and captions {ds.index['captions']}; the caption "
                                 f"modes of its phases (--captions {captions}, or @step:mode) need {sorted(needed)}")
        if differ := sorted({k for ds in self.datasets[1:] for k in space_differences(ds.root, self.datasets[0].root)}):
            raise ValueError(f"datasets {self.names} differ in {', '.join(differ)} and cannot be mixed: prepare them "
                             f"with the same --resolution, --vae and --text-encoder")
        schema = self.datasets[0].index["schema"]
        self.has_latent = "latent" in schema
        self.x0_shape = tuple(schema["latent" if self.has_latent else "image"]["shape"])  # what the model denoises
        # prepare.py stores the images beside any latents; bench.py's latent-only synthetic data: the Flux VAE's 8x
        self.resolution = schema["image"]["shape"][-1] if "image" in schema else self.x0_shape[-1] * 8
        self.images = images or not self.has_latent
        self.null_txt, self.null_mask = load_prompt_text(self.datasets[0].root, self.device)  # (1, L0, D), (1, L0)
        self.worker, self.perms = ThreadPoolExecutor(1), {}
        self.load_state_dict({"batches": 0, "cursors": {}})

    def state_dict(self):
        return copy.deepcopy(self.state)

    def load_state_dict(self, state):
        """Continue after the batch last returned before that state_dict(); batches read ahead are dropped. -> the
        datasets the state has no position in (a later phase's, or one named otherwise), which start afresh. A
        dataset of another size than the state's (prepared again since) is refused: its permutation, and so the
        samples to come, would differ (its position could even lie past its end)."""
        sizes = {key: len(ds) for key, ds in zip(self.keys, self.datasets)}
        for name, (_, position) in state["cursors"].items():
            then = state.get("sizes", {}).get(name)  # states written before the sizes were kept: the position only
            if name in sizes and (then is not None and then != sizes[name] or position > sizes[name]):
                raise ValueError(f"--data {name} holds {sizes[name]} samples, {then or f'over {position}'} when the "
                                 f"state was saved: prepared again since, it cannot continue where it was; use the "
                                 f"dataset the run read, or name this one by another path (a new dataset starts at "
                                 f"its first sample)")
        self.state = copy.deepcopy(state)
        fresh = [key for key in self.keys if key not in self.state["cursors"]]
        self.state["cursors"].update({name: [0, 0] for name in fresh})
        self.state["sizes"] = {**self.state.get("sizes", {}), **sizes}
        for future, _ in getattr(self, "pending", []):
            future.cancel()
        self.planned, self.pending = copy.deepcopy(self.state), collections.deque()
        return fresh

    def permutation(self, d, epoch):
        if self.perms.get(d, (None,))[0] != epoch:  # one cached per dataset: drawn once an epoch, not once a batch
            rng = np.random.default_rng([self.seed, zlib.crc32(self.keys[d].encode()), epoch])
            self.perms[d] = epoch, rng.permutation(len(self.datasets[d]))
        return self.perms[d][1]

    def take(self, state, d, n):
        """The next n sample numbers of dataset d, moving to the next epoch's permutation when one is used up."""
        out, cursor = [], state["cursors"][self.keys[d]]
        while n:
            perm = self.permutation(d, cursor[0])
            k = min(n, len(perm) - cursor[1])
            out.append(perm[cursor[1]:cursor[1] + k])
            n, cursor[1] = n - k, cursor[1] + k
            if cursor[1] == len(perm):
                cursor[:] = [cursor[0] + 1, 0]
        return np.concatenate(out)

    def plan(self, state):
        """The global batch after `state` (identical on every rank) -> this rank's (dataset, sample, long) slice.
        Micro-batch r of the world's draws its datasets and caption lengths from (seed, batches x world + r),
        train.py's numbering of the global micro-batches: a step draws the same on any number of processes."""
        step = state["batches"] // self.grad_accum
        phase = [i for i, (start, _, _) in enumerate(self.phases) if start <= step][-1]
        weights, p_long = self.phases[phase][1], self.p_long[phase]
        p = np.array([weights.get(name, 0.0) for name in self.names])
        which, use_long = [], []
        for r in range(self.world_size):
            rng = np.random.default_rng([self.seed, state["batches"] * self.world_size + r])
            which.append(rng.choice(len(p), size=self.batch_size, p=p / p.sum()))
            use_long.append(rng.random(self.batch_size) < p_long)
        which, use_long = np.concatenate(which), np.concatenate(use_long)
        index = np.empty(len(which), dtype=np.int64)
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
        rows = [(*self.datasets[d].locate(i), "long" if long else "short")
                for d, i, long in zip(which, index, use_long)]
        for shard, row, field in rows:  # every read of the batch asked for, then the copies
            for key in (*arrays, f"txt_{field}"):
                shard.will_need(key, row)
        for j, (shard, row, field) in enumerate(rows):
            for key, out in arrays.items():
                out[j] = shard.arrays[key][row]
            chunks.append(shard.ragged(f"txt_{field}", row))
            batch["caption"].append(shard.string(f"caption_{field}", row))
            batch["id"].append(shard.string("id", row))
        if "latent" in arrays:  # bf16 bits whose exponent is all ones: NaN or inf, one pass over the batch
            if (bad := ((arrays["latent"] & 0x7F80) == 0x7F80).reshape(len(rows), -1).any(1)).any():
                shard, row, _ = rows[int(bad.argmax())]
                raise DamagedShard(f"{shard.path}: row {row} of latent.npy is not finite (NaN or inf); the shard is "
                                   f"damaged, or the VAE failed on that image: {shard.repair}")
        batch["txt"], batch["txt_mask"] = batch_text(chunks, pin)
        return batch

    def __next__(self):
        while len(self.pending) < PREFETCH:  # planned here, read by the worker
            plan = self.plan(self.planned)
            self.pending.append((self.worker.submit(self.load, *plan), copy.deepcopy(self.planned)))
        future, state = self.pending[0]
        loaded = future.result()  # a read error leaves state_dict() at the last batch returned
        self.pending.popleft()
        self.state = state
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in loaded.items()}
        if "latent" in batch:
            batch["latent"] = batch["latent"].view(torch.bfloat16).float()
        return batch


def heldout_order(ids):
    """Held-out sample i is the i-th id by sha256: the first N a uniform draw over the source, the same whatever
    order the shards hold them in (the number of processes that prepared the data, the source files each read)."""
    return sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).digest())


class HeldoutSplit:
    """The eval split of a prepared directory: captions, encoded text and real images of sample indices (numbered by
    heldout_order), and null (the encoded empty prompt). score() is empty: real images are judged by the feature
    metrics (eval.Metrics)."""

    def __init__(self, root, num_samples, caption="long"):
        """caption: the field prompts are read from, checked here; None: images only (eval.py ref)."""
        self.prepared, self.caption = PreparedDataset(root, "eval"), caption
        if num_samples > len(self.prepared):
            raise ValueError(f"{root} has {len(self.prepared)} held-out samples, fewer than the {num_samples} asked "
                             f"for: ask for fewer, or prepare with a larger --eval-fraction")
        if caption is not None and caption not in self.prepared.index["captions"]:
            raise ValueError(f"{root} has captions {self.prepared.index['captions']}, not {caption!r}: pick one of "
                             f"those (train.py --captions, eval.py --caption)")
        self.null = load_prompt_text(root)  # (1, L0, D), (1, L0)
        self.order = heldout_order([shard.string("id", row)
                                    for shard, row in map(self.prepared.locate, range(len(self.prepared)))])

    def rows(self, indices):
        return (self.prepared.locate(self.order[i]) for i in indices)  # (shard, row) pairs

    def captions(self, indices):
        return [shard.string(f"caption_{self.caption}", row) for shard, row in self.rows(indices)]

    def encode(self, indices):
        """-> txt (B, L, D) float32, mask (B, L) bool."""
        txt, mask = batch_text([shard.ragged(f"txt_{self.caption}", row) for shard, row in self.rows(indices)])
        return txt.float(), mask

    def images(self, indices):
        """-> uint8 (B, 3, R, R)."""
        return torch.from_numpy(np.stack([shard.arrays["image"][row] for shard, row in self.rows(indices)]))

    def images_id(self, num_samples):
        """The sha256 of held-out images 0..num_samples-1, those an evaluation of as many prompts is compared with:
        a reference file names the images it holds statistics of (eval.Metrics), another dataset's is refused."""
        digest = hashlib.sha256()
        for start in range(0, num_samples, 256):
            digest.update(self.images(range(start, min(start + 256, num_samples))).numpy().tobytes())
        return f"sha256 {digest.hexdigest()}"

    def score(self, images, indices):
        return {}


# ----------------------------------------------------------------------------------------------------------
# --data: "builtin" (shapes.py) or prepared directories with weights and phases

def data_dirs(spec):
    """The prepared directories a --data spec names, in order of appearance ([] for builtin)."""
    phases = [] if spec == "builtin" else parse_data_phases(spec)
    return list(dict.fromkeys(name for _, weights, _ in phases for name in weights))


def open_loader(spec, batch_size, rank, world_size, seed, captions, device, grad_accum, resolution, text_context,
                images):
    """The training loader of --data: shapes.ShapesLoader or ShardLoader, one interface."""
    if spec == "builtin":
        from shapes import ShapesLoader
        return ShapesLoader(batch_size, rank, world_size, seed, resolution, caption_share(captions), text_context,
                            device)
    return ShardLoader(spec, batch_size, rank, world_size, seed, captions, device, grad_accum, images)


def open_heldout(spec, num_samples, caption, resolution, seed, text_context):
    """The held-out prompts of --data (the first directory of a mixture): shapes.HeldoutShapes or HeldoutSplit."""
    if spec == "builtin":
        from shapes import HeldoutShapes
        return HeldoutShapes(seed, caption, resolution, text_context)
    return HeldoutSplit(data_dirs(spec)[0], num_samples, caption)


# ----------------------------------------------------------------------------------------------------------
# The command lines of train.py, eval.py, prepare.py and bench.py: errors that name the flag; torchrun's workers

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher():
    """A process torchrun started gets SIGTERM when torchrun dies (Linux): killed with SIGKILL, torchrun cannot stop
    its workers, which would run on into the run or data folder unseen. The signal comes when the thread that started
    the process ends: torchrun starts its workers from its main thread. -> whether the kernel took the setting."""
    try:
        return ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def quiet_unless_rank_0(rank):
    """Under torchrun, the library warnings and notes every rank meets alike (Python warnings, torch's, diffusers' and
    transformers' logging below ERROR, the hub's and transformers' progress bars) print once, on rank 0, not once a
    process. Errors and tracebacks still print on every rank."""
    if rank != 0:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()  # transformers' too: it reads this setting when it is imported, with the first model


@contextlib.contextmanager
def exit_on(prefix=None, errors=(ValueError, FileNotFoundError)):
    """An error of `errors` inside stops the command with one line, `error: <prefix>: <the error>`, not a traceback."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"error: {prefix}: {e}" if prefix else f"error: {e}")


def one_line(e, n=200):
    """An exception's message in an error line: one line (torch's load errors list a key a line), n characters."""
    return " ".join(str(e).split())[:n]


def nearest_existing(path):
    """path, absolute, or its nearest parent that exists: the folder an output there is made in."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def unwritable(path):
    """Why an output at `path` (a folder or file to make, or one that is there) cannot be written, or None: the
    nearest existing folder on it is a file, or not writable. Checked before any work, not when writing fails."""
    there = nearest_existing(path)
    if not there.is_dir():
        return f"{there} is a file, not a folder"
    if not os.access(there, os.W_OK | os.X_OK):
        return f"cannot write in {there} (no permission, or a read-only file system)"
    return None


def process_ended(host, pid):
    """Whether process `pid` of `host` has ended (or is a zombie, until its parent reaps it); unknown, so False, on
    another host or without /proc."""
    if host != socket.gethostname() or not os.path.isdir("/proc"):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stop_on_signals(message, master, rank_0=None):
    """Ctrl-C, or a SIGTERM (kill, a scheduler's time limit), ends the command with one line: `message()` on rank 0,
    where to resume; the other ranks exit quietly, but rank 1 says it where rank 0, `rank_0` (host, pid), has ended:
    killed, it said nothing, and torchrun stops the others. -> {signal: the handler it replaces}, for the caller to
    put back (a caller in this process, as the tests, keeps its own)."""
    def stop(signum, frame):
        why = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if master:
            raise SystemExit(f"\nstopped ({why}); {message()}")
        if rank_0 and os.environ.get("RANK") == "1" and process_ended(*rank_0):
            raise AnotherProcessEnded(f"\nstopped ({why}; rank 0 ended); {message()}")  # said at once
        raise SystemExit(128 + signum)
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and after a flag's help its default, where it has one (not None, off or empty) and
    the help does not say it."""

    def _get_help_string(self, action):
        if any(action.default is off for off in (None, False, argparse.SUPPRESS)) or action.default == [] or \
                "default" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse's, but under torchrun rank 0 alone prints an argument error (every rank parses the same flags); the
    other ranks exit with its status, quietly. Under torchrun they first wait for rank 0 to print and exit, whereupon
    torchrun stops them: a rank failing first would have torchrun stop rank 0 before it printed."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)  # --prom is not --prompt: a flag is given whole, or refused

    def parse_args(self, args=None, namespace=None):
        """argparse's, refusing an empty value: `--resume "$CKPT"` with CKPT unset would otherwise start afresh, and
        naming an unknown flag first (argparse would take its value for a subcommand: "invalid choice")."""
        words = sys.argv[1:] if args is None else args
        parsers = [self, *(p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                           for p in a.choices.values())]
        flags = {s for p in parsers for a in p._actions for s in a.option_strings}
        for name in (w.split("=")[0] for w in itertools.takewhile(lambda w: w != "--", words)):
            if name.startswith("--") and name not in flags:  # compared without the dashes every flag shares
                close = difflib.get_close_matches(name[2:], [f[2:] for f in flags if f.startswith("--")], n=1)
                self.error(f"{name} is not a flag" + (f": did you mean --{close[0]}?" if close else ""))
        parsed = super().parse_args(args, namespace)
        actions = [a for a in self._actions if a.option_strings]
        for a in self._actions:  # the flags and operands of the subcommand given (bench.py model, ...)
            if isinstance(a, argparse._SubParsersAction):
                actions += a.choices[getattr(parsed, a.dest)]._actions
        for action in actions:
            if getattr(parsed, action.dest, None) == "":  # a list may hold one: eval.py sample --prompt ""
                self.error(f"argument {'/'.join(action.option_strings) or action.dest}: an empty value (an unset "
                           f"shell variable?): give one, or leave the flag out")
        return parsed

    def given(self, argv):
        """The destinations of the flags typed in argv: chosen by the user, not defaults."""
        return {a.dest for a in self._actions for word in argv if word.split("=")[0] in a.option_strings}

    def error(self, message):
        if os.environ.get("RANK", "0") != "0":
            if "TORCHELASTIC_RUN_ID" in os.environ:
                time.sleep(QUIET_RANK_WAIT_S)
            raise SystemExit(2)
        super().error(message)


QUIET_RANK_WAIT_S = 30  # time for rank 0, which parses the same flags, to print its error and exit


class AnotherProcessEnded(SystemExit):
    """Said at once by any rank: the process that ended may be rank 0, killed before it could say anything."""


@contextlib.contextmanager
def stop_when_another_process_ends(where_to_resume=None):
    """Under torchrun on gloo, a process that ends (killed, or stopped by an error it has printed) fails the others'
    next collective at once: one line instead of each one's traceback, with where_to_resume() if given. (On NCCL they
    wait in the collective until torchrun stops them: stop_on_signals.)"""
    try:
        yield
    except RuntimeError as e:
        lost = re.search(r"Connection \w+ by peer", str(e))
        if not (lost and torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise  # a single process's network error (a hub download) keeps its traceback
        resume = f"; {where_to_resume()}" if where_to_resume else ""
        raise AnotherProcessEnded(f"error: another process of this run ended ({lost.group()}){resume}") from None


def quiet_exit(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def errors_of_rank_0_first():
    """Around a script's main: under torchrun, the error that stops a rank other than 0 (a SystemExit with a message)
    waits QUIET_RANK_WAIT_S before it is printed. Where rank 0 met it too (the same flags and files: most of them),
    torchrun stops this rank meanwhile and the error shows once, not once per process; where only this rank met it, it
    still shows. A damaged shard found mid-run (DamagedShard) stops it so too, with one line; a collective that fails
    because another process ended, with one line at once. Once the rank's way out is decided, torchrun's SIGTERM (it
    stops the other ranks when one ends) is ignored: in the interpreter's teardown, stop_on_signals' handler would
    print a traceback and a second, other reason."""
    try:
        try:
            with stop_when_another_process_ends():
                yield
        except DamagedShard as e:  # found mid-run: one line
            raise SystemExit(f"error: {e}") from None
    except SystemExit as e:
        if isinstance(e.code, str) and os.environ.get("RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" in os.environ \
                and not isinstance(e, AnotherProcessEnded):
            signal.signal(signal.SIGTERM, quiet_exit)  # stopped by torchrun: rank 0 said it (not stop_on_signals')
            time.sleep(QUIET_RANK_WAIT_S)
        raise
    finally:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)


def number(kind, low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: kind (int or float) in [low, high] (open at either end with low_open, high_open), with the
    range in the error message."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}")
        if not (low < value if low_open else low <= value) or not (value < high if high_open else value <= high) \
                or not math.isfinite(value):
            bounds = f"{'(' if low_open else '['}{low}, {high}{']' if high < math.inf and not high_open else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    return parse


# the argparse types of most flags
count, positive, fraction = number(int, 1), number(float, 0, low_open=True), number(float, 0, 1)
MAX_RESOLUTION = 4096  # PRX trains up to 1024 px; one 4096 px image is 48 MiB, a batch of them GBs
side = number(int, 1, MAX_RESOLUTION)  # an image side in pixels: a mistyped one would fill the memory
seed_number = number(int, 0, 2**62)  # torch.Generator's seeds are 64-bit; seed + i stays inside
