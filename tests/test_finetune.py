"""`mmsearch finetune` / `distill`: the tiny CLIP (trained on synthetic shapes) adapted to the
real Flickr photos and captions in ../shared, its losses against short obvious versions,
what stays locked, WiSE-FT, the saved folder, and the rules for using it with an index."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import FLICKR, draw_shapes
from mmsearch.cli import app
from mmsearch.engine import Engine
from mmsearch.errors import DatasetError, ModelMismatchError, TrainingError
from mmsearch.eval.datasets import load_karpathy
from mmsearch.ingest.decode import load_image
from mmsearch.models.backends import lean_text_encoder, load_embedder
from mmsearch.models.identity import identify, same_image_tower
from mmsearch.train import losses
from mmsearch.train.distill import DistillOptions, distill_to_folder
from mmsearch.settings import FINETUNE_DEFAULTS
from mmsearch.train.finetune import FinetuneOptions, finetune, finetune_to_folder
from mmsearch.train.pairs import load_pairs, split_by_image
from mmsearch.train.schedule import better
from mmsearch.train.towers import Unlocked, set_trainable, snapshot, wise

KARPATHY = FLICKR / "dataset_flickr8k_1k.json"
# what the tiny model learns in 15 epochs (explicit --epochs: 150 steps, measured each epoch,
# never stopped early): held-out rsum 15.6 -> 42.8, mean R@1 0.44 -> 1.8; on the reference
# split (never used to choose a step or alpha) rsum 12.4 -> 25.4, R@1 0.05 -> 0.85
RECIPE = dict(lr=3e-3, epochs=15, batch_size=64, eval_every=10, patience=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training on 2 cores shared with other tests: one torch thread avoids OpenMP spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_model: tuple[Path, Path]) -> dict[str, str]:
    config, checkpoint = tiny_model
    return {"model": str(config), "pretrained": str(checkpoint)}


@pytest.fixture(scope="module")
def flickr_index(base: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of the 1,000 Flickr photos built with the base model (its vectors are reused)."""
    if not KARPATHY.is_file():
        pytest.skip(f"real photos not found at {FLICKR} (see ../shared/README.md)")
    home = tmp_path_factory.mktemp("fthome")
    with Engine.open("flickr", home=home, device="cpu", **base) as engine:
        engine.index([FLICKR / "images"])
        engine.add_texts(["a dog runs on the grass", "a child in a pool"])
    return home


@pytest.fixture(scope="module")
def splits() -> tuple:
    """640 photos to train on, 160 held out (epoch and alpha chosen there), 200 reference."""
    everything = load_karpathy(KARPATHY, FLICKR / "images", split="test")
    outer = split_by_image(everything, 0.2, seed=1)
    return split_by_image(outer.train, 0.2, seed=0), outer.heldout


@pytest.fixture(scope="module")
def tuned(base: dict[str, str], flickr_index: Path, splits: tuple,
          tmp_path_factory: pytest.TempPathFactory) -> tuple:
    split, reference = splits
    out = tmp_path_factory.mktemp("ft") / "tuned"
    with Engine.open("flickr", home=flickr_index, device="cpu", create=False) as engine:
        embedder = engine.embedder
        before = snapshot(embedder.torch_model)
        report = finetune_to_folder(embedder, split, FinetuneOptions(**RECIPE), out,
                                    store=engine.store, reference=reference)
        return report, out, before, snapshot(embedder.torch_model)


# -- losses against the obvious formulas ------------------------------------------------------
def test_infonce_is_clip_loss_and_the_textbook_formula() -> None:
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(1 / 0.07)
    got = losses.info_nce(image, text, scale)
    sims = (image @ text.T).numpy() * float(scale)
    def ce(rows: np.ndarray) -> float:
        return float(np.mean([-(r[i] - math.log(np.exp(r).sum())) for i, r in enumerate(rows)]))
    assert float(got) == pytest.approx((ce(sims) + ce(sims.T)) / 2, rel=1e-5)
    assert float(got) == pytest.approx(float(ClipLoss()(image, text, scale)), rel=1e-6)


