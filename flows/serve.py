"""Serve the pipeline as a scheduled Prefect deployment (needs a Prefect server, see README).

    python -m flows.serve [--cron "0 3 * * *"] [--params params.yaml]
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
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    pipeline.serve(name=args.name, cron=args.cron, parameters={"repo": str(root), "params_file": args.params})


if __name__ == "__main__":
    main()
