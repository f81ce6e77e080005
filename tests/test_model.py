import hashlib
import json
import os
import re
import types

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import (CHECKSUMS, PRX, PRXConfig, file_sha256, flops_per_sample, gelu_tanh, list_checkpoints, preset_config,
                   read_config, rope_for_grid, run_of, step_of, trim_text, verify_checkpoint, weights_file)

TINY = dict(in_channels=4, patch_size=2, context_dim=24, hidden_size=64, depth=4, num_heads=2, axes_dim=(16, 16),
            route_start=1, route_end=2)


def randomize(model, std=0.05):
    """Random weights everywhere (the zero-initialised layers would hide most of the network)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def inputs(cfg, B=3, H=8, W=12, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.rand(B, generator=g)
    txt = torch.randn(B, L, cfg.context_dim, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, 3, 5][:B])[:, None]
    return x, t, txt, mask


@pytest.mark.parametrize("bottleneck, resolution_embeds, patch", [(None, False, 2), (32, False, 2), (32, True, 2),
                                                                  (None, False, 1)])  # patch 1: DC-AE's latents
def test_diffusers_interop_both_ways(tmp_path, bottleneck, resolution_embeds, patch):
    """Equal outputs on a non-square input (8 x 12: the resolution embedding's H and W differ)."""
    from diffusers import PRXTransformer2DModel
    cfg = PRXConfig(**dict(TINY, patch_size=patch), bottleneck_size=bottleneck, resolution_embeds=resolution_embeds)
    theirs = randomize(PRXTransformer2DModel(**{k: v for k, v in PRX(cfg).diffusers_config().items()
                                                if k != "_class_name"}))
    theirs.save_pretrained(tmp_path / "d", max_shard_size="50KB")  # sharded checkpoint
    assert (tmp_path / "d" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = PRX.from_diffusers(str(tmp_path / "d"))
    assert ours.cfg.resolution_embeds == resolution_embeds
    x, t, txt, mask = inputs(cfg)
    with torch.no_grad():
        ref = theirs(x, t, txt, mask, return_dict=False)[0]
        assert (ours(x, t, txt, mask) - ref).abs().max() <= 1e-5
        # and back: ours -> a pipeline folder (transformer/ single file and sharded) -> diffusers loads it
        randomize(ours, std=0.03)
        for shard in (2**40, 20_000):
            folder = tmp_path / f"o{shard}"
            ours.save_diffusers(str(folder), max_shard_bytes=shard)
            sharded = (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
            assert sharded == (shard == 20_000)
            back = PRXTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
            assert (back(x, t, txt, mask, return_dict=False)[0] - ours(x, t, txt, mask)).abs().max() <= 1e-5
        again = PRX.from_diffusers(str(folder))  # and our export loads into ours (a pipeline: its transformer/)
        assert torch.equal(again(x, t, txt, mask), ours(x, t, txt, mask))


def test_export_without_encoders_takes_them_at_load(tmp_path):
    """save_diffusers without the VAE and text encoder: model_index.json cannot name another repository's files, so
    they are null there and the README's call passes them to from_pretrained (here tiny local stand-ins)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXPipeline
    from transformers import AutoTokenizer, T5GemmaEncoderModel
    from tiny_prepared import save_tiny_encoders
    save_tiny_encoders(tmp_path)
    model = PRX(PRXConfig(**dict(TINY, context_dim=32)))  # the tiny T5Gemma's width
    model.save_diffusers(str(tmp_path / "x"), shift=3.0, resolution=512)
    index = json.loads((tmp_path / "x" / "model_index.json").read_text())
    assert index["vae"] == index["text_encoder"] == index["tokenizer"] == [None, None]
    with pytest.raises(ValueError, match="expected"):  # diffusers names what is missing
        PRXPipeline.from_pretrained(tmp_path / "x")
    pipe = PRXPipeline.from_pretrained(
        tmp_path / "x", vae=AutoencoderKL.from_pretrained(tmp_path / "flux", subfolder="vae"),
        text_encoder=T5GemmaEncoderModel.from_pretrained(tmp_path / "t5gemma", is_encoder_decoder=False),
        tokenizer=AutoTokenizer.from_pretrained(tmp_path / "t5gemma"))
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert pipe.default_sample_size == 512 and not pipe.scheduler.config.use_dynamic_shifting
    # a tokenizer without a model_max_length (this one) must be given prepare.py's length, here 12 (README: 256)
    image = pipe("a red cat", height=16, width=16, num_inference_steps=2, tokenizer_max_length=12,
                 use_resolution_binning=False, output_type="pt").images
    assert image.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="pixel-space"):
        PRX(PRXConfig(**dict(TINY, in_channels=3))).save_diffusers(str(tmp_path / "px"))
    with pytest.raises(ValueError, match="SPRINT adds layers"):
        PRX(PRXConfig(**TINY, sprint=True)).save_diffusers(str(tmp_path / "sprint"))
    with pytest.raises(ValueError, match="BatchNorm"):  # FLUX.2's VAE (its `bn` statistics)
        model.save_diffusers(str(tmp_path / "flux2"), vae=types.SimpleNamespace(bn=None))


def test_from_diffusers_loads_a_hub_pipeline_from_the_cache_offline(unreachable_hub, monkeypatch):
    """A hub id whose pipeline is in the Hugging Face cache loads with HF_HUB_OFFLINE set (before: the check for its
    model_index.json went to the hub first, and failed)."""
    monkeypatch.setattr(unreachable_hub, "HF_HUB_OFFLINE", True)
    ours = PRX(PRXConfig(**TINY))
    repo = os.path.join(unreachable_hub.HF_HUB_CACHE, "models--someone--prx-tiny")
    ours.save_diffusers(os.path.join(repo, "snapshots", "0" * 40))  # the cache's layout
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0" * 40)
    again = PRX.from_diffusers("someone/prx-tiny")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_from_diffusers_takes_overrides_and_refuses_what_it_cannot_load(tmp_path):
    """A diffusers folder: the config's fields, then the caller's overrides; options this model does not implement
    and a checkpoint missing a weight are refused, not loaded into a model that computes something else."""
    from safetensors.torch import save_file
    model = randomize(PRX(PRXConfig(**TINY)))
    config, state = model.diffusers_config(), model.state_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = PRX.from_diffusers(str(tmp_path), route_start=0, route_end=3)
    assert (loaded.cfg.route_start, loaded.cfg.route_end) == (0, 3)
    assert PRX.from_diffusers(str(tmp_path), theta=100).cfg.theta == 100  # a key of their config too: overridden
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    for option in (dict(time_factor=1.0), dict(time_max_period=100)):
        (tmp_path / "config.json").write_text(json.dumps(config | option))
        with pytest.raises(ValueError, match="time_factor != 1000"):
            PRX.from_diffusers(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in state.items() if k != "final_layer.linear.bias"},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(RuntimeError, match="final_layer.linear.bias"):
        PRX.from_diffusers(str(tmp_path))


@pytest.mark.parametrize("preset", ["tiny", "tiny-pixel"])
def test_a_fresh_model_is_adaln_zero(preset):
    """DiT's adaLN-Zero, as PRX: every block's modulation starts at zero, so each block passes its image tokens
    through unchanged, and the final layer predicts zero."""
    torch.manual_seed(0)
    model = PRX.from_preset(preset)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    x = torch.randn(2, model.cfg.in_channels, 16, 16)
    txt, mask = torch.randn(2, 5, model.cfg.context_dim), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()
    pred = model(x, torch.rand(2), txt, mask)
    assert len(seen) == model.cfg.depth and all(torch.equal(before, after) for before, after in seen)
    assert torch.equal(pred, torch.zeros_like(x)) and seen[0][0].abs().mean() > 0.1
    # the final layer's modulation too (its zero output layer hides it from the prediction), and SPRINT's mask token
    final = model.final_layer.adaLN_modulation[1]
    assert not final.weight.any() and not final.bias.any()
    assert not PRX.from_preset(preset, sprint=True).sprint_mask_token.any()


def test_padding_never_changes_output():
    cfg = PRXConfig(**TINY)
    model = randomize(PRX(cfg)).eval()
    x, t, txt, mask = inputs(cfg)
    pad = torch.randn(3, 9, cfg.context_dim) * 100  # garbage in padded slots
    with torch.no_grad():
        out = model(x, t, txt, mask)
        out_pad = model(x, t, torch.cat([txt, pad], 1), torch.cat([mask, torch.zeros(3, 9, dtype=torch.bool)], 1))
        garbage = txt.clone()
        garbage[~mask] = 1e3
        out_garbage = model(x, t, garbage, mask)
    assert (out - out_pad).abs().max() <= 1e-5
    assert (out - out_garbage).abs().max() <= 1e-5
    with torch.no_grad():  # padding first (left-padded tokenizers), and 0/1 integer or float masks: the same
        left = model(x, t, torch.cat([pad, txt], 1), torch.cat([torch.zeros(3, 9, dtype=torch.bool), mask], 1))
        numeric = [model(x, t, txt, mask.to(dtype)) for dtype in (torch.int64, torch.float32)]
    assert all((out - o).abs().max() <= 1e-5 for o in [left, *numeric])
    # trimming: the longest real caption sets the length; no mask when nothing is padded
    txt_t, mask_t = trim_text(torch.cat([txt, pad], 1), torch.cat([mask, torch.zeros(3, 9, dtype=torch.bool)], 1))
    assert txt_t.shape[1] == 7 and mask_t is not None
    assert trim_text(txt[:1], mask[:1])[1] is None
    empty = trim_text(txt, torch.zeros_like(mask))  # no caption has a real token: no text at all, and no mask
    assert empty[0].shape == (3, 0, cfg.context_dim) and empty[1] is None


def test_trim_text_cuts_at_the_last_used_column_and_drops_a_full_mask():
    """trim_text against a loop over the mask's entries, on masks padded on the right, on the left, with holes, with
    no real token, and of no length: the text keeps columns up to the last one any caption uses, the mask only where
    some caption is padded within them."""
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        B, L = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(0, 7, (1,), generator=g))
        lengths = torch.randint(0, L + 1, (B, 1), generator=g)
        right, left = torch.arange(L) < lengths, torch.arange(L) >= L - lengths
        mask = [torch.rand(B, L, generator=g) < 0.6, right, left][trial % 3]
        txt = torch.randn(B, L, 2, generator=g)
        used = [j for b in range(B) for j in range(L) if mask[b, j]]
        longest = max(used) + 1 if used else 0
        padded = any(not mask[b, j] for b in range(B) for j in range(longest))
        txt_t, mask_t = trim_text(txt, mask)
        assert torch.equal(txt_t, txt[:, :longest]) and (mask_t is not None) == padded
        assert mask_t is None or torch.equal(mask_t, mask[:, :longest])


def test_cpu_bf16_autocast_runs_attention_in_fp32(monkeypatch):
    """Under the CPU's bf16 autocast the projections run in bf16 and the attention in fp32 (its fused bf16 backward
    is the slow one there), on the bf16 projections' values, so the result is the bf16 model's within fp32 rounding."""
    import model as model_module
    cfg = PRXConfig(**TINY)
    model = randomize(PRX(cfg))
    x, t, txt, mask = inputs(cfg)
    sdpa, seen = model_module.F.scaled_dot_product_attention, []

    def recording_sdpa(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        seen.append((q.dtype, k.dtype, v.dtype, out.dtype))
        return out
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording_sdpa)
    qkv = []
    model.blocks[0].attention.img_qkv_proj.register_forward_hook(lambda m, i, o: qkv.append(o.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x, t, txt, mask)
    out.float().square().mean().backward()
    assert qkv == [torch.bfloat16]
    assert len(seen) == cfg.depth and set(seen) == {(torch.float32,) * 4}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_cut_text_compiles_no_more_graphs_than_uncut_text():
    # a compiled model guards on strides: a batch whose text trim_text cuts (padded past its longest caption) must
    # reuse the graph of uncut batches, or a run compiles once more inside its timed steps
    cfg, graphs = PRXConfig(**TINY), []
    model = torch.compile(PRX(cfg).eval(), backend=lambda gm, _: graphs.append(gm) or gm.forward)
    torch._dynamo.reset()
    x, t = inputs(cfg)[:2]
    with torch.no_grad():
        for longest, padded in [(7, 7), (5, 5), (6, 11), (4, 9), (8, 8)]:  # static, dynamic, then cut and uncut
            txt = torch.randn(3, padded, cfg.context_dim)
            mask = torch.arange(padded)[None] < torch.tensor([longest, 2, 3])[:, None]
            model(x, t, *trim_text(txt, mask))
    assert len(graphs) == 2


def test_compiled_gelu_matches_torch_gelu_and_its_gradient():
    # compiled, gelu_tanh is written with a sigmoid; it must be torch's tanh GELU, values and gradients
    x = torch.linspace(-30, 30, 6001, requires_grad=True)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    out = torch.compile(gelu_tanh, fullgraph=True)(x)
    assert (out - ref).abs().max() <= 1e-5
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    grad_ref, = torch.autograd.grad((ref * weights).sum(), x)
    grad, = torch.autograd.grad((out * weights).sum(), x)
    assert (grad - grad_ref).abs().max() <= 1e-5


def test_route_ratio_zero_is_the_plain_model():
    cfg = PRXConfig(**TINY)
    model = randomize(PRX(cfg))
    x, t, txt, mask = inputs(cfg)
    with torch.no_grad():  # the routing path keeping every token (a ratio that routes int(N r) = 0): the plain model
        plain = model(x, t, txt, mask, route_ratio=0.0)
        assert torch.allclose(model(x, t, txt, mask, route_ratio=1e-6), plain, atol=1e-6)
        torch.manual_seed(0)
        routed = model(x, t, txt, mask, route_ratio=0.5)
    assert (routed - model(x, t, txt, mask)).abs().max() > 1e-3  # routing really changes the computation


@pytest.mark.parametrize("sprint", [False, True])
def test_routed_tokens_return_to_their_positions(sprint):
    """Reference: each sample alone, boolean-indexing its kept tokens and their own RoPE rows; no gather/scatter."""
    cfg = PRXConfig(**TINY, sprint=sprint)
    model = randomize(PRX(cfg))
    x, t, txt, mask = inputs(cfg, H=8, W=12)
    B, h, w = x.shape[0], 4, 6
    with torch.no_grad():
        torch.manual_seed(3)
        out, _, keep_idx = model(x, t, txt, mask, route_ratio=0.5, repa_layer=cfg.route_start)
        assert keep_idx.shape == (B, h * w // 2)
        scores = torch.rand(B, h * w)  # each sample keeps its 12 lowest scores (median: the 12th), in position order
        _, _, idx = model(x, t, txt, mask, route_ratio=0.5, repa_layer=cfg.route_start, route_scores=scores)
        assert torch.equal(idx, torch.stack([(s <= s.median()).nonzero()[:, 0] for s in scores]))
        cos = rope_for_grid(model.rope_cos, h, w, cfg.axes_dim, "cpu")
        sin = rope_for_grid(model.rope_sin, h, w, cfg.axes_dim, "cpu")
        for b in range(B):
            xb, tb, txtb = x[b:b + 1], t[b:b + 1], model.txt_in(txt[b:b + 1, :int(mask[b].sum())])
            img = model.img_in(xb.view(1, cfg.in_channels, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w, -1))
            vec = model.time_in(tb)
            kept = torch.zeros(h * w, dtype=torch.bool)
            kept[keep_idx[b]] = True
            for i, block in enumerate(model.blocks):
                if i == cfg.route_start:
                    dense = img.clone()
                    img = img[:, kept]
                c, s = (cos[kept], sin[kept]) if cfg.route_start <= i <= cfg.route_end else (cos, sin)
                img = block(img, txtb, vec, c[None, :, None], s[None, :, None], None)
                if i == cfg.route_end:
                    merged = (model.sprint_mask_token.expand(1, h * w, -1).clone() if sprint else dense.clone())
                    merged[:, kept] = img
                    img = model.sprint_fuse(torch.cat([dense, merged], -1)) if sprint else merged
            ref = model.final_layer(img, vec).view(1, h, w, cfg.in_channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
            assert (out[b:b + 1] - ref.reshape(xb.shape)).abs().max() <= 1e-5


def test_sprint_fuses_at_route_ratio_zero():
    """SPRINT's fusion layer is part of its network: at route_ratio 0 (sampling) every token goes through the middle
    blocks and is fused, as when the ratio is too small to route one token."""
    cfg = PRXConfig(**TINY, sprint=True)
    model = randomize(PRX(cfg))
    x, t, txt, mask = inputs(cfg)
    with torch.no_grad():
        full, none_routed = model(x, t, txt, mask), model(x, t, txt, mask, route_ratio=1e-6)
        model.sprint_fuse.weight.mul_(2)
        fused_otherwise = model(x, t, txt, mask)
    assert (full - none_routed).abs().max() <= 1e-6 and (fused_otherwise - full).abs().max() > 1e-3


@pytest.mark.parametrize("route_ratio", [0.5, 0.75])
def test_routing_rounds_the_routed_tokens_down(route_ratio):
    """On 21 tokens (a 3 x 7 grid) int(21 r) tokens are routed and the rest kept (11 at 0.5, 6 at 0.75), as the FLOP
    count assumes: rounding the kept share down instead would keep 10 and 5."""
    cfg = PRXConfig(**TINY)
    x, t, txt, _ = inputs(cfg, B=1, H=6, W=14, L=5)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, _, idx = PRX(cfg)(x, t, txt, None, route_ratio=route_ratio, repa_layer=cfg.route_start)
    assert idx.shape == (1, 21 - int(21 * route_ratio))
    assert counter.get_total_flops() == flops_per_sample(cfg, num_img=21, num_txt=5, route_ratio=route_ratio)


def test_repa_hook_returns_block_output():
    cfg = PRXConfig(**TINY)
    model = randomize(PRX(cfg))
    x, t, txt, mask = inputs(cfg)
    captured = {}
    model.blocks[0].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    with torch.no_grad():
        out, hidden, idx = model(x, t, txt, mask, repa_layer=0)
    assert idx is None and torch.equal(hidden, captured["h"]) and hidden.shape == (3, 24, 64)
    assert torch.equal(out, model(x, t, txt, mask))
    # under routing, a layer from route_start to route_end (inclusive, PRX) gives the visible tokens it computed
    # and their positions, before route_end's reinsertion; a later layer the whole grid
    outputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
    scores = torch.rand(3, 24, generator=torch.Generator().manual_seed(0))
    for layer in range(cfg.depth):
        with torch.no_grad():
            _, hidden, idx = model(x, t, txt, mask, route_ratio=0.5, repa_layer=layer, route_scores=scores)
        routed = cfg.route_start <= layer <= cfg.route_end
        assert torch.equal(hidden, outputs[layer]) and hidden.shape[1] == (12 if routed else 24)
        assert torch.equal(idx, scores.argsort(1)[:, :12].sort(1).values) if routed else idx is None


def test_presets_parameter_counts():
    from diffusers import PRXTransformer2DModel
    with torch.device("meta"):
        small = PRX.from_preset("small")
        theirs = PRXTransformer2DModel()  # diffusers' defaults are PRX small
        tiny = PRX.from_preset("tiny")
        pixel = PRX.from_preset("small-pixel", resolution=512)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(small) == count(theirs) == 1_170_691_648
    assert count(tiny) <= 5_000_000
    assert count(PRX.from_preset("tiny-pixel", resolution=32, context_dim=64)) == 1_581_616  # the README's first run
    assert pixel.cfg.patch_size == 32 and pixel.cfg.bottleneck_size == 256 and pixel.cfg.in_channels == 3
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")


def test_preset_config_pixel_variants_and_overrides():
    """Only `-pixel` makes a pixel-space model; the caller's overrides come after the preset's and the pixel
    variant's settings."""
    fields = lambda cfg: (cfg.in_channels, cfg.patch_size, cfg.bottleneck_size, cfg.depth)
    assert fields(preset_config("tiny")) == (16, 2, None, 4) and fields(preset_config("tiny-pixel")) == (3, 4, None, 4)
    assert fields(preset_config("small-pixel", 512, patch_size=8, bottleneck_size=None, depth=3)) == (3, 8, None, 3)


@pytest.mark.parametrize("change, message", [(dict(route_end=4), "route_end < depth"),
                                             (dict(route_start=3, route_end=2), "route_start <= route_end"),
                                             (dict(num_heads=3, axes_dim=(10, 11)), "head dim"),  # 64 = 3 x 21 + 1
                                             (dict(axes_dim=(16, 8)), "head dim")])  # 2 heads of 32, RoPE on 24
def test_configs_that_cannot_build_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        PRX(PRXConfig(**{**TINY, **change}))


def test_non_square_and_bad_inputs():
    cfg = PRXConfig(**TINY)
    model = PRX(cfg)
    x, t, txt, mask = inputs(cfg, H=6, W=14)
    assert model(x, t, txt, mask).shape == x.shape
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        model(x[:, :3], t, txt, mask)
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        model(x[..., :5, :], t, txt, mask)
    with pytest.raises(ValueError, match=r"\[3, L, 24\]"):
        model(x, t, txt[..., :10], mask)
    with pytest.raises(ValueError, match=r"txt_mask must be \[B, L\] = \[3, 7\]"):
        model(x, t, txt, mask[:, :4])
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        model(x, t[:2], txt, mask)
    with pytest.raises(ValueError, match=r"route_scores must be \[B, H/p \* W/p\] = \[3, 21\]"):
        model(x, t, txt, mask, route_ratio=0.5, route_scores=torch.rand(3, 20))
    with pytest.raises(ValueError, match=r"route_ratio must be in \[0, 1\)"):
        model(x, t, txt, mask, route_ratio=1.0)
    with pytest.raises(ValueError, match=r"repa_layer must be a block index in \[0, 4\)"):
        model(x, t, txt, mask, repa_layer=cfg.depth)


@pytest.mark.parametrize("bottleneck", [None, 48])
@pytest.mark.parametrize("sprint,route_ratio", [(False, 0.0), (False, 0.5), (True, 0.75)])
def test_flop_counter_matches_closed_form(bottleneck, sprint, route_ratio):
    cfg = PRXConfig(**TINY, bottleneck_size=bottleneck, sprint=sprint)
    model = PRX(cfg)
    x, t, txt, mask = inputs(cfg, B=1, H=8, W=8, L=5)
    # the math backend decomposes attention into matmuls that the counter sees (CPU's fused kernel is not counted)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, t, txt, None, route_ratio=route_ratio)
    assert counter.get_total_flops() == flops_per_sample(cfg, num_img=16, num_txt=5, route_ratio=route_ratio)


def test_flop_counter_counts_the_resolution_embedder():
    cfg = PRXConfig(**TINY, resolution_embeds=True)
    x, t, txt, _ = inputs(cfg, B=1, H=8, W=8, L=5)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        PRX(cfg)(x, t, txt, None)
    assert counter.get_total_flops() == flops_per_sample(cfg, num_img=16, num_txt=5)


def test_route_defaults_keep_dense_blocks_on_both_sides():
    # PRX routes blocks 2..12 of 16; a small model keeps that shape: a dense block before and after the routed span
    spans = {d: (PRXConfig(depth=d).route_start, PRXConfig(depth=d).route_end) for d in (2, 3, 4, 16, 24)}
    assert spans == {2: (0, 0), 3: (1, 1), 4: (1, 2), 16: (2, 12), 24: (3, 18)}
    PRX(PRXConfig(**{**TINY, "route_start": None, "route_end": None, "depth": 2}))  # still builds


def test_a_side_longer_than_the_rope_table_names_the_limit():
    """1,025 tokens on one side (tiny-pixel, patch 4: 4,100 px by 4): the RoPE table's rows end at MAX_POSITIONS."""
    model = PRX.from_preset("tiny-pixel", 32)
    x, t, txt = torch.zeros(1, 3, 4 * 1025, 4), torch.zeros(1), torch.zeros(1, 2, model.cfg.context_dim)
    with pytest.raises(ValueError, match="1025x1 tokens exceed the RoPE table"):
        model(x, t, txt)
    assert model(x[:, :, 4:], t, txt).shape == (1, 3, 4 * 1024, 4)  # the table's last row: in it


def test_file_sha256_hashes_the_whole_file(tmp_path):
    data = torch.randint(0, 256, (5 * 2**19 + 7,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp_path / "f").write_bytes(data.numpy().tobytes())  # 2.5 MiB: past the 1 MiB it reads at a time
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data.numpy().tobytes()).hexdigest()


def test_checkpoints_of_a_run_in_step_order_and_the_previous_one_named(tmp_path):
    """step_10 after step_2 (numbers, not names), past other folders; a corrupt checkpoint names the latest
    earlier one, not the first."""
    folder = tmp_path / "run" / "checkpoints"
    for step in (10, 1, 2):
        ckpt = folder / f"step_{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"weights %d" % step)
        (ckpt / CHECKSUMS).write_text(json.dumps({"model.safetensors": file_sha256(ckpt / "model.safetensors")}))
    (folder / "step_3.tmp").mkdir()
    (folder / "notes").mkdir()
    ckpts = list_checkpoints(str(tmp_path / "run"))
    assert [os.path.basename(c) for c in ckpts] == ["step_1", "step_2", "step_10"]
    assert [step_of(c) for c in ckpts] == [1, 2, 10] and {run_of(c) for c in ckpts} == {str(tmp_path / "run")}
    verify_checkpoint(ckpts[-1])
    (folder / "step_10" / "model.safetensors").write_bytes(b"weights 11")
    with pytest.raises(ValueError, match=r"step_10/model.safetensors is corrupt.*previous checkpoint is \S*step_2: "):
        verify_checkpoint(ckpts[-1])
    (folder / "step_1" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="step_1/model.safetensors is missing.*there is no earlier checkpoint"):
        verify_checkpoint(ckpts[0])


def test_weights_file_takes_the_ema_where_kept(tmp_path):
    (tmp_path / "model.safetensors").touch()
    assert [weights_file(tmp_path, w) for w in (None, "model")] == ["model.safetensors"] * 2
    with pytest.raises(FileNotFoundError, match="keeps no EMA weights"):
        weights_file(tmp_path, "ema")
    (tmp_path / "ema.safetensors").touch()
    assert [weights_file(tmp_path, w) for w in (None, "model", "ema")] == ["ema.safetensors", "model.safetensors",
                                                                             "ema.safetensors"]


def test_the_presets_table_takes_no_flags(monkeypatch, capsys):
    """`python model.py` as a script (runpy: its __main__ block, without a second interpreter's imports)."""
    import runpy
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model.py")
    monkeypatch.setattr("sys.argv", [script])
    runpy.run_path(script, run_name="__main__")
    shown = capsys.readouterr()
    assert shown.out.startswith("tiny ") and "small-pixel" in shown.out and not shown.err
    monkeypatch.setattr("sys.argv", [script, "--nonsense"])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(script, run_name="__main__")
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and "unrecognized arguments: --nonsense" in err and not out


def test_a_checkpoint_whose_checksums_and_weights_are_both_gone_is_refused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    (ckpt / CHECKSUMS).write_text("{}")
    with pytest.raises(ValueError, match="does not list the sha256 of each file of the checkpoint \\(no "
                                         "model.safetensors\\)"):
        verify_checkpoint(str(ckpt))


def test_a_config_without_the_sampling_settings_is_not_a_runs_config(tmp_path):
    """eval.py samples with config['sampling']: a config without it is refused when read, naming the file."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"args": {}, "model": {}}))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a run's config"):
        read_config(str(path))


def test_save_diffusers_sets_the_token_cap_on_a_copy_of_the_tokenizer(tmp_path):
    """The exported tokenizer pads and truncates to max_tokens; the caller's tokenizer keeps its own length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "red": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=77)
    model = PRX(PRXConfig(in_channels=4, patch_size=2, context_dim=24, hidden_size=64, depth=2, num_heads=2,
                          axes_dim=(16, 16)))
    model.save_diffusers(str(tmp_path / "x"), tokenizer=tokenizer, max_tokens=12)
    assert tokenizer.model_max_length == 77
    assert AutoTokenizer.from_pretrained(tmp_path / "x" / "tokenizer").model_max_length == 12


def test_an_ema_still_mostly_its_initial_weights_is_noted():
    """decay^updates of the EMA is the initial weights (no warm-up): noted above a tenth."""
    from model import ema_note
    assert "have had 2,301 updates (--ema 0.999 every 10 steps): 10% of them" in ema_note(0.999, 10, 23019)
    assert ema_note(0.999, 10, 23020) is None  # 0.999^2302 < 0.1
    assert ema_note(0.0, 10, 0) is None
    assert "have had 0 updates (--ema 0.5 every 3 steps): 100% of them" in ema_note(0.5, 3, 2)
