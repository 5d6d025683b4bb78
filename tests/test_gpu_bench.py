"""The prepared GPU visit (issue 23) on a CPU: the GPU configs pass pre-flight on the shared data,
the carry pieces join back into what was packed, and `bench/gpu.py --dry-run` runs every part's
plumbing end to end (embedded Ray, a SQLite MLflow store, the PNG)."""

from __future__ import annotations

import argparse
import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import REPO_ROOT, load_config

SHARED = REPO_ROOT.parent / "shared" / "data"
GPU_CONFIGS = [
    "cifar10-resnet18-gpu.yaml",
    "cifar10-resnet18-gradcache-gpu.yaml",
    "cifar10-resnet18-5min-gpu.yaml",
    "clip-gpu.yaml",
]


@pytest.mark.skipif(not (SHARED / "cifar10-train.parquet").is_file(), reason="no ../shared/data")
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_pass_preflight_on_the_shared_data(name: str, tmp_path: Path) -> None:
    """Every rule and the data checks (files, columns, a decoded sample, labels, one global
    batch), as `contrastive pretrain` runs them before Ray; clip-gpu.yaml on the captioned copies
    its header tells how to make."""
    from service.data.captions import caption_parquet
    from service.train.preflight import preflight

    overrides = []
    if name == "clip-gpu.yaml":
        for split, seed in (("train", 0), ("test", 1)):
            out = tmp_path / f"cifar10-{split}-captions.parquet"
            caption_parquet(SHARED / f"cifar10-{split}.parquet", out, seed=seed)
            overrides.append(f"data.{split}={out}")
    config = load_config(REPO_ROOT / "jobs" / "configs" / name, overrides)
    assert config.train.use_gpu and config.train.amp == "bf16"
    assert config.data.test, "the test split gives the final numbers"
    preflight(config)


@pytest.mark.skipif(not (SHARED / "cifar10-train.parquet").is_file(), reason="no ../shared/data")
def test_the_visits_runs_pass_preflight_as_the_gpu_machine_gets_them(tmp_path: Path) -> None:
    """The three pretrainings of the GPU plan (not the dry run's), as bench/gpu.py builds them:
    every rule and data check, and they fit the lent machine (16 CPUs, one GPU)."""
    from bench.gpu import GPU_PLAN, Bench, cache_run, loop_run, quality_run
    from service.train.driver import fit_problems
    from service.train.preflight import preflight

    args = argparse.Namespace(
        out=str(tmp_path / "out"), work=str(tmp_path / "work"), data=str(SHARED), dry_run=False,
        deadline_s=510.0, parts="abc",
    )  # fmt: skip
    bench = Bench(args, GPU_PLAN)
    runs = {"a": loop_run(bench), "b": quality_run(bench, 5.0, 10)}
    runs |= {f"c{batch}": cache_run(bench, batch, 0.5) for batch in (16_384, 32_768)}
    configs = {}
    for part, (name, overrides) in runs.items():
        config = configs[part] = load_config(REPO_ROOT / "jobs" / "configs" / name, overrides)
        preflight(config)
        assert fit_problems(config, cpus=16, gpus=1) == [], part
        assert (config.train.use_gpu, config.train.amp, config.model.arch) == (
            True, "bf16", "resnet18"
        )  # fmt: skip
        assert config.data.reader == "torch" and config.data.test is None  # part b probes it
        assert config.mlflow.registered_model_name is None and config.train.num_workers == 1
    a, b = configs["a"], configs["b"]
    assert (a.train.global_batch_size, a.train.optimizer, a.model.proj_hidden_dim) == (
        512, "adamw", 2048
    )  # fmt: skip
    assert a.model.channels_last and not a.data.has_val and a.train.time_budget_minutes == 0.4
    assert b.data.has_val and b.train.time_budget_minutes == 5.0 and b.eval.knn_every_epochs == 10
    for batch in (16_384, 32_768):
        c = configs[f"c{batch}"]
        assert c.train.micro_batch_size == 512 and c.loss.chunk_size == 2048
        assert 50_000 // c.train.global_batch_size >= 1  # a full global batch every epoch


def test_loop_rates_doctest() -> None:
    import bench.gpu

    assert doctest.testmod(bench.gpu, raise_on_error=True).attempted >= 1


