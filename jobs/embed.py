"""`ray job submit ... -- python jobs/embed.py --model models:/NAME@ALIAS --input s3://.../*.parquet
--output s3://.../embeddings [--batch-size 256 --concurrency N --shard-rows 4096]`.

Thin entry point: the job driver joins the cluster the job runs on (RAY_ADDRESS) and runs
`contrastive embed --distributed` (an actor pool over the cluster, resumable: resubmit the same
command after a failure); the last stdout line is the JSON summary.
"""

import sys
from pathlib import Path

# With `--working-dir .` the repo root is the job's cwd but not on sys.path (jobs/ is): add it
# so the uploaded copy of `service` is importable even where the package is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["embed", "--distributed", *sys.argv[1:]]))
