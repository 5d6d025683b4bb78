#!/usr/bin/env bash
# Stop an MLflow server started by start-server.sh --detach: signals its whole process group.
#
# Usage: deploy/mlflow/stop-server.sh [DATA_DIR]   (same default as start-server.sh)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data_dir="${1:-${MLFLOW_DATA_DIR:-$repo_root/outputs/mlflow}}"
pid_file="$data_dir/mlflow.pid"

[[ -f "$pid_file" ]] || { echo "stop-server: no $pid_file: nothing to stop" >&2; exit 0; }
pgid="$(cat "$pid_file")"
[[ "$pgid" =~ ^[0-9]+$ ]] || { echo "stop-server: error: $pid_file holds '$pgid'" >&2; exit 1; }

if kill -TERM -- "-$pgid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pgid" 2>/dev/null && echo "stop-server: process group $pgid killed" >&2
fi
rm -f "$pid_file"
echo "stop-server: stopped the MLflow server from $data_dir" >&2
