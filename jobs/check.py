"""`ray job submit ... -- python jobs/check.py --config jobs/configs/smoke-cpu.yaml [--set k=v]`.

Thin entry point: the job driver joins the cluster the job runs on (RAY_ADDRESS) and runs
`contrastive check`; the last stdout line is its JSON summary (exit 1: the check failed).
"""

import sys
from pathlib import Path

# With `--working-dir .` the repo root is the job's cwd but not on sys.path (jobs/ is): add it
# so the uploaded copy of `service` is importable even where the package is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["check", *sys.argv[1:]]))
