"""`ray job submit ... -- python jobs/tune.py --config jobs/configs/tune-smoke.yaml [--set k=v]`.

Thin entry point: the job driver joins the cluster the job runs on (RAY_ADDRESS) and runs
`contrastive tune` (a Ray Tune sweep of distributed pretraining runs, ASHA early stopping, one
parent MLflow run with a nested run per trial); the last stdout line is the JSON summary.
"""

import sys
from pathlib import Path

# With `--working-dir .` the repo root is the job's cwd but not on sys.path (jobs/ is): add it
# so the uploaded copy of `service` is importable even where the package is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
