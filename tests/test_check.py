"""``contrastive check``'s parts without Ray: the drill really cuts the gradient (and only the
gradient) on a real gloo group, the reference's batch order for cached-gradient steps, the
comparison, the check's config and the table. The command end to end on the 2-node cluster is
tests/test_check_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.config import Config, ConfigError, ModelConfig, TextConfig, TrainConfig
from service.losses import NTXentLoss, simulated_bug
from service.train.check import reference_batch
from service.train.check_run import check_config, compare, format_check, one_process
from tests._dist_utils import run_in_gloo_group

GLOBAL, DIM = 8, 16


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(GLOBAL, DIM, generator=g), torch.randn(GLOBAL, DIM, generator=g)


def _loss_and_grads(rank: int, world: int, drill: str | None) -> dict[str, Any]:
    """NT-Xent over the global batch on ``world`` ranks: this rank's slice, its gradient."""
    b = GLOBAL // world
    z1, z2 = (z[rank * b : (rank + 1) * b].clone().requires_grad_() for z in _embeddings())
    with simulated_bug(drill):
        loss = NTXentLoss(temperature=0.5)(z1, z2)
    # DDP averages the ranks' gradients: the global loss is the mean of the ranks' losses
    (loss / world).backward()
    return {"loss": float(loss.detach()), "grads": [z1.grad, z2.grad]}


def _ranks(rank: int, world: int) -> dict[str, Any]:
    return {drill: _loss_and_grads(rank, world, drill) for drill in (None, "gather_without_grad")}


@pytest.mark.distributed
def test_the_drill_cuts_the_gradient_but_not_the_loss() -> None:
    one = _loss_and_grads(0, 1, None)
    per_rank = run_in_gloo_group(_ranks, 2)
    b = GLOBAL // 2
    for drill, equal in ((None, True), ("gather_without_grad", False)):
        losses = [r[drill]["loss"] for r in per_rank]
        assert sum(losses) / 2 == pytest.approx(one["loss"], rel=1e-6)  # forward always right
        for view in (0, 1):
            got = torch.cat([r[drill]["grads"][view] for r in per_rank])
            assert torch.allclose(got, one["grads"][view], atol=1e-6) is equal, drill
    got = torch.cat([r["gather_without_grad"]["grads"][0] for r in per_rank])
    assert (got - one["grads"][0]).abs().max() > 0.02 * one["grads"][0].abs().max()  # ~7%
    assert per_rank[0][None]["grads"][0].shape == (b, DIM)


def test_unknown_drill_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown simulated bug 'nope'"):
        with simulated_bug("nope"):
            pass


def test_reference_order_puts_the_ranks_kth_micro_batches_together() -> None:
    # 2 ranks x 4 samples, micro-batch 2: rank 0 holds 0..3, rank 1 holds 4..7
    labels = torch.arange(8)
    views = [labels.float().view(8, 1) * 10, labels.float().view(8, 1) * 100]
    got_views, got_labels = reference_batch((views, labels), world=2, micro=2)
    assert got_labels.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert got_views[1].flatten().tolist() == [0, 100, 400, 500, 200, 300, 600, 700]
    # no cached-gradient steps (or a micro-batch as large as a rank's batch): unchanged
    for micro in (None, 4):
        assert reference_batch((views, labels), 2, micro)[1].tolist() == list(range(8))


def test_compare_reports_the_worst_parameter_against_the_tolerance() -> None:
    reference = {"loss": [4.0], "grads": [{"a": torch.tensor([1.0, -2.0]), "b": torch.ones(2)}],
                 "bn": {"running_mean": torch.ones(3)}}  # fmt: skip
    close = {"loss": [4.0], "grads": [{"a": torch.tensor([1.0, -2.0]), "b": torch.ones(2) + 1e-5}],
             "bn": {"running_mean": torch.ones(3)}}  # fmt: skip
    result = compare(close, reference, tolerance=1e-3)
    assert result["equal"] and result["grad_worst_parameter"] == "b"
    assert not compare(close, reference, tolerance=1e-6)["equal"]  # 5e-6 of the largest
    assert result["grad_rel_error"] == pytest.approx(1e-5 / 2, rel=1e-2)  # of the largest, 2
    far = {**close, "grads": [{"a": torch.tensor([1.0, -1.0]), "b": torch.ones(2)}]}
    result = compare(far, reference, tolerance=1e-3)
    assert not result["equal"] and result["grad_worst_parameter"] == "a"
    assert result["grad_rel_error"] == pytest.approx(0.5)


