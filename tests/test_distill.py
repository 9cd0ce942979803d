"""LADD pieces: losses, discriminator through the frozen teacher, synthesize (deterministic, resumable),
distill (student pipeline; interruptions: test_faults.py)."""

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ladd.config import DISTILL_PRESETS, DistillConfig
from ladd.data.synthetic import load_synthetic
from ladd.discriminator import Discriminator, default_feature_layers, resolve_feature_layers
from ladd.distill import distill
from ladd.errors import ConfigError
from ladd.losses import ADVERSARIAL_LOSSES, approx_r1, heads_loss, per_row
from ladd.pipeline import encode_prompts, latent_shape, load_pipeline, max_sequence_length, read_meta
from ladd.sampling import cfg_velocity, sample_renoise
from ladd.schedules import student_sigmas
from ladd.synthesize import synthesize
from ladd.tracking import NullTracker
from ladd.variants import noise_to


def test_hinge_and_nonsaturating_losses():
    real, fake = [torch.tensor([[2.0, 0.5]])], [torch.tensor([[-2.0, 0.0]])]
    hinge, nonsaturating = ADVERSARIAL_LOSSES["hinge"], ADVERSARIAL_LOSSES["nonsaturating"]
    assert heads_loss(hinge, real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert per_row(hinge.student, fake).mean().item() == pytest.approx(1.0)
    sp = torch.nn.functional.softplus
    assert heads_loss(nonsaturating, real, fake).item() == pytest.approx(
        (sp(-real[0]).mean() + sp(fake[0]).mean()).item()
    )
    assert per_row(nonsaturating.student, fake).mean().item() == pytest.approx(sp(-fake[0]).mean().item())
    assert approx_r1(real, real).item() == 0.0


def test_default_feature_layers_spread_over_depth():
    assert default_feature_layers(4) == [0, 1, 2, 3]
    assert default_feature_layers(24) == [5, 11, 17, 23]
    assert default_feature_layers(2) == [0, 1]
    assert resolve_feature_layers(None, 24) == [5, 11, 17, 23]
    assert resolve_feature_layers([-2, -1], 24) == [22, 23] and resolve_feature_layers([-2, 3], 4) == [2, 3]
    for bad in ([4], [-5], []):
        with pytest.raises(ConfigError, match=r"distill.feature_layers: .* the teacher's 4 \(0 to 3, or -4 to -1"):
            resolve_feature_layers(bad, 4)


def test_features_stop_after_the_last_hooked_block(tiny_teacher_dir):
    """Heads follow block order whatever order the layers are given in, and the teacher's forward pass
    ends after the last hooked block (the blocks above it never run)."""
    pipe = load_pipeline(tiny_teacher_dir)
    teacher = pipe.transformer.eval().requires_grad_(False)
    ran = []
    hooks = [b.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(teacher.transformer_blocks)]
    e, p = encode_prompts(pipe, ["handwritten one", "handwritten two"], max_sequence_length(tiny_teacher_dir))
    x, t = torch.randn(2, *latent_shape(pipe)), torch.tensor([0.3, 0.8])
    disc = Discriminator(teacher, [2, 0])
    assert disc.layers == [0, 2]
    with torch.no_grad():
        features = disc.features(x, t, e, p)
    assert ran == [0, 1, 2] and len(features) == 2
    ran.clear()
    with torch.no_grad():
        full = Discriminator(teacher, [0, 1, 2, 3]).features(x, t, e, p)
    assert ran == [0, 1, 2, 3] and torch.equal(full[2], features[1])
    for h in hooks:
        h.remove()


def test_batch_size_one_is_refused():
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        DistillConfig(batch_size=1)


def test_student_gradient_flows_through_frozen_teacher(tiny_teacher_dir):
    pipe = load_pipeline(tiny_teacher_dir)
    teacher = pipe.transformer.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = copy.deepcopy(teacher).requires_grad_(True)
    disc = Discriminator(teacher, default_feature_layers(teacher.config.num_layers))
    assert {id(p) for p in disc.parameters()}.isdisjoint(id(p) for p in teacher.parameters())
    e, p = encode_prompts(pipe, ["handwritten one", "handwritten two"], max_sequence_length(tiny_teacher_dir))
    x_t = torch.randn(2, *latent_shape(pipe))
    t = torch.ones(2)
    x0_hat = x_t - student(hidden_states=x_t, encoder_hidden_states=e, pooled_projections=p, timestep=t * 1000).sample
    logits = disc(noise_to(x0_hat, torch.full((2,), 0.6), torch.randn_like(x0_hat)), torch.full((2,), 0.6), e, p)
    assert [lg.shape for lg in logits] == [(2, 16)] * 4
    per_row(ADVERSARIAL_LOSSES["hinge"].student, logits).mean().backward(retain_graph=True)
    assert all(p.grad is None for p in teacher.parameters())
    through_teacher = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # every parameter that influences x0_hat gets a gradient through the frozen teacher
    student.zero_grad(set_to_none=True)
    x0_hat.sum().backward()
    direct = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert direct and through_teacher == direct
    torch.optim.AdamW(list(student.parameters()) + list(disc.parameters())).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_synthesize_deterministic_and_resumable(tiny_synthetic, tiny_teacher_dir, prepared_data, tmp_path):
    data = load_synthetic(tiny_synthetic.out_dir)
    latents, records = data.latents, data.records
    assert len(latents) == len(records) == 1168 and torch.isfinite(latents).all()  # the train split
    manifest = json.loads((Path(tiny_synthetic.out_dir) / "manifest.json").read_text())
    assert manifest["run"]["guidance"] == tiny_synthetic.guidance and manifest["run"]["teacher"]
    # a second run in a fresh dir is bit-identical; killing after a shard and rerunning keeps finished shards
    cfg = replace(tiny_synthetic, out_dir=str(tmp_path / "again"))
    synthesize(cfg, prepared_data, tiny_teacher_dir, NullTracker())
    os.remove(tmp_path / "again" / "shard-00001.safetensors")
    os.remove(tmp_path / "again" / "manifest.json")  # as if killed before the end
    summary = synthesize(cfg, prepared_data, tiny_teacher_dir, NullTracker())
    assert summary["generated_shards"] == 1 and summary["shards"] == 3
    again = load_synthetic(cfg.out_dir)
    assert torch.equal(again.latents, latents) and torch.equal(again.trajectory, data.trajectory)
    # other settings: start over, and the result differs
    other = synthesize(replace(cfg, guidance=4.0), prepared_data, tiny_teacher_dir, NullTracker())
    assert other["generated_shards"] == 3
    assert not torch.equal(load_synthetic(cfg.out_dir).latents, latents)


SMOKE_DISTILL = dict(steps=24, batch_size=4, warmup_steps=4, checkpoint_every=4, log_every=2, device="cpu")


def test_distilled_student_is_a_diffusers_pipeline(tiny_teacher_dir, tiny_synthetic, tmp_path):
    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck.safetensors"),
        report_dir=str(tmp_path),
        **{**SMOKE_DISTILL, "steps": 8},
    )
    summary = distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
    assert summary["steps"] == 8 and summary["skipped_updates"] == 0
    student_dir = tmp_path / "student"
    teacher, student = load_pipeline(tiny_teacher_dir), load_pipeline(student_dir)
    # same VAE and text encoders as the teacher, a trained transformer
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(teacher, name).state_dict(), getattr(student, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(
        not torch.equal(a, b) for a, b in zip(teacher.transformer.parameters(), student.transformer.parameters())
    )
    meta = read_meta(student_dir)
    times = meta["student_times"]
    assert times == pytest.approx([1.0, 0.79344, 0.45656, 0.25], abs=1e-5) and meta["sampler"] == "renoise"
    # stock diffusers, no argument beyond the step count, guidance and the T5 slot: it visits the trained times
    # at 1, 2 and 4 steps, and agrees with our sampler (its re-noising draws from the global RNG)
    msl = max_sequence_length(student_dir)
    e, p = encode_prompts(student, ["handwritten six"], msl)
    for steps, visited in ((4, times), (2, [1.0, 0.25]), (1, [1.0])):
        student.scheduler.set_timesteps(steps)
        assert student.scheduler.timesteps.tolist() == pytest.approx([1000 * t for t in visited], abs=1e-3)
        torch.manual_seed(0)
        ref = student(
            "handwritten six",
            num_inference_steps=steps,
            guidance_scale=0.0,
            max_sequence_length=msl,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
        ).images
        torch.manual_seed(0)
        x = torch.randn((1, *latent_shape(student)), generator=torch.Generator().manual_seed(1))
        ours = sample_renoise(cfg_velocity(student.transformer, e, p), x, student_sigmas(steps, meta))
        assert torch.isfinite(ref).all() and (ours - ref).abs().max() <= 1e-5, steps
    # the model card: diffusers metadata header, how to load, and (before evaluate) no table yet
    card = (Path(student_dir) / "README.md").read_text()
    assert (
        card.startswith("---\nbase_model: ladd-tiny-sd3-digits\nlibrary_name: diffusers")
        and "num_inference_steps=4" in card
    )
    assert "Not evaluated yet" in card


def test_mse_to_teacher_keeps_the_student_near_the_teacher_below_t1(tiny_teacher_dir, tiny_synthetic, tmp_path):
    """regression_target=teacher anchors the student's x0 predictions at t < 1 to the frozen teacher's: with a
    large weight, the same adversarial run drifts less from the teacher there than without it."""
    pipe = load_pipeline(tiny_teacher_dir)
    e, p = encode_prompts(pipe, ["handwritten six", "handwritten two"], max_sequence_length(tiny_teacher_dir))
    x = torch.randn(2, *latent_shape(pipe), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.5, 0.25])

    def drift(**overrides):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        cfg = DistillConfig(
            out_dir=str(out / "student"),
            checkpoint=str(out / "ck.safetensors"),
            report_dir=str(out),
            **{
                **SMOKE_DISTILL,
                **DISTILL_PRESETS["ladd"],
                "steps": 6,
                "lr_g": 1e-3,
                "ema_decay": 0.0,
                "warmup_probs": [0.0, 0.0, 0.5, 0.5],
                "probs": [0.0, 0.0, 0.5, 0.5],
                **overrides,
            },
        )
        distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
        student = load_pipeline(out / "student").transformer
        with torch.no_grad():
            v_s, v_t = (
                m(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t * 1000).sample
                for m in (student, pipe.transformer)
            )
        return (v_s - v_t).abs().mean().item()

    free, anchored = drift(), drift(regression_weight=100.0, regression_target="teacher")
    assert 0 < anchored < 0.5 * free, (anchored, free)
    with pytest.raises(ConfigError, match="distill.regression_target"):
        DistillConfig(regression_target="data")
