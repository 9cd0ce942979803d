"""`ladd <stage>`: parse, load and validate params.yaml (all sections, before any work), run one stage.
`ladd generate`: images from the ONNX export, without PyTorch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ladd.config import ConfigError, Params, load_params

log = logging.getLogger("ladd")


def run_prepare(p: Params, tracker) -> dict:
    from ladd.data.prepare import prepare

    return prepare(p.prepare)


def run_validate(p: Params, tracker) -> dict:
    from ladd.data.validation import validate_data

    v = p.validate
    return validate_data(p.prepare.out_dir, p.prepare.resolution, v.classes, v.max_prompt_length,
                         v.max_duplicate_share, f"{v.report_dir}/data")


def run_classifier(p: Params, tracker) -> dict:
    from ladd.classifier import classifier_stage

    return classifier_stage(p.classifier, p.prepare.out_dir, tracker)


def run_teacher(p: Params, tracker) -> dict:
    from ladd.teacher import teacher_stage

    return {"teacher": str(teacher_stage(p.teacher, p.prepare.out_dir, p.teacher.device, tracker))}


def run_synthesize(p: Params, tracker) -> dict:
    from ladd.data.validation import validate_synthetic
    from ladd.data.prepare import load_split
    from ladd.synthesize import synthesize

    expected = len(load_split(f"{p.prepare.out_dir}/train").captions) * p.synthesize.samples_per_prompt

    def suite(synthetic_dir):  # on the finished set, before it replaces the previous one
        return validate_synthetic(synthetic_dir, p.teacher.out_dir, p.prepare.out_dir, expected,
                                  p.validate.latent_tolerance, f"{p.validate.report_dir}/synthetic")

    return synthesize(p.synthesize, p.prepare.out_dir, p.teacher.out_dir, tracker, check=suite)


def run_distill(p: Params, tracker) -> dict:
    from ladd.distill import distill

    return distill(p.distill, p.teacher.out_dir, p.synthesize.out_dir, tracker)


def run_evaluate(p: Params, tracker) -> dict:
    from ladd.evaluate import evaluate

    return evaluate(p.evaluate, p.prepare.out_dir, p.classifier.out_dir, p.teacher.out_dir, p.distill.out_dir, tracker)


def run_export(p: Params, tracker) -> dict:
    from ladd.export import export_stage

    return export_stage(p.export, p.distill.out_dir, tracker)


STAGES = {
    "prepare": run_prepare,
    "validate": run_validate,
    "classifier": run_classifier,
    "teacher": run_teacher,
    "synthesize": run_synthesize,
    "distill": run_distill,
    "evaluate": run_evaluate,
    "export": run_export,
}


EXIT_DIR = "LADD_EXIT_DIR"  # set by the launcher: where workers leave their exit codes


def torchrun_command(argv: list[str], launch) -> list[str]:
    """The same `ladd` command, started on nproc_per_node processes of this node by torchrun (one rendezvous
    for every node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.nproc_per_node),
           "--nnodes", str(launch.nnodes)]
    if launch.rdzv_endpoint:
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", launch.rdzv_endpoint, "--rdzv_id", launch.rdzv_id,
                "--rdzv_conf", f"join_timeout={launch.rdzv_timeout}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "ladd.cli", *argv]


def wait_for_rendezvous(endpoint: str, timeout: int) -> None:
    """On a node that does not host the rendezvous (the first node does), wait until its endpoint answers;
    ConfigError naming it after `timeout` seconds, before any process starts."""
    import socket
    import time

    host, _, port = endpoint.rpartition(":")
    try:
        address = socket.gethostbyname(host)
        local = {"0.0.0.0", *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError as e:
        raise ConfigError(f"launch.rdzv_endpoint {endpoint}: cannot resolve {host} ({e})") from None
    if address.startswith("127.") or address in local:
        return  # torchrun on this node hosts it
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, int(port)), timeout=min(5, timeout)).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(f"launch.rdzv_endpoint {endpoint} did not answer within {timeout} s: start the "
                                  "first node (it hosts the rendezvous), or fix the address") from None
            time.sleep(1)


