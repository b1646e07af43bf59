"""`python -m app.worker`: how the API starts its embedded worker (settings as JSON in the environment)."""

import argparse
import os

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m app.worker")
    parser.add_argument("--parent-pid", type=int, help="exit when this process dies")
    args = parser.parse_args()
    if args.parent_pid is not None:
        from app.worker.lifeline import die_with_parent

        die_with_parent(args.parent_pid)  # first, before the slow imports below

    from app.settings import Settings
    from app.worker.embedded import SETTINGS_ENV
    from app.worker.loop import run_worker

    raw = os.environ.get(SETTINGS_ENV)
    run_worker(Settings.model_validate_json(raw) if raw else Settings())
