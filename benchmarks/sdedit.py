"""Benchmark: editing a real image with the text-to-image student in stock diffusers (SDEdit: noise the image to
time t, then sample), against the teacher doing the same at many steps.

    python benchmarks/sdedit.py [--strengths 0.25,0.5,0.75] [--steps 4] [--seeds 0,1,2]

Each held-out digit image is edited to the next digit ((d + 1) mod 10, prompted with params.yaml's
export.prompts) by `StableDiffusion3Img2ImgPipeline` built from the student's folder: `num_inference_steps`
--steps and `strength` s start the student's schedule at its k-th time, so it visits only trained times (the
4-step schedule 1, .79, .46, .25: s = 0.75 starts at .79 with 3 steps, 0.5 at .46 with 2, 0.25 at .25 with 1).
The teacher edits the same images at 28 steps, CFG 2, same strength. Columns: accuracy of the prompted
(new) digit and FD against the real test images (the classifier's features), mean ± std over seeds; ms/image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from machine import describe

from ladd.data.prepare import load_split
from ladd.params import load_params
from ladd.pipeline import load_pipeline, max_sequence_length
from ladd.quality import embed, load_classifier_features, score_features
from ladd.scoring import summarize_seeds


def edit(pipe, images, prompts, strength, steps, guidance, seed, msl, batch=128):
    from diffusers import StableDiffusion3Img2ImgPipeline

    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    out = []
    torch.manual_seed(seed)  # diffusers' stochastic (re-noising) steps draw from the global RNG
    for i in range(0, len(images), batch):
        n = len(images[i : i + batch])
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i + j) for j in range(n)]
        out.append(
            img2img(
                prompts[i : i + batch],
                image=images[i : i + batch],
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                max_sequence_length=msl,
                output_type="pt",
            ).images.float()
        )
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--strengths", default="0.25,0.5,0.75")
    ap.add_argument("--steps", type=int, default=4, help="the student's num_inference_steps (its trained schedule)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    test = load_split(f"{params.prepare.out_dir}/test")
    images = test.images.float() / 255
    labels = torch.as_tensor(test.labels)
    targets = (labels + 1) % 10
    prompts = [params.export.prompts[int(d)] for d in targets]
    classifier = load_classifier_features(params.classifier.out_dir)
    real = embed(classifier, images)[0]
    student, teacher = load_pipeline(params.distill.out_dir), load_pipeline(params.teacher.out_dir)
    msl = max_sequence_length(params.teacher.out_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for strength in [float(s) for s in args.strengths.split(",")]:
        for name, pipe, steps, guidance in (
            ("student", student, args.steps, 0.0),
            ("teacher", teacher, params.evaluate.teacher_steps, params.evaluate.guidance),
        ):
            per_seed = []
            for seed in seeds:
                start = time.perf_counter()
                out = edit(pipe, images, prompts, strength, steps, guidance, seed, msl)
                ms = (time.perf_counter() - start) * 1000 / len(out)
                feats, logits = embed(classifier, out)
                scores = score_features(feats, logits, targets, real)
                per_seed.append({"fd": scores["fd"], "accuracy": scores["accuracy"], "ms_per_image": ms})
            visited = int(min(steps * strength, steps))
            rows.append({"model": name, "strength": strength, "steps": visited, **summarize_seeds(per_seed)})
            print(f"{name} strength {strength}: {rows[-1]['accuracy']:.3f} / FD {rows[-1]['fd']:.1f}", flush=True)
    print(f"\n# SDEdit with the text-to-image student ({describe()})\n")
    print(f"{len(images)} held-out images, each edited to the next digit; mean ± std over seeds {seeds}\n")
    print("| model | strength | steps run | accuracy of the new digit | FD vs real | ms/image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['strength']:g} | {r['steps']} | "
            f"{r['accuracy'] * 100:.1f} ± {r['accuracy_std'] * 100:.1f} | "
            f"{r['fd']:.1f} ± {r['fd_std']:.1f} | {r['ms_per_image']:.2f} |"
        )
    unedited = score_features(real, embed(classifier, images)[1], targets, real)
    print(
        f"\nthe unedited images: accuracy of the new digit {unedited['accuracy'] * 100:.1f}, "
        f"FD {np.round(unedited['fd'], 1)}"
    )


if __name__ == "__main__":
    main()
