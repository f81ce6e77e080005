"""prepare.py on tiny sources (an image folder of awkward files, parquet, webdataset tars) with tiny random encoders
saved to disk (tiny_prepared.py; the `prepared` fixture of conftest.py)."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

import data
import prepare
from tiny_prepared import MAX_TOKENS, RES, caption, prepare_argv, reference_image, stored_samples

ROOT = Path(__file__).resolve().parent.parent


def test_the_eval_split_is_a_seeded_fraction_of_the_ids():
    """--eval-fraction f of the ids, by a hash of (seed, id): about f of 20,000 ids, another set for another seed,
    the same set for the same seed."""
    ids = [f"img_{i:05d}.jpg" for i in range(20_000)]
    splits = [{i for i in ids if prepare.in_eval_split(seed, i, 0.1)} for seed in (0, 1, 0)]
    assert all(abs(len(split) - 2_000) < 150 for split in splits)  # binomial sd 42
    assert splits[0] == splits[2] and len(splits[0] & splits[1]) < 300  # independent: ~200 in common


def test_eval_fraction_0_holds_out_nothing_and_1_everything():
    """The split keeps an id whose hash is h (mod 10^6) for fraction f when h < f 10^6: at 0 no id, not even one at
    h = 0, is held out; at 1 every id is."""
    edge = "img_155064.jpg"
    assert prepare.stable_hash("eval", 0, edge) % 1_000_000 == 0
    assert not prepare.in_eval_split(0, edge, 0) and prepare.in_eval_split(0, edge, 1e-6)
    assert all(prepare.in_eval_split(0, f"img_{i:05d}.jpg", 1) for i in range(1000))


def test_counts_shapes_dtypes_and_skipped(prepared):
    root, skipped = prepared
    index = json.loads((root / "out" / "index.json").read_text())
    train, held = stored_samples(root / "out"), stored_samples(root / "out", "eval")
    assert index["train"]["count"] == len(train) and index["eval"]["count"] == len(held)
    assert len(train) + len(held) == 42 - len(skipped) and not set(train) & set(held)
    assert set(held) == {i for i in [*train, *held] if prepare.in_eval_split(0, i, 0.2)} and len(held) > 0
    assert {k: v.split(":")[0] for k, v in index["skipped"]["ids"].items()} == skipped
    assert index["skipped"]["count"] == 9 and index["skipped"]["by_reason"]["undecodable image"] == 3
    assert max(s["count"] for s in index["train"]["shards"]) < 8 + 5  # shard size 8, flushed after a batch of 5
    for shard_info in [s for s in index["train"]["shards"] if s["count"]]:
        arrays, n = data.Shard(root / "out" / shard_info["path"]).arrays, shard_info["count"]
        assert arrays["image"].shape == (n, 3, RES, RES) and arrays["image"].dtype == np.uint8
        assert arrays["latent"].shape == (n, 4, RES // 2, RES // 2) and arrays["latent"].dtype == np.int16
        assert arrays["txt_long"].dtype == np.int16 and arrays["txt_long"].shape[1] == 32
        assert len(arrays["txt_short_offsets"]) == n + 1
    assert index["schema"]["latent"] == {"dtype": "int16", "shape": [4, RES // 2, RES // 2]}
    assert index["latent_norm"]["scale"][0] == [[pytest.approx(0.3611)]]


def test_stored_images_match_reference_crops(prepared):
    root, _ = prepared
    for sample_id, (shard, r) in {**stored_samples(root / "out"), **stored_samples(root / "out", "eval")}.items():
        np.testing.assert_array_equal(shard.arrays["image"][r], reference_image(root / "images" / sample_id))
    shard, r = stored_samples(root / "out", "eval" if prepare.in_eval_split(0, "grey16_0.png", 0.2) else "train")[
        "grey16_0.png"]
    assert 100 < shard.arrays["image"][r].mean() < 155  # a 0..65535 ramp, rescaled rather than clipped to 255


def test_stored_latent_is_the_seeded_vae_posterior_sample(prepared):
    from diffusers import AutoencoderKL
    root, _ = prepared
    vae = AutoencoderKL.from_pretrained(root / "models" / "flux", subfolder="vae")
    for sample_id, (shard, r) in stored_samples(root / "out").items():
        with torch.no_grad():
            post = vae.encode(torch.from_numpy(shard.arrays["image"][r][None].astype(np.float32)) / 127.5 - 1
                              ).latent_dist
        eps = torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(
            prepare.stable_hash("latent", 0, sample_id)))
        expected = ((post.mean[0] + post.std[0] * eps) - 0.1159) * 0.3611
        stored = torch.from_numpy(np.array(shard.arrays["latent"][r])).view(torch.bfloat16).float()
        # computed in a batch of 5 at preparation, alone here: equal up to one bf16 rounding step
        torch.testing.assert_close(stored, expected.bfloat16().float(), rtol=2 ** -7, atol=1e-5)
        assert (stored - (post.mean[0] - 0.1159) * 0.3611).abs().max() > 1e-2  # a sample, not the mean
    sample = dict(id=sample_id, image=shard.arrays["image"][r], captions={})  # --seed 1: noise of its own
    latent = prepare.encode_samples([sample], None, vae, *data.latent_stats(vae), 1)[0]["latent"][0]
    eps = torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(
        prepare.stable_hash("latent", 1, sample_id)))
    expected = ((post.mean[0] + post.std[0] * eps) - 0.1159) * 0.3611
    torch.testing.assert_close(torch.from_numpy(np.array(latent)).view(torch.bfloat16).float(),
                               expected.bfloat16().float(), rtol=2 ** -7, atol=1e-5)


def test_a_bf16_vae_gets_the_pixels_rounded_once(prepared):
    """On the GPU the VAE runs in bf16: it is given [-1, 1] pixels computed in fp32 and rounded to bf16 once (scaled in
    bf16, half the 256 levels land a step off)."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(prepared[0] / "models" / "flux", subfolder="vae").to(torch.bfloat16)
    seen, encode = [], vae.encode
    vae.encode = lambda x: seen.append(x) or encode(x)
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    prepare.encode_latents(vae, levels, [0], *data.latent_stats(vae))
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], (levels.float() / 127.5 - 1).bfloat16())


