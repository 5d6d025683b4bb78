"""Distributed exactness of every loss, on real gloo process groups.

Contract: W ranks with local batch b, each computing its local loss, with DDP's gradient
averaging (mean over ranks of each rank's gradient) give the same loss (mean over ranks) and the
same parameter gradients as one process on the concatenated W*b batch, to 1e-5 relative, for
W in {1, 2, 3}. "The same as one process" is checked against the loop references in
``test_losses_reference.py``, not against our own single-process code.

To keep CI fast, every world size is spawned once (module cache): each rank runs every scenario
and the checks of collective error handling, and the tests below compare the saved results.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from service.losses import (
    DebiasedNTXentLoss,
    HardNegativeNTXentLoss,
    LossInputError,
    MoCoLoss,
    NTXentLoss,
    SymmetricInfoNCELoss,
    gather_no_grad,
    gather_with_grad,
)
from tests._dist_utils import run_in_gloo_group
from tests.test_losses_reference import (
    ref_debiased,
    ref_enqueue,
    ref_hard_negative,
    ref_moco,
    ref_ntxent,
    ref_symmetric,
)

pytestmark = pytest.mark.distributed

IN_DIM, EMB_DIM, LOCAL_BATCH = 6, 5, 4
DTYPE = torch.float64  # exactness of the maths, not of float32 rounding
MOCO_STEPS, MOCO_QUEUE = 2, 10  # 10 does not divide 8 or 12 keys/step: the ring wraps unevenly

SCENARIOS: dict[str, dict[str, Any]] = {
    "ntxent_2views": {"kind": "ntxent", "views": 2, "t": 0.5},
    "ntxent_3views": {"kind": "ntxent", "views": 3, "t": 0.3},
    "ntxent_local_batch_1": {"kind": "ntxent", "views": 2, "t": 0.5, "b": 1},
    "ntxent_2views_chunk5": {"kind": "ntxent", "views": 2, "t": 0.5, "chunk": 5},
    "ntxent_3views_chunk7": {"kind": "ntxent", "views": 3, "t": 0.3, "chunk": 7},
    "ntxent_2views_chunk1": {"kind": "ntxent", "views": 2, "t": 0.2, "chunk": 1},
    "symmetric": {"kind": "symmetric", "views": 2, "t": 0.1},
    "symmetric_learnable": {"kind": "symmetric", "views": 2, "t": 0.2, "learnable": True},
    "symmetric_learnable_chunk3": {
        "kind": "symmetric",
        "views": 2,
        "t": 0.2,
        "learnable": True,
        "chunk": 3,
    },
    "moco": {"kind": "moco", "views": 2, "t": 0.2},
    "moco_chunk4": {"kind": "moco", "views": 2, "t": 0.2, "chunk": 4},
    "hard_negative_2views": {"kind": "hard_negative", "views": 2, "t": 0.5, "top_k": 5},
    "hard_negative_3views": {"kind": "hard_negative", "views": 3, "t": 0.4, "top_k": 4},
    "debiased": {"kind": "debiased", "views": 2, "t": 0.5, "tau_plus": 0.1},
}


# --- the computation each rank runs ---------------------------------------------------------


def _encoder() -> nn.Linear:
    torch.manual_seed(1234)
    return nn.Linear(IN_DIM, EMB_DIM).to(DTYPE)


def _make_loss(spec: dict[str, Any]) -> nn.Module:
    kind, t, chunk = spec["kind"], spec["t"], spec.get("chunk")
    if kind == "ntxent":
        return NTXentLoss(t, chunk_size=chunk)
    if kind == "symmetric":
        return SymmetricInfoNCELoss(t, spec.get("learnable", False), chunk_size=chunk)
    if kind == "moco":
        return MoCoLoss(t, queue_size=MOCO_QUEUE, dim=EMB_DIM, chunk_size=chunk)
    if kind == "hard_negative":
        return HardNegativeNTXentLoss(t, top_k=spec["top_k"])
    return DebiasedNTXentLoss(t, tau_plus=spec["tau_plus"])


def _global_inputs(name: str, world: int) -> list[Tensor]:
    """The same global inputs on every rank: one ``[W*b, IN_DIM]`` tensor per view (and step)."""
    spec = SCENARIOS[name]
    n = spec.get("b", LOCAL_BATCH) * world
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{world}".encode()))
    count = spec["views"] * (MOCO_STEPS if spec["kind"] == "moco" else 1)
    return [torch.randn(n, IN_DIM, generator=g, dtype=DTYPE) for _ in range(count)]


def _params(encoder: nn.Module, loss: nn.Module) -> list[nn.Parameter]:
    return list(encoder.parameters()) + list(loss.parameters())


def run_scenario(name: str, rank: int, world: int) -> dict[str, Any]:
    """This rank's local losses and parameter gradients (and MoCo queue) for one scenario."""
    spec = SCENARIOS[name]
    b = spec.get("b", LOCAL_BATCH)
    encoder, loss_fn = _encoder(), _make_loss(spec)
    local = [x[rank * b : (rank + 1) * b] for x in _global_inputs(name, world)]
    views = spec["views"]
    losses, grads = [], []
    for step in range(len(local) // views):
        params = _params(encoder, loss_fn)
        for p in params:
            p.grad = None
        loss = loss_fn(*[encoder(x) for x in local[step * views : (step + 1) * views]])
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
    out: dict[str, Any] = {"losses": losses, "grads": grads}
    if spec["kind"] == "moco":
        out["queue"], out["ptr"] = loss_fn.queue.keys.clone(), int(loss_fn.queue.ptr)
    return out


def reference(name: str, world: int) -> dict[str, Any]:
    """One process, concatenated batch, loop references."""
    spec = SCENARIOS[name]
    encoder, loss_fn = _encoder(), _make_loss(spec)  # loss_fn only for its initial state
    xs = _global_inputs(name, world)
    views, kind, t = spec["views"], spec["kind"], spec["t"]
    queue, ptr = (loss_fn.queue.keys.to(DTYPE), 0) if kind == "moco" else (None, 0)
    log_scale = None
    if spec.get("learnable"):
        log_scale = loss_fn.logit_scale.detach().to(DTYPE).requires_grad_()
    losses, grads = [], []
    for step in range(len(xs) // views):
        params = list(encoder.parameters()) + ([log_scale] if log_scale is not None else [])
        for p in params:
            p.grad = None
        zs = [encoder(x) for x in xs[step * views : (step + 1) * views]]
        if kind == "ntxent":
            loss = ref_ntxent(zs, t)
        elif kind == "symmetric":
            loss = ref_symmetric(*zs, log_scale.exp() if log_scale is not None else 1.0 / t)
        elif kind == "moco":
            loss = ref_moco(zs[0], zs[1], queue, t)
            queue, ptr = ref_enqueue(queue, ptr, zs[1])
        elif kind == "hard_negative":
            loss = ref_hard_negative(zs, t, spec["top_k"])
        else:
            loss = ref_debiased(*zs, t, spec["tau_plus"])
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
    return {"losses": losses, "grads": grads, "queue": queue, "ptr": ptr}


def collective_error_checks(rank: int, world: int) -> dict[str, Any]:
    """Bad inputs on *some* ranks must make *every* rank raise the same error (no deadlock)."""
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(7 + rank)
    uneven = 3 if rank == 0 else 4
    try:
        NTXentLoss()(torch.randn(uneven, 5, generator=g), torch.randn(uneven, 5, generator=g))
    except LossInputError as exc:
        out["unequal_batch"] = str(exc)
    views = [torch.randn(4, 5, generator=g) for _ in range(2)]
    if rank == 1:
        views[1][[0, 2], 1] = float("nan")
    try:
        NTXentLoss()(*views)
    except LossInputError as exc:
        out["non_finite"] = str(exc)
    try:
        gather_with_grad(torch.zeros(uneven, 2))
    except LossInputError as exc:
        out["gather_unequal"] = str(exc)
    # gather_with_grad: values in rank order, and the backward *sums* every rank's gradient.
    x = torch.full((2, 3), float(rank + 1), dtype=DTYPE, requires_grad=True)
    gathered = gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=DTYPE).view_as(gathered) * (rank + 1)
    (gathered * weights).sum().backward()
    out["gathered"], out["gather_grad"] = gathered.detach(), x.grad
    out["gathered_no_grad"] = gather_no_grad(x)
    # gather_distributed=False: a purely local loss (here: the reference on the local batch).
    local = [torch.randn(4, 5, generator=g, dtype=DTYPE) for _ in range(2)]
    out["local_only"] = (NTXentLoss(0.5, gather_distributed=False)(*local), ref_ntxent(local, 0.5))
    return out


def hook_checks(rank: int, world: int) -> dict[str, Any]:
    """Training-loop hooks that talk to other ranks."""
    out: dict[str, Any] = {}
    # reduce_gradients: the loss's own parameters (outside DDP) get the mean gradient of all ranks.
    crit = SymmetricInfoNCELoss(0.2, learnable_temperature=True)
    crit.logit_scale.grad = torch.tensor(float(rank + 1), dtype=crit.logit_scale.dtype)
    crit.reduce_gradients()
    out["reduced_grad"] = crit.logit_scale.grad.clone()
    # ... and a real backward: each rank's local-loss gradient, then the average.
    g = torch.Generator().manual_seed(11 + rank)
    crit.logit_scale.grad = None
    crit(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)).backward()
    out["local_grad"] = crit.logit_scale.grad.clone()
    crit.reduce_gradients()
    out["averaged_grad"] = crit.logit_scale.grad.clone()
    # No gradients at all (fixed temperature; MoCo's frozen key encoder): a no-op, not a hang.
    NTXentLoss().reduce_gradients()
    moco = MoCoLoss(0.2, queue_size=8, dim=EMB_DIM)
    moco.attach(nn.Linear(IN_DIM, EMB_DIM))
    moco.reduce_gradients()
    out["no_grad_done"] = True
    return out


