"""Inpainting: masks, the condition, the widened teacher, and a tiny inpainting chain (teacher ->
synthesize -> distill -> evaluate -> export) that stock `StableDiffusion3InpaintPipeline` runs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd3_family import LATENT_CHANNELS, T5_MAX_LENGTH, build_sd35_like_teacher

from ladd.inpaint import check_mask, condition, latent_mask, masked_images, random_masks, widen_transformer
from ladd.pipeline import load_pipeline, max_sequence_length


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
        got = wide(
            hidden_states=torch.cat([x, cond], 1), encoder_hidden_states=c, pooled_projections=p, timestep=t
        ).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # stock diffusers runs it as an inpainting model (33 channels: the condition goes in, nothing is blended)
    from diffusers import StableDiffusion3InpaintPipeline

    inpaint = StableDiffusion3InpaintPipeline(**{**pipe.components, "transformer": wide})
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask_image = Image.fromarray((random_masks([3], 64, 64)[0, 0].numpy() * 255).astype(np.uint8))
    out = inpaint(
        "a drawing of the digit two",
        image=image,
        mask_image=mask_image,
        num_inference_steps=2,
        guidance_scale=0.0,
        strength=1.0,
        height=64,
        width=64,
        max_sequence_length=T5_MAX_LENGTH,
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.slow
def test_the_fine_tuned_inpainting_teacher_uses_its_condition(tiny_teacher_dir, prepared_data):
    """After a short fine-tune on random masks, the widened tiny teacher predicts better with the true mask and
    masked image than with another record's: it reads the new channels (which start at zero)."""
    import torch.nn.functional as F

    from ladd.config import TeacherConfig
    from ladd.data.prepare import load_split
    from ladd.inpaint import inpaint_condition
    from ladd.pipeline import encode_images, encode_prompts
    from ladd.teacher import finetune_inpaint_teacher
    from ladd.tracking import NullTracker

    train = load_split(prepared_data / "train")
    images, prompts = train.images[:512], list(train.captions["prompt"][:512])
    pipe = load_pipeline(tiny_teacher_dir)
    cfg = TeacherConfig(steps=150, batch_size=64, lr=2e-3, device="cpu")
    pipe = finetune_inpaint_teacher(pipe, images, prompts, cfg, "cpu", NullTracker())
    held = load_split(prepared_data / "test")
    x0 = encode_images(pipe.vae, held.images[:128])
    cond = inpaint_condition(pipe.vae, held.images[:128], random_masks(list(range(10_000, 10_128)), 32, 32))
    e, p = encode_prompts(pipe, list(held.captions["prompt"][:128]), max_sequence_length(tiny_teacher_dir))
    g = torch.Generator().manual_seed(0)
    eps, t = torch.randn(x0.shape, generator=g), torch.full((128,), 0.9)
    x_t = 0.1 * x0 + 0.9 * eps

    def loss(c):
        with torch.no_grad():
            v = pipe.transformer(
                hidden_states=torch.cat([x_t, c], 1), encoder_hidden_states=e, pooled_projections=p, timestep=t * 1000
            ).sample
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
            pipe.transformer.pos_embed.proj.weight[:, LATENT_CHANNELS:]
        )
    inpaint = StableDiffusion3InpaintPipeline(**pipe.components)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.random((1, 3, 64, 64))).float() * 2 - 1
    mask = random_masks([4], 64, 64)
    raw = pipe.vae.encode(masked_images(pixels, mask)).latent_dist.mean  # passed as masked_image_latents (unscaled)
    prompt = "a drawing of the digit two"
    stock = inpaint(
        prompt,
        image=(pixels + 1) / 2,
        mask_image=mask,
        masked_image_latents=raw,
        strength=1.0,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=64,
        width=64,
        max_sequence_length=T5_MAX_LENGTH,
        generator=torch.Generator().manual_seed(9),
        output_type="latent",
    ).images
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    cond = condition(latent_mask(mask, (8, 8)), (raw - shift) * scale)
    e, p = encode_prompts(pipe, [prompt], T5_MAX_LENGTH)
    ne, np_ = encode_prompts(pipe, [""], T5_MAX_LENGTH)
    ours = generate_latents(
        pipe.transformer,
        e,
        p,
        record_noise([9], (LATENT_CHANNELS, 8, 8)),
        flow_sigmas(steps, pipe.scheduler.config.shift),
        guidance,
        ne,
        np_,
        condition=cond,
    )
    assert (ours - stock).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def inpaint_chain(prepared_data, tmp_path_factory):
    """The embedded default's inpainting chain, made tiny: a 16-latent-channel teacher widened and fine-tuned on
    random masks, its inpainted latents synthesized, a student distilled."""
    from conftest import DISTILL

    from ladd.config import DistillConfig, InpaintConfig, SynthesizeConfig, TeacherConfig
    from ladd.distill import distill
    from ladd.synthesize import synthesize
    from ladd.teacher import teacher_stage
    from ladd.tracking import NullTracker

    root = tmp_path_factory.mktemp("inpaint")
    on = InpaintConfig(enabled=True, teacher_steps=10)
    teacher = teacher_stage(
        TeacherConfig(
            out_dir=str(root / "teacher"), latent_channels=16, vae_steps=10, steps=10, batch_size=16, device="cpu"
        ),
        prepared_data,
        "cpu",
        NullTracker(),
        on,
    )
    syn = SynthesizeConfig(
        out_dir=str(root / "synthetic"), steps=2, samples_per_prompt=1, shard_size=512, batch_size=512, device="cpu"
    )
    synthesize(syn, prepared_data, teacher, NullTracker(), inpaint=on)
    cfg = DistillConfig(
        out_dir=str(root / "student"), checkpoint=str(root / "ck.safetensors"), report_dir=str(root), **DISTILL
    )
    summary = distill(cfg, teacher, syn.out_dir, NullTracker())
    return root, teacher, syn, on, summary


