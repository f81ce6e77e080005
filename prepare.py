"""
Turn a real dataset into prepared shards (data.py's format), once, before the clock: decode and clean every sample,
centre-crop to R x R, encode the image with a frozen VAE (--vae: PRX part 2's tokenizers, FLUX.1's, FLUX.2's, REPA-E's
or DC-AE's; a KL posterior sampled with a per-sample seed) and every caption field with T5Gemma, and write shards of
memory-mapped .npy files plus index.json.

    python prepare.py --out data/mj --source brivangl/midjourney-v6-llava --captions long=llava,short=prompt
    torchrun --nproc-per-node 8 prepare.py --out data/mj        # each rank encodes its own part of the source files
    python prepare.py --out data/px --vae none --resolution 512 --source /path/to/images --captions long=txt
                                            # pixel space, a folder of images with <name>.txt captions (field txt)

Sources: a hub dataset id (streamed), a folder of images with .txt/.json captions, or a glob of local .parquet/.tar
files. Undecodable or tiny images, empty captions, unreadable caption files and text that is not UTF-8 are skipped
and counted in index.json with their reason; a seeded hash of the sample id puts --eval-fraction of the samples into
the eval split (--eval-fraction 1: an evaluation-only set, for train.py --eval-data). Shards are written to .tmp
and renamed, so an interrupted preparation resumes after its last whole shard, with the settings it started with
(prepare.json; other values, or source files added or removed, are refused rather than mixed into one dataset). A
source file that cannot be read (a corrupt parquet or tar) stops the preparation naming it: with a readable copy in
its place, the same command resumes.
"""

import argparse
import collections
import glob
import hashlib
import importlib.metadata
import io
import itertools
import json
import os
import re
import shutil
import signal
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from data import FIXED, FORMAT, IMAGE_EXTENSIONS, PROBE_CAPTION, VAES, NotOnThisMachine, Parser, count, \
    die_with_launcher, errors_of_rank_0_first, exit_on, fraction, from_hub, hub_unreachable, is_hub_id, load_vae, \
    normalize_latent, one_line, quiet_transformers, quiet_unless_rank_0, repair_hint, seed_number, side, \
    stop_on_signals, unwritable, whole, write_whole


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
    """PRXPipeline's own prompt cleaning (DeepFloyd's clean_text: lower case, no urls, @handles, CJK, most punctuation,
    ftfy), so that a model trains on the text a diffusers user's prompt becomes. Reused, not re-implemented: about 45
    ordered regular expressions whose every quirk must match ("a &amp; b" -> "a ; b")."""
    import ftfy  # noqa: F401  diffusers' clean_text needs it and raises a NameError without it
    from diffusers.pipelines.prx.pipeline_prx import TextPreprocessor
    return TextPreprocessor().clean_text(text)


T5GEMMA_ID = "google/t5gemma-2b-2b-ul2"  # PRX's text encoder


class T5GemmaTextEncoder:
    """captions -> (emb (B, L, D), mask (B, L) bool): T5Gemma encoder last_hidden_state, as PRX."""

    def __init__(self, model, tokenizer, max_tokens=256):
        self.model, self.tokenizer, self.max_tokens = model.eval().requires_grad_(False), tokenizer, max_tokens
        self.tokenizer.padding_side = "right"  # real tokens keep positions 0..L-1, as when encoded alone

    @classmethod
    def from_pretrained(cls, name=T5GEMMA_ID, device="cpu", max_tokens=256):
        from transformers import AutoTokenizer, PretrainedConfig, T5GemmaEncoderModel
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # bf16 as PRX on GPU

        def load():
            # another model type would be built at T5Gemma's default size (2B, seconds of random init), then refused;
            # no config.json at all (None): from_pretrained's error names the folder
            if (kind := PretrainedConfig.get_config_dict(name)[0].get("model_type")) not in (None, "t5gemma"):
                raise ValueError(f"--text-encoder {name}: not a T5Gemma encoder: its config.json is a {kind} model's; "
                                 f"pass a folder or hub id of a T5Gemma encoder (PRX's: {T5GEMMA_ID})")
            # transformers 5.x: the encoder is built from config.encoder of the composite T5GemmaConfig
            loaded = T5GemmaEncoderModel.from_pretrained(name, is_encoder_decoder=False, dtype=dtype,
                                                         output_loading_info=True)
            return whole(loaded, "a T5Gemma encoder", "--text-encoder", name), AutoTokenizer.from_pretrained(name)
        with quiet_transformers():  # its report lists the decoder's weights, unused here; whole() checks what matters
            model, tokenizer = from_hub(load, f"the text encoder {name}", name, "--text-encoder", name=name)
        return cls(model.to(device), tokenizer, max_tokens)

    def __call__(self, captions):
        return self.encode(captions)[:2]

    @torch.no_grad()
    def encode(self, captions):
        """-> emb, mask, and how many of the captions have more than max_tokens tokens (the encoder reads the first)."""
        cleaned = [clean_caption(c) for c in captions]  # once, for both tokenizer calls
        tokens = self.tokenizer(cleaned, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.model.device)
        emb = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return emb, tokens.attention_mask.bool(), sum(len(ids) > self.max_tokens
                                                      for ids in self.tokenizer(cleaned).input_ids)


