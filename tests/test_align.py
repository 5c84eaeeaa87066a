"""Alignment fine-tuning (scripts/align.py): the pipeline end to end on tiny random open_clip / timm models and
miniature COCO and ImageNet folders, exact resume after an interruption, teacher rows paired by sample id
under shuffling, the presets, fail-fast pretrained weights, and the metrics against brute-force oracles."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image, ImageDraw

from spec_torch.apps.align.data import (
    AlignSamples,
    ResumableBatchSampler,
    TeacherFeatures,
    collate_align,
    sample_texts,
    split_rows,
)
from spec_torch.apps.align.evaluate import knn_accuracy, retrieval_recall
from spec_torch.apps.align.pipeline import run
from spec_torch.apps.align.runtime import Runtime
from spec_torch.apps.align.train import AlignTrainer, prompt_contrastive_loss, warmup_cosine
from spec_torch.apps.data import build_dataset
from spec_torch.apps.encoders import build_encoder
from spec_torch.apps.extract import extract_features
from spec_torch.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "spec_torch" / "apps" / "configs"
SCRIPT = ROOT / "scripts" / "align.py"

#: float32 CPU training replayed from a checkpoint: the same operations on the same data (observed: equal)
RESUME_ATOL = 1e-6
#: the same on CUDA under autocast, where reductions need not be bitwise reproducible
CUDA_RESUME_ATOL = 1e-3
#: float32 features of the same images through two code paths (cache vs direct forward)
FEATURE_ATOL = 1e-5
#: float32 logits: our prompt loss vs open_clip's ClipLoss
LOSS_ATOL = 1e-6

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TINY_DINO = {"model": "vit_small_patch14_dinov2.lvd142m", "img_size": 28, "model_kwargs": {"depth": 1}}
WNIDS = {"n01440764": "red", "n01443537": "blue", "n01484850": "green"}
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
SHAPES = ["ellipse", "rectangle"]


pytestmark = pytest.mark.usefixtures("two_threads")


# ------------------------------------------------------------------------------------------- fixtures
def draw(colour: str, shape: str, k: int, size: int = 36) -> Image.Image:
    img = Image.new("RGB", (size, size), (230, 230, 230))
    box = (3 + k % 5, 3 + k % 4, size - 4 - k % 3, size - 3 - k % 5)
    getattr(ImageDraw.Draw(img), shape)(box, fill=colour, outline="black")
    return img


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("align")


@pytest.fixture(scope="module")
def mini_coco(work) -> dict[str, Path]:
    """train2017/ with 36 images (6 colours x 2 shapes x 3) and 2 captions each naming colour and shape."""
    images = work / "coco" / "train2017"
    images.mkdir(parents=True)
    doc: dict[str, list] = {"images": [], "annotations": []}
    for i in range(1, 37):
        colour, shape = COLOURS[i % 6], SHAPES[(i // 6) % 2]
        name = f"{i:012d}.jpg"
        draw(colour, shape, i).save(images / name, format="JPEG", quality=95)
        doc["images"].append({"id": i, "file_name": name, "width": 36, "height": 36})
        word = "circle" if shape == "ellipse" else "box"
        doc["annotations"].append({"id": 1000 + i, "image_id": i, "caption": f"a {colour} {word}"})
        doc["annotations"].append({"id": 2000 + i, "image_id": i, "caption": f"a {word} in {colour} no {i}"})
    ann = work / "coco" / "annotations" / "captions_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(doc))
    return {"root": images, "annotations": ann}


@pytest.fixture(scope="module")
def mini_imagenet(work) -> Path:
    """root/<wnid>/*.JPEG, 8 images in each of 3 classes (one colour per class)."""
    root = work / "imagenet"
    for wnid, colour in WNIDS.items():
        (root / wnid).mkdir(parents=True)
        for k in range(8):
            draw(colour, SHAPES[k % 2], k).save(root / wnid / f"img_{wnid[-3:]}_{k:02d}.JPEG", format="JPEG")
    return root


def compose_align(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS / "align"), version_base="1.3"):
        return compose(config_name="align", overrides=overrides)


def tiny(cfg, work: Path, out: str, **train):
    """Tiny random student and teacher, CPU, no progress bars, small steps; ``out`` under ``work``."""
    with open_dict(cfg):
        cfg.student.update(model="ViT-S-32", pretrained=None, image_size=None, model_kwargs=TINY_CLIP)
        cfg.teacher = {"family": "timm", "pretrained": False, "checkpoint": None, **TINY_DINO}
        cfg.train.update(
            {
                "steps": 6,
                "batch_size": 8,
                "num_workers": 0,
                "ckpt_every": 2,
                "log_every": 1,
                "heldout_every": 3,
            }
        )
        cfg.train.update(train)
        cfg.optim.update(lr=1e-3, warmup_steps=2)
        cfg.update(device="cpu", progress=False, cache_dir=str(work / "cache"), output_dir=str(work / out))
        cfg.eval.update(batch_size=16, knn_k=3, teacher_clusters=3, templates="simple")
    return cfg


# ------------------------------------------------------------------------------------------- presets
def test_presets_compose_and_name_the_models_of_the_issue():
    for preset, data, contrastive in (
        ("align_mscoco_clip_to_dinov2", "mscoco", "pairs"),
        ("align_imagenet_clip_to_dinov2", "imagenet", "prompts"),
    ):
        cfg = compose_align([f"experiment={preset}"])
        assert cfg.data.name == data and cfg.loss.contrastive == contrastive
        assert (cfg.student.family, cfg.student.model, cfg.student.tower) == (
            "open_clip",
            "ViT-B-32",
            "image",
        )
        assert cfg.student.pretrained, "the real presets ask for pretrained CLIP weights"
        assert cfg.teacher.model == "vit_base_patch14_dinov2.lvd142m" and cfg.teacher.pretrained is True
        assert cfg.kernel_student.name == cfg.kernel_teacher.name == "cosine"
        assert {k.split(".")[0] for k in OmegaConf.missing_keys(cfg)} <= {"data", "eval"}
    demo = compose_align(["experiment=align_tiny"])
    assert OmegaConf.missing_keys(demo) == set() and demo.student.pretrained is None


def test_pretrained_weights_missing_exit_2_with_one_line(work, mini_coco):
    """The real preset offline: one clean line naming the model and how to supply the weights; no results."""
    out = work / "cli_fail"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SPEC_TORCH_CACHE=str(work / "cli_cache")
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "experiment=align_mscoco_clip_to_dinov2",
            f"data.root={mini_coco['root']}",
            f"data.annotations={mini_coco['annotations']}",
            f"hydra.run.dir={out}",
            "progress=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "ViT-B-32" in errors[0] and "student.checkpoint=" in errors[0]  # an override that works
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()


def test_teacher_weights_missing_fail_fast_naming_the_model(work, mini_coco):
    """A usable student but the real DINOv2 teacher offline: SpecError naming the teacher, before training."""
    cfg = compose_align(
        [
            "experiment=align_mscoco_clip_to_dinov2",
            f"data.root={mini_coco['root']}",
            f"data.annotations={mini_coco['annotations']}",
            "heldout=8",
        ]
    )
    cfg = tiny(cfg, work, "teacher_fail")
    with open_dict(cfg):
        cfg.teacher = compose_align(["experiment=align_mscoco_clip_to_dinov2"]).teacher
    with pytest.raises(SpecError, match=r"teacher: .*vit_base_patch14_dinov2.*teacher\.checkpoint="):
        run(cfg)
    assert not (work / "teacher_fail" / "checkpoints").exists()


# -------------------------------------------------------------------------------------------- pairing
def test_teacher_rows_follow_sample_ids_under_shuffling(work, mini_coco):
    """A shuffled loader: the looked-up teacher rows are the teacher's features of the very images in the batch."""
    ds = build_dataset("mscoco", root=str(mini_coco["root"]), annotations=str(mini_coco["annotations"]))
    teacher_enc = build_encoder("timm", **TINY_DINO)
    teacher = TeacherFeatures(extract_features(ds, teacher_enc, work / "pair_cache", progress=False))
    positions = np.arange(3, len(ds))  # not starting at 0: positions != rows of the cache
    samples = AlignSamples(ds, positions, teacher_enc.preprocess, sample_texts(ds), seed=0)
    loaders = {
        "resumable sampler": torch.utils.data.DataLoader(
            samples, batch_sampler=ResumableBatchSampler(len(samples), 8, seed=5), collate_fn=collate_align
        ),
        "torch shuffle": torch.utils.data.DataLoader(
            samples,
            batch_size=8,
            shuffle=True,
            collate_fn=collate_align,
            generator=torch.Generator().manual_seed(1),
        ),
    }
    for name, loader in loaders.items():
        seen, misaligned = 0, 0
        for batch in loader:
            with torch.inference_mode():
                direct = teacher_enc(batch["images"])  # [B, dt] the teacher on the batch's own images
            looked_up = teacher.lookup(batch["ids"])
            torch.testing.assert_close(looked_up, direct, atol=FEATURE_ATOL, rtol=0, msg=name)
            assert batch["ids"] == [ds.sample_id(int(i)) for i in batch["index"]]
            # the bug this guards against: cache rows taken in loader order pair other samples
            k = len(batch["ids"])
            positional = torch.from_numpy(np.array(teacher.cache.features[seen : seen + k]))
            misaligned += int(not torch.allclose(positional, direct, atol=FEATURE_ATOL))
            seen += k
        assert seen >= 24 and misaligned > 0, name
    with pytest.raises(SpecError, match="no cached teacher features"):
        teacher.lookup(["coco:999"])


def test_sampler_replays_from_any_position_and_shards_partition_batches():
    full = ResumableBatchSampler(50, 8, seed=3)
    epoch0, epoch1 = list(full), None
    full.set_position(1, 0)
    epoch1 = list(full)
    assert len(epoch0) == 6 and epoch0 != epoch1  # a new permutation each epoch
    flat = [k for b in epoch0 for k, e in b]
    assert len(set(flat)) == 48 and {e for b in epoch0 for _, e in b} == {0}
    resumed = ResumableBatchSampler(50, 8, seed=3)
    resumed.set_position(0, 4)
    assert list(resumed) == epoch0[4:]
    shards = [ResumableBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for b, (b0, b1) in enumerate(zip(*shards)):
        assert sorted(b0 + b1) == sorted(epoch0[b])  # the two ranks' shares = the global batch
    with pytest.raises(SpecError, match="batch_size"):
        ResumableBatchSampler(10, 8, world_size=2)


def test_split_rows_is_deterministic_and_disjoint():
    train, held = split_rows(40, 0.25, seed=1)
    assert len(held) == 10 and len(train) == 30 and not set(train) & set(held)
    assert np.array_equal(held, split_rows(40, 10, seed=1)[1])
    with pytest.raises(SpecError, match="heldout"):
        split_rows(40, 39, seed=1)


# ------------------------------------------------------------------------------------- end to end
def test_coco_pipeline_end_to_end_and_exact_resume(work, mini_coco, mini_imagenet):
    """MS-COCO preset, tiny models: uninterrupted vs interrupted at step 5 and resumed from step 4."""
    overrides = [
        "experiment=align_mscoco_clip_to_dinov2",
        f"data.root={mini_coco['root']}",
        f"data.annotations={mini_coco['annotations']}",
        f"eval.imagenet_root={mini_imagenet}",
        "heldout=8",
    ]
    res_a = run(tiny(compose_align(overrides), work, "coco_a"))
    out_a, out_b = work / "coco_a", work / "coco_b"

    class Interrupt(Exception):
        pass

    def stop_at_5(trainer):
        if trainer.step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tiny(compose_align(overrides), work, "coco_b"), on_step=stop_at_5)
    assert not (out_b / "results.json").exists()
    assert torch.load(out_b / "checkpoints" / "last.pt", weights_only=False)["step"] == 4
    res_b = run(tiny(compose_align(overrides), work, "coco_b"))
    assert res_b["resumed"] and res_b["steps"] == res_a["steps"] == 6
    assert res_b["teacher_cache"] == res_a["teacher_cache"]  # teacher features extracted once, reused

    sd_a = torch.load(out_a / "student.pt", weights_only=True)
    sd_b = torch.load(out_b / "student.pt", weights_only=True)
    init = build_encoder("open_clip", model="ViT-S-32", model_kwargs=TINY_CLIP).model.state_dict()
    assert not torch.allclose(sd_a["visual.conv1.weight"], init["visual.conv1.weight"])  # it trained
    torch.testing.assert_close(sd_a["token_embedding.weight"], init["token_embedding.weight"], atol=0, rtol=0)
    for key in sd_a:
        torch.testing.assert_close(sd_b[key], sd_a[key], atol=RESUME_ATOL, rtol=0, msg=key)

    # results, logs and plot
    results = json.loads((out_a / "results.json").read_text())
    assert results["contrastive"] == "pairs" and results["n_heldout"] == 8 and results["n_train"] == 28
    for when in ("before", "after"):
        held, inet = results[when]["heldout"], results[when]["imagenet"]
        assert {"spec_diff", "knn_teacher_clusters", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"} <= set(held)
        assert {"zeroshot_top1", "knn_labels"} <= set(inet) and inet["n"] == 24
        assert held["spec_diff"] == pytest.approx(max(held["lambda_max"], -held["lambda_min"]))
    assert res_b["before"] == res_a["before"]  # the resumed run kept the untrained model's evaluation
    rows = (out_b / "logs" / "train.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]  # step 5 not logged twice
    assert any(r.split(",")[7] for r in rows[1:]), "held-out SPEC-diff logged"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out_b / "logs" / "tb"))
    tb.Reload()
    assert {"train/loss_clip", "train/loss_spec", "heldout/spec_diff"} <= set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars("train/loss_spec")] == [1, 2, 3, 4, 5, 6]  # as TensorBoard reads it
    assert (out_a / "plots" / "align_metrics.png").stat().st_size > 0
    assert results["report"] == "report.html"  # written before results.json (fails on main: no report)
    html = (out_a / "report.html").read_text()
    assert "Held-out SPEC-diff to the teacher" in html and "<h2>Settings</h2>" in html


def test_imagenet_preset_trains_with_class_prompts(work, mini_imagenet):
    cfg = compose_align(
        [
            "experiment=align_imagenet_clip_to_dinov2",
            f"data.root={mini_imagenet}",
            f"eval.imagenet_root={mini_imagenet}",
            "data.max_per_class=null",
            "heldout=6",
            "train.train_text=true",
        ]
    )
    res = run(tiny(cfg, work, "inet", steps=2, heldout_every=2))
    assert res["contrastive"] == "prompts" and res["steps"] == 2
    after = res["after"]
    assert {"zeroshot_top1", "knn_labels"} <= set(after["imagenet"]) and "knn_labels" in after["heldout"]
    sd = torch.load(work / "inet" / "student.pt", weights_only=True)
    init = build_encoder("open_clip", model="ViT-S-32", model_kwargs=TINY_CLIP).model.state_dict()
    assert not torch.equal(sd["token_embedding.weight"], init["token_embedding.weight"])  # text tower trained
    assert torch.equal(sd["logit_scale"], init["logit_scale"])


def test_resume_refuses_other_settings_and_unrequested_overwrite(work, mini_imagenet, caplog):
    base = [f"data.root={mini_imagenet}", "experiment=align_imagenet_clip_to_dinov2", "heldout=6"]
    base += [f"eval.imagenet_root={mini_imagenet}", "data.max_per_class=null"]
    run(tiny(compose_align(base), work, "refuse", steps=2))
    with pytest.raises(SpecError, match="batch_size"):
        run(tiny(compose_align(base), work, "refuse", steps=2, batch_size=6))
    with pytest.raises(SpecError, match="resume is off"):
        run(tiny(compose_align([*base, "train.resume=false"]), work, "refuse", steps=2))
    with pytest.raises(SpecError, match="no such checkpoint"):
        run(tiny(compose_align([*base, f"train.resume={work / 'none.pt'}"]), work, "refuse2", steps=2))
    # settings that change the run's meaning are refused, unless forced (and then logged loudly)
    with pytest.raises(SpecError, match=r"other settings that change .*loss: .*eta.*resume_force=true"):
        run(tiny(compose_align([*base, "loss.eta=3"]), work, "refuse", steps=2))
    with pytest.raises(SpecError, match=r"lr: 0.001 -> 0.002"):
        run(_lr(base, work))
    with caplog.at_level(logging.WARNING, logger="spec_torch.apps.align.train"):
        res = run(
            tiny(compose_align([*base, "loss.eta=3", "train.resume_force=true"]), work, "refuse", steps=2)
        )
    assert res["resumed"] and "RESUMING from" in caplog.text and "FORCED" in caplog.text
    assert "0 steps to train" in caplog.text
    # before/after are computed under this run's settings (eta=3), never the checkpoint's
    saved = json.loads((work / "refuse" / "eval_before.json").read_text())
    assert saved["run_settings"]["loss"]["eta"] == 3


def _lr(base, work):
    cfg = tiny(compose_align(base), work, "refuse", steps=2)
    with open_dict(cfg):
        cfg.optim.lr = 2e-3
    return cfg


def test_resume_refuses_a_checkpoint_that_runs_code(work, tmp_path):
    """A crafted ``train.resume=<file>`` whose unpickling would call a function is refused, not run."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "evil.pt"
    torch.save({"step": 1, "model": Payload()}, crafted)
    trainer = AlignTrainer.__new__(AlignTrainer)  # only resume() is exercised
    trainer.ckpt_path, trainer.rt = tmp_path / "last.pt", Runtime.detect("cpu")
    with pytest.raises(SpecError, match=r"train.resume: refused the checkpoint .*evil.pt.*could run code"):
        trainer.resume(crafted)
    assert not marker.exists()


def _results(before_sd=0.5, after_sd=0.1):
    def metrics(sd, ev, acc, stab):
        return {
            "n": 64.0, "spec_diff": sd, "lambda_max": sd, "lambda_min": -0.5 * sd, "mode_eigenvalue": ev,
            "mode_heldout_eigenvalue": 0.9 * ev, "mode_stability": stab, "knn_teacher_clusters": acc,
            "knn_teacher_clusters_teacher": 1.0, "knn_labels": acc,
        }  # fmt: skip

    return {
        "before": {"heldout": metrics(before_sd, -before_sd, 0.6, 0.95)},
        "after": {"heldout": metrics(after_sd, -after_sd, 0.9, 0.2)},
        "steps": 30,
        "resumed": False,
        "n_train": 160,
        "n_heldout": 64,
        "contrastive": "prompts",
        "teacher": {"family": "offline_colour"},
        "teacher_cache": "/cache/x",
        "config": {
            "student": {"family": "open_clip", "model": "ViT-S-32"},
            "teacher": {"family": "offline_colour"},
            "loss": {"eta": 1.0, "norm": "op"},
            "seed": 0,
            "heldout": 64,
        },
    }


def test_plot_puts_mode_magnitudes_under_lower_is_better():
    """The before/after panels (fails on main: the signed mode_eigenvalue and mode_heldout_eigenvalue sat under
    "higher is better"): SPEC-diff and the |eigenvalue| of the loss's strongest mode, in sample and held out,
    under "lower is better", stability on a panel of its own with no better direction, accuracies higher."""
    from spec_torch.apps.align.evaluate import metric_label, metric_panels, metric_value

    res = _results()
    panels = {title: keys for _, title, keys in metric_panels(res["before"], res["after"])}
    assert panels["lower is better"] == ["spec_diff", "mode_eigenvalue", "mode_heldout_eigenvalue"]
    assert panels["higher is better"] == ["knn_teacher_clusters", "knn_labels"]
    assert panels["no better direction"] == ["mode_stability"]
    assert (
        metric_label("mode_eigenvalue") == "|mode_eigenvalue|"
        and metric_value("mode_eigenvalue", -0.3) == 0.3
    )
    assert metric_label("spec_diff") == "spec_diff"


def test_align_report_renders_the_results(tmp_path):
    """report.html from results.json (fails on main: align wrote no HTML): the finding, the metrics with
    their better direction and whether they moved that way, |eigenvalue| lower-is-better, the loss's mode before
    and after, the settings; tables scroll in their wrappers."""
    from spec_torch.apps.align.evaluate import plot_before_after
    from spec_torch.apps.report.align_html import write_align_report

    res = _results()
    history = {"step": [1, 2], "loss_spec": [0.5, 0.4], "loss_clip": [1.0, 0.9], "heldout_step": [0, 2]}
    history["heldout_spec_diff"] = [0.5, 0.1]
    plot = plot_before_after(res["before"], res["after"], tmp_path / "plots" / "align_metrics.png", history)
    html = write_align_report(tmp_path, res, plot).read_text()
    assert "Held-out SPEC-diff to the teacher: 0.5000 before, 0.1000 after 30 steps (5.00x lower" in html
    assert '<td>|mode_eigenvalue|</td><td>lower is better</td><td class="num">0.5</td>' in html
    assert "<td>|mode_heldout_eigenvalue|</td><td>lower is better</td>" in html
    assert "<td>mode_stability</td><td>no better direction</td>" in html
    assert html.count("<td>better</td>") == 5 and "<td>worse</td>" not in html
    assert "Stability has no better direction" in html and "ViT-S-32" in html
    assert '<div class="wide"><table>' in html and "overflow-x:auto" in html
    worse = write_align_report(tmp_path / "w", _results(0.1, 0.2), plot).read_text()
    assert "2.00x higher: the student moved away from the teacher" in worse


def test_demo_lowers_heldout_spec_diff(work):
    """align_tiny, shortened: the student takes on the colour teacher's clusters on held-out images."""
    cfg = compose_align(["experiment=align_tiny", "data.n=224", "heldout=64"])
    with open_dict(cfg):
        cfg.update(progress=False, cache_dir=str(work / "cache"), output_dir=str(work / "demo"))
        cfg.train.update(steps=30, batch_size=32, ckpt_every=30, heldout_every=30)
    res = run(cfg)
    before, after = res["before"]["heldout"], res["after"]["heldout"]
    assert after["spec_diff"] < 0.5 * before["spec_diff"], (before, after)
    assert after["knn_labels"] >= before["knn_labels"]


# ------------------------------------------------------------------------------------- loss and metrics
def test_prompt_loss_equals_clip_loss_for_distinct_texts_and_handles_shared_prompts():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    ours = prompt_contrastive_loss(img, txt, torch.arange(6), scale)
    torch.testing.assert_close(ours, ClipLoss()(img, txt, scale), atol=LOSS_ATOL, rtol=0)
    # images 0, 1 share prompt 0: oracle = CE(i2t) + soft CE(t2i) written out in numpy
    owner = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = (scale * img @ txt[:3].T).double().numpy()  # [6, 3]
    i2t = -np.mean([logits[i, o] - np.log(np.exp(logits[i]).sum()) for i, o in enumerate(owner.tolist())])
    t2i = 0.0
    for u in range(3):
        members = np.flatnonzero(owner.numpy() == u)
        logp = logits[:, u] - np.log(np.exp(logits[:, u]).sum())
        t2i -= logp[members].mean() / 3
    got = prompt_contrastive_loss(img, txt[:3], owner, scale)
    assert float(got) == pytest.approx((i2t + t2i) / 2, abs=1e-5)


def test_knn_and_retrieval_against_brute_force():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 5))
    labels = rng.integers(0, 3, 30)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = zn @ zn.T
    np.fill_diagonal(sim, -np.inf)
    want = []
    for i in range(30):
        nn = np.argsort(-sim[i])[:5]
        counts = np.bincount(labels[nn], minlength=3)
        best = np.flatnonzero(counts == counts.max())
        want.append(labels[nn[np.isin(labels[nn], best)][0]] == labels[i])  # tie: the nearest's class
    assert knn_accuracy(torch.from_numpy(z), labels.tolist(), k=5) == pytest.approx(np.mean(want))

    images, texts = rng.normal(size=(10, 4)), rng.normal(size=(20, 4))
    owner = np.repeat(np.arange(10), 2)
    s = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ (
        texts / np.linalg.norm(texts, axis=1, keepdims=True)
    ).T
    got = retrieval_recall(torch.from_numpy(images), torch.from_numpy(texts), owner.tolist(), ks=(1, 5))
    for k in (1, 5):
        i2t = np.mean([np.isin(np.argsort(-s[i])[:k], np.flatnonzero(owner == i)).any() for i in range(10)])
        t2i = np.mean([owner[j] in np.argsort(-s[:, j])[:k] for j in range(20)])
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t) and got[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_warmup_cosine_schedule():
    assert [warmup_cosine(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)  # half way through the decay
    assert warmup_cosine(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)


def test_nan_features_raise_before_the_optimizer_steps(work, mini_imagenet):
    """A student that outputs NaN: SpecError, and the weights are untouched."""
    cfg = compose_align(
        [
            "experiment=align_imagenet_clip_to_dinov2",
            f"data.root={mini_imagenet}",
            "data.max_per_class=null",
            "eval.imagenet_root=null",
            "heldout=6",
        ]
    )
    cfg = tiny(cfg, work, "nan", steps=3)
    seen = {}

    def poison(trainer):  # after step 1: the next forward produces NaN image embeddings
        if trainer.step == 1:
            with torch.no_grad():
                trainer.model.visual.proj.fill_(float("nan"))
            seen["trainer"] = trainer
            seen["weights"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    with pytest.raises(SpecError, match="NaN"):
        run(cfg, on_step=poison)
    trainer = seen["trainer"]
    assert trainer.step == 1
    assert all(int(st["step"]) == 1 for st in trainer.optimizer.state.values())  # no second step
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, seen["weights"][key], atol=0, rtol=0, equal_nan=True, msg=key)


@pytest.mark.gpu
def test_cuda_amp_pipeline_and_resume(work, mini_coco):
    """On CUDA with autocast: finite metrics, and a resumed run close to the uninterrupted one."""
    overrides = [
        "experiment=align_mscoco_clip_to_dinov2",
        f"data.root={mini_coco['root']}",
        f"data.annotations={mini_coco['annotations']}",
        "heldout=8",
    ]

    def cuda_cfg(out):
        cfg = tiny(compose_align(overrides), work, out)
        with open_dict(cfg):
            cfg.update(device="cuda")
            cfg.train.amp = True
        return cfg

    res_a = run(cuda_cfg("cuda_a"))
    assert all(np.isfinite(v) for v in res_a["after"]["heldout"].values())

    class Interrupt(Exception):
        pass

    def stop_at_3(trainer):
        if trainer.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(cuda_cfg("cuda_b"), on_step=stop_at_3)
    run(cuda_cfg("cuda_b"))
    sd_a = torch.load(work / "cuda_a" / "student.pt", weights_only=True)
    sd_b = torch.load(work / "cuda_b" / "student.pt", weights_only=True)
    for key in sd_a:  # CUDA kernels may reduce in another order between runs: a looser tolerance
        torch.testing.assert_close(sd_b[key], sd_a[key], atol=CUDA_RESUME_ATOL, rtol=0, msg=key)
