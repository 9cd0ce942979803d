"""The preference stage's math and rewards (issue #22, in progress): Diffusion-DPO for rectified flow on a LoRA
policy whose reference is the same module with adapters off, and the reward registry."""

import pytest
import torch

from ladd import lora
from ladd.align import REWARDS, dpo_loss, load_reward, noised, velocity_error
from ladd.config import DistillConfig
from ladd.errors import ConfigError
from ladd.pipeline import load_transformer
from sd3_family import build_tiny_clip


def _policy(teacher_dir):
    """A LoRA policy on the tiny teacher (adapters nudged off zero) and its layers; adapters off is the reference."""
    model = load_transformer(teacher_dir)
    cfg = DistillConfig(student="lora", lora_rank=4)
    weights, layers = lora.add_student_adapter(model, cfg, lora.target_suffixes(model, cfg.lora_targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in weights.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, weights, layers


def _errors(model, layers, x0, eps, t, c, p):
    x_t = noised(x0, eps, t)

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
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.rand(n, generator=g) * 0.8 + 0.1, torch.randn(n, 8, cfg.joint_attention_dim, generator=g),
            torch.randn(n, cfg.pooled_projection_dim, generator=g))


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


def test_align_student_writes_a_fused_pipeline_its_adapter_reproduces(tiny_student_dir, tiny_classifier_dir,
                                                                       prepared_data, tmp_path):
    from types import SimpleNamespace

    import pandas as pd
    from diffusers import StableDiffusion3Pipeline

    from ladd.align import align_student

    train = pd.read_parquet(prepared_data / "train" / "captions.parquet").head(16)
    prompts, labels = train["prompt"].tolist(), train["label"].astype(int).tolist()
    cfg = SimpleNamespace(reward="classifier", reward_path=None, samples=4, steps=1, min_margin=0.0, min_pairs=2,
                          lora_rank=4, lora_targets=("attention", "feed_forward", "adaln"), train_steps=3,
                          batch_size=4, lr=1e-3, beta=2000.0, seed=0)
    with pytest.raises(ConfigError, match="align.min_pairs is 1000"):
        align_student(SimpleNamespace(**{**vars(cfg), "min_pairs": 1000}), prompts, labels, tiny_student_dir,
                      tiny_classifier_dir, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    summary = align_student(cfg, prompts, labels, tiny_student_dir, tiny_classifier_dir, tmp_path / "aligned")
    assert summary["pairs"] >= 2
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None)
    fused = StableDiffusion3Pipeline.from_pretrained(tmp_path / "aligned", **no_t5)
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_student_dir, **no_t5)
    stock.load_lora_weights(tmp_path / "aligned")
    for steps in (1, 2, 4):
        out = []
        for pipe in (fused, stock):
            torch.manual_seed(0)
            out.append(pipe("a handwritten digit six", num_inference_steps=steps, guidance_scale=0.0,
                            max_sequence_length=16, generator=torch.Generator().manual_seed(1), output_type="latent").images)
        assert (out[0] - out[1]).abs().max() <= 1e-5, steps