def _rank_main(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "scenarios": {name: run_scenario(name, rank, world) for name in SCENARIOS}
    }
    if world == 2:
        results["errors"] = collective_error_checks(rank, world)
        results["hooks"] = hook_checks(rank, world)
    return results


_CACHE: dict[int, list[dict[str, Any]]] = {}


def results_for(world: int) -> list[dict[str, Any]]:
    """Per-rank results; world 1 runs in this process without any process group."""
    if world not in _CACHE:
        if world == 1:
            valid = [n for n, spec in SCENARIOS.items() if spec.get("b", LOCAL_BATCH) >= 2]
            _CACHE[1] = [{"scenarios": {n: run_scenario(n, 0, 1) for n in valid}}]
        else:
            _CACHE[world] = run_in_gloo_group(_rank_main, world)
    return _CACHE[world]


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_distributed_equals_single_process_reference(world: int, name: str) -> None:
    if world == 1 and SCENARIOS[name].get("b", LOCAL_BATCH) * world < 2:
        pytest.skip("a global batch of one sample has no negatives (tested as bad input)")
    per_rank = [r["scenarios"][name] for r in results_for(world)]
    expected = reference(name, world)
    for step, expected_loss in enumerate(expected["losses"]):
        local_losses = torch.stack([r["losses"][step] for r in per_rank])
        if world > 1:  # the check is meaningful only if the ranks' local losses differ
            assert len({round(v, 9) for v in local_losses.tolist()}) == world, local_losses
        torch.testing.assert_close(local_losses.mean(), expected_loss, rtol=1e-5, atol=1e-12)
        for i, expected_grad in enumerate(expected["grads"][step]):
            ddp_average = torch.stack([r["grads"][step][i] for r in per_rank]).mean(dim=0)
            torch.testing.assert_close(
                ddp_average.to(expected_grad.dtype), expected_grad, rtol=1e-5, atol=1e-12
            )
    if SCENARIOS[name]["kind"] == "moco":
        for r in per_rank:  # every rank holds the single-process queue
            assert r["ptr"] == expected["ptr"]
            torch.testing.assert_close(
                r["queue"].to(DTYPE), expected["queue"], rtol=1e-6, atol=1e-7
            )