def test_dc_ae_latents_are_its_deterministic_encoding_scaled(prepared, tmp_path):
    """--vae dc-ae (SANA 1.1's deterministic autoencoder, 32x down; here a tiny 4x one): a stored latent is
    encode(image) x scaling_factor, and eval.py decodes the data's latents through the same VAE."""
    from diffusers import AutoencoderDC
    from eval import load_decoder, to_uint8
    from model import PRXConfig
    root, _ = prepared
    dc_ae = root / "models" / "dc-ae"
    prepare.main(prepare_argv(tmp_path / "dc", root / "images", root / "models", "--vae", "dc-ae", "--vae-path",
                              str(dc_ae), "--eval-fraction", "0", "--captions", "long=txt"))
    vae = AutoencoderDC.from_pretrained(dc_ae)
    for sample_id, (shard, r) in stored_samples(tmp_path / "dc").items():
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(shard.arrays["image"][r][None].astype(np.float32)) / 127.5 - 1).latent[0]
        stored = torch.from_numpy(np.array(shard.arrays["latent"][r])).view(torch.bfloat16).float()
        assert stored.shape == (4, RES // 4, RES // 4)
        torch.testing.assert_close(stored, (z * 0.41407).bfloat16().float(), rtol=2 ** -7, atol=1e-5)
    shape, decode = load_decoder(PRXConfig(in_channels=4), str(tmp_path / "dc"), RES, "cpu")
    with torch.no_grad():
        expected = to_uint8(vae.decode(stored[None] / 0.41407).sample)
        assert shape == (4, RES // 4, RES // 4) and torch.equal(decode(stored[None]), expected)
    assert load_decoder(PRXConfig(in_channels=4), str(tmp_path / "dc"), 2 * RES, "cpu")[0] == (4, RES // 2, RES // 2)
    # ^ a run at another resolution than the data's (a resolution stage evaluated on the first stage's data): its own


def test_text_is_unpadded_encoder_output(prepared):
    from transformers import AutoTokenizer, T5GemmaEncoderModel
    root, _ = prepared
    tokenizer = AutoTokenizer.from_pretrained(root / "models" / "t5gemma")
    model = T5GemmaEncoderModel.from_pretrained(root / "models" / "t5gemma", is_encoder_decoder=False).eval()

    def encode(text):
        ids = tokenizer(prepare.clean_caption(text), truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).last_hidden_state[0].bfloat16().float()
    truncated = {"long": 0, "short": 0}
    every = {**stored_samples(root / "out"), **stored_samples(root / "out", "eval")}
    for sample_id, (shard, r) in every.items():
        long = (root / "images" / sample_id).with_suffix(".txt").read_text()
        short = json.loads((root / "images" / sample_id).with_suffix(".json").read_text())["short"]
        for name, text in (("long", long), ("short", short)):
            assert shard.string(f"caption_{name}", r) == text
            stored = torch.from_numpy(np.array(shard.ragged(f"txt_{name}", r))).view(torch.bfloat16).float()
            expected = encode(text)
            assert len(stored) == len(expected) == min(len(text.split()) + 1, MAX_TOKENS)  # words + <bos>
            torch.testing.assert_close(stored, expected, rtol=2 ** -7, atol=1e-5)
            truncated[name] += len(text.split()) + 1 > MAX_TOKENS
    assert truncated["long"] > 0  # counted in index.json (the eval split's too), the tokenizer's count of each
    index = json.loads((root / "out" / "index.json").read_text())
    assert index["captions_cut"] == {"max_tokens": MAX_TOKENS, **truncated}
    for name, text in (("null_txt", ""), ("probe_txt", data.PROBE_CAPTION)):
        stored = torch.from_numpy(np.load(root / "out" / f"{name}.npy")).view(torch.bfloat16).float()
        torch.testing.assert_close(stored, encode(text), rtol=0, atol=0)
    encoder = prepare.T5GemmaTextEncoder.from_pretrained(str(root / "models" / "t5gemma"), max_tokens=4)
    # a caption is cut when its cleaned text is too long (what the encoder reads): "a cat" is 3 tokens, the raw 12
    assert [encoder.encode([text])[2] for text in ("A Cat http://x.com/a/b", "a cat dog bird")] == [0, 1]


# What diffusers 0.42's PRXPipeline feeds its text encoder for each prompt (TextPreprocessor.clean_text), quirks kept
PIPELINE_TEXT = {
    "A vintage tram on a sandy beach (digital painting) #art / 4K":
        "a vintage tram on a sandy beach digital painting art 4k",
    ' A &amp; B  “Cat” http://x.com/a @bob ': 'a ; b "cat"',
    "Photo by @jane_doe, see www.example.com/gallery?id=3 &quot;sunset&quot;": "photo by , see ?id=3 sunset",
    "Check https://t.co/AbC123 #sunset #1 #123456": "check sunset",
    "ＦＵＬＬＷＩＤＴＨ ﬁsh “quotes” ‘single’ — dash": "fullwidth fish \"quotes\" 'single' - dash",  # ftfy
    "一只猫 a cat 在桌子上 on a table": "a cat on a table",
    "Rocket 🚀 launch at night 🌌!!!": "rocket 🚀 launch at night 🌌!!!",
    "this-is-my-cute-cat_photo_file": "this is my cute cat photo file",
    "IMG_1234.jpg image_2.png a dog": "a dog",
    "Page 12 of 3000x2000 wallpaper, free shipping, click for more": "of wallpaper, ,",
    '"""AUSVERKAUFT""" ***sale*** [draft] {x} |y| \\back\\': '"ausverkauft" sale draft x y back',
    "prompt\\nwith newline 192.168.0.1 a:b": "prompt with newline a:b",
    "   ": "",
    " A Red Bird" * 400: ("a red bird " * 400).strip(),
}


def test_captions_are_cleaned_as_the_diffusers_pipeline_cleans_prompts():
    assert {prompt: prepare.clean_caption(prompt) for prompt in PIPELINE_TEXT} == PIPELINE_TEXT


def assert_same_bf16_latents(a, b):
    """The resumed run encodes its samples in other batches than the clean one, and a batched convolution may round
    by the batch (AVX-512 kernels do, seen: 0.05% of the values; AVX2 ones did not): the stored bf16 latents may then
    differ by one bf16 step (relative 2^-7), no more."""
    x, y = (torch.from_numpy(np.load(path)).view(torch.bfloat16).float() for path in (a, b))
    assert x.shape == y.shape, a
    assert torch.allclose(x, y, rtol=2 ** -7, atol=0), f"{a}: {(x != y).float().mean():.2%} of the values differ, " \
        f"by up to {((x - y).abs() / y.abs()).max():.2e} of their size"


@pytest.mark.parametrize("crash_at", [3, 4])  # shards are written eval, train, eval, train: 4 leaves eval 1 whole
def test_interrupted_preparation_resumes_to_the_same_result(crash_at, prepared, tmp_path, monkeypatch):
    root, _ = prepared
    write_shard, calls = prepare.write_shard, []

    def crash_at_a_shard(path, columns, meta):
        calls.append(path)
        if len(calls) == crash_at:  # killed while writing: a partial shard is left behind
            Path(f"{path}.tmp").mkdir(parents=True)
            Path(f"{path}.tmp/image.npy").write_bytes(b"partial")
            raise KeyboardInterrupt
        write_shard(path, columns, meta)
    argv = prepare_argv(tmp_path / "out", root / "images", root / "models", "--captions", "long=txt,short=short")
    monkeypatch.setattr(prepare, "write_shard", crash_at_a_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    assert list(tmp_path.glob("out/*/*.tmp")) and not (tmp_path / "out" / "index.json").exists()
    assert [p.parent.name for p in calls] == ["eval", "train", "eval", "train"][:crash_at]
    rows_done = json.loads(sorted(tmp_path.glob("out/train/shard-*[0-9]"))[-1].joinpath("meta.json").read_text()
                           )["rows_done"]
    load_sample, loaded = prepare.load_sample, []
    monkeypatch.setattr(prepare, "load_sample", lambda row, *a, **k: loaded.append(row) or load_sample(row, *a, **k))
    monkeypatch.setattr(prepare, "write_shard", write_shard)
    prepare.main(argv)
    assert 0 < rows_done and len(loaded) == 42 - rows_done  # continued after the last whole shard
    assert not list(tmp_path.glob("out/*/*.tmp"))
    resumed = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    clean = sorted(p.relative_to(root / "out") for p in (root / "out").rglob("*") if p.is_file())
    assert resumed == clean
    for rel in clean:
        if rel.name == "latent.npy":
            assert_same_bf16_latents(tmp_path / "out" / rel, root / "out" / rel)
        elif rel.name != "index.json":
            assert (tmp_path / "out" / rel).read_bytes() == (root / "out" / rel).read_bytes(), rel
    a, b = (json.loads((d / "index.json").read_text()) for d in (tmp_path / "out", root / "out"))
    assert {k: v for k, v in a.items() if k != "settings"} == {k: v for k, v in b.items() if k != "settings"}


def test_two_preparation_ranks_split_the_files(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    argv = prepare_argv(tmp_path / "out", root / "images", root / "models", "--captions", "long=txt,short=short")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 0 waits for the others, then writes the index
        monkeypatch.setenv("RANK", str(rank))
        prepare.main(argv)
    files = sorted(p.relative_to(root / "images").as_posix() for p in (root / "images").iterdir()
                   if p.suffix in prepare.IMAGE_EXTENSIONS)
    single = {**stored_samples(root / "out"), **stored_samples(root / "out", "eval")}
    for rank in (0, 1):
        shards = [p for p in (tmp_path / "out").glob(f"*/shard-r{rank:03d}-*")]
        ids = {data.Shard(p).string("id", r) for p in shards for r in range(json.loads(
            (p / "meta.json").read_text())["count"])}
        assert ids == set(files[rank::2]) & set(single)
    both = {**stored_samples(tmp_path / "out"), **stored_samples(tmp_path / "out", "eval")}
    assert set(both) == set(single)
    for sample_id, (shard, r) in both.items():
        single_shard, single_r = single[sample_id]
        np.testing.assert_array_equal(shard.arrays["image"][r], single_shard.arrays["image"][single_r])
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"]["count"] == 9


def test_parquet_source(prepared):
    root, _ = prepared
    index = json.loads((root / "out_pq" / "index.json").read_text())
    assert index["train"]["count"] + index["eval"]["count"] == 5
    assert list(index["skipped"]["ids"]) == ["pq5"] and index["captions"] == ["long", "short"]
    # the same words on every run (PIL's own message names the address of the bytes' BytesIO)
    assert index["skipped"]["ids"]["pq5"] == \
        "undecodable image: UnidentifiedImageError: cannot identify an image in 12 bytes"


def test_rows_without_an_id_are_named_by_their_image_whatever_the_ranks(prepared, tmp_path, monkeypatch):
    import datasets
    root, _ = prepared
    rng, pngs = np.random.default_rng(3), []
    for i in range(5):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, "PNG")
        pngs.append(png.getvalue())
    features = datasets.Features({"image": datasets.Image(), "llava": datasets.Value("string"),
                                  "prompt": datasets.Value("string")})
    (tmp_path / "pq").mkdir()
    for k, files in enumerate([pngs[:3], [pngs[3], pngs[4], pngs[0]]]):  # pngs[0] twice: a duplicate image
        rows = [{"image": {"bytes": b, "path": None}, "llava": caption(rng, 8), "prompt": caption(rng, 3)}
                for b in files]
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "pq" / f"train-{k}.parquet"))
    expected = {prepare.content_id(b) for b in pngs}
    prepare.main(prepare_argv(tmp_path / "one", tmp_path / "pq", root / "models", "--eval-fraction", "0.5"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        prepare.main(prepare_argv(tmp_path / "two", tmp_path / "pq", root / "models", "--eval-fraction", "0.5"))
    splits = {}
    for out in ("one", "two"):
        for split in ("train", "eval"):
            for p in (tmp_path / out / split).glob("shard-*"):
                shard = data.Shard(p)
                ids = [shard.string("id", r) for r in range(json.loads((p / "meta.json").read_text())["count"])]
                splits.setdefault(out, []).extend((i, split) for i in ids)
    assert sorted(splits["one"]) == sorted(splits["two"])  # the same ids in the same splits on 1 or 2 processes
    assert {i for i, _ in splits["one"]} == expected and len(splits["one"]) == 6
    assert len({split for i, split in splits["one"] if i == prepare.content_id(pngs[0])}) == 1  # duplicates: 1 split


def test_webdataset_tars_in_pixel_space(prepared, tmp_path, monkeypatch):
    """Webdataset keys as ids, fields by extension ('json.caption' reaches into the .json); a caption that cannot be
    decoded is one sample skipped and counted, the rest of its tar read (datasets' builder stops at it); an
    interrupted preparation resumes inside a tar."""
    import tarfile
    root, _ = prepared
    write_tar(tmp_path / "part-0.tar", [f"s{i}" for i in range(6)], {"s2": {"txt": "café".encode("latin-1")},
                                                                     "s4": {"json": b'{"caption": "a red'}})
    argv = prepare_argv(tmp_path / "out", tmp_path / "*.tar", root / "models", "--vae", "none", "--image-field", "png",
                        "--captions", "long=txt,short=json.caption", "--eval-fraction", "0")
    prepare.main(argv)
    stored = stored_samples(tmp_path / "out")
    assert sorted(stored) == ["s0", "s1", "s3", "s5"]
    skipped = json.loads((tmp_path / "out" / "index.json").read_text())["skipped"]["ids"]
    assert {k: v.split(": ")[:3] for k, v in skipped.items()} == {
        "s2": ["undecodable member", "s2.txt", "UnicodeDecodeError"],
        "s4": ["undecodable member", "s4.json", "JSONDecodeError"]}
    resumed = [argv[0], str(tmp_path / "resumed"), *argv[2:], "--shard-size", "2", "--batch-size", "2"]
    interrupted_after_the_first_train_shard(resumed, monkeypatch)
    prepare.main(resumed)
    again = json.loads((tmp_path / "resumed" / "index.json").read_text())["skipped"]["ids"]
    assert sorted(stored_samples(tmp_path / "resumed")) == sorted(stored) and again == skipped
    assert len(data.PreparedDataset(str(tmp_path / "resumed"), "train")) == len(stored)  # none read twice
    batch = next(data.ShardLoader(str(tmp_path / "out"), batch_size=4, captions="short"))
    assert "latent" not in batch and batch["image"].shape == (4, 3, RES, RES) and batch["image"].dtype == torch.uint8
    with tarfile.open(tmp_path / "part-0.tar") as tar:
        shorts = {m.name[:2]: json.load(tar.extractfile(m))["caption"] for m in tar
                  if m.name.endswith(".json") and m.name[:2] in stored}
    assert batch["caption"] == [shorts[i] for i in batch["id"]]


def test_a_tar_member_of_any_extension_reads_as_text_and_the_id_field_comes_before_the_key(prepared, tmp_path):
    """.uid and .caption have no decoder (datasets' builder gave their bytes: ids "b'U0'"); --id-field names the id
    over the webdataset key; a caption not UTF-8 skips its sample; a member no flag reads does not, even undecodable
    (bad JSON, an .id that is no int: datasets' builder refused the tar); hidden members are left out, as datasets'
    builder leaves them; a field given twice skips its sample."""
    import tarfile
    root, _ = prepared
    members = {f"k{i}": {"uid": f"U{i}\n".encode(), "caption": f"a red circle number {i}".encode(),
                         "json": b'{"cut', "id": b"uid-0"} for i in range(4)}
    members["k2"]["caption"] = "café".encode("latin-1")
    write_tar(tmp_path / "part-0.tar", list(members), members)
    with tarfile.open(tmp_path / "part-0.tar", "a") as tar:
        for name in ("k3.caption", "__hidden.png", "sub/.hidden.png"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    prepare.main(prepare_argv(tmp_path / "out", tmp_path / "*.tar", root / "models", "--vae", "none", "--image-field",
                              "png", "--id-field", "uid", "--captions", "long=caption", "--eval-fraction", "0"))
    assert sorted(stored_samples(tmp_path / "out")) == ["U0", "U1"]
    batch = next(data.ShardLoader(str(tmp_path / "out"), batch_size=2, captions="long"))
    assert sorted(batch["caption"]) == ["a red circle number 0", "a red circle number 1"]
    skipped = json.loads((tmp_path / "out" / "index.json").read_text())["skipped"]["ids"]
    assert skipped.keys() == {"U2", "U3"} and skipped["U2"].startswith("text not UTF-8: 'utf-8' codec can't decode")
    assert skipped["U3"] == "undecodable member: k3.caption: ValueError: a second member of this name"


def test_the_listing_names_files_relative_to_their_folder_even_one_file():
    """What a resume compares: a single file is named by its name (its folder may move), so another file differs."""
    one = prepare.listing(["/d/x.parquet"])
    assert one == {"count": 1, "sha256": hashlib.sha256(b"x.parquet").hexdigest()}
    assert prepare.listing(["/elsewhere/x.parquet"]) == one and prepare.listing(["/d/y.parquet"]) != one
    assert prepare.listing(["/d/a/x.tar", "/d/b/y.tar"])["sha256"] == hashlib.sha256(b"a/x.tar\nb/y.tar").hexdigest()


def test_a_row_whose_image_is_null_is_skipped_saying_so():
    args = SimpleNamespace(id_field="id", image_field="image", min_size=16, resolution=32)
    for row, sample_id, why in (({"id": "x", "image": None}, "x", "undecodable image"),
                                ({"id": "x", "image": {"bytes": None, "path": None}}, "x", "undecodable image"),
                                ({"image": None}, None, "unreadable image")):  # no id: none from the image either
        sample = prepare.load_sample({**row, "txt": "a red cat"}, args, {"long": "txt"})
        assert sample["reason"] == f"{why}: ValueError: no image: the row's image is empty (null)"
        assert sample_id is None or sample["id"] == sample_id


def test_a_complete_preparation_of_a_glob_that_matches_nothing_now_says_it_is_prepared(prepared, tmp_path, capsys):
    """The tars moved (or a copy of the prepared folder, without prepare.json): nothing to read, nothing to do."""
    root, _ = prepared
    (tmp_path / "src").mkdir()
    write_tar(tmp_path / "src" / "part-0.tar", ["a", "b"])
    argv = prepare_argv(tmp_path / "out", tmp_path / "src" / "*.tar", root / "models", "--image-field", "png",
                        "--captions", "long=txt")
    prepare.main(argv)
    (tmp_path / "src").rename(tmp_path / "moved")
    for drop in (False, True):
        if drop:
            (tmp_path / "out" / "prepare.json").unlink()
        prepare.main(argv)
        assert re.search(r"prepared already \(index.json\): nothing to do; its source's files were not compared",
                         capsys.readouterr().out)


def test_a_colour_key_is_transparent_and_composited_on_white():
    """A PNG of RGB or grey with a tRNS colour key: its pixels of that colour are transparent, as RGBA's and P's."""
    for mode, key, kept in (("RGB", (0, 0, 0), (200, 100, 50)), ("L", 0, 200)):
        img = Image.new(mode, (4, 4), key)
        img.putpixel((0, 0), kept)
        png = io.BytesIO()
        img.save(png, "PNG", transparency=key)
        rgb = np.asarray(prepare.to_rgb(Image.open(png)))
        assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == list(np.broadcast_to(kept, 3))


def test_a_float_image_is_skipped_saying_why_not_stored_black():
    """A float TIFF (PIL mode F, values 0..1): converted, it would be black; its range is not in the file."""
    tiff = io.BytesIO()
    Image.fromarray(np.full((32, 32), 0.8, np.float32)).save(tiff, "TIFF")
    args = SimpleNamespace(id_field="id", image_field="image", min_size=16, resolution=32)
    sample = prepare.load_sample({"id": "x", "image": tiff.getvalue(), "txt": "a red cat"}, args, {"long": "txt"})
    assert sample["reason"].startswith("undecodable image: ValueError: a float image (PIL mode F)")


def test_caption_fields_spec():
    assert prepare.parse_caption_fields("long=llava,short=json.caption") == {"long": "llava", "short": "json.caption"}
    for spec in ("long", "long=a,short", "long-x=a"):
        with pytest.raises(ValueError, match="name=field"):
            prepare.parse_caption_fields(spec)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size: must be in [1, inf), got 0"),  # would write an empty dataset
    (["--eval-fraction", "1.5"], "--eval-fraction: must be in [0, 1], got 1.5"),
    (["--seed", "-1"], "--seed: must be in [0, 4611686018427387904], got -1"),  # as train.py's and eval.py's
    (["--resolution", "-256"], "--resolution: must be in [1, 4096], got -256"),
    (["--resolution", "100000", "--min-size", "1"], "--resolution: must be in [1, 4096], got 100000"),  # MemoryError
    (["--shard-size", "4k"], "--shard-size: expected a whole number, got '4k'"),
    (["--resolution", "36"], "--resolution: the flux VAE encodes 8 x 8 pixel blocks, got 36: choose a multiple of 8, "
                             "e.g. 32"),
    (["--resolution", "40", "--vae", "flux2"], "--resolution: the flux2 VAE encodes 16 x 16 pixel blocks, got 40"),
    (["--resolution", "48", "--vae", "dc-ae"], "--resolution: the dc-ae VAE encodes 32 x 32 pixel blocks, got 48"),
    (["--source", "nowhere/*.tar"], "--source: no file matches nowhere/*.tar"),  # else found after loading models
    (["--captions", "long:txt"], "--captions: 'long:txt': expected name=field pairs"),
    (["--device", "cpuu"], "--device: Expected one of cpu, cuda"),
    (["--device", "meta"], "--device: meta: a device that holds no data"),  # left prepare.json behind
    (["--device", "cuda:99"], "--device: cuda:99: this machine has "),  # a RuntimeError once the source was read
    (["--source", ""], "--source: an empty value")])
def test_bad_flags_are_refused_before_any_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--out", str(tmp_path / "out"), "--source", str(tmp_path / "nowhere"), *flags])
    assert f"argument {message}" in capsys.readouterr().err and not (tmp_path / "out").exists()


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted_after_the_first_train_shard(argv, monkeypatch):
    """prepare.main(argv), killed (KeyboardInterrupt) right after it wrote its first train shard."""
    write_shard = prepare.write_shard

    def crash_after_first_train_shard(path, columns, meta):
        write_shard(path, columns, meta)
        if path.parent.name == "train":
            raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "write_shard", crash_after_first_train_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    monkeypatch.setattr(prepare, "write_shard", write_shard)


@pytest.mark.parametrize("before, rank, now", [(1, 0, 2), (2, 0, 1), (2, 1, 1)])  # (2, 1, 1): rank 0 has no shard
def test_a_resume_with_another_number_of_processes_is_refused(before, rank, now, prepared, tmp_path, monkeypatch):
    root, _ = prepared
    out = tmp_path / "out"
    argv = prepare_argv(out, root / "images", root / "models", "--captions", "long=txt,short=short")
    monkeypatch.setenv("WORLD_SIZE", str(before))
    monkeypatch.setenv("RANK", str(rank))
    interrupted_after_the_first_train_shard(argv, monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", str(now))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", lambda *a: pytest.fail("encoders loaded"))
    with pytest.raises(SystemExit, match=rf"^error: .* prepared by {before} processes; resume with the same number "
                                         rf"\(torchrun --nproc-per-node {before}\)"):
        prepare.main(argv)  # before the encoders load


def test_a_shard_cut_short_is_named_on_resume_and_at_the_index(prepared, tmp_path, monkeypatch):
    """A shard renamed into place whose meta.json never reached the disk whole (power lost): the resume, and the
    index written at the end, name the file and what to do, not a JSON traceback."""
    root, _ = prepared
    out = tmp_path / "out"
    argv = prepare_argv(out, root / "images", root / "models", "--captions", "long=txt,short=short")
    interrupted_after_the_first_train_shard(argv, monkeypatch)
    meta = out / "train" / "shard-r000-00000" / "meta.json"
    meta.write_text("")
    for call in (lambda: prepare.main(argv), lambda: prepare.write_index(out, {})):
        with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(meta))}: unreadable \(.*\): a damaged shard; "
                                             rf"delete {re.escape(str(out))} and prepare it again"):
            call()