def test_triplet_and_distillation_losses_match_loops() -> None:
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    s = (image @ text.T).numpy()
    n, m = len(s), 0.2
    hardest_text = [max(max(0.0, m - s[i, i] + s[i, j]) for j in range(n) if j != i) for i in range(n)]
    hardest_image = [max(max(0.0, m - s[j, j] + s[i, j]) for i in range(n) if i != j) for j in range(n)]
    expected = np.mean(hardest_text) + np.mean(hardest_image)
    assert float(losses.triplet(image, text, m)) == pytest.approx(expected, rel=1e-5)
    student = torch.nn.functional.normalize(image + 0.3 * torch.randn(6, 8, generator=g), dim=-1)
    cos = (student * image).sum(1).numpy()
    assert float(losses.feature_distill(student, image)) == pytest.approx(np.mean(1 - cos), rel=1e-5)
    p = torch.softmax(10 * image @ text.T, 1).numpy()
    q = torch.softmax(10 * student @ text.T, 1).numpy()
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
    assert float(losses.affinity_distill(student, image, text, 10.0)) == pytest.approx(kl, rel=1e-4)


# -- the fine-tuning run on real photos ---------------------------------------------------------
def test_text_tower_finetune_improves_on_photos_it_never_saw(tuned: tuple) -> None:
    report = tuned[0]
    assert report.towers_changed == ["text"]
    assert report.train_images == 640 and report.heldout_images == 160
    training = report.training  # explicit epochs are honoured: 15 of 10 steps each
    assert (training.plan.epochs, training.plan.total, training.steps) == (15, 150, 150)
    assert training.stopped == "budget" and [e.step for e in training.log] == list(range(10, 151, 10))
    assert report.improved and report.alpha > 0
    assert report.after.rsum >= 2 * report.before.rsum
    assert report.after.r1 >= report.before.r1 + 0.75
    # the reference split chose nothing: its gain is the honest one
    assert report.reference_after.r1 >= report.reference_before.r1 + 0.5
    assert report.reference_after.rsum >= 1.5 * report.reference_before.rsum
    assert report.by_alpha[0.0] == report.before  # alpha 0 is the base model


def test_locked_image_tower_is_bit_identical(tuned: tuple) -> None:
    _, _, before, after = tuned
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))


def test_wise_endpoints_and_midpoint() -> None:
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor([1])}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor([2])}
    assert wise(a, b, 0) is a and wise(a, b, 1) is b
    mid = wise(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.0, 3.0])) and torch.equal(mid["n"], b["n"])


def test_saved_folder_reloads_to_the_same_vectors(tuned: tuple, base: dict[str, str],
                                                  home: Path) -> None:
    report, out, before, after = tuned
    manifest = json.loads((out / "mmsearch_manifest.json").read_text())
    assert manifest["towers_changed"] == ["text"] and manifest["improved"] is True
    assert manifest["alpha"] == report.alpha and manifest["data"]["train_images"] == 640
    assert manifest["settings"]["epochs"] == 15 and manifest["metrics"]["training"]["steps"] == 150
    identity = identify(f"local-dir:{out}", None)
    assert identity.text_pretrained == str(out.resolve())
    assert same_image_tower(identity, identify(base["model"], base["pretrained"]))
    loaded = load_embedder(identity, "cpu")
    state = loaded.torch_model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in after)
    base_embedder = load_embedder(identify(base["model"], base["pretrained"]), "cpu")
    photos = sorted((FLICKR / "images").glob("*.jpg"))[:4]
    batch = [loaded.prepare(load_image(p)) for p in photos]
    np.testing.assert_array_equal(loaded.encode_images(loaded.collate(batch)),
                                  base_embedder.encode_images(base_embedder.collate(batch)))
    texts = ["a dog on the beach", "two children"]
    assert not np.allclose(loaded.encode_texts(texts), base_embedder.encode_texts(texts), atol=1e-3)
    lean = lean_text_encoder(identity, "cpu")  # text queries skip open_clip for the folder too
    assert lean is not None and type(lean).__name__ == "_PlainTextEncoder"
    np.testing.assert_allclose(lean.encode_texts(texts), loaded.encode_texts(texts), atol=1e-5)


def test_an_index_built_with_the_base_takes_the_tuned_text_tower(
        tuned: tuple, flickr_index: Path) -> None:
    out = tuned[1]
    with Engine.open("flickr", home=flickr_index, model=f"local-dir:{out}", create=False) as e:
        hits = e.search("a dog runs through the grass", k=5)
        assert len(hits) == 5
        with pytest.raises(ModelMismatchError, match="stored texts"):
            e.search_texts(image=hits[0].path)
        e.add_texts(["a man on a bike"])  # a write: the stored texts are embedded again
        assert e.store.model.text_pretrained == str(out.resolve())
        found = e.search_texts("a dog runs on the grass", k=1)
        assert found[0].text == "a dog runs on the grass" and found[0].score > 0.999
        assert e.store.read.embedding_count() == 1000  # no photo was embedded again
    with Engine.open("flickr", home=flickr_index, create=False) as e:  # now the index's own model
        assert e.identity.text_pretrained == str(out.resolve())
        assert len(e.search("a child in a pool", k=3)) == 3


