"""SupCon, batch-hard triplet and margin pairwise losses: plain loop references, exactness across
real gloo ranks (loss and gradients: W ranks x b with DDP averaging == 1 process x W*b), label
errors raised on every rank together, and labels through ``train_step`` (plain and cached)."""

from __future__ import annotations

import math
import zlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.losses import (
    LossInputError,
    NTXentLoss,
    PairwiseContrastiveLoss,
    SupConLoss,
    TripletLoss,
    build_loss,
    check_loss_config,
)
from service.models import unwrap
from service.train import build_state, train_step
from tests._dist_utils import run_in_gloo_group
from tests.test_losses_reference import ref_ntxent

IN_DIM, EMB_DIM, LOCAL_BATCH = 6, 5, 4
DTYPE = torch.float64

# --- plain references: loops over every anchor of the *global* batch -------------------------


def _flatten(views: list[Tensor], labels: Tensor) -> tuple[Tensor, list[int]]:
    """Unit rows, view-major (row v*n + i is view v of sample i), and each row's label."""
    z = torch.cat([v / v.norm(dim=1, keepdim=True) for v in views])
    return z, [int(y) for y in labels.repeat(len(views))]


def ref_supcon(views: list[Tensor], labels: Tensor, temperature: float) -> Tensor:
    """Khosla et al. eq. 2 (L_out), one anchor at a time."""
    z, y = _flatten(views, labels)
    terms = []
    for a in range(len(y)):
        others = [k for k in range(len(y)) if k != a]
        log_denominator = torch.logsumexp(
            torch.stack([z[a] @ z[k] for k in others]) / temperature, 0
        )
        positives = [k for k in others if y[k] == y[a]]
        log_probs = [z[a] @ z[p] / temperature - log_denominator for p in positives]
        terms.append(-torch.stack(log_probs).mean())
    return torch.stack(terms).mean()


def _distance(u: Tensor, v: Tensor) -> Tensor:
    return (u - v).pow(2).sum().clamp_min(1e-12).sqrt()


def ref_triplet(views: list[Tensor], labels: Tensor, margin: float) -> Tensor:
    """Hermans et al. batch-hard: hardest positive vs hardest negative, Euclidean on unit rows."""
    z, y = _flatten(views, labels)
    terms = []
    for a in range(len(y)):
        positives = [_distance(z[a], z[k]) for k in range(len(y)) if k != a and y[k] == y[a]]
        negatives = [_distance(z[a], z[k]) for k in range(len(y)) if y[k] != y[a]]
        if not negatives:
            terms.append(0.0 * z[a].sum())  # no negative: contributes 0
            continue
        hardest = torch.stack(positives).max() - torch.stack(negatives).min()
        terms.append(torch.relu(hardest + margin))
    return torch.stack(terms).mean()


def ref_pairwise(views: list[Tensor], labels: Tensor, margin: float) -> Tensor:
    """Hadsell et al.'s pair terms, averaged per anchor over its positives and its negatives."""
    z, y = _flatten(views, labels)
    terms = []
    for a in range(len(y)):
        pull = [(z[a] - z[k]).pow(2).sum() / 2 for k in range(len(y)) if k != a and y[k] == y[a]]
        push = [
            torch.relu(margin - _distance(z[a], z[k])).pow(2) / 2
            for k in range(len(y))
            if y[k] != y[a]
        ]
        term = torch.stack(pull).mean()
        terms.append(term + torch.stack(push).mean() if push else term)
    return torch.stack(terms).mean()


def _labels(n: int, classes: int, seed: int) -> Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _views(n: int, n_views: int, seed: int, dim: int = EMB_DIM) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g, dtype=DTYPE) for _ in range(n_views)]


# --- single process against the references ---------------------------------------------------


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("classes", [1, 3, 100])  # one class (no negatives), repeats, all distinct
def test_losses_equal_their_loop_references(n_views: int, classes: int) -> None:
    views, labels = _views(8, n_views, seed=n_views), _labels(8, classes, seed=classes)
    cases = [
        (SupConLoss(0.3), lambda v: ref_supcon(v, labels, 0.3)),
        (TripletLoss(margin=0.5), lambda v: ref_triplet(v, labels, 0.5)),
        (PairwiseContrastiveLoss(margin=1.2), lambda v: ref_pairwise(v, labels, 1.2)),
    ]
    for crit, reference in cases:
        ours_in = [v.clone().requires_grad_() for v in views]
        ref_in = [v.clone().requires_grad_() for v in views]
        ours, expected = crit(*ours_in, labels=labels), reference(ref_in)
        ours.backward()
        expected.backward()
        torch.testing.assert_close(ours, expected, msg=type(crit).__name__)
        for got, want in zip(ours_in, ref_in, strict=True):
            torch.testing.assert_close(got.grad, want.grad, msg=type(crit).__name__)


