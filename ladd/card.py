"""The student folder's model card (README.md with the diffusers/Hub metadata header): what it was
distilled from, how to load and call it in stock diffusers, how it was trained and, once `ladd evaluate`
has run, the evaluation table of its run."""

from __future__ import annotations

from pathlib import Path

from ladd.io import atomic_file
from ladd.schedules import trained_step_counts

CARD = "README.md"
TINY_BASE = "ladd-tiny-sd3-digits"  # the embedded default teacher, trained by `ladd teacher`


# diffusers' SD3 pipelines call scheduler.step without their `generator`, so the student's re-noising between steps
# (stochastic_sampling) draws from torch's global RNG: `generator=` alone gives other images at 2 and 4 steps
SEED_LINE = "torch.manual_seed(0)  # the seed of the image: the re-noising between steps draws from torch's global RNG"


def _pipeline_class(meta: dict) -> str:
    return "StableDiffusion3InpaintPipeline" if meta.get("task") == "inpaint" else "StableDiffusion3Pipeline"


def _load_snippet(meta: dict, has_t5: bool) -> str:
    extra = "" if has_t5 else ", text_encoder_3=None, tokenizer_3=None"
    steps = meta.get("default_steps", 4)
    # an inpainting student fills the white part of the mask (strength 1: from noise, its trained times)
    inputs = ", image=image, mask_image=mask, strength=1.0" if meta.get("task") == "inpaint" else ""
    return (
        f'pipe = {_pipeline_class(meta)}.from_pretrained("path/to/student"{extra})\n'
        f"{SEED_LINE}\n"
        f'image = pipe("a prompt"{inputs}, num_inference_steps={steps}, guidance_scale=0.0, '
        f"max_sequence_length={meta['max_sequence_length']}).images[0]"
    )


def _lora_section(meta: dict, has_t5: bool) -> str:
    if "lora" not in meta:
        return ""
    extra = "" if has_t5 else ", text_encoder_3=None, tokenizer_3=None"
    lora = meta["lora"]
    return f"""
### As a LoRA on the teacher

The student is a LoRA (rank {lora["rank"]}, alpha {lora["alpha"]:g}, on {", ".join(lora["target_modules"])}; {lora["parameters"]:,}
parameters), fused into the transformer above and also saved on its own as `pytorch_lora_weights.safetensors`
(EMA weights). Loaded onto the teacher, it needs this folder's scheduler too: with the teacher's it samples
at the wrong times.

```python
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("path/to/teacher"{extra})
pipe.load_lora_weights("path/to/student")
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("path/to/student", subfolder="scheduler")
{SEED_LINE}
image = pipe("a prompt", num_inference_steps={meta.get("default_steps", 4)}, guidance_scale=0.0, max_sequence_length={meta["max_sequence_length"]}).images[0]
```
"""


def _aligned_section(meta: dict) -> str:
    if "aligned" not in meta:
        return ""
    a = meta["aligned"]
    return f"""
### Preference-aligned (`ladd align`)

This is the distilled student after a DPO-LoRA (rank {a["lora"]["rank"]}, {a["lora"]["parameters"]:,} parameters,
{a["train_steps"]} steps on {a["pairs"]} best-vs-worst pairs of its own samples scored by the `{a["reward"]}` reward),
fused into the transformer above. The adapter alone is `pytorch_lora_weights.safetensors`: loaded with
`pipe.load_lora_weights("path/to/aligned")` onto the distilled student (not the teacher) it gives this pipeline.
"""


COLUMNS = {
    "fd": "FD",
    "fd_teacher": "FID-T",
    "fd_reference": "FD vs reference",
    "clip_score": "CLIP score",
    "accuracy": "accuracy",
}


