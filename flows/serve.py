"""Run the pipeline on a schedule (needs a Prefect server, see docs/guide/orchestration.md).

    python -m flows.serve [--cron "0 3 * * *"] [--params params.yaml]            # served by this process
    python -m flows.serve --pool gpu [--cron ...] [--params ...]                 # deployed to a work pool

Served, the scheduled runs execute in this process, on this machine. Deployed to a work pool, they run where
a worker of that pool runs (`prefect worker start --pool gpu` on a GPU node), from this checkout's path,
which must exist there too (a shared file system or the same clone).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.pipeline import pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cron", default="0 3 * * *", help="schedule (default: nightly at 03:00)")
    ap.add_argument("--params", default="params.yaml", help="params file the scheduled runs use")
    ap.add_argument("--name", default="ladd-nightly")
    ap.add_argument("--pool", default=None, help="deploy to this Prefect work pool instead of serving here")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    parameters = {"repo": str(root), "params_file": args.params}
    if args.pool:
        flow = pipeline.from_source(source=str(root), entrypoint="flows/pipeline.py:pipeline")
        flow.deploy(name=args.name, work_pool_name=args.pool, cron=args.cron, parameters=parameters)
    else:
        pipeline.serve(name=args.name, cron=args.cron, parameters=parameters)


if __name__ == "__main__":
    main()
