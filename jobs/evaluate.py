"""`ray job submit ... -- python jobs/evaluate.py --checkpoint DIR|--model URI --train P --test P`.

Thin entry point over `contrastive evaluate`; the last stdout line is the JSON result.
"""

import sys
from pathlib import Path

# With `--working-dir .` the repo root is the job's cwd but not on sys.path (jobs/ is): add it
# so the uploaded copy of `service` is importable even where the package is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
