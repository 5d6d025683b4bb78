#!/usr/bin/env bash
# Build an offline wheelhouse: this project's wheel plus every runtime dependency (pyproject's
# [project] dependencies, not the dev/bench extras) as binary wheels for CPython PYVER on Linux
# x86_64 (manylinux, glibc >= 2.28). Run it on a machine with a package index, copy DIR to the
# air-gapped machine and install from it with no index (DIR/INSTALL.txt says how).
#
#   deploy/wheelhouse.sh PYVER DIR [--without-torch]
#
# --without-torch: for a target that already has torch and torchvision (a GPU image). Neither
# they nor torch's CUDA stack (triton, nvidia-*, cuda-*) are shipped, and the install keeps the
# target's own: the project asks for torch>=2.4 / torchvision>=0.19, which the installed ones
# meet, so pip installs nothing for them. Set TARGET_TORCH / TARGET_TORCHVISION to the target's
# versions (default 2.11.0 / 0.26.0): the dependencies are resolved against those.
#
# Environment: PYTHON, the interpreter that runs pip (default: pythonPYVER when there is one,
# else python3). Any pip >= 22 works. With a matching Python, environment markers are exact;
# with another one pip evaluates them for that Python, and the final check (deploy/wheelhouse.py,
# markers evaluated for PYVER) names any wheel that is then missing.
set -euo pipefail

usage() {
  echo "usage: $0 PYVER DIR [--without-torch]   (PYVER like 3.12; DIR new or empty)" >&2
  exit 2
}
[[ $# -eq 2 || ($# -eq 3 && ${3-} == --without-torch) ]] || usage
PYVER=$1 DIR=$2 WITHOUT_TORCH=${3:+1}
TORCH=${TARGET_TORCH:-2.11.0} TORCHVISION=${TARGET_TORCHVISION:-0.26.0}
[[ $PYVER =~ ^3\.[0-9]+$ ]] || usage
if [[ -e $DIR && -n $(ls -A "$DIR" 2>/dev/null) ]]; then
  echo "$0: $DIR is not empty (one wheelhouse, one version of each package: use a new folder)" >&2
  exit 2
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
HELPER=$REPO/deploy/wheelhouse.py
if [[ -z ${PYTHON-} ]]; then
  PYTHON=python3
  if "python$PYVER" -c 'import sys' >/dev/null 2>&1; then PYTHON=python$PYVER; fi
fi
HOST_PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $HOST_PYVER != "$PYVER" ]]; then
  echo "note: pip runs on Python $HOST_PYVER for a $PYVER target (PYTHON=python$PYVER is exact)" >&2
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
TMP=$(mktemp -d -t wheelhouse.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS

# 1. The project's wheel, built from a copy of the checkout's files (tracked or not ignored):
#    setuptools never cleans build/lib, so an in-place build can ship modules deleted since.
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
    tar --null -T - -cf -) | (mkdir "$TMP/src" && tar -C "$TMP/src" -xf -)
else
  cp -a "$REPO" "$TMP/src"
fi
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "$TMP/src"
PROJECT_WHEEL=$(ls "$DIR"/contrastive_service-*.whl)

# 2. Its runtime dependencies for the target, one resolution (one version each). pip takes
#    --platform tags literally, hence the whole manylinux list; pure (any) wheels always fit.
PLATFORMS=()
for p in $("$PYTHON" -c "import runpy; print(*runpy.run_path('$HELPER')['platforms']())"); do
  PLATFORMS+=(--platform "$p")
done
STUBS=()
if [[ -n $WITHOUT_TORCH ]]; then
  # Stand-ins at the target's versions: pip resolves against them (so the project's ranges are
  # checked against the target's torch here) and never fetches torch or its CUDA wheels.
  mkdir "$TMP/stubs"
  "$PYTHON" "$HELPER" stub torch "$TORCH" "$TMP/stubs" >/dev/null
  "$PYTHON" "$HELPER" stub torchvision "$TORCHVISION" "$TMP/stubs" >/dev/null
  STUBS=(--find-links "$TMP/stubs" "torch==$TORCH+stub"
    "torchvision==$TORCHVISION+stub")
fi
"$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$DIR" \
  --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" \
  "$PROJECT_WHEEL" "${STUBS[@]}"
rm -f "$DIR"/*+stub-py3-none-any.whl

# 3. Check it installs offline on the target, and say how.
"$PYTHON" "$HELPER" check "$DIR" "$PYVER" ${WITHOUT_TORCH:+--without-torch}
{
  echo "# Offline install on CPython $PYVER, Linux x86_64 (glibc >= 2.28), from this folder:"
  if [[ -n $WITHOUT_TORCH ]]; then
    echo "# torch and torchvision must already be installed in that Python (built against"
    echo "# torch $TORCH / torchvision $TORCHVISION); pip keeps them."
  fi
  echo "python -m pip install --no-index --find-links . contrastive-service"
} >"$DIR/INSTALL.txt"
echo "wheelhouse: $DIR, $(du -sh "$DIR" | cut -f1) in $((SECONDS - start)) s"
echo "install on the target (from inside $(basename "$DIR")/):"
grep -v '^#' "$DIR/INSTALL.txt"
