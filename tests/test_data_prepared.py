"""Preparation and loading of real datasets, offline: tiny random VAE, T5Gemma and tokenizer saved to disk and
loaded through the same from_pretrained calls as the hub weights."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data as ds

WORDS = "a the photo painting of cat dog bird red blue green big small on in under tree house sky".split()
RES, MAX_TOKENS = 32, 12


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only waits on shared CPUs
    yield
    torch.set_num_threads(threads)


def save_tiny_encoders(root):
    """A word-level tokenizer that adds <bos> like Gemma's, a full T5Gemma checkpoint (encoder + decoder, as on the
    hub) and a Flux-like AutoencoderKL (x2 down, 4 channels, Flux's shift/scale) in a `vae` subfolder."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5GemmaConfig, T5GemmaForConditionalGeneration
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(root / "t5gemma")
    torch.manual_seed(0)
    module = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                  num_attention_heads=2, num_key_value_heads=1, sliding_window=8, pad_token_id=0, bos_token_id=2,
                  eos_token_id=1)
    T5GemmaForConditionalGeneration(T5GemmaConfig(encoder=module, decoder=module, vocab_size=len(vocab))
                                    ).save_pretrained(root / "t5gemma")
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                  scaling_factor=0.3611, shift_factor=0.1159).save_pretrained(root / "flux" / "vae")


def caption(rng, n):
    return " ".join(rng.choice(WORDS, n)).title()  # upper case: the encoder must lower-case it


def make_folder(root):
    """42 images: RGB png/jpg, RGBA, L, CMYK, 16-bit, palette with transparency; 3 corrupt, 2 tiny, 3 with empty
    captions, 1 without any caption. Long caption in <stem>.txt, short in <stem>.json. -> the skipped ids."""
    rng = np.random.default_rng(0)
    root.mkdir()

    def add(name, img, long=None, short=None):
        path = root / name
        if isinstance(img, bytes):
            path.write_bytes(img)
        else:
            img.save(path, quality=95) if name.endswith(".jpg") else img.save(path)
        if long is not None:
            path.with_suffix(".txt").write_text(caption(rng, int(rng.integers(2, 20))) if long is True else long)
            path.with_suffix(".json").write_text(json.dumps({"short": caption(rng, 2) if short is None else short}))

    def noise(mode, channels, size):
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels)[:3 if channels > 1 else 2],
                                            dtype=np.uint8).squeeze(), mode)

    for i in range(22):
        size = tuple(int(s) for s in rng.integers(20, 90, 2))
        add(f"rgb{i:02d}.{'jpg' if i % 4 == 0 else 'png'}", noise("RGB", 3, size), long=True)
    for i in range(3):
        rgba = rng.integers(0, 256, (40 + 7 * i, 50, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rgba[..., 3] > 128, 255, 0)  # alpha 0 or 255: white where transparent
        add(f"rgba{i}.png", Image.fromarray(rgba, "RGBA"), long=True)
        add(f"grey{i}.png", noise("L", 1, (30 + 9 * i, 45)), long=True)
    for i in range(2):
        add(f"cmyk{i}.jpg", noise("RGB", 3, (48, 36 + 10 * i)).convert("CMYK"), long=True)
        ramp = (np.linspace(0, 65535, 40 * 36) * (1 - 0.2 * i)).astype(np.uint16).reshape(36, 40)
        add(f"grey16_{i}.png", Image.fromarray(ramp), long=True)
    palette = noise("RGB", 3, (33, 44)).convert("P")
    palette.info["transparency"] = 0
    add("palette.png", palette, long=True)
    png = io.BytesIO()
    noise("RGB", 3, (40, 40)).save(png, "PNG")
    skipped = {"bad0.jpg": "undecodable image", "bad1.png": "undecodable image", "bad2.png": "undecodable image",
               "tiny0.png": "image smaller than --min-size 16", "tiny1.png": "image smaller than --min-size 16",
               "empty0.png": "empty caption", "empty1.png": "empty caption", "empty2.png": "empty caption",
               "nocaption.png": "missing caption field"}
    add("bad0.jpg", rng.bytes(500), long=True)
    add("bad1.png", png.getvalue()[:60], long=True)  # truncated
    add("bad2.png", b"", long=True)
    add("tiny0.png", noise("RGB", 3, (8, 8)), long=True)
    add("tiny1.png", noise("RGB", 3, (10, 40)), long=True)
    add("empty0.png", noise("RGB", 3, (40, 40)), long="")
    add("empty1.png", noise("RGB", 3, (40, 40)), long="   ")
    add("empty2.png", noise("RGB", 3, (40, 40)), long=True, short="")
    add("nocaption.png", noise("RGB", 3, (40, 40)))
    return skipped


def prepare_argv(out, source, models, *extra):
    return ["prepare", "--out", str(out), "--source", str(source), "--vae", "flux", "--vae-path",
            str(models / "flux"), "--text-encoder", str(models / "t5gemma"), "--max-tokens", str(MAX_TOKENS),
            "--resolution", str(RES), "--min-size", "16", "--shard-size", "8", "--batch-size", "5",
            "--eval-fraction", "0.2", "--workers", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    save_tiny_encoders(root / "models")
    skipped = make_folder(root / "images")
    ds.main(prepare_argv(root / "out", root / "images", root / "models", "--captions", "long=txt,short=short"))
    # a second source, parquet with the default caption fields (midjourney-v6-llava's llava / prompt)
    import datasets
    rng, rows = np.random.default_rng(1), []
    for i in range(6):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(png, "PNG")
        rows.append({"id": f"pq{i}", "image": {"bytes": b"not an image" if i == 5 else png.getvalue(), "path": None},
                     "llava": caption(rng, 8), "prompt": caption(rng, 3)})
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "llava": datasets.Value("string"), "prompt": datasets.Value("string")})
    (root / "pq").mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "pq" / "train-0.parquet"))
    ds.main(prepare_argv(root / "out_pq", root / "pq", root / "models"))  # a folder of parquet files, as a hub id
    return root, skipped


