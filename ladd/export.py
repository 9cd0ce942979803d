"""`ladd export`: the student pipeline as ONNX graphs for onnxruntime, checked against PyTorch.

Graphs (fp32, and fp16 for GPUs), all with a dynamic batch axis:
- text_encoder: token ids of each tokenizer -> (prompt_embeds, pooled_projections), the pipeline's
  encode_prompt (CLIP penultimate states, zero-padded to the T5 width, T5 or its zero slot);
- transformer: one step, diffusers' argument names -> velocity;
- vae_decoder: scaled latents -> images in [0, 1];
- generator: noise + text embeddings (+ the sampler's re-noising draws) -> (latents, images), the
  student's k-step sampler unrolled;
- an inpainting student also takes `condition` [N, 1 + C, h, w] in the generator (the transformer graph takes x
  and it concatenated), and gets `inpaint_condition`: images in [0, 1] and masks -> that condition
  (`ladd.inpaint.inpaint_condition`: mask at latent size, the masked image's scaled latent).
Beside them, in `single_file_dir`, the transformer (and a LoRA student's adapter) in SD3's original key layout
with the sampling settings (`ladd.single_file`), for ComfyUI and Forge.
The stage fails, keeping the previous export, when ORT and PyTorch disagree by more than the tolerance.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ladd.config import ExportConfig
from ladd.errors import ParityError
from ladd.inpaint import condition_of, has_condition, random_masks
from ladd.io import atomic_dir, fingerprint, write_json
from ladd.onnx_runtime import (
    MANIFEST,
    NUM_TRAIN_TIMESTEPS,
    RUNTIME_SETTINGS,
    OnnxStudent,
    PromptTokenizer,
    session_feeds,
)
from ladd.pipeline import encode_prompts, latent_shape, load_pipeline, read_meta, vae_scaling
from ladd.registry import open_registry
from ladd.sampling import STOCHASTIC, step
from ladd.schedules import student_sigmas, trained_step_counts
from ladd.single_file import write_single_file_exports

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
TEXT_INPUTS = {"tokenizer": "input_ids", "tokenizer_2": "input_ids_2", "tokenizer_3": "input_ids_3"}


class PromptEncoder(torch.nn.Module):
    """StableDiffusion3Pipeline.encode_prompt (no CFG) as a module of token ids."""

    def __init__(self, pipe, max_sequence_length: int, dtype=torch.float32):
        super().__init__()
        encoders = [
            copy.deepcopy(e).to(dtype) if e is not None else None
            for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        ]
        for e in filter(None, encoders):  # the TorchScript exporter's SDPA mixes fp32 into fp16 graphs
            e.set_attn_implementation("eager")
        self.clips = torch.nn.ModuleList(encoders[:2])
        self.t5 = encoders[2]
        self.max_sequence_length, self.joint_dim = max_sequence_length, pipe.transformer.config.joint_attention_dim

    def forward(self, input_ids, input_ids_2, input_ids_3=None):
        outs = [enc(ids, output_hidden_states=True) for enc, ids in zip(self.clips, (input_ids, input_ids_2))]
        clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)  # penultimate layer, as SD3 (clip_skip=None)
        if self.t5 is not None:
            t5 = self.t5(input_ids_3)[0]
        else:  # no T5: diffusers feeds zeros in its slot
            t5 = clip.new_zeros(()).expand(clip.shape[0], self.max_sequence_length, self.joint_dim)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([o[0] for o in outs], dim=-1)


class Velocity(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]


class VaeDecoder(torch.nn.Module):
    """Scaled latents -> images in [0, 1], the inverse of the pipeline's (z - shift) * scale."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale, self.shift = vae_scaling(vae)

    def forward(self, latents):
        return (self.vae.decode(latents / self.scale + self.shift).sample / 2 + 0.5).clamp(0, 1)