def test_a_model_whose_image_tower_changed_is_refused_by_the_index(
        base: dict[str, str], flickr_index: Path, splits: tuple, tmp_path: Path) -> None:
    split = _sixty(splits[0])
    with Engine.open("flickr", home=flickr_index, device="cpu", create=False, **base) as e:
        embedder = e.embedder
        before = snapshot(embedder.torch_model)
        report = finetune_to_folder(embedder, split, FinetuneOptions(
            lr=1e-3, epochs=1, batch_size=16, unlocked=Unlocked(text_layers=1, image_layers=1)),
            tmp_path / "partial", store=e.store)
        after = snapshot(embedder.torch_model)
    assert report.towers_changed == ["image", "text"]
    frozen = [k for k in before if k.startswith(("transformer.resblocks.0.", "token_embedding",
                                                 "visual.conv1", "visual.layer1"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    with pytest.raises(ModelMismatchError, match="built with"):
        Engine.open("flickr", home=flickr_index, model=f"local-dir:{tmp_path / 'partial'}",
                    create=False)


def test_gradient_caching_equals_one_big_batch(base: dict[str, str], splits: tuple) -> None:
    """accum=4 (cached features, four backward passes) takes the same step as accum=1."""
    small = _sixty(splits[0])
    states = []
    for accum in (1, 4):
        embedder = load_embedder(identify(base["model"], base["pretrained"]), "cpu")
        opts = FinetuneOptions(lr=1e-3, epochs=1, batch_size=48, accum=accum, alphas=(1.0,),
                               temperature=0.05)
        report = finetune(embedder, small, opts)
        assert report.training.best_step == 1  # the step's weights were kept, not the base's
        states.append(snapshot(embedder.torch_model))
    # Adam's first step moves each weight by about +-lr whatever its gradient's size, so a
    # coordinate whose gradient is ~0 turns float rounding into up to ~2% of a step (measured
    # 1.8e-5 at lr 1e-3 on one of 12,288): the steps must agree to 5% of one
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=5e-5)


def test_the_default_run_is_sized_in_optimizer_steps() -> None:
    """450 pairs at batch 128 are 3 steps an epoch: the default plans whole epochs up to at
    least the step budget; explicit epochs or steps are taken as given."""
    budget = FINETUNE_DEFAULTS.min_steps
    small = FinetuneOptions().plan(450)
    assert small.steps_per_epoch == 3 and small.total >= budget
    assert small.total == small.epochs * 3 and (small.epochs - 1) * 3 < budget
    assert small.eval_every == math.ceil(small.total / FINETUNE_DEFAULTS.evaluations)
    assert FinetuneOptions().plan(200_000).epochs == 1  # 1,562 steps: one epoch is enough
    assert (FinetuneOptions(epochs=5).plan(450).total, FinetuneOptions(steps=40).plan(450).total) \
        == (15, 40)
    assert FinetuneOptions(steps=40).plan(450).epochs == 14  # the last one partial
    assert better({"rsum": 10.0, "r1": 2.0}, {"rsum": 9.0, "r1": 2.5})  # rsum first
    assert better({"rsum": 10.0, "r1": 2.5}, {"rsum": 10.0, "r1": 2.0})  # then R@1


def test_early_stopping_keeps_the_best_held_out_weights(
        base: dict[str, str], splits: tuple, tmp_path: Path) -> None:
    """The default schedule on 48 pairs (500 one-step epochs planned): the held-out score
    peaks early, the run stops after `patience` evaluations without a better one, and the
    saved model is the best one seen, not the last."""
    from mmsearch.train.data import prepare_set

    split = _sixty(splits[0])
    embedder = load_embedder(identify(base["model"], base["pretrained"]), "cpu")
    report = finetune_to_folder(embedder, split, FinetuneOptions(lr=3e-3, alphas=(1.0,)),
                                tmp_path / "best")
    training = report.training
    assert training.plan.total >= FINETUNE_DEFAULTS.min_steps
    assert training.stopped == "early stop" and training.steps < training.plan.total
    scores = [e.heldout for e in training.log]
    best = max(scores, key=lambda s: tuple(s.values()))
    assert training.best_heldout == best and 0 < training.best_step < training.steps
    assert [e.step for e in training.log if e.heldout == best][0] == training.best_step
    assert not any(better(s, best) for s in scores[-training.plan.patience:])
    assert scores[-1] != best  # restoring mattered: the last weights were worse
    manifest = json.loads((tmp_path / "best" / "mmsearch_manifest.json").read_text())
    assert manifest["metrics"]["training"]["stopped"] == "early stop"
    assert manifest["metrics"]["training"]["best_heldout"] == best
    saved = load_embedder(identify(f"local-dir:{tmp_path / 'best'}", None), "cpu")
    again = prepare_set(saved, split.heldout, False).evaluate(saved.torch_model, saved)
    assert again.score() == best == report.after.score()


def _sixty(split):
    from mmsearch.train.pairs import PairSplit, subset

    return PairSplit(subset(split.train, np.arange(48), "train"),
                     subset(split.heldout, np.arange(12), "heldout"), split.how)


def test_triplet_loss_and_a_stop_request(base: dict[str, str], splits: tuple) -> None:
    import threading

    embedder = load_embedder(identify(base["model"], base["pretrained"]), "cpu")
    stop = threading.Event()
    calls = []

    def progress(stage: str, done: int, total: int) -> None:
        calls.append(stage)
        if stage.startswith("train|"):
            stop.set()  # Ctrl-C after the first step: the best weights so far are kept

    report = finetune(embedder, _sixty(splits[0]), FinetuneOptions(
        loss="triplet", lr=1e-3, epochs=3, batch_size=16, eval_every=3), progress=progress,
        stop=stop)
    assert report.interrupted and list(report.by_alpha) == [1.0]
    assert any(s.startswith("train|step 1/9, epoch 1/3, loss") for s in calls)
    assert report.training.steps == 1 and report.training.log == []
    assert report.after == report.before  # never evaluated: the base weights are kept


def test_bad_options_and_data_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="unknown loss"):
        FinetuneOptions(loss="hinge").check()
    with pytest.raises(TrainingError, match="multiple of accum"):
        FinetuneOptions(batch_size=10, accum=3).check()
    with pytest.raises(TrainingError, match="steps or as epochs, not both"):
        FinetuneOptions(steps=100, epochs=2).check()
    with pytest.raises(TrainingError, match="patience"):
        FinetuneOptions(patience=-1).check()
    with pytest.raises(DatasetError, match="not found"):
        load_pairs(tmp_path / "nope.json")
    bad = tmp_path / "pairs.csv"
    bad.write_text("photo,text\na.jpg,a cat\n")
    with pytest.raises(DatasetError, match="'image' and 'caption'"):
        load_pairs(bad)
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"image": "missing.jpg", "caption": "a cat"}\n')
    with pytest.raises(DatasetError, match="image not found"):
        load_pairs(lines)


