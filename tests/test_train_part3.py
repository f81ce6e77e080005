"""PRX part 3 (REFERENCE 3): the perceptual losses (--lpips, --pdino) against hand computations with tiny random
networks, resolution stages on resume, and the part-3 combination on the CPU. No download: the networks are built
here (lpips' SqueezeNet trunk, a one-block timm DINOv2) and injected where train.py would load PRX's."""
import json
import math
import re
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import train
from model import load_run
from test_train import SMALL, FakeLoader, losses

CPU = torch.device("cpu")


def tiny_lpips():
    import lpips
    return lpips.LPIPS(net="squeeze", pnet_rand=True, verbose=False).eval().requires_grad_(False)


def tiny_dino():
    """DINOv2 ViT-B/14 with registers as timm builds it (patch 14, 1 class + 4 register tokens), 32 wide, 1 block."""
    import timm
    return timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, embed_dim=32, depth=1, num_heads=2,
                             dynamic_img_size=True).eval().requires_grad_(False)


def hand_lpips(net, a, b):
    """LPIPS (Zhang et al. 2018) from the network's parts: inputs in [-1, 1] shifted and scaled, each layer's
    features unit-normalised over channels, squared difference, 1x1 linear head, spatial mean, summed over layers."""
    total = 0
    for lin, u, v in zip(net.lins, net.net(net.scaling_layer(a)), net.net(net.scaling_layer(b))):
        u, v = (f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10) for f in (u, v))
        total = total + lin((u - v).square()).mean(dim=(2, 3))
    return total.mean()


def hand_dino_tokens(net, images):
    """PRX's P-DINO input: 224 px (16 x 16 patches of 14), ImageNet mean and std; patch tokens after the 5 prefix
    tokens."""
    x = F.interpolate((images + 1) / 2, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return net.forward_features(x)[:, 5:]


def step_and_reference(flags, perceptual):
    """One train_step (batch 4, 32 px, a random 2-block model) -> its loss, the flow-matching part by hand, the
    model's output, and (x0, t, x_t)."""
    args = train.get_args(SMALL + flags + ["--out", "unused"])
    args.micro_batch = args.batch_size = 4
    loader = FakeLoader(batch=4, res=32)
    loader.txt, loader.null_txt = torch.randn(4, 2, 32), torch.randn(1, 3, 32)
    torch.manual_seed(0)
    model = train.PRX(train.preset_config(args.model, 32, in_channels=3, context_dim=32, hidden_size=64,
                                          num_heads=1, axes_dim=(32, 32), depth=2))
    for p in model.parameters():  # the zero-initialised output layer would predict 0 everywhere
        torch.nn.init.normal_(p, std=0.05)
    x0, eps, t, x_t, txt, mask, _ = train.micro_batch(args, loader, 0, 0, CPU)
    with torch.no_grad():
        pred = model(x_t, t, txt, mask)
    trainee = train.Trainee(model, perceptual=perceptual)
    loss, *_ = train.train_step(args, 0, 0.0, trainee, [torch.optim.SGD(model.parameters(), lr=0.0)], loader, None,
                                0, 1)
    flow = train.flow_loss(pred, x0, eps, x_t, t, args.pred, train.foreground_weights(x0, 2.0))
    return loss, flow, pred, (x0, t, x_t)


@pytest.mark.parametrize("pred", ["v", "x"])
def test_lpips_term_is_lpips_of_the_predicted_clean_image(pred):
    """--lpips W adds W x LPIPS(x0_hat, x0): x0_hat the output (x-prediction) or x_t - t v; the frozen network gets no
    gradient."""
    net = tiny_lpips()
    loss, flow, out, (x0, t, x_t) = step_and_reference(["--pred", pred, "--lpips", "0.1"], {"lpips": net})
    x0_hat = out if pred == "x" else x_t - t[:, None, None, None] * out
    with torch.no_grad():
        expected = flow + 0.1 * hand_lpips(net, x0_hat, x0)
    assert torch.isclose(loss, expected, rtol=1e-5), (loss, expected)
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    # from 128 px up both images are halved first (PRX's pixel-space resize_factor 0.5); below, kept whole
    a, b = torch.rand(2, 3, 128, 128) * 2 - 1, torch.rand(2, 3, 128, 128) * 2 - 1
    half = [F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False) for x in (a, b)]
    assert torch.isclose(train.lpips_loss(net, a, b), hand_lpips(net, *half), rtol=1e-5)
    assert torch.isclose(train.lpips_loss(net, half[0], half[1]), hand_lpips(net, *half), rtol=1e-5)


