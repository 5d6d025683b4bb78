#!/usr/bin/env bash
# Start a local MLflow tracking server (SQLite backend store + proxied local artifact store),
# wait until it answers /health, and print its tracking URI on stdout.
#
# Usage:
#   deploy/mlflow/start-server.sh [--detach] [DATA_DIR] [-- EXTRA_MLFLOW_SERVER_ARGS...]
#
#   DATA_DIR   where mlflow.db, artifacts/, server.log and mlflow.pid live
#              (default: $MLFLOW_DATA_DIR, else <repo>/outputs/mlflow)
#   --detach   return as soon as the server is healthy and leave it running in its own
#              process group; stop it with deploy/mlflow/stop-server.sh [DATA_DIR].
#              Without --detach the script stays in the foreground and Ctrl-C stops the server.
#
# Environment:
#   MLFLOW_HOST           interface to bind (default 127.0.0.1: this machine only)
#   MLFLOW_PORT           port (default 5000)
#   MLFLOW_WORKERS        server worker processes (default 2)
#   MLFLOW_ALLOW_REMOTE   must be 1 to bind anything other than a loopback address: the server
#                         has NO authentication, so anyone who can reach it can read, change and
#                         delete runs and registered models
#   MLFLOW_ALLOWED_HOSTS  forwarded to --allowed-hosts (Host-header allow-list against DNS
#                         rebinding; MLflow's default is localhost + private IP ranges)
#   MLFLOW_START_TIMEOUT  seconds to wait for /health (default 60)
#
# Examples:
#   export MLFLOW_TRACKING_URI="$(deploy/mlflow/start-server.sh --detach)"
#   MLFLOW_PORT=5001 deploy/mlflow/start-server.sh /tmp/mlflow-scratch
#   deploy/mlflow/start-server.sh -- --app-name basic-auth     # MLflow's built-in basic auth
set -euo pipefail

log() { printf 'start-server: %s\n' "$*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
detach=0
data_dir="${MLFLOW_DATA_DIR:-$repo_root/outputs/mlflow}"
extra_args=()
while (($#)); do
    case "$1" in
        --detach) detach=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra_args=("$@"); break ;;
        -*) die "unknown option '$1' (see --help)" 2 ;;
        *) data_dir="$1" ;;
    esac
    shift
done

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
timeout_s="${MLFLOW_START_TIMEOUT:-60}"
if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    die "MLFLOW_PORT='$port' is not a port number (1-65535)" 2
fi
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "MLFLOW_START_TIMEOUT='$timeout_s' is not a whole number" 2
command -v mlflow >/dev/null || die "'mlflow' is not on PATH; install the project: pip install -e ." 2

# Security default: loopback only. Binding elsewhere is an explicit, warned opt-in.
case "$host" in
    127.0.0.1 | localhost | ::1) probe_host="$host" ;;
    *)
        [[ "${MLFLOW_ALLOW_REMOTE:-0}" == 1 ]] || die "refusing to bind MLFLOW_HOST='$host': the \
MLflow server has no authentication. Set MLFLOW_ALLOW_REMOTE=1 to bind a non-loopback address \
(and put the server behind an authenticating proxy or pass '-- --app-name basic-auth')." 2
        log "WARNING: binding $host:$port with NO authentication: anyone who can reach this port" \
            "can read, modify and delete experiments, runs and registered models."
        # A wildcard bind is probed (and advertised) via loopback, a specific address as is.
        case "$host" in
            0.0.0.0) probe_host=127.0.0.1 ;;
            ::) probe_host=::1 ;;
            *) probe_host="$host" ;;
        esac
        ;;
esac
url_host="$probe_host"
[[ "$url_host" == *:* ]] && url_host="[$url_host]"
tracking_uri="http://$url_host:$port"

mkdir -p "$data_dir/artifacts"
data_dir="$(cd "$data_dir" && pwd)"
pid_file="$data_dir/mlflow.pid"
log_file="$data_dir/server.log"

if [[ -f "$pid_file" ]] && kill -0 -- "-$(cat "$pid_file")" 2>/dev/null; then
    die "an MLflow server started from $data_dir is still running (process group \
$(cat "$pid_file")); stop it with: deploy/mlflow/stop-server.sh '$data_dir'"
fi
# Something else answering on the port would make the /health probe below lie.
if (exec 3<>"/dev/tcp/$probe_host/$port") 2>/dev/null; then
    die "port $port on $probe_host is already in use; choose another with MLFLOW_PORT=..."
fi

server_cmd=(
    mlflow server
    --backend-store-uri "sqlite:///$data_dir/mlflow.db"
    --artifacts-destination "$data_dir/artifacts"
    --host "$host" --port "$port" --workers "$workers"
)
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && server_cmd+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
server_cmd+=("${extra_args[@]}")

# MLflow's job runner (huey consumers for GenAI evaluation jobs) is unused here and adds ~8
# processes; keep it off unless the caller explicitly turns it on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# setsid: the server and its uvicorn workers get their own process group (pgid == pid), so one
# signal to the group stops all of them. Non-interactive bash has no job control, so setsid does
# not fork and $! is the server's pid. Foreground mode streams the server log to stderr.
if ((detach)); then
    setsid "${server_cmd[@]}" >"$log_file" 2>&1 </dev/null &
else
    setsid "${server_cmd[@]}" >&2 </dev/null &
fi
server_pgid=$!
echo "$server_pgid" >"$pid_file"

stop_server() {
    if kill -TERM -- "-$server_pgid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 -- "-$server_pgid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$server_pgid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}
# Until the server is healthy (and always, in foreground mode) the script owns it: any exit or
# signal stops the whole group so no orphaned server keeps the port.
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# curl when present, else the Python that runs MLflow (slim images may lack curl).
probe() {
    if command -v curl >/dev/null; then
        curl -fsS --max-time 2 "$tracking_uri/health" >/dev/null 2>&1
    else
        python3 - "$tracking_uri/health" >/dev/null 2>&1 <<'PYEOF'
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
PYEOF
    fi
}

log "starting the MLflow server on $host:$port (store: $data_dir)"
deadline=$((SECONDS + timeout_s))
until probe; do
    if ! kill -0 "$server_pgid" 2>/dev/null; then
        ((detach)) && tail -n 20 "$log_file" >&2
        die "the MLflow server exited during start-up (see the log above)"
    fi
    ((SECONDS < deadline)) || die "no answer from $tracking_uri/health after ${timeout_s}s"
    sleep 0.3
done
log "ready: MLFLOW_TRACKING_URI=$tracking_uri"
echo "$tracking_uri"

if ((detach)); then
    trap - EXIT INT TERM HUP
    log "running detached (process group $server_pgid, log $log_file);" \
        "stop with: deploy/mlflow/stop-server.sh '$data_dir'"
    exit 0
fi
log "press Ctrl-C to stop"
wait "$server_pgid" || die "the MLflow server exited with status $?"
