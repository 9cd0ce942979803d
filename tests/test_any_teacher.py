"""Any SD3-family teacher at any resolution and aspect ratio: feature maps follow the input, resolution
buckets through synthesize and distill, an SD3.5-shaped teacher (T5, QK RMSNorm, dual attention) through
the whole chain, the memory settings, and clear errors for folders and sizes a teacher cannot take."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file
from sd3_family import T5_MAX_LENGTH, VAE_SCALE, VAE_SHIFT, build_sd35_like_teacher, build_tiny_clip

from ladd.config import (
    STUDENT_SCHEDULE_NAMES,
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    PrepareConfig,
    SynthesizeConfig,
    TeacherConfig,
)
from ladd.data.prepare import prepare
from ladd.data.synthetic import load_synthetic
from ladd.discriminator import Discriminator
from ladd.distill import distill
from ladd.errors import ConfigError, TeacherError
from ladd.export import export_stage
from ladd.generate import generate_latents, record_noise
from ladd.pipeline import encode_prompts, load_pipeline, max_sequence_length, read_meta
from ladd.sampling import flow_sigmas
from ladd.schedules import STUDENT_SCHEDULES, check_student_times
from ladd.synthesize import synthesize
from ladd.teacher import teacher_stage
from ladd.tracking import NullTracker

DISTILL = dict(steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2, log_every=1, device="cpu")


def _transformer(sample_size=16, max_size=16, layers=3):
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=max_size,
    ).eval()


def _inputs(h, w, batch=2):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, h, w, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, 5, 16, generator=g),
        torch.randn(batch, 16, generator=g),
    )


@pytest.mark.parametrize("size,grid", [((8, 8), (4, 4)), ((8, 16), (4, 8)), ((16, 8), (8, 4))])
def test_feature_maps_take_their_grid_from_the_input(size, grid):
    """sample_size 16 fed smaller and non-square latents: each map is (H/p) x (W/p), row-major as the tokens."""
    teacher = _transformer().requires_grad_(False)
    disc = Discriminator(teacher, [0, 1], channels=8)
    x, t, c, p = _inputs(*size)
    seen = {}
    handle = teacher.transformer_blocks[1].register_forward_hook(lambda m, i, o: seen.update(tokens=o[1]))
    maps = disc.features(x, t, c, p)
    handle.remove()
    assert [tuple(m.shape[-2:]) for m in maps] == [grid, grid]
    tokens = seen["tokens"]  # [B, N, D], row-major over the grid
    assert torch.equal(maps[1][:, :, 1, 2], tokens[:, 1 * grid[1] + 2])
    assert all(torch.isfinite(logits).all() for logits in disc(x, t, c, p))


def test_sizes_a_teacher_cannot_take_fail_clearly():
    disc = Discriminator(_transformer(max_size=8).requires_grad_(False), [0], channels=8)
    with pytest.raises(ValueError, match="not divisible by the transformer's patch size 2"):
        disc.features(*_inputs(8, 9))
    with pytest.raises(ValueError, match="pos_embed_max_size is 8"):
        disc.features(*_inputs(8, 18))


def test_hooks_survive_gradient_checkpointing_and_truncation():
    """Recomputation fires the hooks again in backward: features, logits and the input gradient (the student's
    adversarial signal) stay the same with checkpointing, and with or without the skipped top blocks."""
    results = []
    for checkpointing, truncate in ((False, False), (True, True), (True, False), (False, True)):
        teacher = _transformer().requires_grad_(False)
        if checkpointing:
            teacher.enable_gradient_checkpointing()
        torch.manual_seed(0)
        disc = Discriminator(teacher, [0, 1], channels=8, truncate=truncate)
        x, t, c, p = _inputs(8, 16)
        x.requires_grad_(True)
        loss = sum(logits.square().mean() for logits in disc(x, t, c, p))
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-7)
    assert results[0][1].abs().sum() > 0


@pytest.fixture(scope="module")
def bucketed_synthetic(tiny_teacher_dir, prepared_data, tmp_path_factory):
    """The embedded teacher (native 32x32 px, at most 32 px a side) on two non-square buckets, 2:1 weighted."""
    cfg = SynthesizeConfig(
        out_dir=str(tmp_path_factory.mktemp("buckets") / "synthetic"),
        steps=2,
        samples_per_prompt=1,
        shard_size=400,
        batch_size=512,
        resolutions=((16, 32), (32, 16)),
        resolution_weights=(2.0, 1.0),
        device="cpu",
    )
    summary = synthesize(cfg, prepared_data, tiny_teacher_dir, NullTracker())
    return cfg, summary


def test_buckets_synthesize_resume_and_distill(bucketed_synthetic, tiny_teacher_dir, prepared_data, tmp_path):
    cfg, summary = bucketed_synthetic
    out = Path(cfg.out_dir)
    data = load_synthetic(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [b["latent_shape"] for b in manifest["buckets"]] == [[4, 4, 8], [4, 8, 4]]
    assert [tuple(b.latents.shape[1:]) for b in data.buckets] == [(4, 4, 8), (4, 8, 4)]
    assert [tuple(b.trajectory.shape[1:3]) for b in data.buckets] == [(3, 4), (3, 4)]
    shares = [len(b.records) / len(data.records) for b in data.buckets]
    assert abs(shares[0] - 2 / 3) < 0.05, shares
    # every shard holds one bucket; records know theirs
    for name, b in zip(manifest["shard_files"], manifest["shard_buckets"]):
        shard = load_file(out / name)
        assert tuple(shard["latents"].shape[2:]) == tuple(manifest["buckets"][b]["latent_shape"][1:])
        assert (data.records["bucket"].to_numpy()[shard["record"].numpy()] == b).all()
    with pytest.raises(ValueError, match="2 resolution buckets"):
        _ = data.latents
    # resume: a lost shard is the only one generated again, bit-identical
    before = {p.name: load_file(p) for p in out.glob("shard-*.safetensors")}
    manifest_bytes = (out / "manifest.json").read_bytes()
    (out / manifest["shard_files"][-1]).unlink()
    again = synthesize(cfg, prepared_data, tiny_teacher_dir, NullTracker())
    assert again["generated_shards"] == 1
    assert (out / "manifest.json").read_bytes() == manifest_bytes  # content, not bookkeeping
    for name, tensors in before.items():
        assert all(torch.equal(tensors[k], v) for k, v in load_file(out / name).items())
    # distill draws each batch from one bucket; the student pipeline samples non-square sizes
    dcfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck.safetensors"),
        report_dir=str(tmp_path),
        **DISTILL,
    )
    result = distill(dcfg, tiny_teacher_dir, out, NullTracker())
    assert result["steps"] == 4 and result["skipped_updates"] == 0
    student = StableDiffusion3Pipeline.from_pretrained(tmp_path / "student", text_encoder_3=None, tokenizer_3=None)
    image = student(
        "handwritten six",
        height=16,
        width=32,
        num_inference_steps=1,
        guidance_scale=0.0,
        max_sequence_length=max_sequence_length(tmp_path / "student"),
        output_type="np",
    ).images
    assert image.shape == (1, 16, 32, 1) and (image >= 0).all()


def test_buckets_that_do_not_fit_the_teacher_fail_before_any_work(tiny_teacher_dir, prepared_data, tmp_path):
    out = tmp_path / "synthetic"
    for sizes, match in (
        (((32, 32), (20, 32)), r"synthesize.resolutions\[1\]: 20x32 is not divisible by 8"),
        (((64, 32),), r"synthesize.resolutions\[0\]: 64x32 needs 8x4 patches; .*pos_embed_max_size is 4"),
    ):
        with pytest.raises(ConfigError, match=match):
            synthesize(
                SynthesizeConfig(out_dir=str(out), resolutions=sizes, device="cpu"),
                prepared_data,
                tiny_teacher_dir,
                NullTracker(),
            )
        assert not out.exists()
    with pytest.raises(ConfigError, match=r"synthesize.resolutions\[0\] must be \[height, width\]"):
        SynthesizeConfig(resolutions=((32,),))
    with pytest.raises(ConfigError, match="synthesize.resolution_weights must be 2 positive numbers"):
        SynthesizeConfig(resolutions=((32, 32), (16, 32)), resolution_weights=(1.0,))


def test_folders_that_are_not_sd3_pipelines_fail_with_one_line(tiny_teacher_dir, tmp_path):
    unet = tmp_path / "unet"
    shutil.copytree(tiny_teacher_dir, unet)
    index = json.loads((unet / "model_index.json").read_text())
    (unet / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    no_transformer = tmp_path / "no_transformer"
    shutil.copytree(tiny_teacher_dir, no_transformer)
    shutil.rmtree(no_transformer / "transformer")
    for folder, match in (
        (unet, "holds a StableDiffusionPipeline, not an SD3-family pipeline"),
        (no_transformer, "missing transformer/"),
        (tmp_path, "model_index.json is missing"),
    ):
        with pytest.raises(TeacherError, match=match) as err:
            teacher_stage(
                TeacherConfig(pretrained=str(folder), out_dir=str(tmp_path / "teacher")), tmp_path, "cpu", NullTracker()
            )
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "teacher").exists()


@pytest.fixture(scope="module")
def sd35_chain(tmp_path_factory):
    """An SD3.5-medium-shaped teacher (T5, QK RMSNorm, dual attention; 64 px native) from a prompts table,
    through teacher (as `pretrained`) -> synthesize on two non-square buckets -> distill (memory settings on)."""
    root = tmp_path_factory.mktemp("sd35")
    source = build_sd35_like_teacher(root / "hub_copy")
    prompts = root / "prompts.csv"
    pd.DataFrame({"prompt": [f"a drawing of the digit {w}" for w in ("zero", "one", "two", "three")] * 10}).to_csv(
        prompts
    )
    data = root / "data"
    prepare(PrepareConfig(source="prompts", captions=str(prompts), out_dir=str(data)))
    teacher = teacher_stage(
        TeacherConfig(pretrained=str(source), out_dir=str(root / "teacher"), max_sequence_length=T5_MAX_LENGTH),
        data,
        "cpu",
        NullTracker(),
    )
    syn = SynthesizeConfig(
        out_dir=str(root / "synthetic"),
        steps=3,
        samples_per_prompt=1,
        guidance=2.0,
        resolutions=((64, 128), (128, 64)),
        trajectory_times=(0.5, 0.25),
        device="cpu",
    )
    synthesize(syn, data, teacher, NullTracker())
    cfg = DistillConfig(
        out_dir=str(root / "student"),
        checkpoint=str(root / "ck.safetensors"),
        report_dir=str(root),
        **DISTILL,
        student_times=(1.0, 0.5, 0.25),
        schedule="exponential",
        probs=(0.5, 0.25, 0.25),
        warmup_probs=(0.0, 0.5, 0.5),
        gradient_checkpointing="all",
        ema_on_cpu=True,
    )
    summary = distill(cfg, teacher, syn.out_dir, NullTracker())
    return root, teacher, syn, summary


def test_sd35_shaped_teacher_settings_come_from_its_folder(sd35_chain):
    root, teacher, syn, summary = sd35_chain
    assert read_meta(teacher)["max_sequence_length"] == T5_MAX_LENGTH == max_sequence_length(root / "student")
    pipe = load_pipeline(teacher)
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (VAE_SHIFT, VAE_SCALE)
    data = load_synthetic(syn.out_dir)
    assert [tuple(b.latents.shape[1:]) for b in data.buckets] == [(16, 8, 16), (16, 16, 8)]
    # record 0's latent is the teacher's own CFG Euler solve with its scheduler's shift (3.0) and T5 length
    bucket = data.buckets[0]
    i = int(bucket.records[0])
    e, p = encode_prompts(pipe, [data.records["prompt"][i]], T5_MAX_LENGTH)
    ne, np_ = encode_prompts(pipe, [""], T5_MAX_LENGTH)
    x = generate_latents(
        pipe.transformer,
        e,
        p,
        record_noise([int(data.records["seed"][i])], (16, 8, 16)),
        flow_sigmas(syn.steps, 3.0),
        syn.guidance,
        ne,
        np_,
    )
    torch.testing.assert_close(x[0], bucket.latents[0], rtol=0, atol=1e-5)
    assert summary["skipped_updates"] == 0


def test_a_two_bucket_student_is_evaluated_at_each_bucket(sd35_chain):
    """Distilled on 64x128 and 128x64 only: evaluate samples at both (never at the teacher's square 64x64), keeps
    each bucket's rows, and its headline is their share-weighted mean; the protocol records both. Prompts only,
    features auto: the CLIP folder given."""
    import numpy as np

    from ladd.evaluate import evaluate

    root, teacher, syn, summary = sd35_chain
    meta = read_meta(root / "student")
    assert [b["resolution"] for b in meta["buckets"]] == [[64, 128], [128, 64]]
    shares = [b["share"] for b in meta["buckets"]]
    assert sum(shares) == pytest.approx(1.0)
    clip = build_tiny_clip(root / "clip", words=["a", "drawing", "of", "the", "digit", "zero", "one", "two", "three"])
    cfg = EvaluateConfig(
        out_dir=str(root / "eval"),
        clip_path=str(clip),
        few_steps=(1,),
        seeds=(1, 2),
        grid_size=2,
        device="cpu",
        register=False,
    )
    m = evaluate(cfg, root / "data", None, teacher, root / "student", NullTracker())
    assert m["features"] == "clip" and m["protocol"]["resolutions"] == [[64, 128], [128, 64]]
    assert m["protocol"]["resolution_shares"] == shares and "resolution" not in m["protocol"]
    for row in (m["teacher"], m["student"]["1"]):
        assert set(row["buckets"]) == {"64x128", "128x64"}
        for key in ("fd_teacher", "clip_score"):
            mixed = sum(w * row["buckets"][b][key] for w, b in zip(shares, ("64x128", "128x64")))
            assert row[key] == pytest.approx(mixed) and np.isfinite(row[key])
    assert m["student"]["1"]["buckets"]["64x128"]["fd_teacher"] != m["student"]["1"]["buckets"]["128x64"]["fd_teacher"]
    assert "64x128 (" in (root / "student" / "README.md").read_text()


def test_sd35_shaped_student_runs_in_stock_diffusers_and_exports(sd35_chain):
    root, teacher, syn, summary = sd35_chain
    student = StableDiffusion3Pipeline.from_pretrained(root / "student")  # T5 included: no extra arguments
    assert type(student.text_encoder_3).__name__ == "T5EncoderModel"
    student.scheduler.set_timesteps(3)  # the exponential schedule's 3 steps are the training times
    assert student.scheduler.timesteps.tolist() == pytest.approx([1000.0, 500.0, 250.0], abs=1e-3)
    assert student.transformer.dtype == torch.float32
    for steps in (1, 2, 3):
        images = student(
            "a drawing of the digit two",
            height=64,
            width=128,
            num_inference_steps=steps,
            guidance_scale=0.0,
            max_sequence_length=T5_MAX_LENGTH,
            output_type="np",
        ).images
        assert images.shape == (1, 64, 128, 3) and torch.isfinite(torch.from_numpy(images)).all()
    result = export_stage(
        ExportConfig(
            out_dir=str(root / "onnx"),
            single_file_dir=str(root / "single_file"),
            report=str(root / "export.json"),
            steps=3,
            fp16=False,
            batch_sizes=(1, 2),
            latency_repeats=1,
            register=False,
        ),
        root / "student",
        NullTracker(),
    )
    assert result["max_abs_error"] < 1e-3
    assert (
        "input_ids_3" in json.loads((root / "onnx" / "manifest.json").read_text())["tokenizers"]["tokenizer_3"]["input"]
    )


def test_sd35_shaped_lora_student_loads_onto_its_teacher(sd35_chain, tmp_path):
    """A LoRA student of the SD3.5-shaped teacher (prompts only): every target group, dual attention (attn2)
    included, under gradient checkpointing; its adapter in stock diffusers equals the fused student."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    root, teacher, syn, _ = sd35_chain
    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck.safetensors"),
        report_dir=str(tmp_path),
        **DISTILL,
        student_times=(1.0, 0.5, 0.25),
        schedule="exponential",
        probs=(0.5, 0.25, 0.25),
        warmup_probs=(0.0, 0.5, 0.5),
        gradient_checkpointing="all",
        student="lora",
        lora_rank=4,
        lora_targets=("attention", "feed_forward", "adaln"),
        lr_g=1e-3,
        ema_decay=0.5,
    )
    summary = distill(cfg, teacher, syn.out_dir, NullTracker())
    lora = read_meta(tmp_path / "student")["lora"]
    assert {"attn2.to_q", "ff.net.2", "norm1.linear"} <= set(lora["target_modules"])
    assert summary["skipped_updates"] == 0 and lora["parameters"] == summary["trained_parameters"]
    fused = StableDiffusion3Pipeline.from_pretrained(tmp_path / "student")
    stock = StableDiffusion3Pipeline.from_pretrained(teacher)
    stock.load_lora_weights(tmp_path / "student")
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "student", subfolder="scheduler")

    def latents(pipe, steps):
        torch.manual_seed(0)  # the re-noising sampler draws from the global RNG
        return pipe(
            "a drawing of the digit two",
            height=64,
            width=128,
            num_inference_steps=steps,
            guidance_scale=0.0,
            max_sequence_length=T5_MAX_LENGTH,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    for steps in (1, 3):
        assert (latents(fused, steps) - latents(stock, steps)).abs().max() <= 1e-5, steps


@pytest.mark.parametrize(
    "setting",
    [
        dict(gradient_checkpointing="all"),
        dict(truncate_teacher=False),
        dict(prefetch=1),
        dict(ema_on_cpu=True),
        dict(teacher_dtype="bfloat16"),
        dict(mixed_precision="bf16"),
    ],
)
def test_memory_settings_leave_the_tiny_run_unchanged(setting, tiny_teacher_dir, tiny_synthetic, tmp_path):
    """Each memory setting against the all-off fp32 run: equal weights, or (bf16) equal up to bf16 rounding;
    the student always keeps fp32 weights."""
    base = DistillConfig(
        out_dir="",
        checkpoint="",
        **DISTILL,
        gradient_checkpointing="off",
        mixed_precision="no",
        teacher_dtype="float32",
        truncate_teacher=True,
    )

    def run(cfg, name):
        cfg = replace(
            cfg,
            out_dir=str(tmp_path / name),
            checkpoint=str(tmp_path / f"{name}.safetensors"),
            report_dir=str(tmp_path / f"{name}_reports"),
        )
        distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
        raw = SD3Transformer2DModel.from_pretrained(tmp_path / name / "ladd_raw_transformer")
        return dict(raw.named_parameters()), pd.read_csv(tmp_path / f"{name}_reports" / "distill_curve.csv")

    (ref, ref_curve), (got, curve) = run(base, "base"), run(replace(base, **setting), "setting")
    teacher = dict(SD3Transformer2DModel.from_pretrained(tiny_teacher_dir, subfolder="transformer").named_parameters())
    assert all(p.dtype == torch.float32 for p in got.values())
    bf16 = "bfloat16" in setting.values() or "bf16" in setting.values()
    for name, p in ref.items():
        if not bf16:
            torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6)
        else:  # the update lr * step is ~1e-5 per step: bf16 noise may flip a few signs, never more than the update
            assert (got[name] - p).abs().max() <= 2 * (p - teacher[name]).abs().max() + 1e-7, name
    tol = 0.05 if bf16 else 1e-5
    for column in ("loss_d", "loss_adv", "loss_reg"):
        assert (curve[column] - ref_curve[column]).abs().max() <= tol * (1 + ref_curve[column].abs().max()), column


def test_student_times_must_be_their_schedules():
    """Times stock diffusers cannot visit (the paper's evenly spaced ones) fail when distill starts, with the ladder
    (the flow checks them before its first stage; test_faults: `ladd distill` exits 2)."""
    with pytest.raises(ConfigError, match=r"beta schedule's times .* use \[1, 0.7934400439, 0.4565599561, 0.25\]"):
        check_student_times("beta", DistillConfig(student_times=(1.0, 0.75, 0.5, 0.25)).student_times)
    with pytest.raises(ConfigError, match=r"use \[1, 0.629960537, 0.3968502581, 0.25\]"):
        check_student_times("exponential", (1.0, 0.75, 0.5, 0.25))
    two = DistillConfig(student_times=(1.0, 0.25), schedule="exponential", probs=(0.5, 0.5), warmup_probs=(0.5, 0.5))
    check_student_times(two.schedule, two.student_times)
    assert set(STUDENT_SCHEDULES) == set(STUDENT_SCHEDULE_NAMES)  # config's names are the schedules there are