def test_supcon_with_distinct_labels_is_ntxent() -> None:
    views = _views(8, 3, seed=5)
    torch.testing.assert_close(
        SupConLoss(0.4)(*views, labels=torch.arange(8)), ref_ntxent(views, 0.4)
    )


def test_triplet_with_one_class_is_zero_and_its_margin_is_the_expected_first_loss() -> None:
    views = _views(6, 2, seed=3)
    assert float(TripletLoss()(*views, labels=torch.zeros(6, dtype=torch.long))) == 0.0
    same = [torch.ones(6, EMB_DIM)] * 2  # indistinguishable: every distance alike
    crit = TripletLoss(margin=0.3)
    loss = crit(*same, labels=torch.arange(6) % 2)
    assert float(loss) == pytest.approx(crit.expected_initial_loss(2, 6))


def test_label_errors_are_clear() -> None:
    views = _views(4, 2, seed=0)
    with pytest.raises(LossInputError, match="SupConLoss needs class labels"):
        SupConLoss()(*views)
    with pytest.raises(LossInputError, match=r"labels must be a \[4\] tensor, got \(3,\)"):
        TripletLoss()(*views, labels=torch.arange(3))
    with pytest.raises(LossInputError, match="labels must be integers"):
        TripletLoss()(*views, labels=torch.zeros(4))
    with pytest.raises(LossInputError, match="2 sample\\(s\\) of the global batch have no label"):
        PairwiseContrastiveLoss()(*views, labels=torch.tensor([0, -1, 1, -1]))
    with pytest.raises(LossInputError, match="margin must be > 0"):
        TripletLoss(margin=0.0)
    # labels are ignored by the losses that do not need them (the loop always passes them)
    NTXentLoss()(*views, labels=None)


def test_config_rules_for_the_new_losses() -> None:
    for name in ("supcon", "triplet", "pairwise"):
        check_loss_config(LossConfig(name=name), n_views=3)
    with pytest.raises(LossInputError, match="loss.margin=0.5 is used by"):
        check_loss_config(LossConfig(name="supcon", margin=0.5))
    with pytest.raises(LossInputError, match="cannot train image–text pairs"):
        check_loss_config(LossConfig(name="supcon"), text_mode=True)
    check_loss_config(LossConfig(name="siglip", learnable_temperature=True), text_mode=True)
    with pytest.raises(LossInputError, match="learnable_temperature is not supported"):
        check_loss_config(LossConfig(name="triplet", learnable_temperature=True))
    assert build_loss(LossConfig(name="triplet", margin=0.7), 8).margin == 0.7
    assert build_loss(LossConfig(name="triplet"), 8).margin == 0.2
    assert build_loss(LossConfig(name="pairwise"), 8).margin == 1.0


# --- exactness across real gloo ranks ---------------------------------------------------------

SCENARIOS: dict[str, dict[str, Any]] = {
    "supcon_2v": {"kind": "supcon", "views": 2, "classes": 3},
    "supcon_3v": {"kind": "supcon", "views": 3, "classes": 2},
    "triplet_2v": {"kind": "triplet", "views": 2, "classes": 3},
    "triplet_3v": {"kind": "triplet", "views": 3, "classes": 4},
    "pairwise_2v": {"kind": "pairwise", "views": 2, "classes": 3},
    "pairwise_3v": {"kind": "pairwise", "views": 3, "classes": 2},
}
T, TRIPLET_MARGIN, PAIR_MARGIN = 0.3, 0.5, 1.2


def _loss(kind: str) -> nn.Module:
    return {
        "supcon": SupConLoss(T),
        "triplet": TripletLoss(TRIPLET_MARGIN),
        "pairwise": PairwiseContrastiveLoss(PAIR_MARGIN),
    }[kind]


def _reference_loss(kind: str, zs: list[Tensor], labels: Tensor) -> Tensor:
    if kind == "supcon":
        return ref_supcon(zs, labels, T)
    if kind == "triplet":
        return ref_triplet(zs, labels, TRIPLET_MARGIN)
    return ref_pairwise(zs, labels, PAIR_MARGIN)


def _encoder() -> nn.Linear:
    torch.manual_seed(1234)
    return nn.Linear(IN_DIM, EMB_DIM).to(DTYPE)


