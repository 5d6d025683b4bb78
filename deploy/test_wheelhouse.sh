#!/usr/bin/env bash
# End-to-end check of the air-gapped install (deploy/wheelhouse.sh), too slow for CI (minutes:
# ~300 MB of downloads, ~130 wheels to install, an embedded Ray run): run by hand, results in
# docs/benchmarks.md. Prints one JSON line per step (seconds, sizes, ok) and exits 1 on a failure.
#
#   deploy/test_wheelhouse.sh [WHEELHOUSE]   # reuse a wheelhouse built for this Python
#
# 1. a wheelhouse for this machine's Python, --without-torch, at this machine's torch version;
# 2. a fresh venv that has only torch and torchvision: their installed files (and exactly their
#    own dependencies, by importlib.metadata) linked into a folder OUTSIDE the venv and put on
#    its path by a .pth file. Installing torch's CUDA build afresh would cost GBs and minutes;
#    being outside the venv, pip counts them as installed but never uninstalls or rewrites them
#    ("outside environment"), so this machine's own packages cannot be touched;
# 3. `pip install --no-index --find-links WHEELHOUSE contrastive-service`, with no pip config,
#    in a network namespace with only a loopback interface when `unshare -n` is allowed
#    (JSON "no_network": true), so nothing can come from the network;
# 4. `contrastive --help` and a 1-epoch smoke pretraining run (embedded Ray, SQLite MLflow
#    store) from that venv, also without network.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d -t wheelhouse-test.XXXXXX)
[[ -n ${KEEP-} ]] || trap 'rm -rf "$WORK"' EXIT
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
versions=$("$PY" -c 'from importlib.metadata import version as v; print(v("torch"), v("torchvision"))')
read -r TORCH TORCHVISION <<<"$versions"
failed=0

now() { date +%s.%N; }
seconds() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
mb() { du -sm "$1" | cut -f1; }
emit() { # step ok seconds extra-json
  echo "{\"step\": \"$1\", \"ok\": $2, \"seconds\": $3${4:+, $4}}"
  [[ $2 == true ]] || failed=1
}
NO_NETWORK=false
if unshare -n true 2>/dev/null; then NO_NETWORK=true; fi
offline() { # run a command with no network (only loopback) when the kernel lets us
  if [[ $NO_NETWORK == true ]]; then
    unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
  else
    "$@"
  fi
}

# 1. the wheelhouse
t=$(now)
WH=${1:-$WORK/wheelhouse}
ok=true
if [[ -z ${1-} ]]; then
  TARGET_TORCH=$TORCH TARGET_TORCHVISION=$TORCHVISION PYTHON=$PY \
    "$REPO/deploy/wheelhouse.sh" "$PYVER" "$WH" --without-torch >"$WORK/wheelhouse.log" 2>&1 ||
    ok=false
fi
n=$(find "$WH" -name '*.whl' | wc -l)
emit wheelhouse $ok "$(seconds "$t")" "\"python\": \"$PYVER\", \"wheels\": $n, \"mb\": $(mb "$WH")"
[[ $ok == true ]] || { tail -20 "$WORK/wheelhouse.log" >&2; exit 1; }

# 2. a venv with only torch and torchvision
t=$(now)
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
# Python < 3.12's venv brings setuptools 65 beside pip; it would shadow torch's own (>= 77)
"$VPY" -m pip uninstall --quiet --yes setuptools 2>/dev/null || true
mkdir "$WORK/torch-only"
linked=$("$PY" - "$WORK/torch-only" <<'EOF'
import importlib.metadata as md
import os
import sys

from packaging.requirements import Requirement

todo, seen, done = [("torch", ()), ("torchvision", ())], set(), set()
while todo:  # (name, extras asked for): cuda-toolkit[cudart,...] brings nvidia-* by extras
    name, extras = todo.pop()
    name = name.lower().replace("_", "-")
    if (name, extras) in done:
        continue
    done.add((name, extras))
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:  # an optional one this machine does not have
        continue
    seen.add(name)
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            todo.append((req.name, tuple(sorted(req.extras))))
    for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
        link = os.path.join(sys.argv[1], top)
        if not os.path.lexists(link):
            os.symlink(dist.locate_file(top), link)
print(len(seen))
EOF
)
purelib=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$WORK/torch-only" >"$purelib/torch_only.pth"
ok=true
(cd "$WORK" && env -u PYTHONPATH "$VPY" -c '
import importlib.util as u, torch, torchvision
absent = ["ray", "mlflow", "service", "timm"]
assert not [m for m in absent if u.find_spec(m)], [m for m in absent if u.find_spec(m)]
') || ok=false
emit torch_only_venv $ok "$(seconds "$t")" "\"linked_distributions\": $linked, \"torch\": \"$TORCH\""

# 3. the offline install: no index, no pip config, no network
t=$(now)
ok=true
(cd "$WORK" && offline env -u PYTHONPATH -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
  "$VPY" -m pip install --no-index --find-links "$WH" contrastive-service >"$WORK/install.log" 2>&1) ||
  ok=false
"$VPY" -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch") != sys.argv[1])' \
  "$TORCH" || ok=false  # the install kept this machine's torch
installed=$(grep -o '^Successfully installed.*' "$WORK/install.log" | wc -w)
emit install $ok "$(seconds "$t")" "\"no_network\": $NO_NETWORK, \"installed\": $((installed > 2 ? installed - 2 : 0)), \"venv_mb\": $(mb "$WORK/venv")"
[[ $ok == true ]] || { tail -20 "$WORK/install.log" >&2; exit 1; }

# 4. the console script and a 1-epoch smoke run from the venv
t=$(now)
ok=true
(cd "$WORK" && env -u PYTHONPATH "$WORK/venv/bin/contrastive" --help >/dev/null) || ok=false
where=$(cd "$WORK" && env -u PYTHONPATH "$VPY" -c 'import service; print(service.__file__)')
[[ $where == "$WORK/venv/"* ]] || ok=false
emit help $ok "$(seconds "$t")"

t=$(now)
ok=true
(cd "$WORK" && offline env -u PYTHONPATH -u MLFLOW_TRACKING_URI "$WORK/venv/bin/contrastive" \
  pretrain --config "$REPO/jobs/configs/smoke-cpu.yaml" --set train.epochs=1 \
  --set data.limit=512 --set train.global_batch_size=128 --set eval.knn_max_train=1000 \
  --set train.storage_path="$WORK/ray_results" --set "mlflow.tracking_uri=sqlite:///$WORK/mlruns.db" \
  --set mlflow.registered_model_name=wheelhouse-smoke >"$WORK/smoke.log" 2>&1) || ok=false
knn=$("$PY" -c '
import json, sys
lines = [ln for ln in open(sys.argv[1]) if ln.startswith("{")]
print(json.loads(lines[-1]).get("knn_top1", "null") if lines else "null")' "$WORK/smoke.log")
[[ $knn != null ]] || ok=false
emit smoke_pretrain $ok "$(seconds "$t")" "\"knn_top1\": $knn"
[[ $ok == true ]] || tail -30 "$WORK/smoke.log" >&2
exit $failed
