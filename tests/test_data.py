"""data.py: the prepared-data reader, its loader and held-out split, the --data dispatch, on directories prepared by
prepare.py (the `prepared` fixture of conftest.py) or written by hand."""

import copy
import errno
import hashlib
import json
import mmap
import os
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import prepare
from tiny_prepared import RES, reference_image, stored_samples


def test_loader_batch_is_the_stored_samples(prepared):
    root, _ = prepared
    stored = stored_samples(root / "out")
    loader = data.ShardLoader(str(root / "out"), batch_size=4, captions="long", images=True)
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
    short = next(data.ShardLoader(str(root / "out"), batch_size=4, captions="short"))
    assert [stored[i][0].string("caption_short", stored[i][1]) for i in short["id"]] == short["caption"]
    mixed = data.ShardLoader(str(root / "out"), batch_size=4, captions="mixed:0.5")
    captions = [c for _ in range(4) for c in next(mixed)["caption"]]
    longs = {s.string("caption_long", r) for s, r in stored.values()}
    assert 0 < sum(c in longs for c in captions) < len(captions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_gives_the_cpu_batches(prepared):
    root, _ = prepared
    cpu, cuda = (data.ShardLoader(str(root / "out"), 4, images=True, device=d) for d in ("cpu", "cuda"))
    for _ in range(3):
        a, b = next(cpu), next(cuda)
        assert a["id"] == b["id"] and b["latent"].is_cuda and cuda.null_txt.is_cuda
        for key in ("latent", "txt", "txt_mask", "image"):
            assert torch.equal(a[key], b[key].cpu())


def test_loader_ranks_are_disjoint_cover_an_epoch_and_resume(prepared):
    root, _ = prepared
    train = set(stored_samples(root / "out"))
    ranks = [data.ShardLoader(str(root / "out"), batch_size=3, rank=r, world_size=2, seed=5) for r in (0, 1)]
    order = [i for _ in range(len(train) // 6 + 2) for loader in ranks for i in next(loader)["id"]]
    assert set(order[:len(train)]) == train and len(set(order[:len(train)])) == len(train)  # each sample once
    state = ranks[0].state_dict()
    expected = [next(ranks[0]) for _ in range(3)]
    resumed = data.ShardLoader(str(root / "out"), batch_size=3, rank=0, world_size=2, seed=5)
    resumed.load_state_dict(state)
    ranks[0].load_state_dict(state)  # also after iterating (warm-up, then restore)
    for want in expected:
        for got in (next(resumed), next(ranks[0])):
            assert got["id"] == want["id"] and torch.equal(got["latent"], want["latent"])
            assert torch.equal(got["txt"], want["txt"]) and torch.equal(got["txt_mask"], want["txt_mask"])


def test_each_epoch_reads_every_sample_once_in_a_new_order(prepared):
    root, _ = prepared
    train = set(stored_samples(root / "out"))
    loader = data.ShardLoader(str(root / "out"), batch_size=1, seed=5)
    first, second = ([next(loader)["id"][0] for _ in train] for _ in range(2))
    assert set(first) == set(second) == train and len(set(first)) == len(train)
    assert first != second  # a permutation per epoch (seed, dataset, epoch)


def test_each_dataset_of_a_mixture_is_read_in_its_own_order(prepared, tmp_path):
    root, _ = prepared
    (tmp_path / "copy").symlink_to(root / "out")  # the same samples under another name
    loader = data.ShardLoader(f"{root / 'out'}:0.5,{tmp_path / 'copy'}:0.5", batch_size=1)
    assert len(loader.datasets) == 2 and len(loader.datasets[0]) == len(loader.datasets[1])
    assert not np.array_equal(loader.permutation(0, 0), loader.permutation(1, 0))  # seeded by (seed, name, epoch)


def test_mixtures_and_phases(prepared):
    root, _ = prepared
    a, b = str(root / "out"), str(root / "out_pq")
    in_b = lambda batch: {i.startswith("pq") for i in batch["id"]}  # noqa: E731
    assert data.parse_data_phases("d1:0.7,d2:0.3@0;d3@90000:mixed:0.3") == [(0, {"d1": 0.7, "d2": 0.3}, None),
                                                                          (90000, {"d3": 1.0}, "mixed:0.3")]
    phased = data.ShardLoader(f"{a}:1@0;{b}:1@2", batch_size=4)
    assert [in_b(next(phased)) for _ in range(4)] == [{False}, {False}, {True}, {True}]
    accumulated = data.ShardLoader(f"{a}:1@0;{b}:1@2", batch_size=4, grad_accum=2)  # @2 = optimizer step 2
    assert [in_b(next(accumulated)) for _ in range(6)] == [{False}] * 4 + [{True}] * 2
    mixed = data.ShardLoader(f"{a}:0.5,{b}:0.5", batch_size=8)
    assert set.union(*[in_b(next(mixed)) for _ in range(3)]) == {False, True}


def test_mixture_weights_and_the_long_caption_share_are_the_draw_probabilities(prepared):
    """Weights 0.9 / 0.1 draw the second dataset a tenth of the time, mixed:0.2 the long caption a fifth: over 400
    draws each, within 4 binomial sds (0.06 and 0.08)."""
    root, _ = prepared
    stored = {**stored_samples(root / "out"), **stored_samples(root / "out_pq")}
    longs = {s.string("caption_long", r) for s, r in stored.values()}
    loader = data.ShardLoader(f"{root / 'out'}:0.9,{root / 'out_pq'}:0.1", batch_size=8, captions="mixed:0.2")
    batches = [next(loader) for _ in range(50)]
    ids = [i for b in batches for i in b["id"]]
    captions = [c for b in batches for c in b["caption"]]
    assert abs(sum(i.startswith("pq") for i in ids) / len(ids) - 0.1) < 0.06
    assert abs(sum(c in longs for c in captions) / len(captions) - 0.2) < 0.08


def test_mixture_and_mixed_captions_draw_the_same_on_any_number_of_processes(prepared):
    """A step's datasets and caption lengths depend on the global micro-batch, not on the rank's loader calls: one
    process accumulating 2 micro-batches reads what 2 processes read, and a resume on the other count continues it."""
    root, _ = prepared
    spec, kw = f"{root / 'out'}:0.5,{root / 'out_pq'}:0.5", dict(batch_size=4, seed=3, captions="mixed:0.5")
    one = data.ShardLoader(spec, grad_accum=2, **kw)
    two = [data.ShardLoader(spec, rank=r, world_size=2, **kw) for r in (0, 1)]
    read = lambda batch: list(zip(batch["id"], batch["caption"]))  # noqa: E731
    single = [read(next(one)) for _ in range(6)]
    assert single == [read(next(loader)) for _ in range(3) for loader in two]
    stored = {**stored_samples(root / "out"), **stored_samples(root / "out_pq")}
    longs = {s.string("caption_long", r) for s, r in stored.values()}
    assert {(i.startswith("pq"), c in longs) for b in single for i, c in b} == {(a, b) for a in (0, 1) for b in (0, 1)}
    resumed = data.ShardLoader(spec, grad_accum=2, **kw)
    resumed.load_state_dict({**two[0].state_dict(), "batches": 3 * 2})  # train.py's restore: step x chunks per rank
    assert [read(next(resumed)) for _ in range(2)] == [read(next(loader)) for loader in two]


def test_the_caption_modes_are_the_long_caption_probabilities():
    """--captions long, short, mixed (PRX's even mix) and mixed:p, p anywhere in [0, 1] with both ends included."""
    assert [data.caption_share(c) for c in ("long", "short", "mixed", "mixed:0", "mixed:1", "mixed:0.25")] == \
        [1.0, 0.0, 0.5, 0.0, 1.0, 0.25]
    for captions in ("mixed:-0.1", "mixed:1.01", "mixed:x", "mixed:"):  # "mixed:" was taken as mixed
        with pytest.raises(ValueError, match="mixed"):
            data.caption_share(captions)


def test_a_weight_follows_the_last_colon_of_a_path():
    """A path may hold ':' (a weight is the number after the last one): 'A:B:0.5' is the directory A:B at 0.5."""
    assert data.parse_data_phases("/mnt/x:y:0.5,z:2") == [(0, {"/mnt/x:y": 0.5, "z": 2.0}, None)]


def test_mixture_weights_are_relative(prepared):
    """Weights need not sum to 1: A:3,B:1 draws the samples A:0.75,B:0.25 draws."""
    a, b = str(prepared[0] / "out"), str(prepared[0] / "out_pq")
    relative, shares = (data.ShardLoader(spec, batch_size=4, seed=2) for spec in (f"{a}:3,{b}:1", f"{a}:0.75,{b}:0.25"))
    ids = [next(relative)["id"] for _ in range(4)]
    assert ids == [next(shares)["id"] for _ in range(4)]
    assert {i.startswith("pq") for batch in ids for i in batch} == {False, True}


def test_caption_mode_per_phase(prepared):
    """'@step:mode' switches the caption mode at that optimizer step (PRX: long captions, then mixed): the same
    samples as a loader with that mode from the start."""
    a = str(prepared[0] / "out")
    phased = data.ShardLoader(f"{a}@0:long;{a}@2:short", batch_size=4, captions="mixed")
    long, short = (data.ShardLoader(a, batch_size=4, captions=mode) for mode in ("long", "short"))
    for step in range(4):
        got, want_long, want_short = next(phased), next(long), next(short)
        assert got["id"] == want_long["id"] == want_short["id"]
        assert got["caption"] == (want_long if step < 2 else want_short)["caption"] != \
            (want_short if step < 2 else want_long)["caption"]


def test_bad_input_is_refused_with_a_clear_error(prepared, tmp_path):
    root, _ = prepared
    for spec in ("d:0", "d@5", "d1@0;d2@0", "d:-1", "d:.", "d@9e4", "d:0.5,d/:0.5", "d:1e999", "d:nan", "d:inf",
                 f"d,{os.path.abspath('d')}"):
        with pytest.raises(ValueError, match="data spec"):
            data.parse_data_phases(spec)
    for name in ("a;b", "a,b", "a@b", "a:2"):  # a folder named with --data's syntax
        (tmp_path / name).mkdir()
        with pytest.raises(ValueError, match="holds ; , @ or ends in :number, which --data reads as its syntax"):
            data.parse_data_phases(str(tmp_path / name))
    assert data.parse_data_phases("d:0.7, ./e/:3e-1") == [(0, {"d": 0.7, "e": 0.3}, None)]  # not a path ' ./e/:3e-1'
    assert data.parse_data_phases("/mnt/x:y") == [(0, {"/mnt/x:y": 1.0}, None)]  # a ':' without a number: the path's
    assert data.parse_data_phases(".,2024:.5") == [(0, {".": 1.0, "2024": 0.5}, None)]  # names that look like numbers
    for captions in ("long:0.3", "short:0.9"):
        with pytest.raises(ValueError, match="mixed"):
            data.caption_share(captions)  # only mixed takes a probability
    with pytest.raises(ValueError, match="mixed"):
        data.ShardLoader(str(root / "out"), 4, captions="medium")
    with pytest.raises(ValueError, match="captions 'medium'"):
        data.parse_data_phases("d@0;d@10:medium")
    with pytest.raises(FileNotFoundError, match="prepare"):
        data.ShardLoader(str(tmp_path), 4)
    long_only = tmp_path / "long_only"  # a dataset with long captions only, drawn in a long phase: accepted
    shutil.copytree(root / "out", long_only)
    index = json.loads((long_only / "index.json").read_text())
    (long_only / "index.json").write_text(json.dumps({**index, "captions": ["long"]}))
    data.ShardLoader(f"{long_only}@0:long;{root / 'out'}@2:mixed", 4)
    with pytest.raises(ValueError, match=r"long_only: has \d+ samples and captions \['long'\]; .* need \['long', 'sh"):
        data.ShardLoader(f"{long_only}@0:long;{long_only}@2:mixed", 4)
    (long_only / "index.json").write_text(json.dumps({**index, "train": {"count": 0, "shards": []}}))
    with pytest.raises(ValueError, match="long_only: has no training samples \\(prepared with --eval-fraction 1"):
        data.ShardLoader(str(long_only), 4)


def test_a_resume_continues_whatever_the_spelling_of_the_path(prepared, monkeypatch):
    """Positions are kept per dataset: 'out/', './out' and its absolute path are the same dataset as 'out', at the
    same position and in the same order."""
    out = prepared[0] / "out"
    monkeypatch.chdir(out.parent)
    loader = data.ShardLoader("out", 4, seed=1)
    for _ in range(3):
        next(loader)
    state, expected = loader.state_dict(), [next(loader)["id"] for _ in range(3)]
    for spelling in (f"{out.parent}/./out/", "./out/"):
        resumed = data.ShardLoader(spelling, 4, seed=1)
        assert resumed.load_state_dict(state) == [] and [next(resumed)["id"] for _ in range(3)] == expected
    other = data.ShardLoader(f"{out}@0;{out.parent / 'out_pq'}@9", 4, seed=1)
    assert other.load_state_dict(state) == [str(out.parent / "out_pq")]  # a new dataset starts at its first sample
    assert data.dataset_key("../x") == str(out.parent.parent / "x")  # outside the repository: absolute
    inside = os.path.join(os.path.dirname(os.path.abspath(data.__file__)), "data", "mj")
    assert {data.dataset_key(inside), data.dataset_key(inside + "/")} == {os.path.join("data", "mj")}  # from anywhere


def test_a_dataset_prepared_again_with_another_size_is_refused_on_resume(prepared):
    """Its permutation, so the samples to come, would differ, and its position could lie past its end (a numpy
    error mid-step, after the resume had moved the run's later history aside): refused when the state loads."""
    out = prepared[0] / "out"
    loader = data.ShardLoader(str(out), 4, seed=1)
    next(loader)
    state, n = loader.state_dict(), len(loader.datasets[0])
    assert state["sizes"] == {str(out): n}
    with pytest.raises(ValueError, match=f"--data {out} holds {n} samples, {n + 3} when the state was saved"):
        loader.load_state_dict({**state, "sizes": {str(out): n + 3}})
    old = {"batches": 1, "cursors": {str(out): [0, n + 2]}}  # a state from before the sizes were kept
    with pytest.raises(ValueError, match=f"holds {n} samples, over {n + 2} when the state was saved"):
        loader.load_state_dict(old)
    del old["cursors"][str(out)]
    assert loader.load_state_dict(old) == [str(out)]
    # a dataset this --data no longer reads keeps its size in the state: a later stage reading it again is checked
    loader.load_state_dict({**state, "cursors": {**state["cursors"], "gone": [0, 5]}, "sizes": {**state["sizes"],
                                                                                                "gone": 7}})
    assert loader.state_dict()["sizes"] == {str(out): n, "gone": 7}


def test_loading_a_state_leaves_the_callers_state_as_it_was(prepared):
    """load_state_dict adds the datasets the state has no position in to its own copy, not to the caller's state
    (a checkpoint's, which train.py may save again)."""
    out = prepared[0] / "out"
    loader = data.ShardLoader(str(out), 4, seed=1)
    next(loader)
    state = loader.state_dict()
    saved = copy.deepcopy(state)
    other = data.ShardLoader(f"{out}@0;{out.parent / 'out_pq'}@9", 4, seed=1)
    assert other.load_state_dict(state) == [str(out.parent / "out_pq")] and state == saved
    next(other)
    assert state == saved


def test_a_read_error_leaves_the_position_at_the_last_batch_returned(prepared, monkeypatch):
    """A batch that fails to load is not counted as drawn: a checkpoint saved after the error resumes with it."""
    loader = data.ShardLoader(str(prepared[0] / "out"), 4, seed=1)
    next(loader)
    state, load = loader.state_dict(), loader.load
    reference = data.ShardLoader(str(prepared[0] / "out"), 4, seed=1)
    reference.load_state_dict(state)
    expected = next(reference)["id"]
    loader.load_state_dict(state)  # drops the batches read ahead, so the next ones go through the broken reader
    monkeypatch.setattr(loader, "load", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        next(loader)
    assert loader.state_dict() == state
    monkeypatch.setattr(loader, "load", load)
    loader.load_state_dict(loader.state_dict())
    assert next(loader)["id"] == expected


def test_datasets_of_another_space_are_not_mixed(prepared, tmp_path):
    root, _ = prepared
    def scaled(factor):
        return lambda i: i["latent_norm"].update(scale=(np.array(i["latent_norm"]["scale"]) * factor).tolist())
    for name, edit, what in [("vae", lambda i: i["settings"].update(vae="repa-e"), "VAE"),
                             ("width", lambda i: i["schema"]["txt_long"].update(shape=[16]), "text width"),
                             ("norm", scaled(1.1), "latent normalisation"), ("bf16", scaled(1.004), None)]:
        shutil.copytree(root / "out", tmp_path / name)
        index = json.loads((tmp_path / name / "index.json").read_text())
        edit(index)
        (tmp_path / name / "index.json").write_text(json.dumps(index))
        if what is None:  # statistics read in bf16 rather than fp32: the same VAE
            data.ShardLoader(f"{root / 'out'}:0.5,{tmp_path / name}:0.5", 4)
            continue
        with pytest.raises(ValueError, match=f"differ in {what} and cannot be mixed"):
            data.ShardLoader(f"{root / 'out'}:0.5,{tmp_path / name}:0.5", 4)


def test_a_mixture_of_latents_and_images_is_refused_as_a_mixture(prepared, tmp_path):
    import train
    out, images = prepared[0] / "out", tmp_path / "images"
    shutil.copytree(out, images)
    index = json.loads((images / "index.json").read_text())
    del index["schema"]["latent"]  # as prepared with --vae none
    (images / "index.json").write_text(json.dumps(index))
    mixture = f"{out}:0.5,{images}:0.5"
    train.get_args(["--data", mixture, "--model", "tiny", "--resolution", "32"])  # the preset fits the first: no
    with pytest.raises(ValueError, match="differ in .*latent shape.* and cannot be mixed"):  # loop between presets
        data.ShardLoader(mixture, 4)


def another_text_encoder(root, out, scale, names=("null_txt", "probe_txt")):
    """A copy of a prepared directory whose encodings (names) are those of another encoder of the same width (scale:
    random, relative to them) or of the same encoder in other arithmetic (scale ~1e-2: bf16 against fp32)."""
    shutil.copytree(root, out)
    torch.manual_seed(0)
    for name in names:
        emb = torch.from_numpy(np.load(out / f"{name}.npy")).view(torch.bfloat16).float()
        other = emb + scale * emb.abs().mean() * torch.randn_like(emb)
        np.save(out / f"{name}.npy", other.to(torch.bfloat16).view(torch.int16).numpy())
    return out


def test_datasets_of_another_text_encoder_of_the_same_width_are_not_mixed(prepared, tmp_path):
    out = prepared[0] / "out"
    same = another_text_encoder(out, tmp_path / "same", 0.01)  # one encoder, another precision: mixed
    assert data.space_differences(same, out) == []
    data.ShardLoader(f"{out}:0.5,{same}:0.5", 4)
    other = another_text_encoder(out, tmp_path / "other", 3.0)
    assert data.space_differences(other, out) == ["text encoder"]
    with pytest.raises(ValueError, match="differ in text encoder and cannot be mixed"):
        data.ShardLoader(f"{out}:0.5,{other}:0.5", 4)
    # a sibling checkpoint (another fine-tune of one base) may encode "" alike: the probe caption tells them apart
    sibling = another_text_encoder(out, tmp_path / "sibling", 3.0, names=["probe_txt"])
    assert data.space_differences(sibling, out) == ["text encoder"]
    (sibling / "probe_txt.npy").unlink()  # data prepared before the probe: compared on "" alone
    assert data.space_differences(sibling, out) == []


def test_a_new_stage_or_eval_set_of_another_text_encoder_is_refused(prepared, tmp_path, capsys):
    import train
    out = prepared[0] / "out"
    other = another_text_encoder(out, tmp_path / "other", 3.0)
    flags = ["--model", "tiny", "--hidden", "64", "--depth", "1", "--resolution", "32", "--batch-size", "2",
             "--micro-batch", "2", "--eval-samples", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        train.main(["--data", str(out), "--eval-data", str(other), *flags, "--eval-samples", "2"])
    assert f"--eval-data {other}: its text encoder differs from --data {out}'s" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--data", str(out), *flags, "--eval-samples", "2", "--eval-every", "1", "--target", "fid=20"])
    assert "this run's evaluations give nothing (FID needs --eval-ref FILE" in capsys.readouterr().err
    train.main(["--data", str(out), "--max-steps", "1", *flags, "--eval-samples", "2"])
    assert "evaluations draw sample grids only: FID needs --eval-ref FILE" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"the run trained on --data {out}; without --data this resume takes the cpu "
                                         f"track's values: pass the run's flags again"):
        train.main(["--max-steps", "2", "--resume", *flags])
    with pytest.raises(SystemExit, match=f"--data {other}: its text encoder differs from the data the model "
                                         f"trained on \\({out}\\)"):
        train.main(["--data", str(other), "--max-steps", "2", "--resume", *flags])
    import eval as ev  # eval.py on a run whose --eval-data was prepared again since: the run's flag is named
    args, trained = types.SimpleNamespace(data=None, ckpt="runs/x"), {"data": str(out), "eval_data": str(other)}
    with pytest.raises(SystemExit, match=f"^error: the run's --eval-data {other}: its text encoder differs"):
        ev.run_data(args, trained, evaluation=True)


def test_a_text_encoder_a_few_percent_off_is_another(prepared, tmp_path):
    out = prepared[0] / "out"
    near = another_text_encoder(out, tmp_path / "near", 0.3)  # cosine ~0.97: a sibling, not bf16 rounding
    assert data.space_differences(near, out) == ["text encoder"]


def test_one_text_encoder_is_a_cosine_similarity_over_0_99(tmp_path):
    """TextEncodings: the documented threshold is a cosine similarity of 0.99, neither looser nor tighter: encodings
    at cosine 0.995 are one text encoder's (other arithmetic), at 0.985 another's."""
    g = torch.Generator().manual_seed(0)
    null, noise = torch.randn(2, 6, 32, generator=g)
    noise = noise - (noise * null).sum() / null.square().sum() * null  # orthogonal to null, of its norm
    noise = noise * null.norm() / noise.norm()
    np.save(tmp_path / "null_txt.npy", prepare.to_bits(null))
    for cos, same in ((0.995, True), (0.985, False)):
        (tmp_path / str(cos)).mkdir()
        np.save(tmp_path / str(cos) / "null_txt.npy", prepare.to_bits(cos * null + (1 - cos ** 2) ** 0.5 * noise))
        assert (data.TextEncodings(tmp_path / str(cos)) == data.TextEncodings(tmp_path)) == same, cos


def test_a_resolution_stage_compares_only_the_encoders(prepared, tmp_path):
    import eval as ev
    out, other = prepared[0] / "out", tmp_path / "res64"
    shutil.copytree(out, other)
    index = json.loads((other / "index.json").read_text())
    c, h, w = index["schema"]["latent"]["shape"]
    index["schema"]["latent"]["shape"] = [c, 2 * h, 2 * w]
    (other / "index.json").write_text(json.dumps(index))
    assert data.space_differences(other, out) == ["latent shape"]
    assert data.space_differences(other, out, data.ENCODERS) == []
    ev.check_encoders(str(other), str(out))  # a new stage at another resolution: accepted
    ev.check_encoders(str(out), str(tmp_path / "on-another-machine"))  # nothing here to compare with: accepted


def test_a_damaged_index_or_empty_prompt_is_named(prepared, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared[0] / "out", out)
    for name in ("null_txt.npy", "index.json"):
        whole = (out / name).read_bytes()
        (out / name).write_bytes(whole[:len(whole) // 2])
        with pytest.raises(ValueError, match=f"{out / name}: unreadable .* delete {out} and prepare it again"):
            data.ShardLoader(str(out), 4)
        (out / name).write_bytes(whole)


def test_train_names_the_flags_of_a_dataset_it_cannot_read(prepared, tmp_path, capsys):
    import train
    long_only = tmp_path / "long_only"
    shutil.copytree(prepared[0] / "out", long_only)
    index = json.loads((long_only / "index.json").read_text())
    (long_only / "index.json").write_text(json.dumps({**index, "captions": ["long"]}))
    with pytest.raises(SystemExit, match=f"error: --data {long_only} --captions short: .* need \\['short'\\]"):
        train.main(["--data", str(long_only), "--captions", "short", "--model", "tiny", "--out", str(tmp_path / "r")])
    for argv, why in ((["--foreground-weight", "2"], "pass"), (["--track", "cpu"], "the cpu track's value; pass")):
        with pytest.raises(SystemExit):  # latents: no background
            train.main(["--data", str(prepared[0] / "out"), "--model", "tiny", *argv, "--out", str(tmp_path / "r")])
        assert f"--foreground-weight 2: {prepared[0] / 'out'} holds latents, which have no background colour to " \
            f"weigh against ({why} --foreground-weight 0)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def first_shard(out):
    return next(p for p in sorted((out / "train").glob("shard-*"))
                if json.loads((p / "meta.json").read_text())["count"])


def test_will_need_advises_the_pages_of_the_rows_asked_for(tmp_path):
    """madvise(WILLNEED) from the page holding the first row's first byte to the last row's end, in the map's own
    offsets (numpy maps from the allocation granularity below the array's offset), on real maps without error."""
    calls = []
    fake = types.SimpleNamespace(_mmap=types.SimpleNamespace(madvise=lambda *a: calls.append(a)), offset=128,
                                 strides=(3000,))
    data.will_need(fake, 2, 5)  # bytes 128 + 6000 .. 128 + 15000 of the file: pages from 4096
    assert calls == [(mmap.MADV_WILLNEED, 4096, 128 + 15000 - 4096)]
    fake.offset += 3 * mmap.ALLOCATIONGRANULARITY  # an array further in: its map starts 3 granules in, so the same
    data.will_need(fake, 2, 5)  # offsets within the map
    assert calls[-1] == (mmap.MADV_WILLNEED, 4096, 128 + 15000 - 4096)
    np.save(tmp_path / "a.npy", np.arange(3 * 5000, dtype=np.int16).reshape(3, 5000))
    array = np.load(tmp_path / "a.npy", mmap_mode="r")
    for start, stop in ((0, 1), (1, 3), (2, 3), (3, 3)):
        data.will_need(array, start, stop)
    data.will_need(np.zeros((2, 4)), 0, 1)  # not mapped: nothing to advise


def test_the_loader_advises_every_read_of_a_batch_before_copying(prepared, monkeypatch):
    loader, advised = data.ShardLoader(str(prepared[0] / "out"), 4, captions="mixed:0.5"), []
    monkeypatch.setattr(data, "will_need", lambda array, start, stop: advised.append((array.shape[1:], stop - start)))
    batch = loader.load(*loader.plan(copy.deepcopy(loader.state)))
    fields = [(shape, n) for shape, n in advised if len(shape) == 1]  # the text rows: (D,), as many as tokens
    assert [n for _, n in fields] == batch["txt_mask"].sum(1).tolist()  # each sample's caption, long or short
    latent = tuple(loader.datasets[0].index["schema"]["latent"]["shape"])
    assert sorted(set(advised) - set(fields)) == [(latent, 1)] and len(advised) == 2 * 4  # and its latent


def test_too_many_open_files_is_no_damaged_shard(prepared, monkeypatch):
    """Each mapped array holds a file descriptor: past `ulimit -n` the error names the limit, not a damaged shard
    (whose advice, to delete the dataset and prepare it again, would throw away a whole preparation)."""
    load = np.load

    def limited(path, *args, **kwargs):
        if str(path).endswith("latent.npy"):
            raise OSError(errno.EMFILE, "Too many open files")
        return load(path, *args, **kwargs)
    monkeypatch.setattr(data.np, "load", limited)
    with pytest.raises(ValueError, match=r"latent.npy: cannot be mapped \(Too many open files\): .* raise the limits "
                                         r"\(`ulimit -n`") as info:
        data.PreparedDataset(prepared[0] / "out")
    assert "damaged" not in str(info.value)


def test_a_damaged_shard_is_named_at_open(prepared, tmp_path):
    root, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    shard = first_shard(out)
    latent, offsets, image = shard / "latent.npy", shard / "id_offsets.npy", shard / "image.npy"
    whole = {p: p.read_bytes() for p in (latent, offsets, image)}
    for path, damage in ((latent, whole[latent][:-100]),    # cut in the data: "mmap length is greater than file size"
                         (latent, whole[latent][:60]),       # cut in the header
                         (latent, b""),
                         (offsets, whole[offsets][:-8])):    # offsets are read, not mapped
        path.write_bytes(damage)
        for open_split in (lambda: data.PreparedDataset(out), lambda: data.ShardLoader(str(out), 4)):
            with pytest.raises(ValueError, match="damaged") as info:
                open_split()
            assert str(path) in str(info.value)
            assert f"delete {out} and prepare it again (python prepare.py --out {out}" in str(info.value)
        path.write_bytes(whole[path])
    for path in (image, offsets):  # whole files, one row short: a fixed-shape array, or a ragged one's offsets
        np.save(path, np.load(path)[:-1])
        with pytest.raises(ValueError, match=f"{shard}: index.json says .* samples but"):
            data.PreparedDataset(out)
        path.write_bytes(whole[path])
    (shard / "txt_short.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"txt_short.npy'\] missing"):
        data.PreparedDataset(out)
    shutil.rmtree(shard)
    with pytest.raises(FileNotFoundError, match="listed in index.json but missing"):
        data.PreparedDataset(out)


def test_latent_normalisation_flux_dc_ae_and_flux2():
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2
    z = torch.randn(2, 4, 6, 8)
    flux = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, scaling_factor=0.3611,
                         shift_factor=0.1159)
    torch.testing.assert_close(data.normalize_latent(z, *data.latent_stats(flux)), (z - 0.1159) * 0.3611)
    dc_ae = AutoencoderDC(latent_channels=4, attention_head_dim=8, encoder_block_out_channels=(8,),
                          decoder_block_out_channels=(8,), encoder_layers_per_block=(1,), decoder_layers_per_block=(1,),
                          encoder_qkv_multiscales=((),), decoder_qkv_multiscales=((),), scaling_factor=0.41407)
    torch.testing.assert_close(data.normalize_latent(z, *data.latent_stats(dc_ae)), z * 0.41407)  # no shift
    flux2 = AutoencoderKLFlux2(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), latent_channels=4,
                               up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)
    flux2.bn.running_mean.normal_()
    flux2.bn.running_var.uniform_(0.5, 2)
    shift, scale = data.latent_stats(flux2)
    # diffusers' Flux2Pipeline: 2x2 patchify to 16 channels, BatchNorm statistics, back
    patches = z.view(2, 4, 3, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 16, 3, 4)
    patches = (patches - flux2.bn.running_mean[:, None, None]) / (flux2.bn.running_var[:, None, None] + 1e-4).sqrt()
    expected = patches.reshape(2, 4, 2, 2, 3, 4).permute(0, 1, 4, 2, 5, 3).reshape(2, 4, 6, 8)
    torch.testing.assert_close(data.normalize_latent(z, shift, scale), expected)
    torch.testing.assert_close(data.denormalize_latent(data.normalize_latent(z, shift, scale), shift, scale), z)


def test_heldout_split_is_the_eval_split(prepared):
    root, _ = prepared
    held = stored_samples(root / "out", "eval")
    # numbered by the sha256 of the id, not as stored: the first N a uniform draw whatever the shards' order
    split = data.HeldoutSplit(root / "out", len(held))
    ids = sorted(held, key=lambda i: hashlib.sha256(i.encode()).digest())
    assert ids != list(held)  # (the fixture stores them in another order)
    idx = list(range(len(held)))[::-1]
    assert split.captions(idx) == [(root / "images" / ids[i]).with_suffix(".txt").read_text() for i in idx]
    images = split.images(idx)
    assert images.dtype == torch.uint8 and images.shape == (len(held), 3, RES, RES)
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(images[j].numpy(), reference_image(root / "images" / ids[i]))
    txt, mask = split.encode(idx)
    assert txt.dtype == torch.float32 and txt.shape == (len(held), mask.sum(1).max(), 32)
    for j, i in enumerate(idx):
        shard, row = held[ids[i]]
        stored = torch.from_numpy(np.array(shard.ragged("txt_long", row))).view(torch.bfloat16).float()
        assert mask[j].sum() == len(stored) and torch.equal(txt[j, :len(stored)], stored)
    null = torch.from_numpy(np.load(root / "out" / "null_txt.npy")).view(torch.bfloat16).float()
    assert torch.equal(split.null[0][0], null) and split.null[1].all() and split.score(images, idx) == {}
    short = data.HeldoutSplit(root / "out", 1, "short")
    assert short.captions([0]) == [held[ids[0]][0].string("caption_short", held[ids[0]][1])]
    with pytest.raises(ValueError, match=f"{len(held)} held-out samples"):
        data.HeldoutSplit(root / "out", len(held) + 1)
    images_only = data.HeldoutSplit(root / "out", 1, None)  # eval.py ref: no caption needed
    assert torch.equal(images_only.images([0]), images[-1:])
    with pytest.raises(ValueError, match=r"captions \['long', 'short'\], not 'medium'"):
        data.HeldoutSplit(root / "out", 1, "medium")  # at opening, before a run trains or eval.py loads networks


def test_heldout_split_encodes_the_caption_it_reads(prepared):
    """HeldoutSplit(caption="short"): the short captions' encodings, not the long ones'."""
    root, _ = prepared
    n = len(stored_samples(root / "out", "eval"))
    split = data.HeldoutSplit(root / "out", n, "short")
    txt, mask = split.encode(range(n))
    for j, (shard, row) in enumerate(split.rows(range(n))):
        stored = torch.from_numpy(np.array(shard.ragged("txt_short", row))).view(torch.bfloat16).float()
        assert split.captions([j]) == [shard.string("caption_short", row)]
        assert mask[j].sum() == len(stored) and torch.equal(txt[j, :len(stored)], stored)


def write_hand_written(root, train_count, eval_count, res=16):
    """A prepared directory of random images and text, written by prepare.py's writers; train/ also holds a shard
    that kept no sample (all its rows skipped or held out: an --eval-fraction 1 set's are all so)."""
    g = torch.Generator().manual_seed(0)

    def columns(n, tag):
        return {"image": list(torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g).numpy()),
                "txt_long": [prepare.to_bits(torch.randn(3 + i % 3, 8, generator=g)) for i in range(n)],
                "caption_long": [f"{tag} {i}" for i in range(n)], "id": [f"{tag}{i}" for i in range(n)]}
    if train_count:
        prepare.write_shard(root / "train" / "shard-r000-00000", columns(train_count, "t"),
                            {"count": train_count, "skipped": {}})
    prepare.write_shard(root / "train" / "shard-r000-00001", {}, {"count": 0, "skipped": {}})
    prepare.write_shard(root / "eval" / "shard-r000-00000", columns(eval_count, "e"), {"count": eval_count})
    np.save(root / "null_txt.npy", prepare.to_bits(torch.randn(1, 8, generator=g)))
    prepare.write_index(root, {})


def test_a_damaged_row_is_named_with_its_shard(prepared, tmp_path):
    """Offsets that do not index their array are found at open; a caption that is not UTF-8 text or a latent that is
    not finite when its batch is read, by shard and row (one line through errors_of_rank_0_first), not a traceback
    from the decoder or a non-finite loss that blames --lr."""
    out = tmp_path / "out"
    shutil.copytree(prepared[0] / "out", out)
    shard = first_shard(out)
    offsets = shard / "caption_long_offsets.npy"
    good = np.load(offsets)
    for bad in (good[::-1], np.concatenate([good[:-1], [good[-1] - 1]])):  # falling; short of the array's length
        np.save(offsets, bad)
        with pytest.raises(ValueError, match=f"{shard}: caption_long_offsets.npy does not index the {good[-1]} values "
                                             f"of caption_long.npy .* damaged: delete {out}"):
            data.PreparedDataset(out)
    np.save(offsets, good)
    n = len(data.PreparedDataset(out))  # a batch of every sample: row 0 of the shard among them
    for name, damage in (("caption_long", lambda a: a.__setitem__(0, 0xFF)),  # not UTF-8 in row 0
                         ("latent", lambda a: a.__setitem__((0, 0, 0, 0), 0x7FC0))):  # bf16 NaN in row 0
        path = shard / f"{name}.npy"
        whole = path.read_bytes()
        array = np.load(path)
        damage(array)
        np.save(path, array)
        loader = data.ShardLoader(str(out), n, captions="long")
        with pytest.raises(data.DamagedShard, match=f"{shard}: row 0 of {name}.npy is not"):
            next(loader)
        loader.worker.shutdown(wait=True)
        path.write_bytes(whole)
    with pytest.raises(SystemExit, match="^error: a shard: row 3"), data.errors_of_rank_0_first():
        raise data.DamagedShard("a shard: row 3")


def test_a_shard_that_kept_no_sample_is_no_damaged_shard(tmp_path):
    write_hand_written(tmp_path / "a", 2, 3)
    assert len(data.PreparedDataset(tmp_path / "a")) == 2
    write_hand_written(tmp_path / "eval-only", 0, 3)
    assert len(data.PreparedDataset(tmp_path / "eval-only")) == 0
    with pytest.raises(ValueError, match="has no training samples"):
        data.ShardLoader(str(tmp_path / "eval-only"), 2)


def test_heldout_split_of_a_hand_written_directory(tmp_path):
    g = torch.Generator().manual_seed(0)
    txt = [torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)]
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    columns = {"image": list(images.numpy()), "txt_long": [prepare.to_bits(t) for t in txt],
               "caption_long": ["a red", "b"], "id": ["0", "1"]}
    for split in ("train", "eval"):
        prepare.write_shard(tmp_path / split / "shard-r000-00000", columns, {"count": 2, "skipped": {}})
    np.save(tmp_path / "null_txt.npy", prepare.to_bits(torch.randn(1, 8, generator=g)))
    prepare.write_index(tmp_path, {})
    split = data.HeldoutSplit(str(tmp_path), 2)
    assert split.captions([1, 0]) == ["b", "a red"]
    emb, mask = split.encode([0, 1])
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    torch.testing.assert_close(emb[0, :3], txt[0].bfloat16().float())
    assert torch.equal(split.images([1]), images[1:]) and split.null[0].shape == (1, 1, 8)
    with pytest.raises(ValueError, match="2 held-out samples"):
        data.HeldoutSplit(str(tmp_path), 3)


def test_images_id_is_the_sha256_of_the_first_held_out_images(prepared, tmp_path):
    """images_id(n) hashes the bytes of held-out images 0..n-1, those an evaluation of n prompts compares with."""
    split = data.HeldoutSplit(prepared[0] / "out", 1, None)
    for n in (1, len(split.prepared)):
        assert split.images_id(n) == f"sha256 {hashlib.sha256(split.images(range(n)).numpy().tobytes()).hexdigest()}"
    write_hand_written(tmp_path, 0, 300, res=4)  # past the 256 images hashed at a time
    split = data.HeldoutSplit(tmp_path, 300, None)
    assert split.images_id(300) == f"sha256 {hashlib.sha256(split.images(range(300)).numpy().tobytes()).hexdigest()}"


def test_data_dirs():
    assert data.data_dirs("builtin") == []
    assert data.data_dirs("/d/a") == ["/d/a"]
    assert data.data_dirs("b:0.7,/d/a:0.3@0;c:1@90;b@100") == ["b", "/d/a", "c"]  # in order of appearance, once


def test_open_loader_and_heldout_follow_data(prepared):
    from shapes import HeldoutShapes, ShapesLoader
    root, _ = prepared
    a, b = str(root / "out"), str(root / "out_pq")
    builtin = data.open_loader("builtin", 2, 1, 2, 3, "short", "cpu", 1, 32, 0, images=False)
    assert isinstance(builtin, ShapesLoader)
    expected = next(ShapesLoader(2, 1, 2, seed=3, resolution=32, p_long=0.0, text_context=0))
    got = next(builtin)
    assert got["id"] == expected["id"] and torch.equal(got["txt"], expected["txt"])
    assert data.open_loader("builtin", 2, 0, 1, 3, "mixed:0.3", "cpu", 1, 32, 0, images=False).p_long == 0.3
    loader = data.open_loader(f"{a}:1,{b}:1", 4, 0, 1, 3, "long", "cpu", 2, RES, 5, images=True)
    assert isinstance(loader, data.ShardLoader) and loader.names == sorted([a, b])
    assert (loader.seed, loader.grad_accum, loader.images, loader.batch_size) == (3, 2, True, 4)
    held = data.open_heldout("builtin", 10, "short", 48, 3, 0)
    assert isinstance(held, HeldoutShapes) and held.images([0]).shape == (1, 3, 48, 48)
    assert held.captions([0]) == HeldoutShapes(seed=3, caption="short").captions([0])
    assert held.encoder.context == 0
    held = data.open_heldout(f"{a}:0.5,{b}:0.5@0;{b}@10", 1, "short", RES, 0, 5)  # the first directory's eval split
    assert isinstance(held, data.HeldoutSplit) and held.prepared.root == Path(a) and held.caption == "short"
    with pytest.raises(ValueError, match=r"captions \['long', 'short'\], not"):  # a caption field the data lacks
        data.open_heldout(a, 1, "medium", RES, 0, 5)


def test_vae_offline_fails_fast_and_says_what_to_fetch(prepared, unreachable_hub, monkeypatch):
    import diffusers  # noqa: F401 (imported before the clock)
    root, _ = prepared
    start = time.time()
    with pytest.raises(RuntimeError, match="cannot be reached") as info:
        data.load_vae("flux")
    assert time.time() - start < 5
    assert "hf download black-forest-labs/FLUX.1-schnell --include 'vae/*'" in str(info.value)
    assert "--vae-path" in str(info.value) and unreachable_hub.HF_HUB_OFFLINE is False  # restored
    monkeypatch.setattr(unreachable_hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        data.load_vae("flux")
    monkeypatch.setattr(unreachable_hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "hub_unreachable", lambda: pytest.fail("asked the hub"))  # cached or local: no need
    vae, shift, scale = data.load_vae("flux", root / "models" / "flux")
    assert vae.config.latent_channels == 4 and scale.flatten()[0] == pytest.approx(0.3611)
    repo = Path(unreachable_hub.HF_HUB_CACHE) / "models--black-forest-labs--FLUX.1-schnell"
    shutil.copytree(root / "models" / "flux", repo / "snapshots" / ("0" * 40))  # the cache's layout
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    vae, shift, scale = data.load_vae("flux")  # the hub id, found in the cache
    assert vae.config.latent_channels == 4 and scale.flatten()[0] == pytest.approx(0.3611)


def test_train_on_prepared_latents_and_resume(prepared, tmp_path, capsys):
    """train.py on a prepared dataset: latents and T5Gemma text from the shards, loader position in the checkpoint;
    the resumed phase evaluates on another prepared set (--eval-data), which eval.json names."""
    import train
    root, _ = prepared
    argv = ["--data", str(root / "out_pq"), "--model", "tiny", "--resolution", str(RES), "--hidden", "64", "--depth",
            "2", "--batch-size", "8", "--micro-batch", "4", "--log-every", "1", "--eval-samples", "0", "--out",
            str(tmp_path / "run")]
    train.main(argv + ["--max-steps", "3"])  # in this process: a launch would import torch again
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_3" / "trainer.pt", weights_only=True)
    assert state["loader"]["batches"] == 6  # 3 steps x 2 accumulation micro-batches
    capsys.readouterr()
    train.main(argv + ["--max-steps", "5", "--resume", "--eval-data", str(root / "out"), "--eval-samples", "2"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 5]  # the last: the evaluation at the end
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["data"] == str(root / "out")
    assert "\neval step 5 | train_time " in capsys.readouterr().out  # no --eval-ref: a sample grid, no score


def test_latents_images_are_read_for_repa_only_until_it_stops(prepared, tmp_path, monkeypatch):
    """A latent run reads the shards' images for the REPA teacher alone: from --repa-stop on (batches read ahead
    aside), and on a resume past it, the loader no longer reads them."""
    import timm
    from safetensors.torch import save_file
    import train
    weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(weights))
    read, next_batch = [], data.ShardLoader.__next__
    monkeypatch.setattr(data.ShardLoader, "__next__", lambda loader: read.append("image" in (b := next_batch(
        loader))) or b)
    argv = ["--data", str(prepared[0] / "out"), "--model", "tiny", "--resolution", str(RES), "--hidden", "64",
            "--depth", "2", "--batch-size", "4", "--micro-batch", "4", "--eval-samples", "0", "--repa", "dinov2",
            "--repa-teacher", "vit_tiny_patch16_224", "--repa-weights", str(weights), "--repa-stop", "2",
            "--out", str(tmp_path / "run")]
    train.main(argv + ["--max-steps", "8"])
    ahead = data.PREFETCH - 1  # the batches submitted before step 2's were taken
    assert read == [True] * (2 + ahead) + [False] * (6 - ahead)  # steps 0-1 with REPA, those read ahead, then none
    read.clear()
    train.main(argv + ["--max-steps", "10", "--resume"])
    assert read == [False] * 2


def test_a_folder_without_index_json_is_told_what_to_run(tmp_path):
    """--data given an unfinished preparation, a source folder, a run, a mistyped mixture or an empty place: the
    advice fits each (before: `prepare.py --out` of the folder, the source folder itself included)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "samples_10.png").write_bytes(b"")
    (tmp_path / "unfinished" / "train").mkdir(parents=True)
    (tmp_path / "unfinished" / "prepare.json").write_text("{}")
    (tmp_path / "images" / "cats").mkdir(parents=True)
    (tmp_path / "images" / "cats" / "a.JPG").write_bytes(b"")
    (tmp_path / "x.parquet").write_bytes(b"")
    for folder, advice in (("unfinished", "its preparation did not finish: run the same prepare.py command again"),
                           ("images", f"prepare them into a folder of their own (`python prepare.py --source "
                                      f"{tmp_path / 'images'} --out NEW --eval-fraction 1 ...`)"),
                           ("x.parquet", f"`python prepare.py --source {tmp_path / 'x.parquet'} --out NEW"),
                           ("images/cats/a.JPG", f"`python prepare.py --source {tmp_path / 'images' / 'cats'} --out"),
                           ("run", "a training run or checkpoint, not data"),
                           ("a:50%", "no such folder; a mixture is DIR:WEIGHT,DIR:WEIGHT"),
                           ("new", f"prepare one with `python prepare.py --out {tmp_path / 'new'} --eval-fraction 1 "
                                   f"...`")):
        assert advice in data.how_to_prepare(tmp_path / folder, "--eval-fraction 1 ")
    with pytest.raises(FileNotFoundError, match="index.json not found: its preparation did not finish"):
        data.read_index(tmp_path / "unfinished")