def test_pair_formats_and_the_split_by_photo(tmp_path: Path) -> None:
    folder = tmp_path / "pairs"
    photos = draw_shapes(folder, per_combo=2)
    for path, caption in photos.items():
        path.with_suffix(".txt").write_text(f"{caption}\n\n{caption} again\n")
    split = load_pairs(folder, holdout=0.25, seed=3)
    assert split.train.n_images + split.heldout.n_images == 24
    assert split.heldout.n_images == 6 and split.train.n_captions == 36
    assert not set(split.train.image_paths) & set(split.heldout.image_paths)
    again = load_pairs(folder, holdout=0.25, seed=3)
    assert again.heldout.image_paths == split.heldout.image_paths  # seeded
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"image": str(p), "caption": c}) + "\n"
                            for p, c in photos.items()))
    assert load_pairs(rows, holdout=0.25).heldout.n_images == 6
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\n" + "".join(f"{p},{c}\n" for p, c in photos.items()))
    assert load_pairs(csv, holdout=0.5).train.n_images == 12


def test_unlocking_follows_open_clip_and_counts_towers(base: dict[str, str]) -> None:
    model = load_embedder(identify(base["model"], base["pretrained"]), "cpu").torch_model
    assert set_trainable(model, Unlocked()) == ["text"]
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert set_trainable(model, Unlocked(text_layers=1)) == ["text"]
    assert not model.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    assert model.transformer.resblocks[-1].attn.in_proj_weight.requires_grad
    assert set_trainable(model, Unlocked(full=True)) == ["image", "text"]
    assert all(p.requires_grad for p in model.parameters())