def test_check_config_is_small_float32_and_refuses_what_it_cannot_compare() -> None:
    config = Config(train=TrainConfig(global_batch_size=512, num_workers=2, amp="bf16",
                                      time_budget_minutes=5))  # fmt: skip
    checked = check_config(config)
    assert checked.train.global_batch_size == 64 and checked.per_worker_batch_size == 32
    assert checked.train.amp == "off" and checked.train.time_budget_minutes is None
    assert check_config(config, per_worker_batch=8).train.global_batch_size == 16
    with pytest.raises(ConfigError, match="more than the run's per-worker batch"):
        check_config(config, per_worker_batch=512)
    cached = Config(train=TrainConfig(global_batch_size=512, num_workers=2, micro_batch_size=8))
    assert check_config(cached).per_worker_batch_size == 16  # two micro-batches per rank
    reference = one_process(check_config(cached))
    assert (reference.train.num_workers, reference.train.micro_batch_size) == (1, 16)
    with pytest.raises(ConfigError, match="train.num_workers is 1"):
        check_config(Config(train=TrainConfig(num_workers=1)))
    with pytest.raises(ConfigError, match="image-only"):
        check_config(Config(text=TextConfig(column="caption")))


def _summary(equal: bool) -> dict[str, Any]:
    return {
        "workers": 2, "nodes": 2, "backend": "gloo", "device": "CPU", "model": "small_cnn",
        "loss": "ntxent", "global_bn": True, "micro_batch_size": None, "per_worker_batch": 32,
        "global_batch": 64, "run_per_worker_batch": 128, "amp": "auto", "steps": 3,
        "drill": None, "seconds": 40.0,
        "status": "pass" if equal else "fail",
        "equality": {"loss_rel_error": 1e-7, "grad_rel_error": 3e-5 if equal else 0.11,
                     "grad_worst_parameter": "head.layers.3.bias", "bn_rel_error": 2e-7,
                     "tolerance": 1e-3, "loss_tolerance": 1e-5, "equal": equal},
        "communication": {"all_gather_ms": 0.4, "all_gather_bytes": 65536,
                          "all_gather_bus_gbps": 0.09, "all_reduce_ms": 1.8,
                          "all_reduce_bytes": 1951360, "all_reduce_bus_gbps": 1.1,
                          "step_ms": 246.0, "communication_share": 0.009},
        "data_wait": [{"rank": 0, "data_wait_share": 0.04, "data_wait_ms": 10.3},
                      {"rank": 1, "data_wait_share": 0.05, "data_wait_ms": 12.0}],
        "mlflow": {"uri": "http://u:secret@host:5000", "driver": {"ok": True, "seconds": 0.008},
                   "rank0": {"ok": True, "seconds": 0.011}},
    }  # fmt: skip


def test_the_table_says_what_passed_and_what_differs() -> None:
    table = format_check(_summary(equal=True))
    assert table.splitlines()[0].startswith("contrastive check: 2 workers on 2 Ray node(s)")
    gradients = next(line for line in table.splitlines() if line.lstrip().startswith("gradients"))
    assert gradients.rstrip().endswith("ok") and "3.0e-05 of the largest" in gradients
    assert "1.9 MiB" in table and "rank 1: 5.0% (12.0 ms/step)" in table
    assert "secret" not in table  # credentials in the tracking URI are not printed
    assert table.splitlines()[-1].startswith("PASS")
    failed = format_check(_summary(equal=False))
    assert "DIFFERENT" in failed and failed.splitlines()[-1].startswith("FAIL")
    assert "worst at head.layers.3.bias" in failed


def test_bad_check_arguments_are_bad_input(capsys) -> None:
    from service.cli import main

    assert main(["check", "--steps", "0", "--tolerance", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1, got 0" in err and "--tolerance must be > 0" in err


def test_a_one_worker_config_is_refused_before_ray(capsys) -> None:
    from service.cli import main

    assert main(["check", "--set", "train.num_workers=1"]) == 2
    assert "compares W workers with one process" in capsys.readouterr().err


def test_model_config_default_has_global_bn() -> None:
    assert ModelConfig().sync_batchnorm is True
