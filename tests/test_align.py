"""The preference stage (`ladd align`): Diffusion-DPO for rectified flow on a LoRA policy whose reference is the
same module with adapters off, the reward registry, the stage's outputs and its refusals."""

import json

import pytest
import torch
from sd3_family import build_tiny_clip

from ladd import lora
from ladd.align import PASS_THROUGH, REWARDS, SUMMARY, align_stage, dpo_loss, load_reward, model_dir, velocity_error
from ladd.config import REWARDS as REWARD_NAMES
from ladd.config import AlignConfig, DistillConfig
from ladd.errors import ConfigError, ValidationFailed
from ladd.io import fingerprint
from ladd.pipeline import load_transformer, max_sequence_length
from ladd.tracking import NullTracker
from ladd.variants import noise_to


def _policy(teacher_dir):
    """A LoRA policy on the tiny teacher (adapters nudged off zero) and its layers; adapters off is the reference."""
    model = load_transformer(teacher_dir)
    cfg = DistillConfig(student="lora", lora_rank=4)
    spec = lora.LoraSpec(cfg.lora_rank, cfg.lora_rank, 0.0, tuple(lora.target_suffixes(model, cfg.lora_targets)))
    weights, layers = lora.add_student_adapter(model, spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in weights.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, weights, layers


def _errors(model, layers, x0, eps, t, c, p):
    x_t = noise_to(x0, t, eps)

    def v():
        return model(hidden_states=x_t, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample

    with lora.adapters(layers, on=True):
        policy = velocity_error(v(), x0, eps)
    with torch.no_grad():
        ref = velocity_error(v(), x0, eps)
    return policy, ref


def _pair(model, n=4):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return (
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.rand(n, generator=g) * 0.8 + 0.1,
        torch.randn(n, 8, cfg.joint_attention_dim, generator=g),
        torch.randn(n, cfg.pooled_projection_dim, generator=g),
    )


def test_dpo_gives_no_gradient_when_winner_and_loser_are_the_same_image(tiny_teacher_dir):
    model, weights, layers = _policy(tiny_teacher_dir)
    x_w, _, eps, t, c, p = _pair(model)
    pw, rw = _errors(model, layers, x_w, eps, t, c, p)
    pl, rl = _errors(model, layers, x_w, eps, t, c, p)
    loss, _ = dpo_loss(pw, pl, rw, rl, beta=500.0)
    loss.backward()
    assert all(q.grad is not None and q.grad.abs().max() == 0 for q in weights.parameters())


def test_a_dpo_step_lowers_the_winners_error_relative_to_the_reference(tiny_teacher_dir):
    model, weights, layers = _policy(tiny_teacher_dir)
    x_w, x_l, eps, t, c, p = _pair(model)
    opt = torch.optim.SGD(weights.parameters(), lr=1e-2)

    def margin():
        (pw, rw), (pl, rl) = _errors(model, layers, x_w, eps, t, c, p), _errors(model, layers, x_l, eps, t, c, p)
        return pw, pl, rw, rl

    before = [x.detach() for x in margin()]
    loss, _ = dpo_loss(*margin()[:2], *before[2:], beta=500.0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = [x.detach() for x in margin()]
    # the reference (adapters off) is untouched; the winner's error moved down relative to the loser's
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
    delta = lambda m: ((m[0] - m[2]) - (m[1] - m[3])).mean()  # noqa: E731
    assert delta(after) < delta(before)


def test_rewards_load_from_local_folders_and_bad_ones_fail_with_one_line(tiny_classifier_dir, tmp_path):
    clip = build_tiny_clip(tmp_path / "clip")
    score = load_reward("clip", clip, None)
    images = torch.rand(3, 3, 32, 32)
    s = score(images, ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three"], None)
    assert s.shape == (3,) and torch.isfinite(s).all()
    digits = load_reward("classifier", None, tiny_classifier_dir)(images, [""] * 3, [1, 2, 3])
    assert digits.shape == (3,) and ((digits >= 0) & (digits <= 1)).all()
    assert set(REWARDS) >= {"classifier", "clip"} and REWARDS["classifier"].needs_labels
    with pytest.raises(ConfigError, match="align.reward must be one of"):
        load_reward("pickscore", None, None)
    with pytest.raises(ConfigError, match="align.reward_path: .* is not a CLIP model folder"):
        load_reward("clip", tmp_path / "missing", None)
    with pytest.raises(ConfigError, match="clip needs align.reward_path"):
        load_reward("clip", None, None)


def test_reward_names_are_the_registry():
    assert REWARD_NAMES == tuple(REWARDS)


def test_a_batch_sampled_alone_is_that_batch_among_all_rows(tiny_student_dir):
    """`generate_batch` (align's candidates, evaluate's rows): one batch handed over with only its own embeddings and
    noise samples exactly as `generate_latents` samples it among every row, the renoise sampler's fresh noise (seeded
    by the batch's first row) included."""
    from ladd.align import generate_batch
    from ladd.generate import generate_latents, record_noise
    from ladd.pipeline import encode_prompts, latent_shape, load_pipeline, read_meta
    from ladd.schedules import student_sigmas

    pipe, meta = load_pipeline(tiny_student_dir), read_meta(tiny_student_dir)
    e, p = encode_prompts(pipe, [f"a handwritten digit {d}" for d in range(10)], meta["max_sequence_length"])
    noise, sigmas = record_noise(list(range(10)), latent_shape(pipe)), student_sigmas(2, meta)
    whole = generate_latents(pipe.transformer, e, p, noise, sigmas, sampler="renoise", batch_size=4, seed=3)
    parts = [
        generate_batch(
            pipe.transformer, i, e[i : i + 4], p[i : i + 4], noise[i : i + 4], sigmas, 4, sampler="renoise", seed=3
        )
        for i in (0, 4, 8)
    ]
    assert torch.equal(torch.cat(parts), whole)
    alone = generate_latents(
        pipe.transformer, e[4:8], p[4:8], noise[4:8], sigmas, sampler="renoise", batch_size=4, seed=3
    )
    assert not torch.equal(alone, parts[1])  # the batch as rows 0..3: other re-noising


def _cfg(out, **kw):
    return AlignConfig(
        **{
            **dict(
                enabled=True,
                out_dir=str(out),
                prompts=48,
                samples=4,
                steps=1,
                min_margin=0.0,
                min_pairs=2,
                lora_rank=4,
                train_steps=3,
                batch_size=4,
                probe_prompts=8,
                probe_every=2,
                device="cpu",
            ),
            **kw,
        }
    )


def test_the_aligned_student_is_a_fused_pipeline_its_adapter_reproduces(
    tiny_student_dir, tiny_classifier_dir, prepared_data, tmp_path
):
    from diffusers import StableDiffusion3Pipeline

    out, reports = tmp_path / "aligned", tmp_path / "reports"
    summary = align_stage(_cfg(out), prepared_data, tiny_classifier_dir, tiny_student_dir, reports, NullTracker())
    assert summary["pairs"] >= 2 and summary["candidates"] == 48 * 4 and summary["lora"]["rank"] == 4
    assert {"model_index.json", "pytorch_lora_weights.safetensors", "README.md", "align_curve.png", SUMMARY} <= {
        f.name for f in out.iterdir()
    }
    curve = json.loads((out / SUMMARY).read_text())["curve"]
    assert [r["step"] for r in curve if "probe_reward" in r] == [0, 2, 3] and all("loss" in r for r in curve[:3])
    assert json.loads((reports / "align_pairs.json").read_text())["success"]
    assert "Preference-aligned" in (out / "README.md").read_text()
    assert model_dir(_cfg(out), tiny_student_dir) == out
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None)
    fused = StableDiffusion3Pipeline.from_pretrained(out, **no_t5)
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_student_dir, **no_t5)
    stock.load_lora_weights(out)  # the adapter goes on the distilled student
    for steps in (1, 2, 4):
        images = []
        for pipe in (fused, stock):
            torch.manual_seed(0)  # diffusers' stochastic sampling draws its re-noising noise from the global RNG
            images.append(
                pipe(
                    "a handwritten digit six",
                    num_inference_steps=steps,
                    guidance_scale=0.0,
                    max_sequence_length=max_sequence_length(tiny_student_dir),
                    generator=torch.Generator().manual_seed(1),
                    output_type="latent",
                ).images
            )
        assert (images[0] - images[1]).abs().max() <= 1e-5, steps
    # refusals: one line naming the key, before training; the previous output stays as it was
    before = fingerprint(out)
    with pytest.raises(ValidationFailed, match=r"align.min_margin \(0\) and align.min_pairs is 1000") as err:
        align_stage(
            _cfg(out, min_pairs=1000), prepared_data, tiny_classifier_dir, tiny_student_dir, reports, NullTracker()
        )
    assert "\n" not in str(err.value)
    wrong_kind = tmp_path / "not_clip"
    wrong_kind.mkdir()
    (wrong_kind / "config.json").write_text(json.dumps({"model_type": "t5"}))
    for path, message in ((tmp_path / "missing", "is not a CLIP model folder"), (wrong_kind, "align.reward_path")):
        with pytest.raises(ConfigError, match=message):
            align_stage(
                _cfg(out, reward="clip", reward_path=str(path)),
                prepared_data,
                tiny_classifier_dir,
                tiny_student_dir,
                reports,
                NullTracker(),
            )
    assert fingerprint(out) == before


def test_off_the_stage_passes_the_student_through(tiny_student_dir, tmp_path):
    cfg = AlignConfig(out_dir=str(tmp_path / "aligned"))
    assert align_stage(cfg, None, None, tiny_student_dir, tmp_path / "reports", NullTracker()) == {"enabled": False}
    assert [f.name for f in (tmp_path / "aligned").iterdir()] == [PASS_THROUGH]
    assert model_dir(cfg, tiny_student_dir) == tiny_student_dir
    with pytest.raises(FileNotFoundError, match="run `ladd align` first"):
        model_dir(_cfg(tmp_path / "aligned"), tiny_student_dir)


def test_a_nan_reward_fails_the_pairs_suite_naming_the_record(tiny_student_dir, prepared_data, tmp_path, monkeypatch):
    import ladd.align as align

    def nan_on_third(path, classifier_dir, key):
        def score(images, prompts, labels):
            s = torch.rand(len(images))
            s[2] = float("nan")
            return s

        return score

    from ladd.data.prepare import load_split

    monkeypatch.setitem(align.REWARDS, "classifier", align.Reward(nan_on_third, needs_labels=False))
    third = load_split(prepared_data / "train").captions["id"][2]
    with pytest.raises(ValidationFailed, match=rf"column 'finite' failed for records \['{third}'\]"):
        align_stage(
            _cfg(tmp_path / "aligned", prompts=8),
            prepared_data,
            None,
            tiny_student_dir,
            tmp_path / "reports",
            NullTracker(),
        )
    assert not (tmp_path / "aligned").exists()


def test_memory_settings_keep_the_adapter(tiny_student_dir, tiny_classifier_dir, prepared_data, tmp_path):
    """Gradient checkpointing (on for CUDA) recomputes with the adapters as they were: the same adapter as without
    it; a bf16 base (mixed_precision bf16) trains an adapter pointing the same way as the fp32 one."""
    from safetensors.torch import load_file

    def adapter(name, **kw):
        cfg = _cfg(tmp_path / name, prompts=16, train_steps=2, probe_prompts=0, **kw)
        align_stage(cfg, prepared_data, tiny_classifier_dir, tiny_student_dir, tmp_path / "reports", NullTracker())
        state = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
        return torch.cat([state[k].flatten() for k in sorted(state) if "lora_B" in k])  # B starts at 0: the update

    plain = adapter("plain", gradient_checkpointing="off")
    torch.testing.assert_close(adapter("checkpointed", gradient_checkpointing="on"), plain, rtol=1e-4, atol=1e-7)
    bf16 = adapter("bf16", mixed_precision="bf16")
    assert torch.nn.functional.cosine_similarity(bf16, plain, dim=0) > 0.9