@pytest.mark.slow
def test_the_chain_stores_each_records_condition_and_trains_on_it(inpaint_chain, prepared_data):
    from ladd.data.prepare import load_split
    from ladd.data.synthetic import load_synthetic
    from ladd.inpaint import inpaint_condition, record_masks

    root, teacher, syn, on, summary = inpaint_chain
    pipe = load_pipeline(teacher)
    assert pipe.transformer.config.in_channels == 33 and pipe.vae.config.latent_channels == 16
    data = load_synthetic(syn.out_dir)
    bucket = data.buckets[0]
    assert bucket.latents.shape[1:] == (16, 8, 8) and bucket.condition.shape[1:] == (17, 8, 8)
    rec = data.records.iloc[int(bucket.records[5])]
    image = load_split(prepared_data / "train").images[[int(rec["image"])]]
    want = inpaint_condition(pipe.vae, image, record_masks("synthesize", [rec["seed"]], on.mask_seed, 32, 32))
    torch.testing.assert_close(bucket.condition[5:6], want, rtol=0, atol=1e-5)
    assert summary["skipped_updates"] == 0 and load_pipeline(root / "student").transformer.config.in_channels == 33


@pytest.mark.slow
def test_stock_inpaint_pipeline_runs_the_student_as_ladds_sampler(inpaint_chain, prepared_data):
    """`StableDiffusion3InpaintPipeline.from_pretrained(student)` at strength 1, no CFG, 1/2/4 steps: the trained
    times, and ladd's own sampler's latents (1e-5) given the same noise, mask and masked-image latent."""
    from diffusers import StableDiffusion3InpaintPipeline

    from ladd.data.prepare import load_split
    from ladd.generate import record_noise
    from ladd.inpaint import inpaint_condition
    from ladd.pipeline import encode_prompts, read_meta
    from ladd.sampling import cfg_velocity, sample_renoise
    from ladd.schedules import student_sigmas

    root = inpaint_chain[0]
    # the tiny teacher has no T5 and no image encoder: diffusers wants those passed as None (an SD3.5 folder needs
    # nothing)
    stock = StableDiffusion3InpaintPipeline.from_pretrained(
        root / "student", text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None
    )
    meta = read_meta(root / "student")
    test = load_split(prepared_data / "test")
    image, mask = test.images[:1], random_masks([11], 32, 32)
    prompt = test.captions["prompt"][0]
    raw = stock.vae.encode(masked_images(image.float() / 127.5 - 1, mask)).latent_dist.mean
    e, p = encode_prompts(stock, [prompt], meta["max_sequence_length"])
    cond = inpaint_condition(stock.vae, image, mask)
    for steps, visited in ((4, meta["student_times"]), (2, [1.0, 0.25]), (1, [1.0])):
        stock.scheduler.set_timesteps(steps)
        assert stock.scheduler.timesteps.tolist() == pytest.approx([1000 * t for t in visited], abs=1e-3)
        torch.manual_seed(0)  # diffusers' re-noising draws from the global RNG
        ref = stock(
            prompt,
            image=image.float() / 255,
            mask_image=mask,
            masked_image_latents=raw,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=0.0,
            max_sequence_length=meta["max_sequence_length"],
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        ).images
        torch.manual_seed(0)
        ours = sample_renoise(
            cfg_velocity(stock.transformer, e, p, condition=cond),
            record_noise([3], (16, 8, 8)),
            student_sigmas(steps, meta),
        )
        assert (ours - ref).abs().max() <= 1e-5, steps


