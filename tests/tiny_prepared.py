"""Builders of the tiny prepared datasets of test_prepare.py and test_data.py, offline: tiny random VAE, T5Gemma
and tokenizer saved to disk and loaded through the same from_pretrained calls as the hub weights."""

import io
import json

import numpy as np
import torch
from PIL import Image, ImageOps

import prepare
from data import PreparedDataset

WORDS = "a the photo painting of cat dog bird red blue green big small on in under tree house sky".split()
RES, MAX_TOKENS = 32, 12


def save_tiny_encoders(root):
    """A word-level tokenizer that adds <bos> like Gemma's, a full T5Gemma checkpoint (encoder + decoder, as on the
    hub), a Flux-like AutoencoderKL (x2 down, 4 channels, Flux's shift/scale) in a `vae` subfolder, and a DC-AE-like
    AutoencoderDC (x4 down, 4 channels, SANA 1.1's scaling factor) at the root of `dc-ae`, as on the hub."""
    from diffusers import AutoencoderDC, AutoencoderKL
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
    AutoencoderDC(latent_channels=4, attention_head_dim=8, encoder_block_out_channels=(8, 8, 8),
                  decoder_block_out_channels=(8, 8, 8), encoder_layers_per_block=(1, 1, 1),
                  decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((),) * 3,
                  decoder_qkv_multiscales=((),) * 3, scaling_factor=0.41407).save_pretrained(root / "dc-ae")


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
    add("empty1.png", noise("RGB", 3, (40, 40)), long=" @bob http://x.com/a ")  # empty once cleaned
    add("empty2.png", noise("RGB", 3, (40, 40)), long=True, short="")
    add("nocaption.png", noise("RGB", 3, (40, 40)))
    return skipped


def prepare_argv(out, source, models, *extra):
    return ["--out", str(out), "--source", str(source), "--vae", "flux", "--vae-path",
            str(models / "flux"), "--text-encoder", str(models / "t5gemma"), "--max-tokens", str(MAX_TOKENS),
            "--resolution", str(RES), "--min-size", "16", "--shard-size", "8", "--batch-size", "5",
            "--eval-fraction", "0.2", "--workers", "2", "--device", "cpu", *extra]


def make_prepared(root):
    """Two prepared directories under root: out (the image folder) and out_pq (parquet). -> the skipped ids."""
    save_tiny_encoders(root / "models")
    skipped = make_folder(root / "images")
    prepare.main(prepare_argv(root / "out", root / "images", root / "models", "--captions", "long=txt,short=short"))
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
    prepare.main(prepare_argv(root / "out_pq", root / "pq", root / "models"))  # a folder of parquet files, as a hub id
    return skipped


def stored_samples(out, split="train"):
    """id -> (shard, row) of every sample of a split."""
    data = PreparedDataset(out, split)
    return {shard.string("id", r): (shard, r) for shard, r in map(data.locate, range(len(data)))}


def reference_image(path):
    img = Image.open(path)
    if img.mode == "I;16":
        img = Image.fromarray(np.round(np.asarray(img) / 257).astype(np.uint8))
    elif img.mode in ("RGBA", "P"):
        rgba = np.asarray(img.convert("RGBA"))
        img = Image.fromarray(np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8))
    return np.asarray(ImageOps.fit(img.convert("RGB"), (RES, RES), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
