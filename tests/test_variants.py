"""The distillation variants: each trains the parts it claims, and the paper's preset stays pure."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from ladd.config import DISTILL_PRESETS, DistillConfig
from ladd.data.synthetic import load_synthetic
from ladd.discriminator import resolve_feature_layers
from ladd.distill import distill, student_times, trajectory_columns
from ladd.errors import ConfigError
from ladd.generate import record_noise
from ladd.losses import ADVERSARIAL_LOSSES, gan_health, per_row, student_loss
from ladd.pipeline import encode_prompts, latent_shape, load_pipeline, max_sequence_length
from ladd.sampling import STOCHASTIC, EulerPath, cfg_velocity, flow_sigmas, sample_euler
from ladd.tracking import NullTracker
from ladd.variants import (
    REGRESSION_TARGETS,
    RENOISE_TIMES,
    STUDENT_INPUTS,
    backward_simulate,
    tied_times,
    trajectory_input,
)

SMOKE = dict(steps=6, batch_size=8, warmup_steps=2, checkpoint_every=100, log_every=1, device="cpu")


def test_config_choices_are_the_registries():
    fields = DistillConfig.__dataclass_fields__
    for key, registry in (
        ("student_input", STUDENT_INPUTS),
        ("renoise_times", RENOISE_TIMES),
        ("regression_target", REGRESSION_TARGETS),
        ("sampler", STOCHASTIC),
    ):
        for name in registry:
            DistillConfig(**{key: name, "regression_weight_one": 0.0})
        with pytest.raises(ConfigError, match=f"distill.{key}"):
            DistillConfig(**{key: "nope"})
    assert "ladd" in DISTILL_PRESETS and set(DISTILL_PRESETS["ladd"]) <= set(fields)


def test_pure_ladd_preset_replaces_every_regression_setting():
    cfg = DistillConfig(
        preset="ladd",
        regression_weight=5.0,
        student_input="trajectory",
        renoise_times="tied",
        backward_share=0.5,
        adversarial_weight=0.3,
        adversarial_time_weights=(1.0, 0.0, 0.0, 0.0),
    )
    assert (
        cfg.regression_weight,
        cfg.regression_weight_one,
        cfg.student_input,
        cfg.renoise_times,
        cfg.backward_share,
        cfg.renoise_mean,
        cfg.renoise_std,
    ) == (0.0, 0.0, "noised", "logit_normal", 0.0, 1.0, 1.0)
    assert (cfg.adversarial_weight, cfg.adversarial_time_weights) == (1.0, None)  # the paper: 1 at every time
    assert DistillConfig(preset="no_adversarial", regression_weight=3.0).adversarial_weight == 0.0
    with pytest.raises(ConfigError, match="adversarial_time_weights must be 4 non-negative"):
        DistillConfig(adversarial_time_weights=(1.0, 0.0))
    with pytest.raises(ConfigError, match="distill.preset"):
        DistillConfig(preset="turbo")
    with pytest.raises(ConfigError, match="regression_weight_one needs student_input: trajectory"):
        DistillConfig(student_input="noised", regression_weight_one=1.0)


def test_euler_path_records_the_solver_state_at_grid_and_mid_step_times(tiny_teacher_dir):
    pipe = load_pipeline(tiny_teacher_dir)
    e, p = encode_prompts(pipe, ["handwritten one", "handwritten two"], max_sequence_length(tiny_teacher_dir))
    model = cfg_velocity(pipe.transformer, e, p)
    x = torch.randn(2, *latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    path = EulerPath([0.6, 0.4])
    final = sample_euler(model, x, sigmas, callback=path)
    states = path.stacked()
    torch.testing.assert_close(states[:, 0], sample_euler(model, x, sigmas[:2]), rtol=0, atol=1e-6)
    at_06 = states[:, 0]
    # mid-step: the Euler path is linear within a step
    torch.testing.assert_close(states[:, 1], at_06 + (0.4 - 0.6) * model(at_06, sigmas[1]), rtol=0, atol=1e-6)
    assert torch.equal(final, sample_euler(model, x, sigmas))
    with pytest.raises(ValueError, match="never reached"):
        EulerPath([0.9]).stacked()


def test_synthesize_stores_the_teacher_path_that_ends_at_each_latent(tiny_synthetic, tiny_teacher_dir, prepared_data):
    """The stored trajectory of a record is the teacher's own CFG Euler path from the record's noise: re-solving
    one record reproduces both its latent and its states."""
    data = load_synthetic(tiny_synthetic.out_dir)
    assert data.trajectory_times == [0.7934400439, 0.4565599561, 0.25] and data.trajectory.shape[:2] == (
        len(data.latents),
        3,
    )
    pipe = load_pipeline(tiny_teacher_dir)
    msl = max_sequence_length(tiny_teacher_dir)
    i = 7
    record = data.records.iloc[i]
    e, p = encode_prompts(pipe, [record["prompt"]], msl)
    ne, np_ = encode_prompts(pipe, [""], msl)
    path = EulerPath(data.trajectory_times)
    x = sample_euler(
        cfg_velocity(pipe.transformer, e, p, ne, np_, tiny_synthetic.guidance),
        record_noise([int(record["seed"])], latent_shape(pipe)),
        flow_sigmas(tiny_synthetic.steps, pipe.scheduler.config.shift),
        callback=path,
    )
    torch.testing.assert_close(x[0], data.latents[i], rtol=0, atol=1e-5)
    torch.testing.assert_close(path.stacked()[0], data.trajectory[i], rtol=0, atol=1e-5)
    # the student's times must be stored; a mismatch is one clear error naming the settings
    with pytest.raises(ConfigError, match="synthesize.trajectory_times"):
        trajectory_columns(data.trajectory_times, torch.tensor([1.0, 0.6]))


def test_trajectory_inputs_are_the_stored_teacher_states():
    x0 = torch.randn(4, 2, 3, 3)
    noise = torch.randn(4, 2, 3, 3)
    trajectory = torch.randn(4, 3, 2, 3, 3)
    k = torch.tensor([0, 1, 2, 3])
    x_t = trajectory_input(x0, torch.tensor([1.0, 0.75, 0.5, 0.25]), k, noise, trajectory, None)
    assert torch.equal(x_t[0], noise[0])  # t = 1: the record's own starting noise
    for row in (1, 2, 3):
        assert torch.equal(x_t[row], trajectory[row, row - 1])


def test_backward_simulation_runs_the_student_without_gradient_and_with_fresh_noise():
    times = torch.tensor([1.0, 0.75, 0.5, 0.25])
    weight = torch.nn.Parameter(torch.tensor(0.5))
    calls = []

    def student_velocity(x, t, c, p, m):
        calls.append((len(x), t.tolist()))
        return weight * x  # a "student" with a parameter that would receive gradients

    k = torch.tensor([1, 3, 2, 1])
    c, p, like, m = torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4, 2, 8, 8), torch.zeros(4, 0, 8, 8)
    a = backward_simulate(
        student_velocity, k, times, c, p, like, STOCHASTIC["renoise"], torch.Generator().manual_seed(0), m
    )
    assert not a.requires_grad
    # the student ran once per step level, on the rows that still needed it, at the sampler's times
    assert calls == [(4, [1.0] * 4), (2, [0.75] * 2), (1, [0.5])]
    b = backward_simulate(
        student_velocity, k, times, c, p, like, STOCHASTIC["renoise"], torch.Generator().manual_seed(1), m
    )
    assert not torch.allclose(a, b)  # fresh noise for every draw
    # re-noising: the row at 0.75 is 0.25 x0_hat + 0.75 eps, so its spread comes mostly from fresh noise
    assert 0.6 < a[0].std() < 1.0


def test_tied_times_stay_below_the_student_time():
    t = torch.tensor([1.0, 0.75, 0.5, 0.25] * 256)
    t_hat = tied_times(t, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert (t_hat <= t).all() and (t_hat[t == 0.25] <= 0.25).all() and t_hat[t == 1.0].mean() > 0.5


def _curve(out: Path) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(out.open())]


@pytest.mark.parametrize(
    "variant, extra, regression",
    [
        (None, {}, True),  # the default: trajectory inputs, regression at every step, heads on the two deepest blocks
        ("ladd", {}, False),
        ("ladd_tuned", {}, False),  # the paper's recipe at its val-chosen settings: heads on the two shallowest blocks
        ("trajectory", {"regression_weight_one": 1.0}, True),
        ("backward", {"backward_share": 1.0}, False),
        ("tied_times", {}, False),
        ("teacher_anchor", {}, True),
    ],
)
def test_each_variant_trains(variant, extra, regression, tiny_teacher_dir, tiny_synthetic, tmp_path):
    """Every recipe runs and moves the student; the pure preset has no regression term at all; the regression
    variants report theirs; per-head logits and GAN health are recorded."""
    from dataclasses import replace

    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck.safetensors"),
        report_dir=str(tmp_path),
        **SMOKE,
        preset=variant,
    )
    if extra:
        cfg = replace(cfg, preset=None, **{**DISTILL_PRESETS[variant], **extra})
    summary = distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
    curve = _curve(tmp_path / "distill_curve.csv")
    assert len(curve) == SMOKE["steps"] and summary["skipped_updates"] == 0
    if regression:
        assert any(r["loss_reg"] > 0 for r in curve) and all(r["loss_reg"] >= 0 for r in curve)
    else:
        assert all(r["loss_reg"] == 0 and r["loss_g"] == r["loss_adv"] for r in curve)
    # the default's heads: the two deepest blocks; the paper's presets: 4 spread over the depth
    heads = len(resolve_feature_layers(DISTILL_PRESETS.get(variant, {}).get("feature_layers", cfg.feature_layers), 4))
    assert {"logits_real_h0", f"logits_fake_h{heads - 1}"} <= set(curve[0])
    health = json.loads((tmp_path / "student" / "ladd_train_summary.json").read_text())["gan_health"]
    assert health["status"] in ("ok", "partial", "chance", "d_wins") and len(health["logit_gap_per_head"]) == heads
    assert (tmp_path / "distill_curve.png").stat().st_size > 1000
    teacher = load_pipeline(tiny_teacher_dir).transformer
    student = load_pipeline(tmp_path / "student").transformer
    assert any(not torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_adversarial_weight_zero_gives_the_student_the_regression_gradient_alone(
    tiny_teacher_dir, tiny_synthetic, tmp_path
):
    """With adversarial_weight 0 no gradient reaches the student from the heads: heads of another width, depth and
    learning rate leave the trained student bit for bit the same (with weight 1 they change it), the logged
    adversarial loss is 0, and GAN health says the heads were off."""

    def run(name, weight, **heads):
        out = tmp_path / name
        cfg = DistillConfig(
            out_dir=str(out / "student"),
            checkpoint=str(out / "ck.safetensors"),
            report_dir=str(out),
            **SMOKE,
            adversarial_weight=weight,
            **heads,
        )
        summary = distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
        return summary, _curve(out / "distill_curve.csv"), list(load_pipeline(out / "student").transformer.parameters())

    other_heads = {"head_channels": 32, "feature_layers": (1, 2), "lr_d": 1e-2}
    (summary, curve, student), (_, _, student_other) = run("off", 0.0), run("off_other", 0.0, **other_heads)
    assert all(torch.equal(a, b) for a, b in zip(student, student_other))
    assert all(r["loss_adv"] == 0 and r["loss_g"] == r["loss_reg"] > 0 for r in curve)
    assert summary["gan_health"]["status"] == "off"
    (_, curve_on, student_on), (_, _, student_on_other) = run("on", 1.0), run("on_other", 1.0, **other_heads)
    assert any(not torch.equal(a, b) for a, b in zip(student_on, student_on_other))
    assert any(r["loss_adv"] != 0 for r in curve_on)


def test_adversarial_time_weights_judge_only_the_times_they_weigh(tiny_teacher_dir, tiny_synthetic, tmp_path):
    """Weights (0, 0, 1, 0): the heads judge (and the curve and GAN health report) student time 2 alone."""
    out = tmp_path / "t2"
    cfg = DistillConfig(
        out_dir=str(out / "student"),
        checkpoint=str(out / "ck.safetensors"),
        report_dir=str(out),
        **{**SMOKE, "steps": 8, "batch_size": 16},
        adversarial_time_weights=(0.0, 0.0, 1.0, 0.0),
        warmup_probs=(0.25, 0.25, 0.25, 0.25),
        probs=(0.25, 0.25, 0.25, 0.25),
    )
    summary = distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
    curve = _curve(out / "distill_curve.csv")
    assert all(math.isnan(r[f"gap_t{k}"]) and math.isnan(r[f"loss_d_t{k}"]) for r in curve for k in (0, 1, 3))
    judged = [r for r in curve if not math.isnan(r["gap_t2"])]
    assert judged and all(r["loss_d_t2"] == pytest.approx(r["loss_d"], rel=1e-5) for r in judged)
    per_time = summary["gan_health"]["per_time"]
    assert math.isfinite(per_time[2]["logit_gap"]) and all(math.isnan(per_time[k]["logit_gap"]) for k in (0, 1, 3))


def test_student_adversarial_loss_weights_each_row():
    fake = [torch.tensor([[1.0, 3.0], [-2.0, 0.0], [5.0, 5.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0], [1.0, 1.0]])]
    hinge = ADVERSARIAL_LOSSES["hinge"]
    per_sample = per_row(hinge.student, fake)
    assert per_sample.tolist() == pytest.approx([-1.5, 0.5, -3.0])  # -D(fake), mean over positions, then heads
    rows = torch.tensor([True, False, True])
    assert student_loss(hinge, [f[rows] for f in fake], torch.tensor([2.0, 0.5]), 3).item() == pytest.approx(
        (2.0 * -1.5 + 0.5 * -3.0) / 3
    )
    assert student_loss(hinge, fake, torch.ones(3), 3).item() == pytest.approx(per_sample.mean().item())


def test_trajectory_regression_pulls_t_below_1_onto_the_teacher_endpoints(tiny_teacher_dir, tiny_synthetic, tmp_path):
    """On the stored path states, the student's x0 prediction ends nearer their teacher endpoints with the
    regression term than the same run without it."""
    from dataclasses import replace

    data = load_synthetic(tiny_synthetic.out_dir)
    pipe = load_pipeline(tiny_teacher_dir)
    rows = torch.arange(16)
    e, p = encode_prompts(pipe, list(data.records["prompt"][:16]), max_sequence_length(tiny_teacher_dir))
    t = torch.full((16,), float(student_times(DistillConfig())[2]))
    x_t = data.trajectory[rows, 1]  # the state at t = times[2]

    def endpoint_error(weight):
        out = tmp_path / str(weight)
        cfg = DistillConfig(
            out_dir=str(out / "student"),
            checkpoint=str(out / "ck.safetensors"),
            report_dir=str(out),
            **{**SMOKE, "steps": 20, "batch_size": 16},
            preset="trajectory",
        )
        distill(
            replace(
                cfg,
                preset=None,
                regression_weight=weight,
                lr_g=1e-3,
                ema_decay=0.0,
                probs=(0.0, 0.0, 1.0, 0.0),
                warmup_probs=(0.0, 0.0, 1.0, 0.0),
            ),
            tiny_teacher_dir,
            tiny_synthetic.out_dir,
            NullTracker(),
        )
        with torch.no_grad():
            v = (
                load_pipeline(out / "student")
                .transformer(hidden_states=x_t, encoder_hidden_states=e, pooled_projections=p, timestep=t * 1000)
                .sample
            )
        return (x_t - t.view(-1, 1, 1, 1) * v - data.latents[rows]).pow(2).mean().item()

    free, regressed = endpoint_error(0.0), endpoint_error(100.0)
    assert regressed < 0.7 * free, (regressed, free)


def test_gan_health_flags_chance_and_a_winning_discriminator():
    def rows(loss_d, real, fake):
        return [
            {
                "step": i,
                "loss_d": loss_d,
                "logits_real": real,
                "logits_fake": fake,
                "logits_real_h0": real,
                "logits_fake_h0": fake,
            }
            for i in range(40)
        ]

    assert gan_health(rows(1.97, 0.02, -0.03), "hinge", 1)["status"] == "chance"
    assert gan_health(rows(1.2, 0.5, -0.4), "hinge", 1)["status"] == "ok"
    winning = gan_health(rows(0.05, 3.0, -3.0), "hinge", 1)
    assert (
        winning["status"] == "d_wins" and "0.050" in winning["summary"] and winning["logit_gap"] == pytest.approx(6.0)
    )