def test_the_split_follows_the_seed(prepared, tmp_path):
    root, _ = prepared
    prepare.main(prepare_argv(tmp_path / "out", root / "images", root / "models", "--captions", "long=txt,short=short",
                              "--seed", "1", "--eval-fraction", "0.5"))
    ids = {*stored_samples(tmp_path / "out"), *(held := stored_samples(tmp_path / "out", "eval"))}
    assert set(held) == {i for i in ids if prepare.in_eval_split(1, i, 0.5)}
    assert set(held) != {i for i in ids if prepare.in_eval_split(0, i, 0.5)}


def test_the_split_hash_is_the_same_in_every_process():
    """Python's hash() of a string changes with each process (PYTHONHASHSEED): the split must not."""
    probe = "import prepare; print(prepare.stable_hash('eval', 0, 'img_1.jpg'))"
    outs = {subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {f"{prepare.stable_hash('eval', 0, 'img_1.jpg')}\n"}


def test_resume_with_other_settings_is_refused(prepared, tmp_path, monkeypatch, capsys):
    root, _ = prepared
    out, images = tmp_path / "out", shutil.copytree(root / "images", tmp_path / "images")
    argv = prepare_argv(out, images, root / "models", "--captions", "long=txt,short=short")
    interrupted_after_the_first_train_shard(argv, monkeypatch)
    before = files_of(out)
    assert json.loads(before[Path("prepare.json")])["resolution"] == RES
    changes = {"--resolution": "64", "--captions": "long=txt", "--vae": "none", "--max-tokens": "8",
               "--text-encoder": str(tmp_path), "--eval-fraction": "0.5", "--seed": "1",
               "--source": str(copy_samples(root, tmp_path / "other")), "--min-size": "20"}
    for flag, value in changes.items():
        with pytest.raises(SystemExit, match=f"other settings \\({flag} .* there, .* now[;)]") as info:
            prepare.main(argv + [flag, value])  # the last value of a flag wins
        assert "another --out" in str(info.value) and f"delete {out} yourself" in str(info.value)
    with pytest.raises(SystemExit, match="--resolution 32 there, 64 now; --seed 0 there, 1 now"):
        prepare.main(argv + ["--resolution", "64", "--seed", "1"])
    (images / "aa.png").write_bytes(b"")  # a file more: a resume reading on from a row number would repeat samples
    with pytest.raises(SystemExit, match=r"other settings \(the source's files \(\d+ there, \d+ now, or renamed"):
        prepare.main(argv)
    (images / "aa.png").unlink()
    assert files_of(out) == before  # refused before touching anything
    prepare.main(argv + ["--workers", "1", "--batch-size", "4"])  # how it runs may change: not what it writes
    assert len(stored_samples(out)) == len(stored_samples(root / "out"))
    (images / "sub").mkdir()
    (images / "rgb01.png").rename(images / "sub" / "rgb01.png")  # once prepared: refused as well (the index would
    with pytest.raises(SystemExit, match="the source's files"):  # not describe the files)
        prepare.main(argv)
    (images / "sub" / "rgb01.png").rename(images / "rgb01.png")
    prepare.main(argv)
    assert "prepared already (index.json): nothing to do\n" in capsys.readouterr().out
    images.rename(tmp_path / "moved")  # a source gone (or a hub offline): what is prepared needs nothing of it
    prepare.main(argv)
    assert re.search(r"prepared already \(index.json\): nothing to do; its source's files were not compared "
                     r"\(--source .*images: no such folder", capsys.readouterr().out)
    with pytest.raises(SystemExit, match="--resolution 32 there, 64 now"):  # the flags are still compared
        prepare.main(argv + ["--resolution", "64"])
    (tmp_path / "moved").rename(images)
    with monkeypatch.context() as m:  # torchrun's other processes: rank 0 alone says it
        m.setenv("RANK", "1")
        prepare.main(argv)
    assert capsys.readouterr().out == ""
    for shard in out.glob("*/shard-r*"):  # as a run that crashed before its first shard: other flags start afresh
        shutil.rmtree(shard)
    other = {**json.loads((out / "prepare.json").read_text()), "resolution": 64}
    assert prepare.check_settings(out, SimpleNamespace(**other)) == other


def test_a_prepare_json_older_than_the_source_listing_resumes(tmp_path):
    settings = {k: 1 for k in prepare.SETTINGS} | {"source_files": {"count": 2, "sha256": "x"}}
    (tmp_path / "train" / "shard-r000-00000").mkdir(parents=True)
    (tmp_path / "prepare.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "source_files"}))
    assert prepare.check_settings(tmp_path, SimpleNamespace(**settings)) is None
    (tmp_path / "prepare.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "eval_fraction"}))
    with pytest.raises(SystemExit, match=r"other settings \(--eval-fraction None there, 1 now\)"):  # only the listing
        prepare.check_settings(tmp_path, SimpleNamespace(**settings))  # came later: another missing setting is not


def copy_samples(root, folder, names=("rgb01.png", "rgb02.png", "rgba0.png")):
    """A few images of the prepared folder, with their .txt and .json captions, in a folder of their own."""
    folder.mkdir(parents=True)
    for name in names:
        for suffix in (".png", ".txt", ".json"):
            shutil.copy(root / "images" / Path(name).with_suffix(suffix), folder)
    return folder


def test_a_preparation_that_kept_nothing_leaves_nothing_to_resume(prepared, tmp_path):
    root, _ = prepared
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)  # files of the user's in --out: not prepare.py's to delete
    (out / "notes.txt").write_text("mine")
    (out / "train" / "notes.txt").write_text("mine too")
    mine = files_of(out)
    argv = prepare_argv(out, copy_samples(root, tmp_path / "images"), root / "models", "--captions",
                        "long=txt,short=short")
    with pytest.raises(SystemExit, match="^error: .*no sample was prepared.*image smaller than --min-size 1000"):
        prepare.main(argv + ["--min-size", "1000"])  # every sample skipped, after an empty shard and a done marker
    assert files_of(out) == mine and sorted(p.name for p in out.iterdir()) == ["notes.txt", "train"]
    prepare.main(argv)
    assert sorted([*stored_samples(out), *stored_samples(out, "eval")]) == ["rgb01.png", "rgb02.png", "rgba0.png"]


def test_a_source_inside_out_is_refused(prepared, tmp_path, capsys):
    root, _ = prepared
    source = copy_samples(root, tmp_path / "mydata" / "train")  # a failed preparation would clean mydata/train
    before = files_of(tmp_path / "mydata")
    with pytest.raises(SystemExit):
        prepare.main(prepare_argv(tmp_path / "mydata", source, root / "models", "--captions", "long=txt,short=short"))
    assert f"--source: {source} lies inside --out {tmp_path / 'mydata'}" in capsys.readouterr().err
    assert files_of(tmp_path / "mydata") == before


def test_an_eval_only_set_is_prepared_in_resumable_shards(prepared, tmp_path, monkeypatch):
    """--eval-fraction 1, how train.py --eval-data sets are made: no train sample, and the eval samples are written
    as shards fill (not held in memory to the end), so an interrupted preparation resumes to the same result."""
    root, skipped = prepared
    argv = prepare_argv(tmp_path / "out", root / "images", root / "models", "--captions", "long=txt,short=short",
                        "--eval-fraction", "1")
    prepare.main(argv + ["--out", str(tmp_path / "clean")])
    interrupted_after_the_first_train_shard(argv, monkeypatch)
    assert json.loads((tmp_path / "out/train/shard-r000-00000/meta.json").read_text())["rows_done"] < 42
    prepare.main(argv)
    index, clean = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("out", "clean"))
    assert {k: v for k, v in index.items() if k != "settings"} == {k: v for k, v in clean.items() if k != "settings"}
    assert index["train"]["count"] == 0 and index["eval"]["count"] == 42 - len(skipped)
    assert len(index["eval"]["shards"]) > 1 and max(s["count"] for s in index["eval"]["shards"]) < 8 + 5
    split = data.HeldoutSplit(tmp_path / "out", 42 - len(skipped))
    single = {**stored_samples(root / "out"), **stored_samples(root / "out", "eval")}
    ids = [shard.string("id", r) for shard, r in split.rows(range(len(single)))]
    assert sorted(ids) == sorted(single) and len(split.captions([0, 1])) == 2
    for sample_id, image in zip(ids, split.images(range(len(ids)))):
        shard, r = single[sample_id]
        np.testing.assert_array_equal(image.numpy(), shard.arrays["image"][r])


def test_a_rank_without_source_files_finishes(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    argv = prepare_argv(tmp_path / "out", root / "pq", root / "models")  # one parquet file for two ranks
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        prepare.main(argv)
    assert not list(tmp_path.glob("out/*/shard-r001-*"))
    index, single = (json.loads((d / "index.json").read_text()) for d in (tmp_path / "out", root / "out_pq"))
    assert [index[k]["count"] for k in ("train", "eval")] == [single[k]["count"] for k in ("train", "eval")]
    assert list(index["skipped"]["ids"]) == ["pq5"]


def test_a_misspelt_field_is_refused_before_the_encoders_load(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", lambda *a: pytest.fail("encoders loaded"))
    for source, flags, message in [
            (root / "images", ["--captions", "long=txt,short=shrot"], r"--captions: no field 'shrot' in .*'short'.*: "
                                                                      r"name one of those \(--captions long=FIELD"),
            (root / "pq", ["--image-field", "img"], "--image-field: no field 'img' in .*'image'.*: name one of those$")]:
        with pytest.raises(SystemExit, match="^error: " + message):
            prepare.main(prepare_argv(tmp_path / "out", source, root / "models", *flags))
        assert not (tmp_path / "out").exists()  # no folder, no prepare.json of settings that never ran
    monkeypatch.undo()
    for flag in ("--text-encoder", "--vae-path"):  # a local copy that is not there: named, before any folder
        with pytest.raises(SystemExit, match=f"^error: (prepare.py )?{flag} {tmp_path}/none: no such fold"):
            prepare.main(prepare_argv(tmp_path / "out", root / "pq", root / "models", flag, str(tmp_path / "none")))
        assert not (tmp_path / "out").exists()


def test_a_source_that_is_not_there_or_holds_no_images_is_named(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", lambda *a: pytest.fail("encoders loaded"))
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "a.txt").write_text("a red cat")  # captions without their images
    for source, message in ((tmp_path / "imgs", "no such folder or file here, and not a hub dataset id"),
                            (tmp_path / "captions", "a folder with no images .* and no data files")):
        with pytest.raises(SystemExit, match=f"^error: --source {source}: {message}"):
            prepare.main(prepare_argv(tmp_path / "out", source, root / "models"))
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_the_model_is_a_flag_error_and_other_failures_keep_their_traceback(prepared, tmp_path,
                                                                                          monkeypatch):
    root, _ = prepared
    (tmp_path / "empty").mkdir()
    for flag in ("--text-encoder", "--vae-path"):  # an existing folder without the model's files: an OSError
        with pytest.raises(SystemExit, match=f"^error: (prepare.py )?{flag} {tmp_path}/empty: not a folder of "):
            prepare.main(prepare_argv(tmp_path / "out", root / "pq", root / "models", flag, str(tmp_path / "empty")))
    from transformers import AutoTokenizer, T5Config, T5EncoderModel  # another encoder, its files complete
    T5EncoderModel(T5Config(vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        tmp_path / "t5")
    AutoTokenizer.from_pretrained(root / "models" / "t5gemma").save_pretrained(tmp_path / "t5")
    with pytest.raises(SystemExit, match=f"^error: --text-encoder {tmp_path}/t5: not a T5Gemma encoder: its "
                                         f"config.json is a t5 model's"):  # refused before a 2B T5Gemma is built
        prepare.main(prepare_argv(tmp_path / "out", root / "pq", root / "models", "--text-encoder",
                                  str(tmp_path / "t5")))
    shutil.copytree(root / "models" / "t5gemma", tmp_path / "t5gemma")  # a T5Gemma whose file lacks a weight
    weights = load_file(tmp_path / "t5gemma" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0.self_attn.q_proj" not in k},
              tmp_path / "t5gemma" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=f"^error: --text-encoder {tmp_path}/t5gemma: not a T5Gemma encoder: 1 of its "
                                         f"weights are not in the checkpoint"):  # not left at its random init
        prepare.main(prepare_argv(tmp_path / "out", root / "pq", root / "models", "--text-encoder",
                                  str(tmp_path / "t5gemma")))
    assert not (tmp_path / "out").exists()
    for flags, message in ((["--vae", "flux2"], "not the flux2 VAE: 3 of its weights are not in the checkpoint"),
                           (["--vae-path", str(root / "models" / "dc-ae")], "not the flux VAE: Error.* size mismatch")):
        with pytest.raises(SystemExit, match=f"^error: prepare.py --vae-path .*: {message}"):  # FLUX.1's VAE as
            prepare.main(prepare_argv(tmp_path / "out", root / "pq", root / "models", *flags))  # FLUX.2's: BN at 0, 1
    assert not (tmp_path / "out").exists()
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not a flag's fault: not turned into one line
        prepare.main(prepare_argv(tmp_path / "out", root / "pq", root / "models"))


def test_a_source_listing_survives_a_moved_tree_and_a_new_hub_commit():
    sha = "0123456789abcdef" * 2 + "01234567"
    hub = [f"hf://datasets/u/d@{sha}/data/train-{k}.parquet" for k in range(2)]
    assert prepare.listing(hub) == prepare.listing([f.replace(sha, "f" * 40) for f in hub])
    assert prepare.listing(["/a/x/1.parquet", "/a/x/2.parquet"]) == prepare.listing(["/b/1.parquet", "/b/2.parquet"])
    assert prepare.listing(["/a/1.parquet"]) == prepare.listing(["/b/1.parquet"])
    assert prepare.listing(["/a/1.parquet", "/a/2.parquet"]) != prepare.listing(["/a/1.parquet", "/a/3.parquet"])
    assert prepare.listing(hub) != prepare.listing(hub[:1])


def test_local_models_are_stored_by_absolute_path(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    folder = copy_samples(root, tmp_path / "images", ("rgb01.png", "rgb02.png"))
    monkeypatch.chdir(root)  # train.py and eval.py load them from wherever they run
    argv = prepare_argv(tmp_path / "out", folder, root / "models", "--captions", "long=txt")
    argv[argv.index("--vae-path") + 1], argv[argv.index("--text-encoder") + 1] = "models/flux", "models/t5gemma"
    prepare.main(argv)
    settings = json.loads((tmp_path / "out" / "index.json").read_text())["settings"]
    assert (settings["vae_path"], settings["text_encoder"]) == (str(root / "models/flux"), str(root / "models/t5gemma"))


def test_unreadable_caption_files_are_skipped_and_counted_by_path(prepared, tmp_path, monkeypatch):
    """Not JSON, not UTF-8, not an object, a folder, no read permission (a refused read: the tests run as root, who
    may read anything): each sample skipped with its reason, not a traceback that stops the preparation."""
    root, _ = prepared
    folder = copy_samples(root, tmp_path / "images", ("rgb01.png", "rgb02.png", "rgb03.png", "rgb05.png", "rgb06.png",
                                                      "rgb07.png"))
    (folder / "rgb01.json").write_text('{"short": "a red')  # cut short
    (folder / "rgb02.txt").write_bytes("café".encode("latin-1"))
    (folder / "rgb03.json").write_text('["a", "red cat"]')  # JSON, but not an object
    (folder / "rgb06.txt").unlink()
    (folder / "rgb06.txt").mkdir()
    read_text = Path.read_text

    def refused(path, *args, **kwargs):
        if path == folder / "rgb07.json":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", refused)
    prepare.main(prepare_argv(tmp_path / "out", folder, root / "models", "--captions", "long=txt,short=short",
                              "--eval-fraction", "0"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sorted(stored_samples(tmp_path / "out")) == ["rgb05.png"]
    assert {k: v.split(": ")[:3] for k, v in index["skipped"]["ids"].items()} == {
        "rgb01.png": ["unreadable caption file", str(folder / "rgb01.json"), "JSONDecodeError"],
        "rgb02.png": ["unreadable caption file", str(folder / "rgb02.txt"), "UnicodeDecodeError"],
        "rgb03.png": ["unreadable caption file", str(folder / "rgb03.json"), "TypeError"],
        "rgb06.png": ["unreadable caption file", str(folder / "rgb06.txt"), "IsADirectoryError"],
        "rgb07.png": ["unreadable caption file", str(folder / "rgb07.json"), "PermissionError"]}


def test_text_that_is_not_utf8_is_skipped_and_counted(prepared, tmp_path):
    root, _ = prepared
    folder = copy_samples(root, tmp_path / "images", ("rgb01.png", "rgb02.png", "rgb03.png"))
    for suffix in (".png", ".txt", ".json"):  # a Latin-1 file name: undecodable bytes become lone surrogates
        (folder / f"rgb02{suffix}").rename(folder / os.fsdecode(b"caf\xe9" + suffix.encode()))
    (folder / "rgb03.json").write_text('{"short": "a red \\ud800 cat"}')  # valid JSON, not encodable text
    prepare.main(prepare_argv(tmp_path / "out", folder, root / "models", "--captions", "long=txt,short=short",
                              "--eval-fraction", "0"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sorted(stored_samples(tmp_path / "out")) == ["rgb01.png"]
    assert index["skipped"]["ids"] == {os.fsdecode(b"caf\xe9.png"): "text not UTF-8: {'id': 'caf\\udce9.png'}",
                                       "rgb03.png": "text not UTF-8: {'short': 'a red \\ud800 cat'}"}


def test_caption_file_keys_do_not_replace_the_id_or_the_image(prepared, tmp_path):
    root, _ = prepared
    folder = copy_samples(root, tmp_path / "images", ("rgb01.png", "rgb02.png"))
    for name in ("rgb01", "rgb02"):
        (folder / f"{name}.json").write_text(json.dumps({"short": "red cat", "id": "same", "image": "gone.png"}))
    prepare.main(prepare_argv(tmp_path / "out", folder, root / "models", "--captions", "long=txt,short=short",
                              "--eval-fraction", "0"))
    stored = stored_samples(tmp_path / "out")
    assert sorted(stored) == ["rgb01.png", "rgb02.png"]
    for sample_id, (shard, r) in stored.items():
        np.testing.assert_array_equal(shard.arrays["image"][r], reference_image(folder / sample_id))


def test_min_size_is_the_smallest_shorter_side_kept():
    """--min-size skips images whose shorter side is smaller: a shorter side of exactly --min-size is kept."""
    args, fields = SimpleNamespace(id_field="id", image_field="image", min_size=16, resolution=RES), {"long": "txt"}
    for side, kept in ((16, True), (15, False)):
        sample = prepare.load_sample({"id": str(side), "image": Image.new("RGB", (40, side)), "txt": "a cat"}, args,
                                     fields)
        assert ("reason" not in sample) == kept and sample.get("reason", "").startswith("image smaller") != kept


def test_an_image_is_stored_upright_as_its_exif_orientation_says():
    """A photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view) is cropped upright."""
    args, fields = SimpleNamespace(id_field="id", image_field="image", min_size=16, resolution=RES), {"long": "txt"}
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)  # 60 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG", exif=exif.tobytes())
    sample = prepare.load_sample({"id": "x", "image": png.getvalue(), "txt": "a cat"}, args, fields)
    upright = Image.fromarray(np.rot90(pixels, -1).copy())  # 40 wide, 60 high
    expected = np.asarray(ImageOps.fit(upright, (RES, RES), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_array_equal(sample["image"], expected)


def test_min_size_defaults_to_half_the_resolution(prepared, tmp_path):
    """Without --min-size, an image whose shorter side is under R / 2 is skipped; one of R / 2 is kept."""
    root, _ = prepared
    (tmp_path / "images").mkdir()
    for side in (16, 15):  # --resolution 32
        Image.new("RGB", (40, side), "red").save(tmp_path / "images" / f"{side}.png")
        (tmp_path / "images" / f"{side}.txt").write_text("a red cat")
    argv = prepare_argv(tmp_path / "out", tmp_path / "images", root / "models", "--captions", "long=txt",
                        "--eval-fraction", "0")
    del argv[argv.index("--min-size"):argv.index("--min-size") + 2]
    prepare.main(argv)
    assert sorted(stored_samples(tmp_path / "out")) == ["16.png"]
    assert json.loads((tmp_path / "out" / "index.json").read_text())["skipped"]["ids"] == {
        "15.png": "image smaller than --min-size 16: (40, 15)"}


def test_a_shard_holds_shard_size_samples(prepared, tmp_path):
    """Batches of 4 into shards of 4: each batch fills a shard (not one batch more)."""
    root, _ = prepared
    names = [f"rgb{i:02d}.png" for i in (1, 2, 3, 5, 6, 7, 9, 10)]
    prepare.main(prepare_argv(tmp_path / "out", copy_samples(root, tmp_path / "images", names), root / "models",
                              "--captions", "long=txt,short=short", "--eval-fraction", "0", "--shard-size", "4",
                              "--batch-size", "4"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["count"] for s in index["train"]["shards"]] == [4, 4]


def test_content_id_hashes_the_image_bytes_in_every_form(tmp_path):
    """A row without an id is named by its image's bytes, whichever form holds them (bytes, a path, datasets'
    {"bytes": None, "path"}): a copy under another name or folder (a moved tree) keeps the id, other bytes do not."""
    png = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(png, "PNG")
    for path in (tmp_path / "a.png", tmp_path / "moved" / "b.png"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png.getvalue())
    forms = [png.getvalue(), str(tmp_path / "a.png"), tmp_path / "moved" / "b.png",
             {"bytes": None, "path": str(tmp_path / "a.png")}]
    assert {prepare.content_id(v) for v in forms} == {prepare.content_id(png.getvalue())}
    assert prepare.content_id(png.getvalue()[:-1]) != prepare.content_id(png.getvalue())


def test_text_encoder_offline_fails_fast_and_says_what_to_fetch(unreachable_hub):
    from transformers import AutoTokenizer, T5GemmaEncoderModel  # noqa: F401 (imported before the clock)
    start = time.time()
    with pytest.raises(RuntimeError, match="http://127.0.0.1:9 cannot be reached") as info:
        prepare.T5GemmaTextEncoder.from_pretrained("google/t5gemma-2b-2b-ul2")
    assert time.time() - start < 5
    assert "`hf download google/t5gemma-2b-2b-ul2`" in str(info.value) and "--text-encoder" in str(info.value)


def test_a_hub_source_offline_fails_at_once(tmp_path, unreachable_hub, monkeypatch):
    """--source a hub id (the default) on a machine that cannot reach the hub: the source's error at once (data's
    hub_unreachable), not after datasets' retries (~30 s)."""
    import datasets
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: pytest.fail("asked datasets: it retries"))
    with pytest.raises(SystemExit, match=r"^error: --source brivangl/midjourney-v6-llava: no such folder or file here, "
                                         r"and the hub dataset cannot be read \(http://127.0.0.1:9 cannot be reached\); "
                                         r"where the hub answers, `hf download --repo-type dataset brivangl/midjourney-"
                                         r"v6-llava --local-dir DIR`, then pass --source DIR$"):
        prepare.main(["--out", str(tmp_path / "out")])
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"the hub dataset cannot be read \(HF_HUB_OFFLINE is set\)"):
        prepare.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_under_torchrun_prepare_asks_to_die_with_it(tmp_path, monkeypatch):
    """prepare.py's processes, as train.py's and eval.py's, ask for SIGTERM when torchrun dies (TORCHELASTIC_RUN_ID:
    data.die_with_launcher); one another launcher started with RANK set does not. Each leaves library warnings to rank
    0 (data.quiet_unless_rank_0)."""
    calls = []
    monkeypatch.setattr(prepare, "die_with_launcher", lambda: calls.append("asked"))
    monkeypatch.setattr(prepare, "quiet_unless_rank_0", lambda rank: calls.append(f"quiet unless {rank} is 0"))
    monkeypatch.setattr(prepare, "prepare", lambda args, rank, world_size: calls.append((rank, world_size)))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    prepare.main(["--out", str(tmp_path / "out")])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    prepare.main(["--out", str(tmp_path / "out")])
    assert calls == ["quiet unless 1 is 0", (1, 2), "asked", "quiet unless 1 is 0", (1, 2)]  # before its preparation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_a_torchrun_prepare_worker_dies_with_its_launcher(tmp_path):
    """Killed with SIGKILL, torchrun cannot stop prepare.py's workers, which would encode on into --out unseen: each
    asks the kernel for SIGTERM when its parent dies (test_eval's launcher, as torchrun starts its workers)."""
    from test_eval import assert_dies_with_launcher
    worker = ("import time, prepare; prepare.prepare = lambda *a: (print(True, flush=True), time.sleep(300)); "
              f"prepare.main(['--out', {str(tmp_path / 'out')!r}])")
    assert_dies_with_launcher(worker, env={**os.environ, "TORCHELASTIC_RUN_ID": "none"})  # main set it up, then sleeps


def write_tar(path, keys, replaced=(), seed=2):
    """A webdataset tar: per key a 40 x 40 random .png, a .txt caption and a .json {"caption": short caption}; the
    members in `replaced` ({key: {extension: bytes}}) in their place."""
    import tarfile
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, "PNG")
            members = {"png": png.getvalue(), "txt": caption(rng, 6).encode(),
                       "json": json.dumps({"caption": caption(rng, 2)}).encode(), **dict(replaced).get(key, {})}
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def write_parquet(path, ids, seed=0, corrupt=()):
    """Rows of the default caption fields (llava, prompt), with these ids and 40 x 40 random images (bytes that are no
    image in the rows of `corrupt`)."""
    import datasets
    rng, rows = np.random.default_rng(seed), []
    for i, sample_id in enumerate(ids):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, "PNG")
        image = b"not an image" if i in corrupt else png.getvalue()
        rows.append({"id": sample_id, "image": {"bytes": image, "path": None},
                     "llava": caption(rng, 8), "prompt": caption(rng, 3)})
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "llava": datasets.Value("string"), "prompt": datasets.Value("string")})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def test_a_source_file_that_cannot_be_read_is_named_before_the_encoders_load(prepared, tmp_path, monkeypatch):
    """A corrupt or empty parquet file, or a .tar that is no tar: one line naming the source and the file (pyarrow's
    own error names a '<Buffer>'), before any model loads or any folder is made."""
    root, _ = prepared
    write_parquet(tmp_path / "pq" / "train-1.parquet", ["a"])
    (tmp_path / "pq" / "train-0.parquet").write_bytes(b"not parquet" * 10)  # the first: read for the columns
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train-0.parquet").write_bytes(b"")
    (tmp_path / "part-0.tar").write_bytes(b"not a tar" * 100)
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", lambda *a: pytest.fail("encoders loaded"))
    for source, file, flags in ((tmp_path / "pq", tmp_path / "pq" / "train-0.parquet", []),
                                (tmp_path / "empty" / "*.parquet", tmp_path / "empty" / "train-0.parquet", []),
                                (tmp_path / "*.tar", tmp_path / "part-0.tar", ["--image-field", "png"])):
        with pytest.raises(SystemExit, match=f"^error: --source {re.escape(str(source))}: cannot read {file} "
                                             f"\\((ArrowInvalid|ReadError): .*\\); replace it with a readable copy"):
            prepare.main(prepare_argv(tmp_path / "out", source, root / "models", *flags))
        assert not (tmp_path / "out").exists()


def test_a_corrupt_source_file_midway_stops_naming_it_and_a_readable_copy_resumes(prepared, tmp_path):
    """The third of three tars is corrupt: the preparation stops there with one line naming it, the shards of the
    first two kept; with a readable copy in its place the same command resumes and reads it (without it the source's
    files differ, refused as before). A corrupt parquet file is found before any work (its footer: the row count)."""
    root, _ = prepared
    for k in range(2):
        write_tar(tmp_path / f"part-{k}.tar", [f"f{k}r{i}" for i in range(2)], seed=k)
    (tmp_path / "part-2.tar").write_bytes(b"not a tar" * 100)
    argv = prepare_argv(tmp_path / "out", tmp_path / "*.tar", root / "models", "--eval-fraction", "0", "--shard-size",
                        "2", "--batch-size", "2", "--image-field", "png", "--captions", "long=txt,short=json.caption")
    with pytest.raises(SystemExit, match=f"^error: --source {re.escape(str(tmp_path / '*.tar'))}: cannot read "
                                         f"{tmp_path / 'part-2.tar'} \\(ReadError: .*run the same command again, "
                                         f"which resumes after the last whole shard"):
        prepare.main(argv)
    kept = files_of(tmp_path / "out" / "train")
    assert {str(p.parent) for p in kept} == {"shard-r000-00000", "shard-r000-00001"}
    write_tar(tmp_path / "part-2.tar", ["f2r0", "f2r1"], seed=2)
    prepare.main(argv)
    assert sorted(stored_samples(tmp_path / "out")) == [f"f{k}r{i}" for k in range(3) for i in range(2)]
    assert all(files_of(tmp_path / "out" / "train")[p] == b for p, b in kept.items())  # resumed, not redone


def test_an_out_that_cannot_be_made_is_refused_before_the_encoders_load(prepared, tmp_path, monkeypatch, capsys):
    root, _ = prepared
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", lambda *a: pytest.fail("encoders loaded"))
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "out"):  # FileExistsError, NotADirectoryError
        with pytest.raises(SystemExit):
            prepare.main(prepare_argv(out, root / "pq", root / "models"))
        assert f"argument --out: {tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "locked").mkdir()  # os.access refused, as for a user without write permission (root has it)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: Path(path) != tmp_path / "locked" and
                        access(path, mode, **k))
    with pytest.raises(SystemExit):  # a PermissionError
        prepare.main(prepare_argv(tmp_path / "locked" / "data" / "out", root / "pq", root / "models"))
    assert f"argument --out: cannot write in {tmp_path / 'locked'} (no permission" in capsys.readouterr().err
    assert not list((tmp_path / "locked").iterdir())


def test_a_source_that_is_no_folder_nor_hub_id_or_a_single_image_is_named(prepared, tmp_path, monkeypatch):
    """A glob of images, a path with a quoted ~, words: no folder and no hub id (huggingface_hub's HFValidationError
    traceback); one image file: its folder is the source (datasets went looking on the hub)."""
    root, _ = prepared
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", lambda *a: pytest.fail("encoders loaded"))
    monkeypatch.chdir(root)
    for source, message in (("images/*.png", r"no such folder or file here, and not a hub dataset id \(namespace/"
                                              r"name\).*; a glob names .parquet or .tar files"),
                            ("~/nothing", "no such folder.* ~ is expanded by the shell only at the start of a word"),
                            ("a b c", "no such folder or file here, and not a hub dataset id"),
                            (str(root / "images" / "rgb01.png"), "a single image; pass the folder that holds it")):
        with pytest.raises(SystemExit, match=f"^error: --source {re.escape(source)}: {message}"):
            prepare.main(prepare_argv(tmp_path / "out", source, root / "models"))
    assert not (tmp_path / "out").exists()


def test_every_skipped_row_is_counted_even_under_one_id(prepared, tmp_path):
    """Three corrupt rows of one id are three skipped samples (index.json's ids names the id once). Good rows of one
    id (a repeated row of a dataset) are both kept, in one split, as duplicate images without an id are."""
    root, _ = prepared
    write_parquet(tmp_path / "pq" / "train-0.parquet", ["same", "same", "a", "same", "twin", "twin", "b"], seed=3,
                  corrupt=(0, 1, 3))
    write_parquet(tmp_path / "pq" / "train-1.parquet", ["same", "c"], seed=4, corrupt=(0,))  # in another shard
    prepare.main(prepare_argv(tmp_path / "out", tmp_path / "pq", root / "models", "--eval-fraction", "0.5",
                              "--shard-size", "2", "--batch-size", "2"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"]["count"] == 4 and index["skipped"]["by_reason"] == {"undecodable image": 4}
    assert list(index["skipped"]["ids"]) == ["same"]
    assert index["train"]["count"] + index["eval"]["count"] == 5  # a, twin, twin, b, c
    twins = [split for split in ("train", "eval") for p in (tmp_path / "out" / split).glob("shard-*")
             for r in range(json.loads((p / "meta.json").read_text())["count"])
             if data.Shard(p).string("id", r) == "twin"]
    assert len(twins) == 2 and len(set(twins)) == 1
    assert [prepare.open_source(str(tmp_path / "pq"), "image", r, 2)[1] for r in (0, 1)] == [7, 2]  # the bar's total


def test_a_folder_of_the_source_that_cannot_be_read_is_refused(prepared, tmp_path, monkeypatch):
    """A subfolder without read permission: refused by name (Path.rglob leaves it out without a word, and its images
    would be missing unseen); a source folder without it is unreadable, not 'a folder with no images'. Tested by a
    refused listing: the tests run as root, who may read anything."""
    root, _ = prepared
    folder = copy_samples(root, tmp_path / "images")
    copy_samples(root, folder / "sub", ("rgb03.png",))
    monkeypatch.setattr(prepare.T5GemmaTextEncoder, "from_pretrained", lambda *a: pytest.fail("encoders loaded"))
    scandir = os.scandir
    for locked in (folder / "sub", folder):
        def refused(path=".", locked=locked):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return scandir(path)
        monkeypatch.setattr(os, "scandir", refused)
        with pytest.raises(SystemExit, match=f"^error: --source {folder}: cannot read the folder {locked} "
                                             f"\\(PermissionError\\): make it readable, or move it out of the source"):
            prepare.main(prepare_argv(tmp_path / "out", folder, root / "models", "--captions", "long=txt"))
        assert not (tmp_path / "out").exists()


def test_images_in_a_linked_folder_are_read_once_and_a_link_to_an_ancestor_ends(prepared, tmp_path):
    """A subset linked in from elsewhere is part of the source (os.walk and rglob skip linked folders without a word);
    each real folder is read once: a second link to it adds nothing, a link to the source itself does not loop, and a
    link above it is not followed."""
    root, _ = prepared
    folder = copy_samples(root, tmp_path / "images", ("rgb01.png",))
    elsewhere = copy_samples(root, tmp_path / "elsewhere", ("rgb02.png", "rgba0.png"))
    (folder / "more").symlink_to(elsewhere)
    (folder / "again").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to(folder)
    (folder / "top").symlink_to(tmp_path)  # an ancestor: its other folders (elsewhere) are not the source's
    files = prepare.open_source(str(folder), "image", 0, 1)[3]
    assert sorted(p.relative_to(folder).as_posix() for p in files) == ["again/rgb02.png", "again/rgba0.png",
                                                                          "rgb01.png"]


def test_ctrl_c_stops_with_one_line_saying_how_to_resume(tmp_path):
    """As train.py's: no KeyboardInterrupt traceback, and the way on (the whole shards are kept)."""
    stop = ("import os, signal, prepare; prepare.prepare = lambda *a: os.kill(os.getpid(), signal.SIGINT); "
            f"prepare.main(['--out', {str(tmp_path / 'out')!r}, '--source', {str(tmp_path)!r}])")
    run = subprocess.run([sys.executable, "-c", stop], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1 and run.stderr.strip() == f"stopped (Ctrl-C); the whole shards in {tmp_path / 'out'} " \
        f"are kept: run the same command again to resume after the last one"