# -- the commands -------------------------------------------------------------------------------
def test_finetune_command_prints_the_table_and_refuses_to_overwrite(
        base: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    for path, caption in draw_shapes(folder, per_combo=3).items():
        path.with_suffix(".txt").write_text(caption + "\n")
    out = tmp_path / "model"
    argv = ["finetune", str(folder), "--out", str(out), "--model", base["model"], "--pretrained",
            base["pretrained"], "--device", "cpu", "--epochs", "1", "--batch-size", "8",
            "--holdout", "0.25", "--lr", "1e-12"]  # too small to change anything
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "text->image R@1" in result.output and "fine-tuned (WiSE alpha 0)" in result.output
    assert "not better: the held-out recall did not improve" in result.output
    assert "training: 3 of 3 steps (1 epoch asked for; 3 per epoch)" in result.output
    assert json.loads((out / "mmsearch_manifest.json").read_text())["improved"] is False
    assert (out / "open_clip_model.safetensors").is_file()
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 2
    assert again.output.strip().splitlines()[-1].endswith("choose another --out")
    nothing = CliRunner().invoke(app, ["finetune", str(tmp_path / "none"), "--out",
                                       str(tmp_path / "m2")])
    assert nothing.exit_code == 1 and "training data not found" in nothing.output


# -- distillation --------------------------------------------------------------------------------
STUDENT = {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                          "head_width": 32, "mlp_ratio": 2}}


def test_distilled_student_keeps_most_of_the_teachers_recall(
        base: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "shapes"
    for path, caption in draw_shapes(folder, per_combo=40).items():
        path.with_suffix(".txt").write_text(caption + "\n")
    config = tmp_path / "student.json"
    config.write_text(json.dumps(STUDENT))
    teacher = load_embedder(identify(base["model"], base["pretrained"]), "cpu")
    out = tmp_path / "student"
    report = distill_to_folder(teacher, load_pairs(folder, holdout=0.2), DistillOptions(
        student=str(config), lr=3e-3, batch_size=32), out)  # the default schedule
    training = report.training
    assert training.plan.total >= 500 and (training.stopped == "budget") == (
        training.steps == training.plan.total)
    assert training.best_heldout == {**report.student.score(), "cosine": report.cosine}
    assert report.student_params < report.teacher_params / 3
    assert report.student.rsum >= 0.6 * report.teacher.rsum
    assert report.student.rsum >= 3 * report.student_before.rsum
    assert report.cosine > 0.7
    student = load_embedder(identify(f"local-dir:{out}", None), "cpu")
    texts = ["a red circle", "a blue square"]
    np.testing.assert_allclose(student.encode_texts(texts), teacher.encode_texts(texts), atol=1e-6)
    manifest = json.loads((out / "mmsearch_manifest.json").read_text())
    assert manifest["towers_changed"] == ["image"] and manifest["metrics"]["cosine_to_teacher"] > 0.7


def test_student_starts_from_the_teacher_where_shapes_fit(base: dict[str, str]) -> None:
    from mmsearch.train.distill import _init_from_teacher, build_student

    teacher = load_embedder(identify(base["model"], base["pretrained"]), "cpu")
    vit = {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4,
                          "head_width": 32, "mlp_ratio": 2}}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big.json", Path(tmp) / "small.json"
        big.write_text(json.dumps(vit))
        small.write_text(json.dumps(STUDENT))
        big_student = build_student(teacher, DistillOptions(student=str(big), from_teacher=False))[0]
        small_student = build_student(teacher, DistillOptions(student=str(small), from_teacher=False))[0]
    how = _init_from_teacher(small_student.torch_model, big_student.torch_model)
    assert "blocks [0, 3]" in how
    mine, theirs = small_student.torch_model.visual, big_student.torch_model.visual
    assert torch.equal(mine.transformer.resblocks[1].mlp.c_fc.weight,
                       theirs.transformer.resblocks[3].mlp.c_fc.weight)
    assert torch.equal(mine.conv1.weight, theirs.conv1.weight)


def test_distillation_without_captions_uses_the_feature_loss(
        base: dict[str, str], tmp_path: Path) -> None:
    """A photographer's folder has no captions: the student still learns the teacher's space."""
    draw_shapes(tmp_path / "photos", per_combo=10)
    config = tmp_path / "student.json"
    config.write_text(json.dumps(STUDENT))
    argv = ["distill", str(tmp_path / "photos"), "--out", str(tmp_path / "student"), "--model",
            base["model"], "--pretrained", base["pretrained"], "--device", "cpu", "--student",
            str(config), "--init", "scratch", "--lr", "3e-3", "--epochs", "8",
            "--batch-size", "32", "--holdout", "0.2"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "no captions" in result.output and "mean cosine to the teacher" in result.output
    cosine = float(result.output.split("mean cosine to the teacher on held-out photos ")[1].split()[0])
    assert cosine > 0.5
    with pytest.raises(DatasetError, match="no image-caption rows"):
        load_pairs(tmp_path / "photos")  # finetune needs captions