def _fake_wheelhouse(root: Path) -> dict[str, bytes]:
    files = {
        ".wheelhouse/gpu-py312/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl": 1_500_000,
        ".wheelhouse/gpu-py312/mlflow_skinny-3.17.2-py3-none-any.whl": 300_000,
        ".wheelhouse/gpu-py312/numpy-2.5.2-cp312-cp312-manylinux_2_28_x86_64.whl": 700_000,
        ".wheelhouse/gpu-py312/faiss_cpu-1.15.1-cp312-cp312-manylinux_2_28_x86_64.whl": 50_000,
    }
    made = {}
    for i, (path, size) in enumerate(files.items()):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        made[path] = os.urandom(size) + bytes([i])
        (root / path).write_bytes(made[path])
    return made


def _bash(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / script), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip


def test_carry_pieces_join_into_what_was_packed(tmp_path: Path) -> None:
    """gpu_pack.sh splits wheels + data into per-call sets (the image's own distributions and
    what is not run there into a spare bundle); gpu.sh joins what was carried, checks it, and
    names the piece that is missing."""
    here, there, data = tmp_path / "here", tmp_path / "there", tmp_path / "data"
    wheels = _fake_wheelhouse(here)
    data.mkdir()
    parquet = {name: os.urandom(600_000) for name in ("cifar10-train", "cifar10-test")}
    for name, blob in parquet.items():
        (data / f"{name}.parquet").write_bytes(blob)
    packed = _bash("gpu_pack.sh", GPU_ROOT=str(here), DATA=str(data), PIECE_MIB="1")
    assert packed.returncode == 0, packed.stderr
    plan = (here / ".gpucarry" / "PLAN.txt").read_text()
    sets = sorted(p.name for p in (here / ".gpucarry").iterdir() if p.name.isdigit())
    manifest = dict(line.split()[0:3:2] for line in (here / ".gpucarry/01/manifest.txt").open())
    core, spare = int(manifest["core"]), int(manifest["spare"])
    assert len(sets) == core + spare and core >= 3 and spare == 1  # numpy + faiss: ~0.75 MiB
    assert f'run(command="bash bench/gpu.sh", carry=[".gpucarry/{sets[core - 1]}"]' in plan

    (there / ".gpucarry").mkdir(parents=True)
    for name in sets[:core]:  # the core sets only, as the visit carries them
        (there / ".gpucarry" / name).symlink_to(here / ".gpucarry" / name)
    missing = sets[1]
    (there / ".gpucarry" / missing).unlink()
    refused = _bash("gpu.sh", "--join-only", GPU_ROOT=str(there), OUT=str(tmp_path / "out"))
    assert refused.returncode == 2 and "missing core.part-01 (of" in refused.stdout
    (there / ".gpucarry" / missing).symlink_to(here / ".gpucarry" / missing)
    joined = _bash("gpu.sh", "--join-only", GPU_ROOT=str(there), OUT=str(tmp_path / "out"))
    assert joined.returncode == 0, joined.stdout + joined.stderr
    got = {str(p.relative_to(there)) for p in there.glob(".wheelhouse/gpu-py312/*.whl")}
    assert got == {path for path in wheels if "/ray-" in path or "/mlflow_" in path}
    for path in got:
        assert (there / path).read_bytes() == wheels[path]
    for name, blob in parquet.items():
        assert (there / ".gpudata" / f"{name}.parquet").read_bytes() == blob
    assert "spare: 1 of 1 pieces not carried" in joined.stderr


@pytest.mark.slow
def test_dry_run_runs_every_part_through_ray_and_mlflow(tmp_path: Path) -> None:
    """`bench/gpu.py --dry-run`: the bundled subset, a tiny CNN on gloo, a 1-second budget per
    run; every part reports its JSON line (no error), and the quality PNG is written."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OUT")}
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out), "--work", str(work)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert lines == [json.loads(line) for line in (out / "results.jsonl").open()]
    assert all("error" not in line and line["device"] == "cpu" for line in lines)
    parts = {(line["part"], line["what"]): line for line in lines}
    assert set(parts) == {
        ("start", "start"), ("a", "bare_step"), ("a", "loop_vs_bare_step"), ("b", "quality"),
        ("c", "cached_gradient"), ("end", "end"),
    }  # fmt: skip
    loop = parts["a", "loop_vs_bare_step"]
    assert loop["loop"]["images_per_s"] > 0 and 0 <= loop["loop"]["data_wait_fraction"] < 1
    assert loop["loop_vs_bare"] > 0
    quality = parts["b", "quality"]
    assert {"knn200", "knn10", "linear"} == set(quality["test"]) == set(quality["random_init"])
    assert quality["val_knn_curve"][0][0] == 0.0  # random init at minute 0, then trained epochs
    assert len(quality["val_knn_curve"]) == 1 + quality["epochs"]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = parts["c", "cached_gradient"]
    assert (cached["global_batch"], cached["micro_batch"]) == (64, 16) and cached["steps"] >= 1