@torch.no_grad()
def encode_latents(vae, images, seeds, shift, scale):
    """images (B, 3, R, R) uint8 -> normalised latents (B, C, R/f, R/f) float32. A KL VAE's posterior is sampled as
    PRX does, with noise seeded per sample (seeds) so that preparation is reproducible: z = mean + std * eps; DC-AE
    encodes deterministically."""
    x = (images.to(vae.device).float() / 127.5 - 1).to(vae.dtype)  # one rounding to a bf16 VAE's input, not two
    encoded = vae.encode(x)
    if not hasattr(encoded, "latent_dist"):  # AutoencoderDC
        return normalize_latent(encoded.latent.float(), shift, scale)
    posterior = encoded.latent_dist
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(s))
                       for s in seeds]).to(vae.device)
    z = posterior.mean.float() + posterior.std.float() * eps
    return normalize_latent(z, shift, scale)


# ----------------------------------------------------------------------------------------------------------
# Preparation

def to_rgb(img):
    img = ImageOps.exif_transpose(img)
    if img.mode == "F":  # PIL's convert would clip 0..1 floats to black: skipped and counted, not stored wrong
        raise ValueError("a float image (PIL mode F): its value range is not in the file; store it as 8 or 16 bits")
    if img.mode.startswith("I"):  # 16-bit grey (PNG): PIL's convert would clip to 255, so rescale
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:  # composite on white
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def image_value(value):
    """A PIL image, encoded bytes, a path, or datasets' Image(decode=False) dict {"bytes", "path"} -> one of the
    first three."""
    if value is None or value == {"bytes": None, "path": None}:  # a null of a dataset's image column
        raise ValueError("no image: the row's image is empty (null)")
    return (value.get("bytes") or value["path"]) if isinstance(value, dict) else value


def open_image(value):
    value = image_value(value)
    if isinstance(value, bytes):
        try:
            value = Image.open(io.BytesIO(value))
        except Image.UnidentifiedImageError:  # PIL's message names the BytesIO's address: a skip reason per run
            raise Image.UnidentifiedImageError(f"cannot identify an image in {len(value)} bytes") from None
    elif not isinstance(value, Image.Image):
        value = Image.open(value)
    value.load()  # decode now, so that a truncated file fails here and is counted
    return value


def content_id(value):
    """The id of a row without one: a hash of its image (open_image's forms), the same whatever the number of
    processes (a position in a rank's files is not), and one id for duplicate images, which then share a split."""
    value = image_value(value)
    data = value.tobytes() if isinstance(value, Image.Image) else value if isinstance(value, bytes) else \
        Path(value).read_bytes()
    return "sha256-" + hashlib.sha256(data).hexdigest()[:32]


def read_field(row, field):
    for key in field.split("."):  # "json.caption" reaches into a webdataset .json
        row = row[key]
    return row


def has_field(row, field):
    try:
        read_field(row, field)
    except (KeyError, TypeError):
        return False
    return True


def text_of(value):
    """A field as text; bytes (a webdataset member of an extension without a decoder: .id, .caption) as UTF-8, without
    the whitespace around it (a file's last newline)."""
    return value.decode().strip() if isinstance(value, bytes) else str(value)