def _evaluation(metrics: dict | None) -> str:
    if not metrics:
        return "Not evaluated yet: `ladd evaluate` writes its table here.\n"
    t, ref = metrics["teacher"], metrics.get("reference")
    rows = [r for r in (ref, t, *metrics["student"].values(), *metrics.get("aligned", {}).values()) if r]
    keys = [k for k in COLUMNS if any(k in r for r in rows)]
    split = metrics.get("split", "test")
    where = ", ".join(
        f"{r['resolution'][0]}x{r['resolution'][1]} ({r['share']:.0%})" for r in metrics.get("resolutions", [])
    )
    said = [
        f"`ladd evaluate` on {metrics['num_samples']} held-out prompts (the {split} split), mean ± std over "
        f"{len(metrics['seeds'])} sampling seeds, FD on {metrics.get('features', 'classifier')} features"
        + (f", sampled at {where}" if where else "")
        + "."
    ]
    if "fd" in keys:
        floor = f" (real-vs-real floor {metrics['real_floor']['fd']:.1f})" if "real_floor" in metrics else ""
        said.append(f"FD: against the real {split} images{floor}.")
    said.append(
        f"FID-T: against the samples of the teacher the student was distilled from ({t['steps']} steps, CFG "
        f"{t['guidance']:g}), of another seed; the teacher's own row is its floor."
    )
    if ref:
        said.append(
            f"FD vs reference: against the same teacher at CFG {ref['guidance']:g} (the reference row), "
            "another seed; the reference's own row is its floor."
        )
    lines = [
        " ".join(said),
        "",
        "| model | steps | guidance | " + " | ".join(COLUMNS[k] for k in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]

    def cells(r):
        return " | ".join(
            f"{r[k]:.3f}" if k == "accuracy" else f"{r[k]:.1f} ± {r[k + '_std']:.1f}" if k in r else "–" for k in keys
        )

    if ref:
        lines.append(f"| reference teacher | {ref['steps']} | {ref['guidance']:g} | {cells(ref)} |")
    lines.append(f"| teacher (distilled from) | {t['steps']} | {t['guidance']:g} | {cells(t)} |")
    for k, r in metrics["student"].items():
        lines.append(f"| **student** | {k} | 0 | {cells(r)} |")
    for k, r in metrics.get("aligned", {}).items():
        lines.append(f"| **aligned** | {k} | 0 | {cells(r)} |")
    return "\n".join(lines) + "\n"


def write_model_card(student_dir: str | Path, meta: dict, summary: dict, metrics: dict | None = None) -> Path:
    """(Re)write `student_dir/README.md` atomically."""
    student_dir = Path(student_dir)
    has_t5 = (student_dir / "text_encoder_3").is_dir()
    times = ", ".join(f"{t:.3g}" for t in meta["student_times"])
    base = meta.get("base_model") or "a LADD teacher"
    base = TINY_BASE if base == "tiny" else base
    schedule = meta.get("schedule", "exponential")
    scipy = " Its beta schedule needs `scipy` installed." if schedule == "beta" else ""
    card = f"""---
base_model: {base}
library_name: diffusers
pipeline_tag: text-to-image
tags:
- ladd
- distillation
- few-step
- stable-diffusion-3
inference:
  parameters:
    num_inference_steps: {meta.get("default_steps", 4)}
    guidance_scale: 0.0
---

# Few-step student of {base} (LADD)

Distilled with Latent Adversarial Diffusion Distillation (Sauer et al. 2024) by the `ladd`
pipeline. It samples in 1 to {len(meta["student_times"])} steps without classifier-free guidance. Its
scheduler ({schedule} sigmas from 1 to {min(meta["student_times"]):.3g}, re-noising between steps) visits
the training times t = {times} at 1, 2 and {len(meta["student_times"])} steps.{scipy}

## How to load

```python
import torch
from diffusers import {_pipeline_class(meta)}

{_load_snippet(meta, has_t5)}
```

The same seed gives the same image. Seed torch itself, as above: the pipeline passes its `generator=` to the
starting noise only, and the student's scheduler re-noises between steps from torch's global RNG.
Any `num_inference_steps` works; the trained ones ({", ".join(map(str, trained_step_counts(meta)))}) give the best results. Loading prints that the scheduler
config's `sigma_min`/`sigma_max` "will be ignored": diffusers reads them anyway (they set the schedule's ends).
{_lora_section(meta, has_t5)}{_aligned_section(meta)}
## Training

{summary.get("steps", "?")} steps ({meta.get("sampler", "renoise")} sampler), GAN health
`{summary.get("gan_health", {}).get("status", "?")}`; full settings in `ladd_train_summary.json`, the raw
(non-EMA) weights in `ladd_raw_transformer/`.

## Evaluation

{_evaluation(metrics)}"""
    path = student_dir / CARD
    with atomic_file(path) as tmp:
        tmp.write_text(card)
    return path