@pytest.mark.slow
def test_the_chain_evaluates_registers_and_exports(
    inpaint_chain, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, monkeypatch
):
    """evaluate scores the inpainted images (FD, accuracy, error outside the mask) of the teacher and the student at
    1/2/4 steps, with a grid whose first row is the masked input, and registers the student in a real MLflow store
    as a model that inpaints (prompt, image, mask); the ONNX export (condition graph and generator) agrees with
    PyTorch and its runtime inpaints."""
    import base64
    import io
    from dataclasses import replace

    import mlflow
    import pandas as pd

    from ladd.config import EvaluateConfig, ExportConfig
    from ladd.evaluate import evaluate
    from ladd.export import export_stage
    from ladd.onnx_runtime import OnnxStudent
    from ladd.serving import inpaint_example
    from ladd.tracking import NullTracker, stage_run

    root, teacher, syn, on, _ = inpaint_chain
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    cfg = EvaluateConfig(
        out_dir=str(root / "reports"),
        teacher_steps=4,
        few_steps=(1, 2, 4),
        num_samples=24,
        seeds=(0, 1),
        grid_size=10,
        device="cpu",
        model_name="ladd-inpaint",
    )
    with stage_run("evaluate") as tracker:
        metrics = evaluate(cfg, prepared_data, tiny_classifier_dir, teacher, root / "student", tracker, inpaint=on)
    for row in (metrics["teacher"], *metrics["student"].values()):
        assert {"fd", "accuracy", "outside_mse", "fd_teacher"} <= set(row) and 0 <= row["outside_mse"] < 1
    assert (root / "reports" / "grids" / "teacher_vs_student.png").is_file()
    assert metrics["registered"]["promoted"]
    # a text-to-image student under the same name is never compared with the inpainting champion
    from ladd.errors import ConfigError

    with pytest.raises(ConfigError, match="ladd-inpaint's champion is an inpainting student and this one is not"):
        with stage_run("evaluate") as tracker:
            evaluate(
                replace(cfg, out_dir=str(root / "t2i"), few_steps=(4,), num_samples=8, teacher_steps=2),
                prepared_data,
                tiny_classifier_dir,
                tiny_teacher_dir,
                tiny_student_dir,
                tracker,
            )
    model = mlflow.pyfunc.load_model("models:/ladd-inpaint@champion")
    example = inpaint_example(root / "student")
    out = model.predict(pd.DataFrame({"prompt": ["handwritten six"], "steps": [2], "seed": [0], **example}))
    assert Image.open(io.BytesIO(base64.b64decode(out["image_png"][0]))).size == (32, 32)
    with pytest.raises(Exception, match=r"image_png\[0\]: an inpainting student needs image_png and mask_png"):
        model.predict(
            pd.DataFrame(
                {"prompt": ["handwritten six"], "steps": [2], "seed": [0], "image_png": [""], "mask_png": [""]}
            )
        )
    small = inpaint_example(root / "student")  # a mask of another size than the image fails, naming the row
    mask = Image.open(io.BytesIO(base64.b64decode(example["mask_png"][0]))).resize((16, 16))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    small["mask_png"] = [base64.b64encode(buf.getvalue()).decode()]
    with pytest.raises(Exception, match=r"mask_png\[0\]: mask is \(16, 16\), the image \(32, 32\)"):
        model.predict(pd.DataFrame({"prompt": ["handwritten six"], "steps": [2], "seed": [0], **small}))
    result = export_stage(
        ExportConfig(
            out_dir=str(root / "onnx"),
            single_file_dir=str(root / "single_file"),
            report=str(root / "export.json"),
            steps=2,
            fp16=False,
            batch_sizes=(1, 3),
            latency_repeats=1,
            register=False,
        ),
        root / "student",
        NullTracker(),
    )
    report = __import__("json").loads((root / "export.json").read_text())
    assert result["max_abs_error"] < 1e-3 and "inpaint_condition" in report["parity"]["3"]
    runtime = OnnxStudent(root / "onnx", provider="cpu")
    images = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    masks = random_masks([1, 2], 32, 32).numpy()
    out = runtime(["handwritten six", "handwritten two"], images=images, masks=masks)
    assert out.shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match="needs condition"):
        runtime(["handwritten six"])


