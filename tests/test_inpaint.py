"""Inpainting groundwork (issue #23, branch): masks, the condition, and the widened teacher."""

import numpy as np
import pytest
import torch
from PIL import Image

from ladd.inpaint import check_mask, condition, latent_mask, random_masks, widen_transformer
from ladd.pipeline import load_pipeline
from sd3_family import LATENT_CHANNELS, T5_MAX_LENGTH, build_sd35_like_teacher


def test_masks_are_boxes_or_strokes_from_their_seed():
    masks = random_masks(list(range(200)), 32, 48)
    assert masks.shape == (200, 1, 32, 48) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks[7], random_masks([7], 32, 48)[0])
    covered = masks.mean((1, 2, 3))
    assert covered.min() > 0.02 and covered.max() < 0.9
    rectangles = [bool((m[0].any(1).sum() * m[0].any(0).sum()) == m.sum()) for m in masks]  # a box fills its extent
    assert 60 < sum(rectangles) < 140


def test_bad_masks_fail_naming_them():
    with pytest.raises(ValueError, match=r"rec-3: mask is \(16, 16\), the image \(32, 32\)"):
        check_mask(torch.ones(1, 1, 16, 16), (32, 32), "rec-3")
    with pytest.raises(ValueError, match="all zeros"):
        check_mask(torch.zeros(1, 1, 32, 32), (32, 32), "rec-4")
    with pytest.raises(ValueError, match="all ones"):
        check_mask(torch.ones(1, 1, 32, 32), (32, 32), "rec-5")


def test_the_widened_teacher_is_the_base_model_whatever_the_condition(tmp_path):
    pipe = load_pipeline(build_sd35_like_teacher(tmp_path / "sd35"))
    base = pipe.transformer
    wide = widen_transformer(base)
    assert wide.config.in_channels == 2 * LATENT_CHANNELS + 1 and wide.config.out_channels == LATENT_CHANNELS
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=g)
    mask = latent_mask(random_masks([1, 2], 64, 64), (8, 8))
    cond = condition(mask, torch.randn(2, LATENT_CHANNELS, 8, 8, generator=g))
    c = torch.randn(2, 12, base.config.joint_attention_dim, generator=g)
    p = torch.randn(2, base.config.pooled_projection_dim, generator=g)
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        want = base(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t).sample
        got = wide(hidden_states=torch.cat([x, cond], 1), encoder_hidden_states=c, pooled_projections=p, timestep=t).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # stock diffusers runs it as an inpainting model (33 channels: the condition goes in, nothing is blended)
    from diffusers import StableDiffusion3InpaintPipeline

    inpaint = StableDiffusion3InpaintPipeline(**{**pipe.components, "transformer": wide})
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask_image = Image.fromarray((random_masks([3], 64, 64)[0, 0].numpy() * 255).astype(np.uint8))
    out = inpaint("a drawing of the digit two", image=image, mask_image=mask_image, num_inference_steps=2,
                  guidance_scale=0.0, strength=1.0, height=64, width=64, max_sequence_length=T5_MAX_LENGTH,
                  output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_the_fine_tuned_inpainting_teacher_uses_its_condition(tiny_teacher_dir, prepared_data):
    """After a short fine-tune on random masks, the widened tiny teacher predicts better with the true mask and
    masked image than with another record's: it reads the new channels (which start at zero)."""
    import torch.nn.functional as F

    from ladd.config import TeacherConfig
    from ladd.data.prepare import load_split
    from ladd.inpaint import finetune_inpaint_teacher, inpaint_condition
    from ladd.pipeline import encode_images, encode_prompts
    from ladd.tracking import NullTracker

    train = load_split(prepared_data / "train")
    images, prompts = train.images[:512], list(train.captions["prompt"][:512])
    pipe = load_pipeline(tiny_teacher_dir)
    cfg = TeacherConfig(steps=150, batch_size=64, lr=2e-3, device="cpu")
    pipe = finetune_inpaint_teacher(pipe, images, prompts, cfg, "cpu", NullTracker())
    held = load_split(prepared_data / "test")
    x0 = encode_images(pipe.vae, held.images[:128])
    cond = inpaint_condition(pipe.vae, held.images[:128], random_masks(list(range(10_000, 10_128)), 32, 32))
    e, p = encode_prompts(pipe, list(held.captions["prompt"][:128]), 16)
    g = torch.Generator().manual_seed(0)
    eps, t = torch.randn(x0.shape, generator=g), torch.full((128,), 0.9)
    x_t = 0.1 * x0 + 0.9 * eps

    def loss(c):
        with torch.no_grad():
            v = pipe.transformer(hidden_states=torch.cat([x_t, c], 1), encoder_hidden_states=e, pooled_projections=p,
                                 timestep=t * 1000).sample
        return F.mse_loss(v, eps - x0).item()

    assert loss(cond) < 0.9 * loss(cond.roll(1, 0))


@pytest.mark.parametrize("steps,guidance", [(1, 0.0), (3, 2.0)])
def test_ladds_sampler_with_the_condition_is_stock_inpaint_pipeline(tmp_path, steps, guidance):
    """The widened SD3.5-shaped teacher (33 channels) in stock `StableDiffusion3InpaintPipeline` at strength 1
    equals ladd's Euler sampler given the same mask and masked-image latent (1e-5)."""
    from diffusers import StableDiffusion3InpaintPipeline

    from ladd.generate import generate_latents, record_noise
    from ladd.inpaint import masked_images
    from ladd.pipeline import encode_prompts
    from ladd.sampling import flow_sigmas

    pipe = load_pipeline(build_sd35_like_teacher(tmp_path / "sd35"))
    pipe.transformer = widen_transformer(pipe.transformer)
    with torch.no_grad():  # as if fine-tuned: the condition's weights matter
        pipe.transformer.pos_embed.proj.weight[:, LATENT_CHANNELS:] = 0.05 * torch.randn_like(
            pipe.transformer.pos_embed.proj.weight[:, LATENT_CHANNELS:])
    inpaint = StableDiffusion3InpaintPipeline(**pipe.components)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.random((1, 3, 64, 64))).float() * 2 - 1
    mask = random_masks([4], 64, 64)
    raw = pipe.vae.encode(masked_images(pixels, mask)).latent_dist.mean  # passed as masked_image_latents (unscaled)
    prompt = "a drawing of the digit two"
    stock = inpaint(prompt, image=(pixels + 1) / 2, mask_image=mask, masked_image_latents=raw, strength=1.0,
                    num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                    max_sequence_length=T5_MAX_LENGTH, generator=torch.Generator().manual_seed(9), output_type="latent").images
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    cond = condition(latent_mask(mask, (8, 8)), (raw - shift) * scale)
    e, p = encode_prompts(pipe, [prompt], T5_MAX_LENGTH)
    ne, np_ = encode_prompts(pipe, [""], T5_MAX_LENGTH)
    ours = generate_latents(pipe.transformer, e, p, record_noise([9], (LATENT_CHANNELS, 8, 8)),
                            flow_sigmas(steps, pipe.scheduler.config.shift), guidance, ne, np_, condition=cond)
    assert (ours - stock).abs().max() <= 1e-5