def stored_samples(out, split="train"):
    """id -> (shard, row) of every sample of a split."""
    data = ds.PreparedDataset(out, split)
    return {shard.string("id", r): (shard, r) for shard, r in map(data.locate, range(len(data)))}


def reference_image(path):
    img = Image.open(path)
    if img.mode == "I;16":
        img = Image.fromarray(np.round(np.asarray(img) / 257).astype(np.uint8))
    elif img.mode in ("RGBA", "P"):
        rgba = np.asarray(img.convert("RGBA"))
        img = Image.fromarray(np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8))
    return np.asarray(ImageOps.fit(img.convert("RGB"), (RES, RES), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def test_counts_shapes_dtypes_and_skipped(prepared):
    root, skipped = prepared
    index = json.loads((root / "out" / "index.json").read_text())
    train, held = stored_samples(root / "out"), stored_samples(root / "out", "eval")
    assert index["train"]["count"] == len(train) and index["eval"]["count"] == len(held)
    assert len(train) + len(held) == 42 - len(skipped) and not set(train) & set(held)
    assert set(held) == {i for i in [*train, *held] if ds.in_eval_split(0, i, 0.2)} and len(held) > 0
    assert {k: v.split(":")[0] for k, v in index["skipped"]["ids"].items()} == skipped
    assert index["skipped"]["count"] == 9 and index["skipped"]["by_reason"]["undecodable image"] == 3
    assert max(s["count"] for s in index["train"]["shards"]) < 8 + 5  # shard size 8, flushed after a batch of 5
    for shard_info in [s for s in index["train"]["shards"] if s["count"]]:
        arrays, n = ds.Shard(root / "out" / shard_info["path"]).arrays, shard_info["count"]
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
    shard, r = stored_samples(root / "out", "eval" if ds.in_eval_split(0, "grey16_0.png", 0.2) else "train")[
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
            ds.stable_hash("latent", 0, sample_id)))
        expected = ((post.mean[0] + post.std[0] * eps) - 0.1159) * 0.3611
        stored = torch.from_numpy(np.array(shard.arrays["latent"][r])).view(torch.bfloat16).float()
        # computed in a batch of 5 at preparation, alone here: equal up to one bf16 rounding step
        torch.testing.assert_close(stored, expected.bfloat16().float(), rtol=2 ** -7, atol=1e-5)
        assert (stored - (post.mean[0] - 0.1159) * 0.3611).abs().max() > 1e-2  # a sample, not the mean


def test_text_is_unpadded_encoder_output(prepared):
    from transformers import AutoTokenizer, T5GemmaEncoderModel
    root, _ = prepared
    tokenizer = AutoTokenizer.from_pretrained(root / "models" / "t5gemma")
    model = T5GemmaEncoderModel.from_pretrained(root / "models" / "t5gemma", is_encoder_decoder=False).eval()

    def encode(text):
        ids = tokenizer(ds.clean_caption(text), truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).last_hidden_state[0].bfloat16().float()
    truncated = 0
    for sample_id, (shard, r) in stored_samples(root / "out").items():
        long = (root / "images" / sample_id).with_suffix(".txt").read_text()
        short = json.loads((root / "images" / sample_id).with_suffix(".json").read_text())["short"]
        for name, text in (("long", long), ("short", short)):
            assert shard.string(f"caption_{name}", r) == text
            stored = torch.from_numpy(np.array(shard.ragged(f"txt_{name}", r))).view(torch.bfloat16).float()
            expected = encode(text)
            assert len(stored) == len(expected) == min(len(text.split()) + 1, MAX_TOKENS)  # words + <bos>
            torch.testing.assert_close(stored, expected, rtol=2 ** -7, atol=1e-5)
        truncated += len(long.split()) + 1 > MAX_TOKENS
    assert truncated > 0
    null = torch.from_numpy(np.load(root / "out" / "null_txt.npy")).view(torch.bfloat16).float()
    torch.testing.assert_close(null, encode(""), rtol=0, atol=0)
    assert ds.clean_caption(' A &amp; B  “Cat” http://x.com/a @bob ') == 'a & b "cat"'


def test_interrupted_preparation_resumes_to_the_same_result(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    write_shard, calls = ds.write_shard, []

    def crash_on_third_shard(path, columns, meta):
        calls.append(path)
        if len(calls) == 3:  # killed while writing: a partial shard is left behind
            Path(f"{path}.tmp").mkdir(parents=True)
            Path(f"{path}.tmp/image.npy").write_bytes(b"partial")
            raise KeyboardInterrupt
        write_shard(path, columns, meta)
    argv = prepare_argv(tmp_path / "out", root / "images", root / "models", "--captions", "long=txt,short=short")
    monkeypatch.setattr(ds, "write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        ds.main(argv)
    assert list(tmp_path.glob("out/*/*.tmp")) and not (tmp_path / "out" / "index.json").exists()
    rows_done = json.loads(sorted(tmp_path.glob("out/train/shard-*[0-9]"))[-1].joinpath("meta.json").read_text()
                           )["rows_done"]
    load_sample, loaded = ds.load_sample, []
    monkeypatch.setattr(ds, "load_sample", lambda row, *a, **k: loaded.append(row) or load_sample(row, *a, **k))
    monkeypatch.setattr(ds, "write_shard", write_shard)
    ds.main(argv)
    assert 0 < rows_done and len(loaded) == 42 - rows_done  # continued after the last whole shard
    assert not list(tmp_path.glob("out/*/*.tmp"))
    resumed = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    clean = sorted(p.relative_to(root / "out") for p in (root / "out").rglob("*") if p.is_file())
    assert resumed == clean
    for rel in clean:
        if rel.name != "index.json":
            assert (tmp_path / "out" / rel).read_bytes() == (root / "out" / rel).read_bytes(), rel
    a, b = (json.loads((d / "index.json").read_text()) for d in (tmp_path / "out", root / "out"))
    assert {k: v for k, v in a.items() if k != "settings"} == {k: v for k, v in b.items() if k != "settings"}


def test_two_preparation_ranks_split_the_files(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    argv = prepare_argv(tmp_path / "out", root / "images", root / "models", "--captions", "long=txt,short=short")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 0 waits for the others, then writes the index
        monkeypatch.setenv("RANK", str(rank))
        ds.main(argv)
    files = sorted(p.relative_to(root / "images").as_posix() for p in (root / "images").iterdir()
                   if p.suffix in ds.IMAGE_EXTENSIONS)
    single = {**stored_samples(root / "out"), **stored_samples(root / "out", "eval")}
    for rank in (0, 1):
        shards = [p for p in (tmp_path / "out").glob(f"*/shard-r{rank:03d}-*")]
        ids = {ds.Shard(p).string("id", r) for p in shards for r in range(json.loads(
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


def test_webdataset_tars_in_pixel_space(prepared, tmp_path):
    import tarfile
    root, _ = prepared
    rng = np.random.default_rng(2)
    with tarfile.open(tmp_path / "part-0.tar", "w") as tar:
        for i in range(4):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, "PNG")
            for ext, data in (("png", png.getvalue()), ("txt", caption(rng, 6).encode()),
                              ("json", json.dumps({"caption": caption(rng, 2)}).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    argv = prepare_argv(tmp_path / "out", tmp_path / "*.tar", root / "models", "--vae", "none", "--image-field", "png",
                        "--captions", "long=txt,short=json.caption", "--eval-fraction", "0")
    ds.main(argv)
    stored = stored_samples(tmp_path / "out")
    assert sorted(stored) == ["s0", "s1", "s2", "s3"]  # webdataset keys as ids
    batch = next(ds.ShardLoader(str(tmp_path / "out"), batch_size=4, captions="short"))
    assert "latent" not in batch and batch["image"].shape == (4, 3, RES, RES) and batch["image"].dtype == torch.uint8
    with tarfile.open(tmp_path / "part-0.tar") as tar:
        shorts = {m.name[:2]: json.load(tar.extractfile(m))["caption"] for m in tar if m.name.endswith(".json")}
    assert batch["caption"] == [shorts[i] for i in batch["id"]]


def test_loader_batch_is_the_stored_samples(prepared):
    root, _ = prepared
    stored = stored_samples(root / "out")
    loader = ds.ShardLoader(str(root / "out"), batch_size=4, captions="long", images=True)
    batch = next(loader)
    assert batch["latent"].dtype == torch.float32 and batch["txt"].dtype == torch.bfloat16
    assert batch["txt"].shape[1] == batch["txt_mask"].sum(1).max()  # padded to the longest of the batch
    for j, sample_id in enumerate(batch["id"]):
        shard, r = stored[sample_id]
        txt = torch.from_numpy(np.array(shard.ragged("txt_long", r))).view(torch.bfloat16)
        n = len(txt)
        assert batch["caption"][j] == shard.string("caption_long", r) and batch["txt_mask"][j].sum() == n
        assert torch.equal(batch["txt"][j, :n], txt) and not batch["txt"][j, n:].float().any()
        assert torch.equal(batch["latent"][j], torch.from_numpy(np.array(shard.arrays["latent"][r])).view(
            torch.bfloat16).float())
        assert torch.equal(batch["image"][j], torch.from_numpy(np.array(shard.arrays["image"][r])))
    null = np.load(root / "out" / "null_txt.npy")
    assert loader.null_txt.shape == (1, len(null), 32) and loader.null_mask.all()
    short = next(ds.ShardLoader(str(root / "out"), batch_size=4, captions="short"))
    assert [stored[i][0].string("caption_short", stored[i][1]) for i in short["id"]] == short["caption"]
    mixed = ds.ShardLoader(str(root / "out"), batch_size=4, captions="mixed:0.5")
    captions = [c for _ in range(4) for c in next(mixed)["caption"]]
    longs = {s.string("caption_long", r) for s, r in stored.values()}
    assert 0 < sum(c in longs for c in captions) < len(captions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_gives_the_cpu_batches(prepared):
    root, _ = prepared
    cpu, cuda = (ds.ShardLoader(str(root / "out"), 4, images=True, device=d) for d in ("cpu", "cuda"))
    for _ in range(3):
        a, b = next(cpu), next(cuda)
        assert a["id"] == b["id"] and b["latent"].is_cuda and cuda.null_txt.is_cuda
        for key in ("latent", "txt", "txt_mask", "image"):
            assert torch.equal(a[key], b[key].cpu())


def test_loader_ranks_are_disjoint_cover_an_epoch_and_resume(prepared):
    root, _ = prepared
    train = set(stored_samples(root / "out"))
    ranks = [ds.ShardLoader(str(root / "out"), batch_size=3, rank=r, world_size=2, seed=5) for r in (0, 1)]
    order = [i for _ in range(len(train) // 6 + 2) for loader in ranks for i in next(loader)["id"]]
    assert set(order[:len(train)]) == train and len(set(order[:len(train)])) == len(train)  # each sample once
    state = ranks[0].state_dict()
    expected = [next(ranks[0]) for _ in range(3)]
    resumed = ds.ShardLoader(str(root / "out"), batch_size=3, rank=0, world_size=2, seed=5)
    resumed.load_state_dict(state)
    ranks[0].load_state_dict(state)  # also after iterating (warm-up, then restore)
    for want in expected:
        for got in (next(resumed), next(ranks[0])):
            assert got["id"] == want["id"] and torch.equal(got["latent"], want["latent"])
            assert torch.equal(got["txt"], want["txt"]) and torch.equal(got["txt_mask"], want["txt_mask"])


def test_mixtures_and_phases(prepared):
    root, _ = prepared
    a, b = str(root / "out"), str(root / "out_pq")
    in_b = lambda batch: {i.startswith("pq") for i in batch["id"]}  # noqa: E731
    assert ds.parse_data_phases("d1:0.7,d2:0.3@0;d3@90000") == [(0, {"d1": 0.7, "d2": 0.3}), (90000, {"d3": 1.0})]
    phased = ds.ShardLoader(f"{a}:1@0;{b}:1@2", batch_size=4)
    assert [in_b(next(phased)) for _ in range(4)] == [{False}, {False}, {True}, {True}]
    accumulated = ds.ShardLoader(f"{a}:1@0;{b}:1@2", batch_size=4, grad_accum=2)  # @2 = optimizer step 2
    assert [in_b(next(accumulated)) for _ in range(6)] == [{False}] * 4 + [{True}] * 2
    mixed = ds.ShardLoader(f"{a}:0.5,{b}:0.5", batch_size=8)
    assert set.union(*[in_b(next(mixed)) for _ in range(3)]) == {False, True}


def test_bad_input_is_refused_with_a_clear_error(prepared, tmp_path):
    root, _ = prepared
    for spec in ("d:0", "d@5", "d1@0;d2@0"):
        with pytest.raises(ValueError, match="data spec"):
            ds.parse_data_phases(spec)
    with pytest.raises(ValueError, match="name=field"):
        ds.parse_caption_fields("long")
    with pytest.raises(ValueError, match="mixed"):
        ds.ShardLoader(str(root / "out"), 4, captions="medium")
    with pytest.raises(FileNotFoundError, match="prepare"):
        ds.ShardLoader(str(tmp_path), 4)


def test_latent_normalisation_flux_and_flux2():
    from diffusers import AutoencoderKL, AutoencoderKLFlux2
    z = torch.randn(2, 4, 6, 8)
    flux = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, scaling_factor=0.3611,
                         shift_factor=0.1159)
    torch.testing.assert_close(ds.normalize_latent(z, *ds.latent_stats(flux)), (z - 0.1159) * 0.3611)
    flux2 = AutoencoderKLFlux2(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), latent_channels=4,
                               up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)
    flux2.bn.running_mean.normal_()
    flux2.bn.running_var.uniform_(0.5, 2)
    shift, scale = ds.latent_stats(flux2)
    # diffusers' Flux2Pipeline: 2x2 patchify to 16 channels, BatchNorm statistics, back
    patches = z.view(2, 4, 3, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 16, 3, 4)
    patches = (patches - flux2.bn.running_mean[:, None, None]) / (flux2.bn.running_var[:, None, None] + 1e-4).sqrt()
    expected = patches.reshape(2, 4, 2, 2, 3, 4).permute(0, 1, 4, 2, 5, 3).reshape(2, 4, 6, 8)
    torch.testing.assert_close(ds.normalize_latent(z, shift, scale), expected)
    torch.testing.assert_close(ds.denormalize_latent(ds.normalize_latent(z, shift, scale), shift, scale), z)


def test_eval_split(prepared):
    root, _ = prepared
    split, held = ds.load_eval_split(root / "out"), stored_samples(root / "out", "eval")
    assert split["id"] == list(held) and split["image"].shape == (len(held), 3, RES, RES)
    for j, sample_id in enumerate(split["id"]):
        np.testing.assert_array_equal(split["image"][j], reference_image(root / "images" / sample_id))
        assert split["caption"][j] == (root / "images" / sample_id).with_suffix(".txt").read_text()
    txt, mask = ds.batch_text(split["txt"])
    assert txt.shape == (len(held), mask.sum(1).max(), 32)


def test_train_on_prepared_latents_and_resume(prepared, tmp_path):
    """train.py on a prepared dataset: latents and T5Gemma text from the shards, loader position in the checkpoint."""
    import subprocess
    import sys
    root, _ = prepared
    argv = [sys.executable, "train.py", "--data", str(root / "out"), "--model", "tiny", "--resolution", str(RES),
            "--hidden", "64", "--depth", "2", "--batch-size", "8", "--micro-batch", "4", "--log-every", "1",
            "--eval-samples", "0", "--out", str(tmp_path / "run")]
    cwd = Path(__file__).parent.parent
    first = subprocess.run(argv + ["--max-steps", "3"], cwd=cwd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_3" / "trainer.pt", weights_only=True)
    assert state["loader"]["batches"] == 6  # 3 steps x 2 accumulation micro-batches
    second = subprocess.run(argv + ["--max-steps", "5", "--resume"], cwd=cwd, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]