@pytest.mark.slow
def test_the_wrong_kind_of_teacher_or_data_fails_naming_the_key(
    inpaint_chain, prepared_data, tiny_teacher_dir, tmp_path
):
    from ladd.config import DistillConfig, SynthesizeConfig
    from ladd.distill import distill
    from ladd.errors import ConfigError
    from ladd.params import load_params
    from ladd.synthesize import synthesize
    from ladd.tracking import NullTracker

    root, teacher, syn, on, _ = inpaint_chain
    out = tmp_path / "synthetic"
    with pytest.raises(ConfigError, match="inpaint.enabled is true but .* holds a text-to-image transformer"):
        synthesize(
            SynthesizeConfig(out_dir=str(out), steps=1, device="cpu"),
            prepared_data,
            tiny_teacher_dir,
            NullTracker(),
            inpaint=on,
        )
    with pytest.raises(ConfigError, match="inpaint.enabled is false but .* holds an inpainting transformer"):
        synthesize(SynthesizeConfig(out_dir=str(out), steps=1, device="cpu"), prepared_data, teacher, NullTracker())
    with pytest.raises(ConfigError, match="synthesize.resolutions: inpainting works at the images' own size"):
        synthesize(
            SynthesizeConfig(out_dir=str(out), steps=1, resolutions=((32, 32), (16, 32)), device="cpu"),
            prepared_data,
            teacher,
            NullTracker(),
            inpaint=on,
        )
    assert not out.exists()
    with pytest.raises(ConfigError, match="synthesized with inpainting conditions, and the teacher is not"):
        distill(
            DistillConfig(
                out_dir=str(tmp_path / "s"),
                checkpoint=str(tmp_path / "ck.safetensors"),
                report_dir=str(tmp_path),
                steps=1,
                device="cpu",
            ),
            tiny_teacher_dir,
            syn.out_dir,
            NullTracker(),
        )
    params = tmp_path / "params.yaml"
    (tmp_path / "p.csv").write_text("prompt\nhandwritten six\n")
    params.write_text(
        f"prepare: {{source: prompts, captions: {tmp_path / 'p.csv'}}}\ninpaint: {{enabled: true}}\n"
        f"evaluate: {{features: clip, clip_path: {tmp_path}}}\n"
    )
    with pytest.raises(
        ConfigError, match="inpaint.enabled: inpainting fills a masked image, and prepare.source is prompts"
    ):
        load_params(params)