def test_the_teacher_stage_builds_an_inpainting_teacher_and_refuses_odd_widths(prepared_data, tmp_path):
    from ladd.config import InpaintConfig, TeacherConfig
    from ladd.errors import ConfigError
    from ladd.teacher import teacher_stage
    from ladd.tracking import NullTracker

    on = InpaintConfig(enabled=True, teacher_steps=5)
    cfg = TeacherConfig(out_dir=str(tmp_path / "teacher"), latent_channels=16, vae_steps=5, steps=5, batch_size=16,
                        device="cpu")
    teacher = teacher_stage(cfg, prepared_data, "cpu", NullTracker(), on)
    pipe = load_pipeline(teacher)
    assert pipe.transformer.config.in_channels == 33 and pipe.vae.config.latent_channels == 16
    # a 33-channel folder is taken as it is; a transformer of another width is refused, naming the key
    again = teacher_stage(TeacherConfig(pretrained=str(teacher), out_dir=str(tmp_path / "again")), prepared_data, "cpu",
                          NullTracker(), on)
    assert load_pipeline(again).transformer.config.in_channels == 33
    from diffusers import SD3Transformer2DModel

    odd = load_pipeline(teacher)
    odd.transformer = SD3Transformer2DModel.from_config({**dict(odd.transformer.config), "in_channels": 20})
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(ConfigError, match=r"teacher.pretrained: .* takes 20 input channels; an inpainting teacher needs "
                                          r"16 \(text-to-image, widened here\) or 33"):
        teacher_stage(TeacherConfig(pretrained=str(tmp_path / "odd"), out_dir=str(tmp_path / "refused")), prepared_data,
                      "cpu", NullTracker(), on)
    assert not (tmp_path / "refused").exists()