def load_sample(row, args, fields):
    """One source row -> dict(id, image (3, R, R) uint8, captions) or dict(id, reason) when it must be skipped."""
    try:
        sample_id = text_of(row.get(args.id_field) or row.get("__key__") or content_id(row[args.image_field]))
    except Exception as e:  # no image in the row, a listed file that cannot be read, an id not UTF-8
        what = f"--id-field {args.id_field}" if isinstance(e, UnicodeDecodeError) else "image"
        return dict(id=content_id(repr(row).encode()), reason=f"unreadable {what}: {type(e).__name__}: {e}")
    if "__unreadable__" in row:  # set by folder_rows
        return dict(id=sample_id, reason=f"unreadable caption file: {row['__unreadable__']}")
    used = {args.id_field, args.image_field, *(field.split(".")[0] for field in fields.values())}
    if bad := [why for field, why in row.get("__undecodable__", {}).items() if field in used]:  # set by tar_rows
        return dict(id=sample_id, reason=f"undecodable member: {bad[0]}")
    try:
        captions = {name: text_of(read_field(row, field) or "") for name, field in fields.items()}
    except (KeyError, TypeError):
        return dict(id=sample_id, reason=f"missing caption field: row has {sorted(row)}")
    except UnicodeDecodeError as e:
        return dict(id=sample_id, reason=f"text not UTF-8: {e}")
    # lone surrogates (a file name in another encoding, a JSON "\ud800") cannot be stored as UTF-8
    if bad := {k: v for k, v in {"id": sample_id, **captions}.items() if v.encode(errors="replace").decode() != v}:
        return dict(id=sample_id, reason=f"text not UTF-8: {ascii(bad)}")
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
    """<stem>.txt as the field txt and the keys of <stem>.json; a caption file that cannot be read is passed on, to be
    skipped and counted rather than stop the preparation."""
    for path in files:
        row = {}
        for sidecar in (path.with_suffix(".txt"), path.with_suffix(".json")):
            try:
                if sidecar.exists():
                    text = sidecar.read_text(encoding="utf-8")
                    row.update({"txt": text} if sidecar.suffix == ".txt" else {**json.loads(text)})  # {**}: an object
            except (ValueError, TypeError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors;
                # OSError: a caption file without read permission, or a folder named <stem>.txt
                row["__unreadable__"] = f"{sidecar}: {type(e).__name__}: {e}"
        yield {**row, "id": path.relative_to(root).as_posix(), "image": {"bytes": None, "path": str(path)}}


# datasets' webdataset builder's for text; an id (.id, .cls: its ints) is read as text, whatever it holds
WEBDATASET_DECODERS = {**dict.fromkeys(("txt", "text", "transcript"), lambda b: b.decode("utf-8")),
                       **dict.fromkeys(("json", "jsn"), json.loads)}


def tar_rows(files):
    """Webdataset tars (local or hub files) as datasets' webdataset builder reads them: a row per key (a member's name
    up to the first dot of its base name; hidden members, '.*' and '__*', left out), a field per extension, decoded
    by it, the others bytes (images; text load_sample decodes). A member that cannot be decoded (a caption not UTF-8,
    bad JSON) or comes twice keeps its bytes and is named in the row's __undecodable__: its sample is skipped and
    counted if it uses the field. datasets' builder stops the whole preparation there, naming the tar unreadable."""
    import fsspec
    for file in files:
        with fsspec.open(file, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # streamed, never seeked
            row = {}
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                key, dot, field = base.partition(".")
                if not (member.isreg() and key and dot) or base.startswith((".", "__")):
                    continue
                key = f"{folder}/{key}" if folder else key
                if row.get("__key__") != key:  # a sample's members are consecutive
                    if row:
                        yield row
                    row = {"__key__": key, "__undecodable__": {}}
                value, decode = tar.extractfile(member).read(), WEBDATASET_DECODERS.get(field.rsplit(".")[-1].lower())
                tar.members = []  # the stream's record of members: a tar of millions would hold them all
                try:
                    if field in row:
                        raise ValueError("a second member of this name")
                    row[field] = decode(value) if decode else value
                except (ValueError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                    row[field], row["__undecodable__"][field] = value, f"{key}.{field}: {type(e).__name__}: {e}"
            if row:
                yield row


def listing(files):
    """What a resume checks: the files of the source, in the order rows are read from them, named relative to their
    common folder (the tree may move) and without a hub dataset's commit (a new commit may keep the files)."""
    names = [re.sub(r"@[0-9a-f]{40}(?=/)", "", str(f)) for f in files]
    if names and all(os.path.isabs(n) for n in names):
        base = os.path.commonpath([os.path.dirname(n) for n in names])
        names = [os.path.relpath(n, base) for n in names]
    encoded = [os.fsencode(n) for n in names]  # bytes: a file name need not be UTF-8
    return {"count": len(names), "sha256": hashlib.sha256(b"\n".join(encoded)).hexdigest()}


def folder_entries(root, source):
    """What root.rglob("*") lists, but through linked folders (each real folder once, none above root: a link to an
    ancestor would loop), and a folder that cannot be read (no permission) is refused: rglob leaves both out without a
    word, and their images would be missing from the dataset unseen."""
    def refuse(e):
        raise SystemExit(f"error: --source {source}: cannot read the folder {e.filename} ({type(e).__name__}): make "
                         f"it readable, or move it out of the source")
    entries, seen = [], {str(p) for p in Path(os.path.realpath(root)).parents}  # a link up: outside the source
    for folder, dirs, files in os.walk(root, onerror=refuse, followlinks=True):
        if os.path.realpath(folder) in seen:
            dirs.clear()  # not walked again
            continue
        seen.add(os.path.realpath(folder))
        dirs.sort()  # of two links to one folder, the first by name is read: the same on every machine
        entries += [Path(folder, name) for name in dirs + files]
    return entries


def unreadable_source_file(source, file, e):
    """The error of a source file that datasets cannot read (corrupt, empty, not parquet or tar): what was written
    stays, and a resume needs the same files (listing)."""
    return SystemExit(f"error: --source {source}: cannot read {file or 'one of its files'} ({type(e).__name__}: "
                      f"{one_line(e)}); replace it with a readable copy and run the same command again, which resumes "
                      f"after the last whole shard (without that file the source's files differ: use another --out)")


def parquet_row_count(source, file):
    import pyarrow.parquet
    try:
        return pyarrow.parquet.read_metadata(file).num_rows
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise unreadable_source_file(source, file, e) from e


def read_rows(it, n, source, rows, files):
    """The next n rows of it (rows or an iterator over them); a source file that cannot be read (corrupt, empty, not
    parquet or tar) stops the preparation naming it, the shards written so far kept."""
    try:
        return list(itertools.islice(it, n))
    except (OSError, ValueError, tarfile.TarError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise unreadable_source_file(source, file_being_read(rows, files), e) from e


def file_being_read(rows, files):
    """The file of `files` that datasets' streamed rows were reading (the innermost iterable's shard_idx, one shard
    per file), or None where its state does not tell."""
    try:
        state = rows.state_dict()
        while "examples_iterable" in state:
            state = state["examples_iterable"]
        return files[state["shard_idx"]]
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def open_source(source, image_field, rank, world_size):
    """-> (rows, total, listing, files): a streamed datasets.IterableDataset over this rank's files, or [] and 0 if it
    has none; the listing of all files (a resume reads on from a row number, so the files must be those it started
    on); this rank's files, in the order rows reads them."""
    import datasets
    root = Path(source)
    entries = folder_entries(root, source) if root.is_dir() else []
    images = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS)
    if images:
        mine = images[rank::world_size]
        rows = datasets.IterableDataset.from_generator(folder_rows, gen_kwargs=dict(files=mine, root=root))
        return (rows if mine else []), len(mine), listing(p.relative_to(root) for p in images), mine
    if root.is_dir() and not any(p.is_file() and p.suffix not in (".txt", ".json") for p in entries):
        raise SystemExit(f"error: --source {source}: a folder with no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                         f"and no data files (.parquet, .tar), only captions or nothing")
    if root.is_file() and root.suffix.lower() in IMAGE_EXTENSIONS:
        raise SystemExit(f"error: --source {source}: a single image; pass the folder that holds it (and its .txt or "
                         f".json captions)")
    hint = "; a glob names .parquet or .tar files (images: pass their folder)" if glob.has_magic(source) else \
        "; ~ is expanded by the shell only at the start of a word: write the path out" if "~" in source else ""
    try:
        if source.endswith((".parquet", ".tar")):
            if not (matches := sorted(glob.glob(source))):  # (main refuses it, unless prepared already)
                raise SystemExit(f"error: --source {source}: no file matches it")
            builder = datasets.load_dataset_builder("parquet" if source.endswith(".parquet") else "webdataset",
                                                    data_files=matches)
        elif not root.exists() and not is_hub_id(source):  # 'imgs/*.png', '~/data', 'a b': not huggingface_hub's
            raise SystemExit(f"error: --source {source}: no such folder or file here, and not a hub dataset id "
                             f"(namespace/name): pass a folder, a *.parquet or *.tar glob, or a hub id{hint}")  # error
        elif not root.exists() and (why := hub_unreachable()):  # at once, not after retries
            raise SystemExit(f"error: --source {source}: no such folder or file here, and the hub dataset cannot be "
                             f"read ({why}); where the hub answers, `hf download --repo-type dataset {source} "
                             f"--local-dir DIR`, then pass --source DIR")
        else:  # a hub id or a folder of parquet/tar files: file list resolved, nothing downloaded
            builder = datasets.load_dataset_builder(source)
    except OSError as e:  # DatasetNotFoundError, EmptyDatasetError, ConnectionError: a typo or an offline machine
        raise SystemExit(f"error: --source {source}: {'no such folder or file here, and ' if not root.exists() else ''}"
                         f"datasets cannot open it ({type(e).__name__}: {one_line(e)}){hint}") from e
    files = list(builder.config.data_files["train"])
    mine = files[rank::world_size]  # whole files per rank: no rank downloads another's data
    splits = builder.info.splits
    total = splits["train"].num_examples * len(mine) // len(files) if splits and "train" in splits else None
    if total is None and builder.name == "parquet" and all(os.path.isfile(f) for f in mine):  # local: the footers
        total = sum(parquet_row_count(source, f) for f in mine)  # (the progress bar's ETA)
    if not mine:
        return [], 0, listing(files), mine
    if builder.name == "webdataset":
        rows = datasets.IterableDataset.from_generator(tar_rows, gen_kwargs=dict(files=mine))
        return rows, total, listing(files), mine
    try:  # reads the first file for its columns
        rows = datasets.load_dataset(builder.name, data_files=mine, split="train", streaming=True)
    except (OSError, ValueError, tarfile.TarError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise unreadable_source_file(source, mine[0], e) from e
    if isinstance((rows.features or {}).get(image_field), datasets.Image):
        rows = rows.cast_column(image_field, datasets.Image(decode=False))  # we decode, so bad images are counted
    return rows, total, listing(files), mine


def encode_samples(samples, encoder, vae, shift, scale, seed):
    """Decoded samples -> (the stored columns: image, id, latent (unless pixel space), txt_ and caption_ per field;
    {field: captions cut at --max-tokens})."""
    columns, cut = {"image": [s["image"] for s in samples], "id": [s["id"] for s in samples]}, collections.Counter()
    if vae is not None:
        seeds = [stable_hash("latent", seed, s["id"]) for s in samples]
        latents = encode_latents(vae, torch.from_numpy(np.stack(columns["image"])), seeds, shift, scale)
        columns["latent"] = list(to_bits(latents))
    for name in samples[0]["captions"]:
        emb, mask, cut[name] = encoder.encode([s["captions"][name] for s in samples])  # right-padded
        bits, lengths = to_bits(emb), mask.sum(1).tolist()
        columns[f"txt_{name}"] = [bits[j, :n].copy() for j, n in enumerate(lengths)]  # real length, no padding
        columns[f"caption_{name}"] = [s["captions"][name] for s in samples]
    return columns, cut


def write_shard(path, columns, meta):
    """Fixed-shape columns are stacked, ragged ones (text, strings) concatenated with offsets; then the rename."""
    tmp = Path(f"{path}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, values in columns.items():
        if name in FIXED:
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
    # every rank's shards, not only this one's: the source's files are split by rank, so shards of another number of
    # processes would have some files encoded twice and others never
    for shard in {p.name[:11]: p for p in out.glob("train/shard-r???-?????")}.values():  # one shard of each rank
        if (before := shard_meta(shard)["world_size"]) != world_size:
            raise SystemExit(f"error: {out} was being prepared by {before} processes; resume with the same number "
                             f"(torchrun --nproc-per-node {before}) or choose a new --out")
    if not done:
        return 0, 0, None
    meta = shard_meta(done[-1])
    return len(done), meta["rows_done"], meta["source_state"]


def shard_meta(shard):
    """A written shard's meta.json; one cut short (a crash or power loss before its bytes reached the disk) is
    named, with what to do."""
    try:
        return json.loads((shard / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {shard / 'meta.json'}: unreadable ({one_line(e)}): a damaged shard; "
                         f"{repair_hint(shard.parent.parent)}")


# The flags that decide what a shard holds: a preparation resumes only with the values its shards were written with
SETTINGS = ("source", "source_files", "captions", "image_field", "id_field", "vae", "vae_path", "text_encoder",
            "max_tokens", "resolution", "min_size", "eval_fraction", "seed")


def check_settings(out, args):
    """<out>/prepare.json holds SETTINGS, written before the first shard. Refuse to add shards made otherwise ->
    the settings to write: None on a resume, which keeps its own."""
    settings, path = {k: getattr(args, k) for k in SETTINGS}, out / "prepare.json"
    if not (path.exists() and [p for p in out.glob("*/shard-r*") if p.suffix != ".tmp"]):
        return settings  # a fresh start, or one that crashed before its first shard: nothing to mix with
    saved = json.loads(path.read_text())
    # source_files: absent from a prepare.json older than the check, which resumes as before
    if changed := [k for k in SETTINGS if saved.get(k) != settings[k] and (k in saved or k != "source_files")]:
        flags = "; ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} there, {settings[k]!r} now" if k != "source_files"
                          else f"the source's files ({saved[k]['count']} there, {settings[k]['count']} now, or "
                               f"renamed: restore them)" for k in changed)
        raise SystemExit(f"error: {out} holds shards prepared with other settings ({flags}): resume with the "
                         f"values of {path}, choose another --out, or delete {out} yourself to start over")
    return None


def discard(out):
    """Remove what a preparation that kept no sample wrote, and only that (--out may hold other files), so that a rerun
    with corrected flags starts afresh."""
    for split in (out / "train", out / "eval"):
        for path in [*split.glob("shard-r*"), *split.glob("done-r*")]:  # .tmp shards included
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if split.is_dir() and not any(split.iterdir()):
            split.rmdir()
    for name in ("prepare.json", "null_txt.npy", "probe_txt.npy"):
        (out / name).unlink(missing_ok=True)


def open_unless_prepared(out, args, rank, world_size):
    """open_source and check_settings -> (rows, total, files, the settings to write), or None where out holds a
    complete preparation of these settings (rank 0 says so). That one needs nothing of its source, which may not open
    (offline, moved): its files are then not compared, its flags are."""
    prepared = (out / "index.json").exists()
    try:
        rows, total, args.source_files, files = open_source(args.source, args.image_field, rank, world_size)
    except SystemExit as e:
        if not prepared:
            raise
        saved = json.loads((out / "prepare.json").read_text()) if (out / "prepare.json").exists() else {}
        args.source_files = saved.get("source_files")
        unchecked = f"; its source's files were not compared ({str(e).removeprefix('error: ')})"
    else:
        unchecked = ""
    settings = check_settings(out, args)
    if prepared:
        if rank == 0:
            print(f"{out} is prepared already (index.json): nothing to do{unchecked}")
        return None
    return rows, total, files, settings


def check_fields(rows, args, fields, files):
    """A misspelt field: a flag error before the encoders load, not one skipped sample per row of the whole source."""
    head = [rows.features] if getattr(rows, "features", None) else read_rows(rows, args.batch_size, args.source, rows,
                                                                             files)
    for flag, field in [("--image-field", args.image_field), *(("--captions", f) for f in fields.values())]:
        if head and not any(has_field(row, field) for row in head):
            raise SystemExit(f"error: {flag}: no field {field!r} in {args.source}, whose rows have "
                             f"{sorted({k for row in head for k in row})}: name one of those"
                             + " (--captions long=FIELD[,short=FIELD])" * (flag == "--captions"))


def prepare(args, rank=0, world_size=1):
    out, fields = Path(args.out), parse_caption_fields(args.captions)
    args.min_size = args.min_size or args.resolution // 2
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device of every library call too: not GPU 0 on each rank
    if (opened := open_unless_prepared(out, args, rank, world_size)) is None:
        return
    rows, total, files, settings = opened
    check_fields(rows, args, fields, files)
    shard, rows_done, source_state = resume_point(out, rank, world_size)  # before minutes of loading models
    # a model missing, unreachable or not the model asked for: a line naming the flag; anything else a traceback
    with exit_on(errors=(OSError, ValueError, NotOnThisMachine)):
        vae, shift, scale = load_vae(args.vae, args.vae_path, device) if args.vae != "none" else (None, None, None)
        encoder = T5GemmaTextEncoder.from_pretrained(args.text_encoder, device, args.max_tokens)  # the longer load
    out.mkdir(parents=True, exist_ok=True)  # after the flags' checks: a refused run leaves nothing behind
    if settings is not None:
        write_whole(out / "prepare.json", lambda f: f.write(json.dumps(settings, indent=1).encode()))
    if rank == 0:  # the empty prompt for caption dropout; with the probe, what tells text encoders apart (data.py)
        for name, caption in (("null_txt", ""), ("probe_txt", PROBE_CAPTION)):
            emb, mask = encoder([caption])
            write_whole(out / f"{name}.npy", lambda f: np.save(f, to_bits(emb[0, mask[0]])))
    if source_state is not None:  # shards of this rank exist, so it has rows
        rows.load_state_dict(source_state)
    columns, skipped, cut, pending, it = {"train": {}, "eval": {}}, [], collections.Counter(), 0, iter(rows)
    bar = tqdm(total=total, initial=rows_done, unit="img", desc=f"prepare rank {rank}", disable=rank != 0)
    with ThreadPoolExecutor(args.workers) as pool:  # PIL decodes and resizes outside the GIL
        while True:
            chunk = read_rows(it, args.batch_size, args.source, rows, files)
            samples = list(pool.map(lambda row: load_sample(row, args, fields), chunk))
            skipped += [[s["id"], s["reason"]] for s in samples if "reason" in s]  # a list: ids may repeat
            good = [s for s in samples if "reason" not in s]
            if good:
                encoded, cut_here = encode_samples(good, encoder, vae, shift, scale, args.seed)
                cut.update(cut_here)
                for j, s in enumerate(good):
                    split = "eval" if in_eval_split(args.seed, s["id"], args.eval_fraction) else "train"
                    for key, values in encoded.items():
                        columns[split].setdefault(key, []).append(values[j])
            rows_done, pending = rows_done + len(chunk), pending + len(chunk)
            bar.update(len(chunk))
            buffered = sum(len(c.get("id", [])) for c in columns.values())  # both splits: all eval at --eval-fraction 1
            if pending and (not chunk or buffered >= args.shard_size):
                name = f"shard-r{rank:03d}-{shard:05d}"
                if columns["eval"]:
                    write_shard(out / "eval" / name, columns["eval"], {"count": len(columns["eval"]["id"])})
                meta = {"count": len(columns["train"].get("id", [])), "world_size": world_size,
                        "rows_done": rows_done, "source_state": rows.state_dict(), "skipped": skipped,
                        "captions_cut": cut}  # both splits' (as skipped)
                write_shard(out / "train" / name, columns["train"], meta)
                columns, skipped, cut, pending = {"train": {}, "eval": {}}, [], collections.Counter(), 0
                shard += 1
            if not chunk:
                break
    bar.close()
    (out / "train").mkdir(exist_ok=True)  # absent if this rank had no source file, so wrote no shard
    (out / "train" / f"done-r{rank:03d}").write_text(str(world_size))
    if rank == 0:
        while not all((out / "train" / f"done-r{r:03d}").exists() for r in range(world_size)):
            time.sleep(10)  # the other ranks are still encoding
        write_index(out, vars(args), shift, scale)


def write_index(out, settings, shift=None, scale=None):
    shards = {split: [p for p in sorted((out / split).glob("shard-r*")) if p.suffix != ".tmp"]
              for split in ("train", "eval")}
    metas = {split: [shard_meta(p) for p in paths] for split, paths in shards.items()}
    # [id, reason] per skipped row; a dict in shards of older versions (and bench.py's): one row per id
    skipped = [(k, v) for m in metas["train"] for k, v in (m["skipped"].items() if isinstance(m["skipped"], dict)
                                                           else m["skipped"])]
    reasons = collections.Counter(r.split(":")[0] for _, r in skipped)
    cut = collections.Counter()
    for m in metas["train"]:
        cut.update(m.get("captions_cut", {}))  # bench.py's shards: none
    first = next((p for split in shards for p, m in zip(shards[split], metas[split]) if m["count"]), None)
    if first is None:  # no sample in either split (eval only is a set for train.py --eval-data)
        example = next((r for _, r in skipped), "")
        discard(out)
        raise SystemExit(f"error: {out}: no sample was prepared; skipped: {dict(reasons)}, e.g. {example!r}; nothing "
                         f"is kept, so a rerun with corrected flags starts afresh")
    schema = {p.stem: {"dtype": str(a.dtype), "shape": list(a.shape[1:])}
              for p in sorted(first.glob("*.npy")) for a in [np.load(p, mmap_mode="r")]}
    index = {split: {"count": sum(m["count"] for m in metas[split]),
                     "shards": [{"path": f"{split}/{p.name}", "count": m["count"]}
                                for p, m in zip(shards[split], metas[split])]} for split in shards}
    index.update(
        format=FORMAT, skipped={"count": len(skipped), "by_reason": reasons, "ids": dict(skipped)},  # rows, by id
        captions_cut={"max_tokens": settings.get("max_tokens"), **cut},  # per field: longer, the encoder saw the start
        captions=sorted(k.removeprefix("caption_") for k in schema
                        if k.startswith("caption_") and not k.endswith("_offsets")),
        schema=schema, latent_norm=None if shift is None else {
            "shift": shift.tolist(), "scale": scale.tolist(), "formula": "(z - shift) * scale, (C, p, p) per patch"},
        versions={m: importlib.metadata.version(m)
                  for m in ("torch", "diffusers", "transformers", "datasets", "numpy", "pillow")},
        settings=settings)
    write_whole(out / "index.json", lambda f: f.write(json.dumps(index, indent=1).encode()))
    print(f"{out}: {index['train']['count']} train, {index['eval']['count']} eval, {len(skipped)} skipped "
          f"{dict(reasons)}" + "".join(f"; {n} {field} captions cut at --max-tokens {settings['max_tokens']}"
                                       for field, n in cut.items() if n))


def parse_caption_fields(spec):
    """'long=llava,short=prompt' -> {"long": "llava", "short": "prompt"} (our name -> the source's field)."""
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if not fields or len(fields) != len(spec.split(",")) or not all(re.fullmatch(r"\w+", k) for k in fields):
        raise ValueError(f"{spec!r}: expected name=field pairs such as long=llava,short=prompt")
    return fields


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory; an interrupted run resumes there")
    p.add_argument("--source", default="brivangl/midjourney-v6-llava",
                   help="hub dataset id (streamed), image folder with .txt/.json captions, or a *.parquet/*.tar glob")
    p.add_argument("--captions", default="long=llava,short=prompt",
                   help="our caption name=source field, comma separated ('json.caption' reaches into a dict)")
    p.add_argument("--image-field", default="image", help="image column (webdataset tars: the extension, e.g. jpg)")
    p.add_argument("--id-field", default="id",
                   help="sample id column (default: webdataset key, else a hash of the image)")
    p.add_argument("--vae", default="flux", choices=[*VAES, "none"], help="latent tokenizer; none for pixel space")
    p.add_argument("--vae-path", help="local copy or other hub id of that VAE (default: the hub id in VAES)")
    p.add_argument("--text-encoder", default=T5GEMMA_ID, help="T5Gemma hub id or local copy")
    p.add_argument("--max-tokens", type=count, default=256, help="text tokens kept per caption (PRX: 256)")
    p.add_argument("--resolution", type=side, default=256, help="stored images are R x R centre crops")
    p.add_argument("--min-size", type=count, help="skip images whose shorter side is smaller (default R / 2)")
    p.add_argument("--shard-size", type=count, default=4096,
                   help="samples per shard, both splits (~5 GB at 256 px with two T5Gemma captions)")
    p.add_argument("--batch-size", type=count, default=64, help="images per encoder call")
    p.add_argument("--eval-fraction", type=fraction, default=0.015, help="held-out share, chosen by hashing the id "
                   "(the speedrun's ~986k rows: ~14,800, above the full evaluation's 10,000 and the rows skipped)")
    p.add_argument("--seed", type=seed_number, default=0, help="seeds the eval split and the VAE posterior "
                   "samples")
    p.add_argument("--device", help="where the encoders run (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--workers", type=count, default=max(1, os.cpu_count() // int(os.environ.get("WORLD_SIZE", 1))),
                   help="image decoding threads per rank")
    args = p.parse_args(argv)
    for flag, check in (("--captions", lambda: parse_caption_fields(args.captions)),
                        ("--device", lambda: check_device(args.device or "cpu"))):
        try:
            check()
        except (ValueError, RuntimeError) as e:  # torch.device's is a RuntimeError
            p.error(f"argument {flag}: {e}")
    for name in ("vae_path", "text_encoder"):  # a local copy is stored as an absolute path: read from anywhere
        if getattr(args, name) and os.path.exists(getattr(args, name)):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.vae != "none" and args.resolution % (block := VAES[args.vae][3]):
        p.error(f"argument --resolution: the {args.vae} VAE encodes {block} x {block} pixel blocks, got "
                f"{args.resolution}: choose a multiple of {block}, e.g. {max(block, args.resolution // block * block)}")
    matches = [Path(m).resolve() for m in glob.glob(args.source)]  # a hub id matches nothing here
    if args.source.endswith((".parquet", ".tar")) and not matches and not (Path(args.out) / "index.json").exists():
        p.error(f"argument --source: no file matches {args.source}")
    if any(m.is_relative_to(Path(args.out).resolve()) for m in matches):
        p.error(f"argument --source: {args.source} lies inside --out {args.out}, where prepare.py writes and cleans "
                f"up: choose an --out outside the source")
    # an --out that cannot be made: refused now, not after minutes of loading the encoders
    if (why := unwritable(args.out)) and not (Path(args.out) / "index.json").exists():  # prepared: nothing to write
        p.error(f"argument --out: {why}: choose another --out")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's worker, as train.py's: stops when torchrun is killed
        die_with_launcher()
    rank = int(os.environ.get("RANK", 0))
    quiet_unless_rank_0(rank)
    handlers = stop_on_signals(lambda: f"the whole shards in {args.out} are kept: run the same command again to "
                                       f"resume after the last one", rank == 0)
    try:
        prepare(args, rank, int(os.environ.get("WORLD_SIZE", 1)))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def check_device(name):
    """torch.device(name), refused (ValueError) unless this machine has it: found at once, not as a RuntimeError
    after the source was read."""
    device = torch.device(name)
    if device.type == "meta":
        raise ValueError(f"{name}: a device that holds no data, so nothing can be encoded on it: choose cpu or a GPU")
    module = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    n = module.device_count() if device.type != "cpu" and getattr(module, "is_available", lambda: False)() else 0
    if device.type != "cpu" and (device.index or 0) >= n:
        raise ValueError(f"{name}: this machine has {n} {device.type} device{'' if n == 1 else 's'}: leave --device "
                         f"out (cuda if there is one, else cpu) or name one it has")
    return device


if __name__ == "__main__":
    with errors_of_rank_0_first():
        main()