def test_unequal_local_batches_fail_on_every_rank() -> None:
    errors = [r["errors"] for r in results_for(2)]
    assert errors[0]["unequal_batch"] == errors[1]["unequal_batch"]
    assert (
        "rank 0: views=2 batch=3 dim=5, rank 1: views=2 batch=4 dim=5"
        in (errors[0]["unequal_batch"])
    )
    assert errors[0]["gather_unequal"] == errors[1]["gather_unequal"]
    assert "rank 0: dims=2 batch=3 row_numel=2" in errors[0]["gather_unequal"]


def test_non_finite_rows_on_one_rank_fail_on_every_rank() -> None:
    errors = [r["errors"] for r in results_for(2)]
    assert errors[0]["non_finite"] == errors[1]["non_finite"]
    assert "on rank 1: view 1 has 2 row(s)" in errors[0]["non_finite"]


def test_gather_with_grad_concatenates_and_sums_gradients() -> None:
    errors = [r["errors"] for r in results_for(2)]
    expected_values = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]).to(DTYPE)
    base = torch.arange(12, dtype=DTYPE).view(4, 3)
    for rank, e in enumerate(errors):
        torch.testing.assert_close(e["gathered"], expected_values)
        torch.testing.assert_close(e["gathered_no_grad"], expected_values)
        # rank r's slice receives weights from rank 0 (x1) and rank 1 (x2): 3 * base slice.
        torch.testing.assert_close(e["gather_grad"], 3 * base[2 * rank : 2 * rank + 2])


def test_gather_distributed_false_is_a_local_loss() -> None:
    for r in results_for(2):
        ours, ref = r["errors"]["local_only"]
        torch.testing.assert_close(ours, ref)


def test_reduce_gradients_averages_the_loss_parameters_over_ranks() -> None:
    hooks = [r["hooks"] for r in results_for(2)]
    mean_local = torch.stack([h["local_grad"] for h in hooks]).mean()
    assert hooks[0]["local_grad"] != hooks[1]["local_grad"]
    for h in hooks:
        assert float(h["reduced_grad"]) == 1.5  # (1 + 2) / 2
        torch.testing.assert_close(h["averaged_grad"], mean_local)
        assert h["no_grad_done"]
