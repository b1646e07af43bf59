"""`python -m app.worker`: how the API starts its embedded worker (settings as JSON in the environment)."""

import argparse
import os

from app.settings import Settings
from app.worker.embedded import SETTINGS_ENV
from app.worker.loop import run_worker

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m app.worker")
    parser.add_argument("--parent-pid", type=int, help="exit when this process dies")
    args = parser.parse_args()
    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    run_worker(settings, parent_pid=args.parent_pid)
