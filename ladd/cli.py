"""`ladd <stage>`: parse, load and validate params.yaml (all sections, before any work), run one stage.
`ladd generate`: images from the ONNX export, without PyTorch."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from ladd.config import Params
from ladd.errors import ConfigError, DataError, ParityError, TeacherError, TrackingUnavailable, ValidationFailed
from ladd.params import load_params

log = logging.getLogger("ladd")


def run_prepare(p: Params, tracker) -> dict:
    from ladd.data.prepare import prepare

    return prepare(p.prepare)


def run_validate(p: Params, tracker) -> dict:
    from ladd.data.validation import validate_data

    v = p.validate
    return validate_data(
        p.prepare.out_dir,
        p.prepare.resolution,
        v.classes,
        v.max_prompt_length,
        v.max_duplicate_share,
        f"{v.report_dir}/data",
    )


def run_classifier(p: Params, tracker) -> dict:
    from ladd.classifier import classifier_stage

    return classifier_stage(p.classifier, p.prepare.out_dir, tracker)


def run_teacher(p: Params, tracker) -> dict:
    from ladd.teacher import teacher_stage

    return {"teacher": str(teacher_stage(p.teacher, p.prepare.out_dir, p.teacher.device, tracker, p.inpaint))}


def run_synthesize(p: Params, tracker) -> dict:
    from ladd.data.prepare import load_split
    from ladd.data.validation import validate_synthetic
    from ladd.synthesize import synthesize

    expected = len(load_split(f"{p.prepare.out_dir}/train").captions) * p.synthesize.samples_per_prompt

    def suite(synthetic_dir):  # on the finished set, before it replaces the previous one
        return validate_synthetic(
            synthetic_dir,
            p.teacher.out_dir,
            p.prepare.out_dir,
            expected,
            p.validate.latent_tolerance,
            f"{p.validate.report_dir}/synthetic",
        )

    return synthesize(p.synthesize, p.prepare.out_dir, p.teacher.out_dir, tracker, check=suite, inpaint=p.inpaint)


def run_distill(p: Params, tracker) -> dict:
    from ladd.data.synthetic import bucket_resolutions, check_settings, synthesis_settings
    from ladd.distill import distill

    tracker.log_datasets(p.prepare.out_dir, {"train": "training"})
    resolutions = bucket_resolutions(p.synthesize, p.teacher.out_dir)
    check_settings(p.synthesize.out_dir, synthesis_settings(p.synthesize, resolutions))  # not data of older settings
    return distill(p.distill, p.teacher.out_dir, p.synthesize.out_dir, tracker)


def run_align(p: Params, tracker) -> dict:
    from ladd.align import align_stage

    return align_stage(
        p.align, p.prepare.out_dir, p.classifier.out_dir, p.distill.out_dir, f"{p.validate.report_dir}/align", tracker
    )


def run_evaluate(p: Params, tracker) -> dict:
    from ladd.evaluate import evaluate

    tracker.log_datasets(p.prepare.out_dir, {"train": "training", p.evaluate.split: "evaluation"})
    return evaluate(
        p.evaluate,
        p.prepare.out_dir,
        p.classifier.out_dir,
        p.teacher.out_dir,
        p.distill.out_dir,
        tracker,
        p.align,
        p.inpaint,
    )


def run_export(p: Params, tracker) -> dict:
    from ladd.align import model_dir
    from ladd.export import export_stage

    return export_stage(p.export, model_dir(p.align, p.distill.out_dir), tracker, asdict(p.serve))


# the output a second run of the stage would interleave with: held (flock) for the whole stage, on rank 0
LOCKED_OUTPUTS = {
    "prepare": lambda p: p.prepare.out_dir,
    "validate": lambda p: f"{p.validate.report_dir}/data",
    "classifier": lambda p: p.classifier.out_dir,
    "teacher": lambda p: p.teacher.out_dir,
    "synthesize": lambda p: p.synthesize.out_dir,
    "distill": lambda p: p.distill.checkpoint,  # the resume point: the student is rebuilt from it
    "align": lambda p: p.align.out_dir,
    "evaluate": lambda p: f"{p.evaluate.out_dir}/.evaluate",
    "export": lambda p: p.export.out_dir,
}

STAGES = {
    "prepare": run_prepare,
    "validate": run_validate,
    "classifier": run_classifier,
    "teacher": run_teacher,
    "synthesize": run_synthesize,
    "distill": run_distill,
    "align": run_align,
    "evaluate": run_evaluate,
    "export": run_export,
}


def generate_main(argv: list[str]) -> int:
    """`ladd generate --onnx DIR --prompt ...`: PNGs from the exported student, onnxruntime only, under the request
    rules of the served models (`ladd.serving`)."""
    parser = argparse.ArgumentParser(prog="ladd generate", description="generate images with the ONNX student")
    parser.add_argument("--onnx", default="models/onnx", help="export folder (default: models/onnx)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first image, the next ones count up (default: a fresh one, printed)",
    )
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto")
    parser.add_argument("--out", default="samples", help="output folder for the PNGs (default: samples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from PIL import Image

    from ladd.onnx_runtime import OnnxStudent
    from ladd.serving import RequestError

    try:
        student = OnnxStudent(args.onnx, args.precision, args.provider)
        seeds = None if args.seed is None else [args.seed + i for i in range(len(args.prompt))]
        request = student.request(args.prompt, args.steps, seeds)
        images = student.run(request)
    except RequestError as e:
        print(f"ladd generate: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"ladd generate: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, seed, image) in enumerate(zip(request.prompts, request.seeds, images)):
        slug = re.sub(r"[^\w-]+", "_", prompt, flags=re.ASCII).strip("_")[:60]  # no `/` or `..` from a prompt
        path = out / f"{i:03d}_{slug}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        print(f"{path}\tseed {seed}\tsteps {request.steps}")
    log.info("%d images on %s", len(images), student.provider)
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code > 1 and "RANK" in os.environ:  # a torchrun worker's expected failure (1: a peer's, or a bug)
        from ladd.distributed import report_exit_code

        report_exit_code(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ladd", description="Latent Adversarial Diffusion Distillation pipeline")
    parser.add_argument("stage", choices=list(STAGES), help="a pipeline stage (or: ladd generate --help)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="a traceback for expected failures too")
    args = parser.parse_args(argv)
    # transformers names the torchvision it falls back without on every import: an expected failure stays one line
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage()
    )
    rank = int(os.environ.get("RANK", 0))  # under torchrun: only rank 0 logs progress and tracks
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    params_file = Path(args.params).resolve()
    if params_file.is_file():  # the paths inside a params file are relative to its folder, wherever ladd runs
        os.chdir(params_file.parent)
        argv = [*argv, "--params", str(params_file)]  # for torchrun's workers: the last --params wins
    try:  # before importing torch: a bad params file fails in a fraction of a second
        params = load_params(params_file if params_file.is_file() else args.params)
        launch = params.launch
        if args.stage in launch.stages and launch.nproc_per_node * launch.nnodes > 1 and "LOCAL_RANK" not in os.environ:
            from ladd.distributed import launch_workers

            return launch_workers(args.stage, argv, params)
    except (ConfigError, DataError) as e:  # DataError: a table the settings point at cannot be read
        if args.debug:
            raise
        print(f"ladd {args.stage}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 3
    except KeyboardInterrupt:
        print(f"ladd {args.stage}: interrupted; finished work is kept: run the same command to go on", file=sys.stderr)
        return 130
    import torch  # here, not at the top: `ladd generate` runs without PyTorch

    # expected failures: one line on stderr and an exit code per kind (docs/guide/troubleshooting.md);
    # anything else is a bug and keeps its traceback (exit 1)
    exit_codes = {
        ConfigError: 2,
        ValidationFailed: 3,
        DataError: 3,
        FileNotFoundError: 4,
        TeacherError: 5,
        ParityError: 6,
        TrackingUnavailable: 7,
        OSError: 8,
    }  # first match wins: OSError after its subclass
    expected = tuple(exit_codes) if not args.debug else ()

    def fail(stage: str, e: Exception) -> int:
        print(f"ladd {stage}: {e}", file=sys.stderr)
        return next(code for kind, code in exit_codes.items() if isinstance(e, kind))

    if args.threads:
        torch.set_num_threads(args.threads)
    from ladd.io import exclusive
    from ladd.tracking import stage_run

    tracking = not args.no_tracking and os.environ.get("LADD_TRACKING", "1") != "0" and rank == 0
    try:  # a failure propagates through the MLflow run, which ends FAILED
        with stage_run(args.stage, enabled=tracking, model_config=asdict(params.serve)) as tracker:
            section = getattr(params, args.stage, None)
            if section is not None:
                tracker.log_params({f"{args.stage}.{k}": v for k, v in asdict(section).items()})
            with exclusive(LOCKED_OUTPUTS[args.stage](params)) if rank == 0 else contextlib.nullcontext():
                result = STAGES[args.stage](params, tracker)
    except Exception as e:
        from ladd.distributed import peer_failed
        from ladd.tracking import as_tracking_unavailable

        known = as_tracking_unavailable(e) or e  # a server lost mid-stage: exit 7, not an I/O error (8) or a bug
        if isinstance(e, torch.cuda.OutOfMemoryError) and not args.debug:
            print(
                f"ladd {args.stage}: out of GPU memory ({str(e).splitlines()[0][:160]}): lower the stage's batch_size; "
                "for distill also gradient_checkpointing: all, mixed_precision: bf16, ema_on_cpu: true, or more "
                "processes with parallel: fsdp (docs/guide/teachers.md: Memory settings)",
                file=sys.stderr,
            )
            return 9
        if isinstance(known, expected):
            return fail(args.stage, known)
        if isinstance(e, RuntimeError) and peer_failed(e):
            log.warning("rank %d stopped: another process of this run failed (%s)", rank, str(e).splitlines()[0][:200])
            return 1
        raise
    except KeyboardInterrupt:  # SIGINT: every output is written atomically, so nothing half-done is left
        print(
            f"ladd {args.stage}: interrupted; finished work (synthetic shards in <out>.next, the last distill "
            "checkpoint) is "
            "kept: run the same command to go on",
            file=sys.stderr,
        )
        return 130
    log.info("%s done: %s", args.stage, json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
