#!/usr/bin/env bash
# The GPU machine's side of the prepared visit (issue 23): join the carried pieces
# (.gpucarry/NN/, made here by bench/gpu_pack.sh) into the wheels and CIFAR-10, install Ray and
# MLflow from the wheels into this python3 (torch is already there; nothing is fetched), then run
# bench/gpu.py with what is left of 9 minutes. The calls, in order, and what to record:
# docs/benchmarks.md, "GPU (prepared, not yet run)" (and .gpucarry/PLAN.txt).
#
#   bash bench/gpu.sh              # on the GPU machine, after the carry calls
#   bash bench/gpu.sh --parts b    # arguments go to bench/gpu.py (here: part b alone, full 5 min)
#   bash bench/gpu.sh --join-only  # join + check the pieces, nothing else (tests/test_gpu_bench.py)
#
# Back in $OUT: augment.jsonl + augment-tests.txt (the batched augmentation on CUDA, run first),
# results.jsonl (one JSON line per part), quality.png, gpu.log (the run's stderr), pip.txt. Exit: 0 all parts ran, 1 a part failed, 2 pieces missing, 3 deadline.
# Environment: PYTHON (python3), GPU_TOTAL_S (540: the visit's seconds), GPU_ROOT (the checkout).
set -uo pipefail
cd "${GPU_ROOT:-$(dirname "$0")/..}" || exit 2
START=$(date +%s)
OUT=${OUT:-outputs/gpu-bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
say() { echo "[gpu.sh $(($(date +%s) - START)) s] $*" >&2; }

# 1. Join each bundle of the manifest whose pieces are all here (core must be), check its sha256.
manifest=$(ls .gpucarry/*/manifest.txt 2>/dev/null | head -1)
if [ -z "$manifest" ]; then
    echo '{"part": "install", "error": "no .gpucarry/NN/manifest.txt here: carry the sets that bench/gpu_pack.sh made"}'
    exit 2
fi
wheels=""
while read -r bundle sha pieces wheel_dir; do
    wheels=$wheel_dir
    [ -e ".gpucarry/.$bundle-$sha.joined" ] && continue  # joined by an earlier call
    files=() missing=()
    for ((k = 0; k < pieces; k++)); do
        piece=$(ls .gpucarry/*/"$bundle".part-"$(printf %02d "$k")" 2>/dev/null | head -1)
        if [ -n "$piece" ]; then files+=("$piece"); else missing+=("$bundle.part-$(printf %02d "$k")"); fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$bundle" = core ]; then
            echo "{\"part\": \"install\", \"error\": \"missing ${missing[*]} (of $pieces pieces): carry the sets that hold them again (.gpucarry/PLAN.txt)\"}"
            exit 2
        fi
        say "$bundle: ${#missing[@]} of $pieces pieces not carried; not used"
        continue
    fi
    if [ "$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)" != "$sha" ]; then
        echo "{\"part\": \"install\", \"error\": \"$bundle pieces do not join to sha256 $sha: carry them again\"}"
        exit 2
    fi
    cat "${files[@]}" | tar -xf - && touch ".gpucarry/.$bundle-$sha.joined"
    say "$bundle: $pieces piece(s) joined and unpacked"
done <"$manifest"
[ "${1:-}" = "--join-only" ] && exit 0

# 2. Ray and MLflow from the carried wheels, resolved against what the image has; when a carried
# wheel's requirement is not met by the image (and the spare set was not carried), install the
# carried wheels as they are and let `pip check` record the mismatch.
pip_args=(--no-index --no-compile --disable-pip-version-check --find-links "$wheels")
if "$PY" -c "import ray, mlflow" 2>/dev/null; then
    say "ray and mlflow already installed"
elif "$PY" -m pip install -q "${pip_args[@]}" "ray[default,train,tune,data]>=2.50" "mlflow>=3.0" \
    >"$OUT/pip.txt" 2>&1; then
    say "installed ray and mlflow from $wheels"
else
    say "the wheels did not resolve against the image (see pip.txt); installing them --no-deps"
    ls "$wheels"/*.whl | grep -v -e /faiss_cpu- -e /optuna- |
        xargs "$PY" -m pip install -q "${pip_args[@]}" --no-deps >>"$OUT/pip.txt" 2>&1
fi
"$PY" -m pip check >>"$OUT/pip.txt" 2>&1 || say "pip check found mismatches (pip.txt)"

# 3. The batched augmentation on CUDA (issue 23 item 2), first: its share of a ResNet-18 bf16
# step (bench/augment.py's fused_cuda lines) and its equality with the old pipeline on the GPU.
if [ "${GPU_SKIP_AUGMENT:-0}" != 1 ]; then
    PYTHONPATH="$PWD" timeout -k 5 120 "$PY" bench/augment.py --fused-only \
        >"$OUT/augment.jsonl" 2>>"$OUT/gpu.log" || say "bench/augment.py failed (gpu.log)"
    PYTHONPATH="$PWD" timeout -k 5 90 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_batch_augment.py >"$OUT/augment-tests.txt" 2>&1 ||
        say "tests/test_batch_augment.py failed (augment-tests.txt)"
    say "augmentation measured: $(grep -c . "$OUT/augment.jsonl") lines"
fi
# 4. The visit: JSON lines on stdout (and $OUT/results.jsonl), the run's chatter in gpu.log.
left=$((${GPU_TOTAL_S:-540} - ($(date +%s) - START) - 5))
say "bench/gpu.py with ${left} s left"
PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 $((left + 20)) \
    "$PY" bench/gpu.py --out "$OUT" --deadline-s "$left" "$@" 2>"$OUT/gpu.log"
rc=$?
echo "--- gpu.log (last lines) ---" >&2
tail -n 25 "$OUT/gpu.log" >&2
echo "--- augment.jsonl, augment-tests.txt ---"
cat "$OUT/augment.jsonl" 2>/dev/null
tail -n 3 "$OUT/augment-tests.txt" 2>/dev/null
echo "--- results.jsonl ---"
cat "$OUT/results.jsonl" 2>/dev/null
exit $rc
