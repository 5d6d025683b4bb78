#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on the GPU machine (issue 23) into git-ignored carry sets, each
# small enough for one device call (what travels: the working tree + the carried set <= 64 MiB),
# and prints the device calls. Run it in the checkout the device tool sends (the lead's), on a
# machine with network for the wheelhouse. Sequence and what to record: docs/benchmarks.md,
# "GPU (prepared, not yet run)".
#
#   bash bench/gpu_pack.sh
#
# What it makes (all git-ignored):
#   .wheelhouse/gpu-py312/   deploy/wheelhouse.sh 3.12 ... --without-torch (reused when present)
#   .gpudata/                cifar10-{train,test}.parquet copied from $DATA (../shared/data)
#   .gpucarry/NN/            one piece each of two tar bundles + manifest.txt:
#       core:  the wheels the GPU image lacks (Ray, MLflow and theirs) + .gpudata/  -> always
#       spare: the wheels of distributions the image already has (KINDS.md's list), and of
#              faiss-cpu/optuna (search and sweeps: not run there)  -> only if gpu.sh asks
#   .gpucarry/PLAN.txt       the device calls, in order
# Environment: PYVER (3.12), DATA (../shared/data), CALL_MIB (64), PIECE_MIB (default: 64 MiB
# minus the working tree minus 2 MiB), GPU_ROOT (where to make them: this checkout).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "${GPU_ROOT:-$REPO}"
PYVER=${PYVER:-3.12}
WHEELS=.wheelhouse/gpu-py${PYVER//./}
DATA=${DATA:-../shared/data}
CALL_MIB=${CALL_MIB:-64}

# The GPU image's Python packages (/work/.library/device/KINDS.md, 'Python packages already
# there'): pip keeps an installed distribution that satisfies a requirement, so their wheels
# need not travel; gpu.sh falls back to the spare set when one does not satisfy.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"
NOT_RUN_THERE="faiss-cpu optuna colorlog"

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    bash "$REPO/deploy/wheelhouse.sh" "$PYVER" "$WHEELS" --without-torch
fi
mkdir -p .gpudata
cp -f "$DATA/cifar10-train.parquet" "$DATA/cifar10-test.parquet" .gpudata/

rm -rf .gpucarry
mkdir -p .gpucarry/stage
: >.gpucarry/stage/core.list
: >.gpucarry/stage/spare.list
for wheel in "$WHEELS"/*.whl; do
    # a wheel's file name starts with its distribution name, '-' written '_'
    name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
    if [[ " $(echo $DEVICE_HAS $NOT_RUN_THERE) " == *" $name "* ]]; then
        echo "$wheel" >>.gpucarry/stage/spare.list
    else
        echo "$wheel" >>.gpucarry/stage/core.list
    fi
done
ls .gpudata/*.parquet >>.gpucarry/stage/core.list

# What travels besides a set: tracked + untracked-not-ignored files of this checkout.
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard 2>/dev/null || true) |
    xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
piece_bytes=$((${PIECE_MIB:-0} * 1048576))
if [ "$piece_bytes" -eq 0 ]; then
    piece_bytes=$((CALL_MIB * 1048576 - tree_bytes - 2 * 1048576))
fi
echo "working tree: $((tree_bytes / 1048576)) MiB; pieces of $((piece_bytes / 1048576)) MiB" >&2

set_no=0
: >.gpucarry/stage/manifest.txt
for bundle in core spare; do
    [ -s ".gpucarry/stage/$bundle.list" ] || continue
    tar -cf ".gpucarry/stage/$bundle.tar" -T ".gpucarry/stage/$bundle.list"
    sha=$(sha256sum ".gpucarry/stage/$bundle.tar" | cut -d' ' -f1)
    split -b "$piece_bytes" -d -a 2 ".gpucarry/stage/$bundle.tar" ".gpucarry/stage/$bundle.part-"
    rm ".gpucarry/stage/$bundle.tar"
    pieces=$(ls .gpucarry/stage/"$bundle".part-* | wc -l)
    echo "$bundle $sha $pieces $WHEELS" >>.gpucarry/stage/manifest.txt
    for piece in .gpucarry/stage/"$bundle".part-*; do
        set_no=$((set_no + 1))
        dir=$(printf ".gpucarry/%02d" "$set_no")
        mkdir -p "$dir"
        mv "$piece" "$dir/"
        echo "$dir $bundle" >>.gpucarry/stage/sets.txt
    done
done
for dir in .gpucarry/[0-9]*; do cp .gpucarry/stage/manifest.txt "$dir/"; done

core_sets=$(awk '$2 == "core" {print $1}' .gpucarry/stage/sets.txt)
spare_sets=$(awk '$2 == "spare" {print $1}' .gpucarry/stage/sets.txt)
last=$(echo "$core_sets" | tail -1)
{
    echo "Device calls (each within ~30 s of the previous reply: a machine left idle longer"
    echo "goes back with what it was given). Core sets: $(echo $core_sets)."
    n=0
    for dir in $core_sets; do
        n=$((n + 1))
        if [ "$dir" = "$last" ]; then
            echo "$n. run(command=\"bash bench/gpu.sh\", carry=[\"$dir\"], timeout_s=600)"
        elif [ "$n" -eq 1 ]; then
            echo "$n. run(command=\"nvidia-smi -L; python3 -m pip list --format=freeze >\$OUT/pip-list.txt\", carry=[\"$dir\"], timeout_s=120)"
        else
            echo "$n. run(command=\"true\", carry=[\"$dir\"], timeout_s=60)"
        fi
    done
    if [ -n "$spare_sets" ]; then
        echo "Only if gpu.sh's pip.txt shows the carried wheels did not resolve against the image:"
        echo "carry the spare sets too ($(echo $spare_sets)), then run bash bench/gpu.sh again."
    fi
} | tee .gpucarry/PLAN.txt
rm -rf .gpucarry/stage/*.list
du -sh .gpucarry/[0-9]* >&2