def test_pdino_term_is_one_minus_the_patch_token_cosine():
    net = tiny_dino()
    loss, flow, out, (x0, _, _) = step_and_reference(["--pred", "x", "--pdino", "0.01"], {"pdino": net})
    with torch.no_grad():
        cos = F.cosine_similarity(hand_dino_tokens(net, out), hand_dino_tokens(net, x0), dim=-1)  # (B, 256)
    assert cos.shape == (4, 256)
    assert torch.isclose(loss, flow + 0.01 * (1 - cos).mean(), rtol=1e-5)
    # the gradient reaches the prediction through the frozen network, and only the prediction
    x0_hat = out.clone().requires_grad_()
    train.pdino_loss(net, x0_hat, x0).backward()
    assert x0_hat.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("pred", ["v", "x"])
def test_flags_off_leave_the_step_bit_identical(pred):
    """Without --lpips, --pdino and --resolution-embeds build_model adds nothing and the step is flow matching bit
    for bit (the pattern of test_train's all-techniques-off test)."""
    from data import open_loader
    args = train.get_args(SMALL + ["--pred", pred, "--batch-size", "8", "--micro-batch", "8", "--out", "unused"])
    loader = open_loader("builtin", 8, 0, 1, 0, "long", CPU, 1, 32, 5, images=False)
    _, model, _, trainee, _ = train.build_model(args, loader, CPU, 0)
    assert trainee.perceptual == {} and not hasattr(model, "resolution_embedder")
    with torch.no_grad():  # random weights: a fresh model's zero output would hide what it is given
        for p in model.parameters():
            p.normal_(0, 0.05)
    x0, eps, t, x_t, txt, mask, _ = train.micro_batch(args, loader, 0, 0, CPU)
    reference = train.flow_loss(model(x_t, t, txt, mask), x0, eps, x_t, t, pred, train.foreground_weights(x0, 2.0))
    loader.load_state_dict({"batches": 0})
    loss, *_ = train.train_step(args, 0, 0.0, trainee, [torch.optim.SGD(model.parameters(), lr=0.0)], loader, None,
                                0, 1)
    assert torch.equal(loss, reference.detach())


def test_perceptual_losses_refuse_latent_data(tmp_path, capsys):
    (tmp_path / "index.json").write_text(json.dumps({"schema": {"latent": {"shape": [16, 4, 4]}}}))
    with pytest.raises(SystemExit):
        train.get_args(["--data", str(tmp_path), "--pdino", "0.01"])
    assert f"--pdino: {tmp_path} holds latents" in capsys.readouterr().err


def test_a_preset_of_the_other_space_than_the_data_is_refused(tmp_path, capsys):
    """A latent preset on images (or a pixel one on latents) would train with another space's patch and shift."""
    for schema, model, message in (
            ({"image": {"shape": [3, 32, 32]}}, "tiny", "holds images (--vae none): use --model tiny-pixel"),
            ({"latent": {"shape": [16, 4, 4]}}, "small-pixel", "holds latents: use --model small"),
            (None, "tiny", "--data builtin draws images: use --model tiny-pixel (or choose --patch)")):
        (tmp_path / "index.json").write_text(json.dumps({"schema": schema}))
        with pytest.raises(SystemExit):
            train.get_args(["--data", str(tmp_path) if schema else "builtin", "--model", model])
        assert f"--model {model}: a preset for " in (err := capsys.readouterr().err) and message in err, err


def test_patch_lets_a_preset_train_in_the_other_space(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"schema": {"image": {"shape": [3, 32, 32]}}}))
    assert train.get_args(["--data", str(tmp_path), "--model", "tiny", "--patch", "2", "--resolution", "32"]).patch == 2


def test_lpips_backbone_from_the_weights_file_or_a_clear_error_offline(tmp_path, monkeypatch):
    import torchvision
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # VGG16's, no classifier
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(state, tmp_path / train.VGG16_FILE)
    net = train.load_lpips(str(tmp_path / train.VGG16_FILE))
    assert torch.equal(net.net.state_dict()["slice5.28.weight"], state["features.28.weight"]) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(FileNotFoundError, match="--lpips-weights /nonexistent.pth: no such file"):
        train.load_lpips("/nonexistent.pth")
    (tmp_path / "page.pth").write_text("<html>404</html>")  # a saved web page; another network's weights
    torch.save({"features.99.weight": torch.zeros(1)}, tmp_path / "other.pth")
    for name, message in (("page.pth", "not a weights file"), ("other.pth", "not VGG16's weights")):
        with pytest.raises(ValueError, match=f"--lpips-weights {re.escape(str(tmp_path / name))}: {message}"):
            train.load_lpips(str(tmp_path / name))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to download.pytorch.org")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=f"{train.VGG16_FILE} is not in torch's cache.*--lpips-weights PATH"):
        train.load_lpips()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: torch.load(
        tmp_path / "other.pth"))  # the cache of another torchvision: named as such, not as a flag never given
    with pytest.raises(ValueError, match=f"^torchvision cache {train.VGG16_FILE}: not VGG16's weights"):
        train.load_lpips()