@pytest.mark.slow
def test_the_teacher_stage_refuses_odd_widths(inpaint_chain, prepared_data, tmp_path):
    from diffusers import SD3Transformer2DModel

    from ladd.config import TeacherConfig
    from ladd.errors import ConfigError
    from ladd.teacher import teacher_stage
    from ladd.tracking import NullTracker

    _, teacher, _, on, _ = inpaint_chain
    # a 33-channel folder is taken as it is; a transformer of another width is refused, naming the key
    again = teacher_stage(
        TeacherConfig(pretrained=str(teacher), out_dir=str(tmp_path / "again")), prepared_data, "cpu", NullTracker(), on
    )
    assert load_pipeline(again).transformer.config.in_channels == 33
    odd = load_pipeline(teacher)
    odd.transformer = SD3Transformer2DModel.from_config({**dict(odd.transformer.config), "in_channels": 20})
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(
        ConfigError,
        match=r"teacher.pretrained: .* takes 20 input channels; an inpainting teacher needs "
        r"16 \(text-to-image, widened here\) or 33",
    ):
        teacher_stage(
            TeacherConfig(pretrained=str(tmp_path / "odd"), out_dir=str(tmp_path / "refused")),
            prepared_data,
            "cpu",
            NullTracker(),
            on,
        )
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_a_users_sd35_inpainting_folder_and_unlabelled_images(tmp_path):
    """A user's own 33-channel SD3.5-shaped inpainting folder (T5, dual attention) and a folder of unlabelled RGB
    images: the teacher is taken as it is, synthesize and distill run with the condition, stock
    `StableDiffusion3InpaintPipeline.from_pretrained(student)` runs it with no extra argument, evaluate scores it
    with the user's CLIP (no labels: no accuracy) and the export inpaints in ORT."""
    from conftest import DISTILL
    from diffusers import StableDiffusion3InpaintPipeline

    from ladd.config import DistillConfig, InpaintConfig, PrepareConfig, SynthesizeConfig, TeacherConfig
    from ladd.data.prepare import prepare
    from ladd.distill import distill
    from ladd.synthesize import synthesize
    from ladd.teacher import teacher_stage
    from ladd.tracking import NullTracker

    pipe = load_pipeline(build_sd35_like_teacher(tmp_path / "base"))
    StableDiffusion3InpaintPipeline(
        **{**pipe.components, "transformer": widen_transformer(pipe.transformer)}
    ).save_pretrained(tmp_path / "users_inpainting_model")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(40):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "images" / f"{i}.png")
    words = ["zero", "one", "two", "three"]
    (tmp_path / "captions.csv").write_text(
        "file,prompt\n" + "".join(f"{i}.png,a drawing of the digit {words[i % 4]}\n" for i in range(40))
    )
    data = tmp_path / "data"
    prepare(
        PrepareConfig(
            source="folder",
            images_dir=str(tmp_path / "images"),
            captions=str(tmp_path / "captions.csv"),
            resolution=64,
            out_dir=str(data),
        )
    )
    on = InpaintConfig(enabled=True)
    teacher = teacher_stage(
        TeacherConfig(pretrained=str(tmp_path / "users_inpainting_model"), out_dir=str(tmp_path / "teacher")),
        data,
        "cpu",
        NullTracker(),
        on,
    )
    syn = SynthesizeConfig(out_dir=str(tmp_path / "synthetic"), steps=2, samples_per_prompt=2, device="cpu")
    synthesize(syn, data, teacher, NullTracker(), inpaint=on)
    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck.safetensors"),
        report_dir=str(tmp_path),
        **DISTILL,
        gradient_checkpointing="all",
    )
    assert distill(cfg, teacher, syn.out_dir, NullTracker())["skipped_updates"] == 0
    stock = StableDiffusion3InpaintPipeline.from_pretrained(tmp_path / "student")
    image = Image.open(tmp_path / "images" / "0.png")
    mask = Image.fromarray((random_masks([5], 64, 64)[0, 0].numpy() * 255).astype(np.uint8))
    out = stock(
        "a drawing of the digit zero",
        image=image,
        mask_image=mask,
        num_inference_steps=2,
        guidance_scale=0.0,
        strength=1.0,
        height=64,
        width=64,
        max_sequence_length=T5_MAX_LENGTH,
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    from sd3_family import build_tiny_clip

    from ladd.config import EvaluateConfig, ExportConfig
    from ladd.evaluate import evaluate
    from ladd.export import export_stage

    clip = build_tiny_clip(tmp_path / "clip", image_size=64)
    metrics = evaluate(
        EvaluateConfig(
            out_dir=str(tmp_path / "reports"),
            features="clip",
            clip_path=str(clip),
            teacher_steps=2,
            few_steps=(1, 2),
            seeds=(0, 1),
            register=False,
            device="cpu",
        ),
        data,
        None,
        teacher,
        tmp_path / "student",
        NullTracker(),
        inpaint=on,
    )
    assert {"fd", "fd_teacher", "clip_score", "outside_mse"} <= set(metrics["student"]["1"])
    assert "accuracy" not in metrics["student"]["1"]
    result = export_stage(
        ExportConfig(
            out_dir=str(tmp_path / "onnx"),
            single_file_dir=str(tmp_path / "single_file"),
            report=str(tmp_path / "export.json"),
            steps=2,
            fp16=False,
            batch_sizes=(2,),
            latency_repeats=1,
            register=False,
        ),
        tmp_path / "student",
        NullTracker(),
    )
    assert result["max_abs_error"] < 1e-3


def test_the_shipped_inpainting_params_are_params_yaml_with_the_task_switched():
    """params.inpaint.yaml loads, and differs from params.yaml only in the task, the latent channels, the
    distillation's length and the discriminator heads (README: Inpainting students)."""
    from dataclasses import asdict, replace

    from ladd.params import load_params

    root = Path(__file__).resolve().parents[1]
    base, inpaint = load_params(root / "params.yaml"), load_params(root / "params.inpaint.yaml")
    assert inpaint.inpaint.enabled and inpaint.teacher.latent_channels == 16
    same = replace(
        inpaint,
        inpaint=replace(inpaint.inpaint, enabled=False),
        teacher=replace(inpaint.teacher, latent_channels=4),
        distill=replace(
            inpaint.distill,
            steps=base.distill.steps,
            renoise_mean=base.distill.renoise_mean,
            feature_layers=base.distill.feature_layers,
            head_channels=base.distill.head_channels,
        ),
    )
    assert asdict(same) == asdict(base)
