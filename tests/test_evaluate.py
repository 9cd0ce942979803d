"""`ladd evaluate`: every figure is a mean over sampling seeds with its spread; seeds change the samples,
never the schema; the champion gate reads the mean; the side-by-side grid names its rows."""

import json

import numpy as np
import pytest
from PIL import Image

from ladd.config import EvaluateConfig
from ladd.errors import ConfigError
from ladd.evaluate import evaluate
from ladd.tracking import NullTracker


def _keys(tree, prefix=""):
    if isinstance(tree, dict):
        return {k for key, v in tree.items() for k in _keys(v, f"{prefix}{key}/")} | {prefix}
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        return _keys(tree[0], f"{prefix}[]/")
    return {prefix}


def test_seeds_change_the_samples_not_the_schema(
    prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    def run(seeds, name):
        cfg = EvaluateConfig(
            out_dir=str(tmp_path / name),
            teacher_steps=3,
            few_steps=(1, 2),
            num_samples=16,
            grid_size=8,
            device="cpu",
            seeds=seeds,
            register=False,
        )
        return evaluate(cfg, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, NullTracker())

    a, b = run((1, 2, 3), "a"), run((4, 5, 6), "b")
    assert _keys(a) == _keys(b) and a["seeds"] == [1, 2, 3]
    for m in (a, b):
        for row in (m["teacher"], m["student"]["1"], m["student"]["2"], m["real_floor"]):
            fds = [r["fd"] for r in row["per_seed"]]
            assert len(fds) == 3 and len(set(fds)) == 3  # each seed draws its own noise
            assert row["fd"] == pytest.approx(np.mean(fds)) and row["fd_std"] == pytest.approx(np.std(fds, ddof=1))
    assert a["student"]["2"]["fd"] != b["student"]["2"]["fd"]
    # one seed set reproduces itself exactly
    assert run((1, 2, 3), "again")["student"]["2"]["fd"] == a["student"]["2"]["fd"]
    # the plots file carries the floor and the spread; the side-by-side grid has a label margin
    rows = json.loads((tmp_path / "a" / "quality_vs_nfe.json").read_text())["rows"]
    assert [r["model"] for r in rows[:2]] == ["real_floor", "teacher"] and all("fd_std" in r for r in rows)
    # every row is also scored against the many-step teacher's samples: of the next seed (the teacher's own row is
    # that figure's floor) and, for the few-step rows, of the same noise
    assert all("fd_teacher_std" in r for r in rows if r["model"] != "real_floor")
    assert a["teacher"]["fd_teacher"] > 0 and "fd_teacher_same_noise" not in a["teacher"]
    # no evaluate.reference_guidance: no reference row, no fd_reference anywhere
    assert "reference" not in a and not any("fd_reference" in k for k in _keys(a))
    assert len({r["fd_teacher"] for r in a["student"]["2"]["per_seed"]}) == 3
    assert {"fd_teacher_same_noise", "fd_teacher_same_noise_std"} <= set(a["teacher_naive"]["1"])
    plain = Image.open(tmp_path / "a" / "grids" / "student_1.png")
    labelled = Image.open(tmp_path / "a" / "grids" / "teacher_vs_student.png")
    assert plain.size == (10 * 34 * 3, 34 * 3)  # 8 images in a row of 10, 32 px + 2 px border, scale 3
    # a label margin on the left; teacher + 2 student rows, and the prompts under the columns
    assert labelled.width >= 8 * 34 * 3 + 100 and labelled.height > 3 * 34 * 3 + 15
    # the student's model card now carries the evaluation table of the last run (seeds 1, 2, 3 again)
    card = (tiny_student_dir / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "Not evaluated yet" not in card
    assert f"| **student** | 2 | 0 | {a['student']['2']['fd']:.1f} ± {a['student']['2']['fd_std']:.1f} |" in card


def test_seeds_must_be_distinct():
    with pytest.raises(ConfigError, match="evaluate.seeds"):
        EvaluateConfig(seeds=(1, 1, 2))
    with pytest.raises(ConfigError, match="evaluate.seeds"):
        EvaluateConfig(seeds=())


def test_memory_is_a_batchs_prompts_at_a_time_and_the_figures_do_not_depend_on_it(
    prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch
):
    """Memory grows with evaluate.batch_size, not with the number of prompts: no more than a batch of prompts is
    encoded at once (nor its noise drawn); batches of 4 score what one batch of 12 scores (the text encoder's sums
    aside: its batches differ), the renoise student and a grid spanning batches included."""
    import ladd.scoring as ev  # where the table encodes and draws

    sizes = {"encode": [], "noise": []}
    real_encode, real_noise = ev.encode_prompts, ev.record_noise

    def encode_prompts(pipe, prompts, *args):
        sizes["encode"].append(len(prompts))
        return real_encode(pipe, prompts, *args)

    def record_noise(seeds, shape):
        sizes["noise"].append(len(seeds))
        return real_noise(seeds, shape)

    monkeypatch.setattr(ev, "encode_prompts", encode_prompts)
    monkeypatch.setattr(ev, "record_noise", record_noise)

    def run(batch_size):
        cfg = EvaluateConfig(
            out_dir=str(tmp_path / str(batch_size)),
            teacher_steps=2,
            few_steps=(1,),
            num_samples=12,
            batch_size=batch_size,
            grid_size=6,
            device="cpu",
            seeds=(1, 2),
            register=False,
        )
        return evaluate(cfg, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, NullTracker())

    batched = run(4)
    assert max(sizes["encode"]) == max(sizes["noise"]) == 4
    assert len(sizes["noise"]) == 3 * 2 * 3  # batches x seeds x rows (teacher, naive teacher, student)
    whole = run(12)
    for a, b in (
        (batched["teacher"], whole["teacher"]),
        (batched["student"]["1"], whole["student"]["1"]),
        (batched["teacher_naive"]["1"], whole["teacher_naive"]["1"]),
    ):
        assert a["accuracy"] == b["accuracy"]
        for key in ("fd", "fd_teacher", "precision", "recall"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name in ("student_1.png", "teacher_vs_student.png"):
        grids = [np.asarray(Image.open(tmp_path / str(bs) / "grids" / name)).astype(int) for bs in (4, 12)]
        assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1


def _teacher_features(pipe_dir, classifier_dir, prompts, seed, steps, guidance):
    """The many-step teacher's sample features, computed here from the library's primitives: record i of seed s
    from noise s * 1_000_003 + i, Euler on the flow sigmas with CFG, decoded, embedded by the classifier."""
    from ladd.generate import generate_latents, record_noise
    from ladd.pipeline import decode_latents, encode_prompts, latent_shape, load_pipeline, max_sequence_length
    from ladd.quality import FEATURE_EXTRACTORS, embed
    from ladd.sampling import flow_sigmas

    pipe, msl = load_pipeline(pipe_dir), max_sequence_length(pipe_dir)
    embeds, pooled = encode_prompts(pipe, prompts, msl)
    null_e, null_p = encode_prompts(pipe, [""], msl)
    noise = record_noise([seed * 1_000_003 + i for i in range(len(prompts))], latent_shape(pipe))
    lat = generate_latents(
        pipe.transformer,
        embeds,
        pooled,
        noise,
        flow_sigmas(steps, pipe.scheduler.config.shift),
        guidance,
        null_e,
        null_p,
    )
    extractor = FEATURE_EXTRACTORS["classifier"](classifier_dir, "evaluate.features")
    return embed(extractor, decode_latents(pipe.vae, lat))[0].numpy()


def test_fid_t_is_against_the_teacher_distilled_from_and_the_reference_is_its_own_figure(
    prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """On the val split: fd_teacher is FD against the samples of the teacher the student learnt from (the tiny
    synthetic data's CFG 2, 3 steps, read from the student), recomputed here; with reference_guidance set, the
    teacher at that CFG is its own row and fd_reference its own figure; the model card names both."""
    from ladd.data.prepare import load_split
    from ladd.gate import prompts_fingerprint
    from ladd.io import fingerprint
    from ladd.metrics import frechet_distance
    from ladd.pipeline import read_meta

    assert read_meta(tiny_student_dir)["distillation_teacher"] == {"guidance": 2.0, "steps": 3}
    cfg = EvaluateConfig(
        out_dir=str(tmp_path / "val"),
        split="val",
        reference_guidance=1.5,
        few_steps=(1,),
        num_samples=12,
        grid_size=4,
        device="cpu",
        seeds=(1, 2),
        register=False,
    )
    m = evaluate(cfg, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, NullTracker())
    val = list(load_split(prepared_data / "val").captions["prompt"][:12])
    assert m["split"] == "val" and m["protocol"]["split"] == "val"
    assert m["protocol"]["prompts"] == prompts_fingerprint(val)
    assert m["protocol"]["real_images"] == fingerprint(prepared_data / "val" / "images.safetensors")
    assert (m["teacher"]["steps"], m["teacher"]["guidance"], m["reference"]["guidance"]) == (3, 2.0, 1.5)
    t1, t2 = (_teacher_features(tiny_teacher_dir, tiny_classifier_dir, val, seed, 3, 2.0) for seed in (1, 2))
    r1, r2 = (_teacher_features(tiny_teacher_dir, tiny_classifier_dir, val, seed, 3, 1.5) for seed in (1, 2))
    teacher_seed1 = m["teacher"]["per_seed"][0]
    assert teacher_seed1["fd_teacher"] == pytest.approx(frechet_distance(t2, t1), rel=1e-4)  # its own floor
    assert teacher_seed1["fd_reference"] == pytest.approx(frechet_distance(r2, t1), rel=1e-4)
    assert teacher_seed1["fd_reference_same_noise"] == pytest.approx(frechet_distance(r1, t1), rel=1e-4)
    assert m["reference"]["per_seed"][0]["fd_reference"] == pytest.approx(frechet_distance(r2, r1), rel=1e-4)
    student = m["student"]["1"]
    assert {"fd_teacher", "fd_teacher_same_noise", "fd_reference", "fd_reference_same_noise"} <= set(student)
    assert student["fd_teacher"] != student["fd_reference"]
    card = (tiny_student_dir / "README.md").read_text()
    assert "| reference teacher | 3 | 1.5 |" in card and "| teacher (distilled from) | 3 | 2 |" in card
    assert "FID-T" in card and "FD vs reference" in card and "the val split" in card
    with pytest.raises(ConfigError, match="evaluate.gate_metric: fd_reference .* evaluate.reference_guidance"):
        EvaluateConfig(gate_metric="fd_reference")