def _stop_with_parent() -> None:
    """In torchrun's process: SIGTERM when this launcher dies, even by SIGKILL (Linux), so torchrun stops its
    workers instead of training on as orphans beside the next run."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _peer_failed(e: RuntimeError) -> bool:
    """A collective broken because another process of a torchrun job ended (its own error says why)."""
    import torch.distributed as dist

    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and (
        isinstance(e, getattr(dist, "DistError", ())) or ("gloo" in str(e) and "peer" in str(e)))


def launch_workers(stage: str, argv: list[str], params: Params) -> int:
    """Run `stage` under torchrun as params.yaml's `launch` section says; fails before starting anything when
    this node has fewer GPUs than processes."""
    import subprocess

    import torch

    launch, device = params.launch, getattr(params, stage).device
    processes = launch.nproc_per_node * launch.nnodes
    if stage == "distill" and params.distill.parallel == "none":
        raise ConfigError(f"distill.parallel is none but launch asks for {processes} processes: use ddp or fsdp")
    if stage == "distill" and params.distill.batch_size % processes:
        raise ConfigError(f"distill.batch_size ({params.distill.batch_size}) is the global batch: it must divide evenly "
                          f"over launch's {processes} processes")
    gpus = torch.cuda.device_count()
    if (device.startswith("cuda") or (device == "auto" and gpus)) and launch.nproc_per_node > gpus:
        raise ConfigError(f"launch.nproc_per_node is {launch.nproc_per_node} but this node has {gpus} GPUs")
    if launch.rdzv_endpoint:
        wait_for_rendezvous(launch.rdzv_endpoint, launch.rdzv_timeout)
    import tempfile

    cmd = torchrun_command(argv, launch)
    log.info("%s: %d processes per node x %d nodes: %s", stage, launch.nproc_per_node, launch.nnodes, " ".join(cmd))
    report: list[str] = []  # torchrun's own failure report (a traceback and a table): shown only if no worker said why
    with tempfile.TemporaryDirectory(prefix="ladd-exit-") as codes:  # each failing worker leaves its exit code
        proc = subprocess.Popen(cmd, preexec_fn=_stop_with_parent, env={**os.environ, EXIT_DIR: codes},
                                stderr=subprocess.PIPE, text=True, bufsize=1)
        try:
            for line in proc.stderr:  # the workers' output passes through as it comes
                if report or line.startswith("Traceback (most recent call last):"):  # workers' lines carry [rankN]
                    report.append(line)
                else:
                    sys.stderr.write(line)
            code = proc.wait()
        except KeyboardInterrupt:  # torchrun got the same SIGINT and stops its workers
            proc.wait()
            raise
        worker_codes = {f.name: int(f.read_text()) for f in sorted(Path(codes).iterdir())}
    if code and worker_codes:  # rank 0's code (else the first): exit codes mean what they mean without torchrun
        return worker_codes.get("rank-0", next(iter(worker_codes.values())))
    if code:  # a worker killed (SIGKILL, out of memory) before it could say why
        sys.stderr.writelines(report)
        print(f"ladd {stage}: a process under torchrun failed (torchrun exit {code}); see its output above",
              file=sys.stderr)
    return code


def generate_main(argv: list[str]) -> int:
    """`ladd generate --onnx DIR --prompt ...`: PNGs from the exported student, onnxruntime only."""
    parser = argparse.ArgumentParser(prog="ladd generate", description="generate images with the ONNX student")
    parser.add_argument("--onnx", default="models/onnx", help="export folder (default: models/onnx)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the exported count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (the next ones count up)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto")
    parser.add_argument("--out", default="samples", help="output folder for the PNGs (default: samples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from PIL import Image

    from ladd.onnx_runtime import OnnxStudent

    try:
        student = OnnxStudent(args.onnx, args.precision, args.provider)
        images = student(args.prompt, args.steps, [args.seed + i for i in range(len(args.prompt))])
    except (FileNotFoundError, ValueError) as e:
        print(f"ladd generate: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(args.prompt, images)):
        path = out / f"{i:03d}_{'_'.join(prompt.split())[:60]}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        print(path)
    log.info("%d images on %s", len(images), student.provider)
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code > 1 and os.environ.get(EXIT_DIR) and "RANK" in os.environ:  # an expected failure, not a peer's (1)
        Path(os.environ[EXIT_DIR], f"rank-{os.environ['RANK']}").write_text(str(code))
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
    rank = int(os.environ.get("RANK", 0))  # under torchrun: only rank 0 logs progress and tracks
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:  # before importing torch: a bad params file fails in a fraction of a second
        params = load_params(args.params)
        launch = params.launch
        if args.stage in launch.stages and launch.nproc_per_node * launch.nnodes > 1 and "LOCAL_RANK" not in os.environ:
            return launch_workers(args.stage, argv, params)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"ladd {args.stage}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ladd {args.stage}: interrupted; finished work is kept: run the same command to go on", file=sys.stderr)
        return 130
    import torch  # here, not at the top: `ladd generate` runs without PyTorch

    from ladd.data.validation import DataError, ValidationFailed
    from ladd.export import ParityError
    from ladd.pipeline import TeacherError
    from ladd.tracking import TrackingUnavailable

    # expected failures: one line on stderr and an exit code per kind (README: When something goes wrong);
    # anything else is a bug and keeps its traceback (exit 1)
    exit_codes = {ConfigError: 2, ValidationFailed: 3, DataError: 3, FileNotFoundError: 4, TeacherError: 5,
                  ParityError: 6, TrackingUnavailable: 7, OSError: 8}  # first match wins: OSError after its subclass
    expected = tuple(exit_codes) if not args.debug else ()

    def fail(stage: str, e: Exception) -> int:
        print(f"ladd {stage}: {e}", file=sys.stderr)
        return next(code for kind, code in exit_codes.items() if isinstance(e, kind))

    if args.threads:
        torch.set_num_threads(args.threads)
    from ladd.tracking import stage_run

    tracking = not args.no_tracking and os.environ.get("LADD_TRACKING", "1") != "0" and rank == 0
    try:  # a failure propagates through the MLflow run, which ends FAILED
        with stage_run(args.stage, enabled=tracking) as tracker:
            section = getattr(params, args.stage, None)
            if section is not None:
                from dataclasses import asdict

                tracker.log_params({f"{args.stage}.{k}": v for k, v in asdict(section).items()})
            result = STAGES[args.stage](params, tracker)
    except expected as e:
        return fail(args.stage, e)
    except RuntimeError as e:
        if not _peer_failed(e):
            raise
        log.warning("rank %d stopped: another process of this run failed (%s)", rank, str(e).splitlines()[0][:200])
        return 1
    except KeyboardInterrupt:  # SIGINT: every output is written atomically, so nothing half-done is left
        print(f"ladd {args.stage}: interrupted; finished work (synthetic shards in <out>.next, the last distill checkpoint) is "
              "kept: run the same command to go on", file=sys.stderr)
        return 130
    log.info("%s done: %s", args.stage, json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