def test_missing_pdino_weights_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--pdino-weights /nonexistent.safetensors: no such file"):
        train.main(SMALL + ["--pdino", "0.01", "--pdino-weights", "/nonexistent.safetensors", "--max-steps", "1",
                            "--out", str(tmp_path / "r")])


def test_prx_part3_combination_trains(tmp_path, monkeypatch):
    """Pixel space, x-prediction, LPIPS 0.1, P-DINO 0.01, TREAD, REPA stopped after step 2, resolution embeddings."""
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype: 1e11)  # the log's mfu only
    monkeypatch.setattr(train, "load_lpips", lambda weights: tiny_lpips())
    monkeypatch.setattr(train, "load_dino", lambda name, weights, flag, **kw: tiny_dino())  # P-DINO's: REPA is builtin
    out = tmp_path / "r"
    train.main(SMALL + ["--model", "tiny-pixel", "--pred", "x", "--lpips", "0.1", "--pdino", "0.01", "--tread",
                        "--repa", "builtin", "--repa-stop", "2", "--resolution-embeds", "--max-steps", "3",
                        "--out", str(out)])
    logged = losses(out)
    assert sorted(logged) == [1, 2, 3] and all(map(math.isfinite, logged.values()))
    assert "REPA stopped at step 2" in (out / "log.txt").read_text()
    model, config, _ = load_run(str(out))
    assert model.cfg.resolution_embeds and config["args"]["lpips"] == 0.1 and config["args"]["pdino"] == 0.01


def test_resolution_stage_resumes_at_another_resolution(tmp_path):
    """Stage 1 at 32 px with REPA, stage 2 resumed at 64 px without it (PRX part 3: 512 px, then 1024 px without
    REPA). Each checkpoint's config is its own stage's."""
    out = tmp_path / "r"
    train.main(SMALL + ["--repa", "builtin", "--resolution-embeds", "--max-steps", "2", "--out", str(out)])
    train.main(SMALL + ["--resolution", "64", "--resolution-embeds", "--max-steps", "4", "--out", str(out),
                        "--resume"])
    assert "REPA dropped" in (out / "log.txt").read_text()
    logged = losses(out)
    assert sorted(logged) == [1, 2, 3, 4] and all(map(math.isfinite, logged.values()))
    assert json.loads((out / "config.json").read_text())["args"]["resolution"] == 32
    assert json.loads((out / "config.resume-2.json").read_text())["args"]["resolution"] == 64
    assert load_run(str(out))[1]["args"]["resolution"] == 64  # what eval.py samples the stage-2 checkpoint at
    assert load_run(str(out / "checkpoints" / "step_2"))[1]["args"]["resolution"] == 32


def test_a_resolution_stage_that_would_change_the_patch_is_refused(tmp_path):
    args = train.get_args(["--track", "cpu", "--model", "small-pixel", "--resolution", "512"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"args": {**vars(args), "resolution": 256},
                                                 "model": {"patch_size": 16}, "sampling": {}}))
    with pytest.raises(SystemExit, match="--resolution 512: the preset small-pixel takes patch 32 at 512 px \\(the "
                                         "pixel presets .*\\), the run's model has 16: pass --patch 16$"):
        train.check_resume_flags(args, str(run / "checkpoints" / "step_2"))
    typed = train.get_args(["--track", "cpu", "--model", "small-pixel", "--resolution", "512", "--patch", "8"])
    with pytest.raises(SystemExit, match="step_2 --patch 8, the run's model has 16: pass --patch 16$"):
        train.check_resume_flags(typed, str(run / "checkpoints" / "step_2"))
    kept = train.get_args(["--track", "cpu", "--model", "small-pixel", "--resolution", "512", "--patch", "16"])
    assert train.check_resume_flags(kept, str(run / "checkpoints" / "step_2"))["resolution"] == 256  # accepted