class FewStepGenerator(torch.nn.Module):
    """The student's k-step sampler with its times baked in (`ladd.sampling.step`, re-noised to the next t with
    `step_noise[i]` or Euler), then the VAE decoder."""

    def __init__(self, transformer, vae, sigmas: torch.Tensor, sampler: str):
        super().__init__()
        self.velocity, self.decoder = Velocity(transformer), VaeDecoder(vae)
        self.sigmas, self.sampler = [float(s) for s in sigmas], sampler

    def forward(self, noise, prompt_embeds, pooled_projections, step_noise):
        return self.sample(noise, prompt_embeds, pooled_projections, step_noise, None)

    def sample(self, noise, prompt_embeds, pooled_projections, step_noise, condition):
        x, steps = noise, len(self.sigmas) - 1
        for i in range(steps):
            t, t_next = self.sigmas[i], self.sigmas[i + 1]
            timestep = torch.full_like(x[:, 0, 0, 0], t * NUM_TRAIN_TIMESTEPS)
            x_in = x if condition is None else torch.cat([x, condition], 1)
            v = self.velocity(x_in, prompt_embeds, pooled_projections, timestep)
            draw = (lambda i=i: step_noise[i]) if STOCHASTIC[self.sampler] and i < steps - 1 else None
            x = step(x, v, t, t_next, draw)
        return x, self.decoder(x)


class InpaintGenerator(FewStepGenerator):
    """The inpainting student's sampler: the condition beside x at every step (inputs: noise, condition, then the
    text-to-image generator's, so the step noise stays last and drops out at one step)."""

    def forward(self, noise, condition, prompt_embeds, pooled_projections, step_noise):
        return self.sample(noise, prompt_embeds, pooled_projections, step_noise, condition)