def _global_inputs(name: str, world: int) -> tuple[list[Tensor], Tensor]:
    spec, n = SCENARIOS[name], LOCAL_BATCH * world
    seed = zlib.crc32(f"{name}/{world}".encode())
    return _views(n, spec["views"], seed, IN_DIM), _labels(n, spec["classes"], seed)


def run_scenario(name: str, rank: int, world: int) -> dict[str, Any]:
    spec, b = SCENARIOS[name], LOCAL_BATCH
    encoder, crit = _encoder(), _loss(spec["kind"])
    xs, labels = _global_inputs(name, world)
    local = [x[rank * b : (rank + 1) * b] for x in xs]
    loss = crit(*[encoder(x) for x in local], labels=labels[rank * b : (rank + 1) * b])
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in encoder.parameters()]}


def reference(name: str, world: int) -> dict[str, Any]:
    encoder = _encoder()
    xs, labels = _global_inputs(name, world)
    loss = _reference_loss(SCENARIOS[name]["kind"], [encoder(x) for x in xs], labels)
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in encoder.parameters()]}


def _label_error_on_one_rank(rank: int, world: int) -> str:
    labels = torch.arange(LOCAL_BATCH)
    if rank == world - 1:
        labels[1] = -1
    try:
        SupConLoss()(*_views(LOCAL_BATCH, 2, seed=rank), labels=labels)
    except LossInputError as exc:
        return str(exc)
    return "no error"


def _rank_main(rank: int, world: int) -> dict[str, Any]:
    return {
        "scenarios": {name: run_scenario(name, rank, world) for name in SCENARIOS},
        "label_error": _label_error_on_one_rank(rank, world),
    }


_CACHE: dict[int, list[dict[str, Any]]] = {}


def results_for(world: int) -> list[dict[str, Any]]:
    if world not in _CACHE:
        _CACHE[world] = run_in_gloo_group(_rank_main, world)
    return _CACHE[world]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_single_process_reference(world: int, name: str) -> None:
    per_rank = [r["scenarios"][name] for r in results_for(world)]
    expected = reference(name, world)
    local = torch.stack([r["loss"] for r in per_rank])
    assert len({round(v, 9) for v in local.tolist()}) == world, local  # ranks really differ
    torch.testing.assert_close(local.mean(), expected["loss"], rtol=1e-6, atol=1e-12)
    for i, want in enumerate(expected["grads"]):
        ddp_average = torch.stack([r["grads"][i] for r in per_rank]).mean(dim=0)
        torch.testing.assert_close(ddp_average, want, rtol=1e-6, atol=1e-12)


@pytest.mark.distributed
def test_a_missing_label_on_one_rank_fails_every_rank_alike() -> None:
    errors = [r["label_error"] for r in results_for(2)]
    assert errors[0] == errors[1]
    assert "1 sample(s) of the global batch have no label" in errors[0]


# --- labels through the training step ---------------------------------------------------------


def _config(micro: int | None) -> Config:
    return Config(
        model=ModelConfig(arch="small_cnn", proj_hidden_dim=32, proj_out_dim=16),
        loss=LossConfig(name="supcon", temperature=0.5),
        train=TrainConfig(
            global_batch_size=8, num_workers=1, lr=1e-2, lr_scaling="none", epochs=1,
            micro_batch_size=micro, optimizer="sgd", grad_clip_norm=None,
        ),
    )  # fmt: skip


def test_train_step_passes_labels_plain_and_cached_alike() -> None:
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])
    states = []
    for micro in (None, 3):
        torch.manual_seed(0)
        s = build_state(_config(micro), torch.device("cpu"), 4, gather_distributed=False)
        s.model.eval()  # running BN statistics: no batch statistics, so caching is exact
        states.append((s, train_step(s, views, labels)))
    (plain, plain_loss), (cached, cached_loss) = states
    expected = SupConLoss(0.5)  # the loss of the same model before the step
    torch.manual_seed(0)
    fresh = build_state(_config(None), torch.device("cpu"), 4, gather_distributed=False)
    fresh.model.eval()
    with torch.no_grad():
        first = expected.forward_views(fresh.model, views, labels)
    assert plain_loss == pytest.approx(float(first), rel=1e-6)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    for (name, a), b in zip(
        unwrap(plain.model).state_dict().items(),
        unwrap(cached.model).state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(LossInputError, match="needs class labels"):
        train_step(plain, views)
    assert not math.isnan(plain_loss)