class InpaintCondition(torch.nn.Module):
    """Images in [0, 1] and pixel masks (1: to inpaint) -> the condition channels (`ladd.inpaint.condition_of`)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images, masks):
        return condition_of(self.vae, images, masks)


def export_graph(
    module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    opset: int,
    batch_axis: dict[str, int] | None = None,
) -> Path:
    """torch.onnx.export (TorchScript exporter: ~10x faster than dynamo here, same graphs) with a dynamic
    batch axis on every input and output (axis 0 unless `batch_axis` says otherwise), then the full checker."""
    axes = {name: {(batch_axis or {}).get(name, 0): "batch"} for name in inputs + outputs}
    # diffusers' shape checks freeze into the trace (TracerWarning); they do not touch the batch axis, and
    # check_export runs every graph at a second batch size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _text_ids(tokenizers: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
    return {TEXT_INPUTS[name]: torch.from_numpy(tok(prompts)) for name, tok in tokenizers.items()}


def export_student(pipe, meta: dict, out: Path, cfg: ExportConfig, source: dict, limits: dict | None = None) -> dict:
    """Write every graph, the tokenizers and the manifest into `out` (with the request rules of `ladd.serving`: the
    student's trained step counts and `limits`); returns the manifest."""
    trained = trained_step_counts(meta)
    msl = int(meta.get("max_sequence_length", 256))
    tok_max = pipe.tokenizer.model_max_length
    names = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if pipe.text_encoder_3 is not None else [])
    tokenizers_meta = {}
    for name in names:
        tok = getattr(pipe, name)
        tok.save_pretrained(out / name)
        if not (out / name / "tokenizer.json").is_file():
            raise ValueError(
                f"{name}: {type(tok).__name__} saved no tokenizer.json; the ONNX runtime needs a fast tokenizer"
            )
        # the pipeline pads both CLIPs to the first tokenizer's length and T5 to max_sequence_length
        tokenizers_meta[name] = {
            "file": f"{name}/tokenizer.json",
            "input": TEXT_INPUTS[name],
            "max_length": msl if name == "tokenizer_3" else tok_max,
            "pad_id": tok.pad_token_id,
            "pad_token": str(tok.pad_token),
        }
    tokenizers = {n: PromptTokenizer.from_manifest(out, t) for n, t in tokenizers_meta.items()}

    shape = latent_shape(pipe)
    conditioned = has_condition(pipe.transformer.config.in_channels, shape[0])
    prompts = list(cfg.prompts[:2])
    ids = _text_ids(tokenizers, prompts)
    sigmas = student_sigmas(cfg.steps, meta)
    sampler = meta.get("sampler", "euler")
    models = {}
    for precision in ("fp32", "fp16") if cfg.fp16 else ("fp32",):
        dtype = torch.float16 if precision == "fp16" else torch.float32
        # fp16 graphs come from a half copy of the modules (all fp16 inputs); torch's CPU kernels trace them
        tr = copy.deepcopy(pipe.transformer).to(dtype).eval()
        vae = copy.deepcopy(pipe.vae).to(dtype).eval()
        encoder = PromptEncoder(pipe, msl, dtype).eval()
        with torch.no_grad():
            embeds, pooled = encoder(*ids.values())
        noise = torch.randn(len(prompts), *shape, dtype=dtype)
        step_noise = torch.randn(max(cfg.steps - 1, 1), len(prompts), *shape, dtype=dtype)
        (out / precision).mkdir()
        files = {
            "text_encoder": f"{precision}/text_encoder.onnx",
            "transformer": f"{precision}/transformer.onnx",
            "vae_decoder": f"{precision}/vae_decoder.onnx",
            "generator": f"{precision}/generator_{cfg.steps}step.onnx",
        }
        tick = time.perf_counter()
        export_graph(
            encoder,
            tuple(ids.values()),
            out / files["text_encoder"],
            list(ids),
            ["prompt_embeds", "pooled_projections"],
            cfg.opset,
        )
        x_in, generator, generator_inputs = noise, FewStepGenerator(tr, vae, sigmas, sampler), (noise,)
        if conditioned:
            files["inpaint_condition"] = f"{precision}/inpaint_condition.onnx"
            images, masks = example_inpaint_inputs(pipe, len(prompts), cfg.seed, dtype)
            export_graph(
                InpaintCondition(vae),
                (images, masks),
                out / files["inpaint_condition"],
                ["images", "masks"],
                ["condition"],
                cfg.opset,
            )
            with torch.no_grad():
                condition = InpaintCondition(vae)(images, masks)
            x_in, generator = torch.cat([noise, condition], 1), InpaintGenerator(tr, vae, sigmas, sampler)
            generator_inputs = (noise, condition)
        export_graph(
            Velocity(tr),
            (x_in, embeds, pooled, torch.full((len(prompts),), 500.0, dtype=dtype)),
            out / files["transformer"],
            ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
            ["velocity"],
            cfg.opset,
        )
        export_graph(VaeDecoder(vae), (noise,), out / files["vae_decoder"], ["latents"], ["images"], cfg.opset)
        names = ["noise", *(["condition"] if conditioned else []), "prompt_embeds", "pooled_projections"]
        export_graph(
            generator,
            (*generator_inputs, embeds, pooled, step_noise),
            out / files["generator"],
            names + (["step_noise"] if cfg.steps > 1 else []),
            ["latents", "images"],
            cfg.opset,
            batch_axis={"step_noise": 1},
        )
        log.info("exported %s graphs in %.1f s", precision, time.perf_counter() - tick)
        models[precision] = files
    manifest = {
        "format": MANIFEST_FORMAT,
        "opset": cfg.opset,
        "steps": cfg.steps,
        "sampler": sampler,
        "schedules": {str(k): student_sigmas(k, meta).tolist() for k in range(1, max(cfg.steps, *trained) + 1)},
        "trained_steps": trained,
        "default_steps": int(meta.get("default_steps", cfg.steps)),
        "latent_shape": list(shape),
        "image_channels": pipe.vae.config.out_channels,
        "image_size": [shape[1] * pipe.vae_scale_factor, shape[2] * pipe.vae_scale_factor],
        "limits": dict(limits or {}),
        "task": "inpaint" if conditioned else "text2image",
        "tokenizers": tokenizers_meta,
        "models": models,
        "source": source,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def example_inpaint_inputs(pipe, n: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """n seeded images in [0, 1] at the native size and their masks (`ladd.inpaint.random_masks`)."""
    c, h, w = latent_shape(pipe)
    size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    images = torch.rand(n, pipe.vae.config.in_channels, *size, generator=torch.Generator().manual_seed(seed))
    return images.to(dtype), random_masks([seed + i for i in range(n)], *size).to(dtype)


def _max_error(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up: allocator, thread pools, ORT's first-run arena
        fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tick) * 1000)
    return float(np.median(times))


def check_export(pipe, meta: dict, onnx_dir: Path, cfg: ExportConfig) -> dict:
    """Parity (ORT vs PyTorch on the same inputs, every graph) and latency of the whole few-step generator
    (noise + embeddings -> images), ORT vs PyTorch eager, at each batch size, in one run."""
    threads = cfg.threads or torch.get_num_threads()
    runtime = OnnxStudent(onnx_dir, "fp32", cfg.provider, threads)
    provider = runtime.provider
    device = torch.device("cuda" if provider != "CPUExecutionProvider" and torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    conditioned = runtime.manifest.get("task") == "inpaint"
    generator = (InpaintGenerator if conditioned else FewStepGenerator)(
        pipe.transformer, pipe.vae, student_sigmas(cfg.steps, meta), runtime.manifest["sampler"]
    ).eval()
    msl = int(meta.get("max_sequence_length", 256))
    report = {
        "provider": provider,
        "threads": threads,
        "steps": cfg.steps,
        "torch_device": device.type,
        "parity": {},
        "latency": {},
    }
    fp16 = {}
    for batch in cfg.batch_sizes:
        prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(batch)]
        noise, step_noise = runtime.step_noise(list(range(cfg.seed, cfg.seed + batch)), cfg.steps)
        embeds, pooled = encode_prompts(pipe, prompts, msl)
        torch_inputs = (torch.from_numpy(noise).to(device), embeds, pooled, torch.from_numpy(step_noise).to(device))
        condition, parity = None, {}
        if conditioned:  # the condition graph against PyTorch; the generator then takes PyTorch's condition
            images_in, masks = example_inpaint_inputs(pipe, batch, cfg.seed + batch)
            with torch.inference_mode():
                cond = InpaintCondition(pipe.vae)(images_in.to(device), masks.to(device))
            condition = cond.float().cpu().numpy()
            parity["inpaint_condition"] = _max_error(
                runtime.inpaint_condition(images_in.numpy(), masks.numpy()), condition
            )
            torch_inputs = (torch_inputs[0], cond, *torch_inputs[1:])
        with torch.inference_mode():
            latents, images = (x.float().cpu().numpy() for x in generator(*torch_inputs))
        embeds_np, pooled_np = embeds.float().cpu().numpy(), pooled.float().cpu().numpy()
        ort_embeds, ort_pooled = runtime.encode(prompts)
        ort_latents, ort_images = runtime.generate_latents(embeds_np, pooled_np, noise, step_noise, condition=condition)
        loop_latents, loop_images = runtime.generate_latents(
            embeds_np, pooled_np, noise, step_noise, unrolled=False, condition=condition
        )
        report["parity"][str(batch)] = {
            "prompt_embeds": _max_error(ort_embeds, embeds_np),
            "pooled_projections": _max_error(ort_pooled, pooled_np),
            "latents": _max_error(ort_latents, latents),
            "images": _max_error(ort_images, images),
            "transformer_loop_latents": _max_error(loop_latents, latents),
            "vae_decoder_images": _max_error(loop_images, images),
            **parity,
        }
        session = runtime.session("generator")
        feeds = session_feeds(
            session,
            noise=noise,
            prompt_embeds=embeds_np,
            pooled_projections=pooled_np,
            step_noise=step_noise,
            condition=condition,
        )

        def run_torch(torch_inputs=torch_inputs):
            with torch.inference_mode():
                generator(*torch_inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()

        torch_ms = median_ms(run_torch, cfg.latency_repeats)
        ort_ms = median_ms(lambda session=session, feeds=feeds: session.run(None, feeds), cfg.latency_repeats)
        report["latency"][str(batch)] = {"torch_ms": torch_ms, "ort_ms": ort_ms, "ratio": ort_ms / torch_ms}
        log.info(
            "batch %d: parity %s; torch %.2f ms, ort %.2f ms (%.2fx)",
            batch,
            report["parity"][str(batch)],
            torch_ms,
            ort_ms,
            ort_ms / torch_ms,
        )
        if cfg.fp16:
            fp16 = _check_fp16(
                fp16, onnx_dir, cfg, threads, embeds_np, pooled_np, noise, step_noise, latents, images, condition
            )
            report["fp16"] = {k: v for k, v in fp16.items() if k != "runtime"}
    report["max_abs_error"] = max(max(p.values()) for p in report["parity"].values())
    pipe.to("cpu")
    return report


def _check_fp16(
    fp16: dict, onnx_dir, cfg, threads, embeds, pooled, noise, step_noise, latents, images, condition=None
) -> dict:
    """`fp16` (what earlier batch sizes found) with this batch's: the fp16 graphs' distance to the fp32 PyTorch
    result (reported, not gated: half precision's error is ~1e-2 by design) and the generator's latency; where
    its provider cannot run them, the reason (and no further try)."""
    if "error" in fp16:
        return fp16
    try:
        runtime = fp16.get("runtime") or OnnxStudent(onnx_dir, "fp16", cfg.provider, threads)
        lat, img = runtime.generate_latents(embeds, pooled, noise, step_noise, condition=condition)
    except Exception as e:  # e.g. an op without a float16 kernel on the CPU provider
        log.warning("fp16 graphs did not run on %s: %s", cfg.provider, e)
        return {"provider": None, "error": str(e)[:500]}
    session = runtime.session("generator")
    feeds = session_feeds(
        session,
        noise=noise,
        prompt_embeds=embeds,
        pooled_projections=pooled,
        step_noise=step_noise,
        condition=condition,
    )
    batch = {
        "latents_max_abs_error": _max_error(lat, latents),
        "images_max_abs_error": _max_error(img, images),
        "ort_ms": median_ms(lambda: session.run(None, feeds), cfg.latency_repeats),
    }
    per_batch = {**fp16.get("per_batch", {}), str(len(noise)): batch}
    return {
        "runtime": runtime,
        "provider": runtime.provider,
        "per_batch": per_batch,
        **{k: max(b[k] for b in per_batch.values()) for k in ("latents_max_abs_error", "images_max_abs_error")},
    }


def export_stage(cfg: ExportConfig, student_dir: str | Path, tracker, limits: dict | None = None) -> dict:
    """Export, check, and only then replace `cfg.out_dir`, write the report and log/register the model."""
    torch.manual_seed(cfg.seed)
    pipe = load_pipeline(student_dir, "cpu")
    meta = read_meta(student_dir)
    source = {"student_dir": str(student_dir), "fingerprint": fingerprint(student_dir)}
    with atomic_dir(cfg.out_dir) as tmp:
        manifest = export_student(pipe, meta, tmp, cfg, source, limits)
        if (Path(cfg.out_dir) / RUNTIME_SETTINGS).is_file():  # each machine's measured settings outlive a re-export
            shutil.copy2(Path(cfg.out_dir) / RUNTIME_SETTINGS, tmp / RUNTIME_SETTINGS)
        report = check_export(pipe, meta, tmp, cfg)
        if report["max_abs_error"] > cfg.tolerance:
            worst = {b: max(p, key=p.get) for b, p in report["parity"].items()}
            raise ParityError(
                f"ONNX Runtime and PyTorch disagree: max abs error {report['max_abs_error']:.3g} > "
                f"export.tolerance {cfg.tolerance:g} (worst output per batch size: {worst}); "
                f"{cfg.out_dir} and {cfg.report} are left as they were"
            )
        with atomic_dir(cfg.single_file_dir) as single:  # for ComfyUI / Forge: SD3's original key layout
            report["single_file"] = write_single_file_exports(student_dir, single)
        log.info("wrote %s: %s", cfg.single_file_dir, ", ".join(report["single_file"]))
    report["bytes"] = {
        f: (Path(cfg.out_dir) / f).stat().st_size for files in manifest["models"].values() for f in files.values()
    }
    report["config"] = asdict(cfg)
    write_json(cfg.report, report)
    tracker.log_metrics(
        {
            "export/max_abs_error": report["max_abs_error"],
            **{f"export/{k}/batch{b}": v for b, row in report["latency"].items() for k, v in row.items()},
        }
    )
    tracker.log_artifact(cfg.report)
    if cfg.register:
        registered = open_registry(tracker).log_onnx_student(cfg.out_dir, cfg.model_name)
        if registered:
            log.info("logged the ONNX student to MLflow: %s", registered)
    return {"max_abs_error": report["max_abs_error"], "provider": report["provider"], "latency": report["latency"]}
