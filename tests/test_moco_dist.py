"""MoCo across ranks on a real 2-rank gloo group: the key encoder after setup, and shuffle-BN.

Issue 12 ("MoCo, temperature, validation"):

- the key encoder must be the same on every rank after ``build_state`` (it is copied after DDP
  has broadcast rank 0's weights; each rank seeds differently, as the Ray worker does);
- the keys are encoded with shuffle-BN (MoCo v1 §3.3): every key's BatchNorm statistics come from
  a slice of the shuffled global batch, and the keys come back in each rank's own order.

One group is spawned for the whole module (cached); every rank runs every scenario and the tests
compare the saved results.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.losses import MoCoLoss, shuffled_forward
from service.models import unwrap
from service.train import build_state, train_step
from tests._dist_utils import run_in_gloo_group

pytestmark = pytest.mark.distributed

WORLD, LOCAL_BATCH, IN_DIM, EMB_DIM, SEED = 2, 4, 6, 5, 7


def _moco_config() -> Config:
    return Config(
        model=ModelConfig(arch="small_cnn", proj_hidden_dim=32, proj_out_dim=16),
        loss=LossConfig(name="moco", temperature=0.2, moco_queue_size=32),
        train=TrainConfig(
            global_batch_size=WORLD * LOCAL_BATCH, num_workers=WORLD, lr=1e-2, lr_scaling="none"
        ),
    )


def _flat_state(module: nn.Module, buffers: bool = True) -> Tensor:
    tensors = module.state_dict().values() if buffers else module.parameters()
    return torch.cat([t.detach().double().flatten() for t in tensors])


def _max_difference_across_ranks(module: nn.Module, buffers: bool = True) -> float:
    """All-gather the flattened state of ``module`` and return the largest difference to rank 0."""
    local = _flat_state(module, buffers)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    return max(float((t - everyone[0]).abs().max()) for t in everyone)


def _key_encoder_after_setup(rank: int, world: int) -> dict[str, Any]:
    config = _moco_config()
    torch.manual_seed(config.train.seed + rank)  # as the Ray worker does: ranks start different
    state = build_state(
        config, torch.device("cpu"), 4, rank=rank, world=world, wrap=DistributedDataParallel
    )
    key_encoder = state.criterion.key_encoder.target
    out = {
        "key_diff_after_setup": _max_difference_across_ranks(key_encoder),
        "key_equals_model": bool(
            torch.equal(_flat_state(key_encoder), _flat_state(unwrap(state.model)))
        ),
    }
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own data
    views = [torch.randn(LOCAL_BATCH, 3, 32, 32, generator=g) for _ in range(2)]
    train_step(state, views)
    # Parameters only: BatchNorm running statistics are per rank after a step (DDP broadcasts
    # buffers at the start of a forward; the EMA copies the online model's buffers).
    key_encoder = state.criterion.key_encoder
    out["key_diff_after_step"] = _max_difference_across_ranks(key_encoder, buffers=False)
    out["queue_diff_after_step"] = _max_difference_across_ranks(state.criterion.queue)
    return out


def _bn_encoder() -> nn.Module:
    torch.manual_seed(0)  # the same key encoder on every rank
    return nn.Sequential(nn.Linear(IN_DIM, EMB_DIM), nn.BatchNorm1d(EMB_DIM)).double()


def _local_batch(rank: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(LOCAL_BATCH, IN_DIM, generator=g, dtype=dtype)


def _reference_shuffled_keys(encoder: nn.Module, seed: int, world: int) -> Tensor:
    """Shuffle-BN written out on one process: every slice of the permuted global batch through
    ``encoder`` on its own, then each key put back at its sample's global position."""
    encoder = copy.deepcopy(encoder)
    everything = torch.cat(
        [_local_batch(r, next(encoder.parameters()).dtype) for r in range(world)]
    )
    permutation = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))
    keys = torch.empty(len(everything), EMB_DIM, dtype=everything.dtype)
    with torch.no_grad():
        for rows in permutation.view(world, -1):
            keys[rows] = encoder(everything[rows])
    return keys  # all ranks' keys in rank order


def _shuffle_bn(rank: int, world: int) -> dict[str, Any]:
    x = _local_batch(rank)
    encoder = _bn_encoder()
    own = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out: dict[str, Any] = {
        "expected": _reference_shuffled_keys(encoder, SEED, world)[own],
        "keys": shuffled_forward(encoder, x, torch.Generator().manual_seed(SEED)),
        "running_mean": encoder[1].running_mean.clone(),  # BN stats of this rank's slice
        "again": shuffled_forward(encoder, x, torch.Generator().manual_seed(SEED)),
        "other_seed": shuffled_forward(encoder, x, torch.Generator().manual_seed(SEED + 1)),
    }
    with torch.no_grad():
        out["unshuffled"] = _bn_encoder()(x)  # BN statistics of this rank's own batch
    # The rows this rank encoded (its slice of the permutation) and their BN running mean.
    permutation = torch.randperm(world * LOCAL_BATCH, generator=torch.Generator().manual_seed(SEED))
    encoded_rows = permutation.view(world, -1)[rank]
    everything = torch.cat([_local_batch(r) for r in range(world)])
    fresh = _bn_encoder()
    with torch.no_grad():
        fresh(everything[encoded_rows])
    out["encoded_rows"] = encoded_rows
    out["expected_running_mean"] = fresh[1].running_mean.clone()

    eval_encoder = _bn_encoder().eval()  # per-sample maths: no batch statistics
    out["eval_keys"] = shuffled_forward(eval_encoder, x, torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        out["eval_expected"] = eval_encoder(x)
    return out


def _moco_forward_views(rank: int, world: int) -> dict[str, Any]:
    """Through the loss hook: the enqueued keys (all ranks, rank order) are the shuffled keys."""
    model = _bn_encoder().float()
    crit = MoCoLoss(temperature=0.2, queue_size=4 * world * LOCAL_BATCH, dim=EMB_DIM)
    crit.attach(model)
    seed = crit.shuffle_generator().initial_seed()
    g = torch.Generator().manual_seed(2000 + rank)
    queries = torch.randn(LOCAL_BATCH, IN_DIM, generator=g)
    crit.forward_views(model, [queries, _local_batch(rank, torch.float32)])
    expected = F.normalize(_reference_shuffled_keys(crit.key_encoder.target, seed, world), dim=1)
    return {
        "enqueued": crit.queue.keys[: world * LOCAL_BATCH].clone(),
        "expected": expected,
        "step": int(crit.shuffle_step),
        "next_seed_differs": crit.shuffle_generator().initial_seed() != seed,
    }


def _rank_main(rank: int, world: int) -> dict[str, Any]:
    return {
        "setup": _key_encoder_after_setup(rank, world),
        "shuffle": _shuffle_bn(rank, world),
        "moco": _moco_forward_views(rank, world),
    }


_CACHE: dict[int, list[dict[str, Any]]] = {}


def _results() -> list[dict[str, Any]]:
    if WORLD not in _CACHE:
        _CACHE[WORLD] = run_in_gloo_group(_rank_main, WORLD)
    return _CACHE[WORLD]


def test_key_encoder_is_equal_on_every_rank_after_setup() -> None:
    """Ranks seed differently; ``build_state`` copies the key encoder after DDP's broadcast."""
    for rank, result in enumerate(_results()):
        setup = result["setup"]
        assert setup["key_diff_after_setup"] == 0.0, (rank, setup)
        assert setup["key_equals_model"], rank
        # ... and its weights stay equal: averaged gradients, the same EMA; the same queue.
        assert setup["key_diff_after_step"] == 0.0, (rank, setup)
        assert setup["queue_diff_after_step"] == 0.0, (rank, setup)


def test_shuffled_keys_equal_the_hand_shuffled_reference() -> None:
    for rank, result in enumerate(_results()):
        s = result["shuffle"]
        torch.testing.assert_close(s["keys"], s["expected"], rtol=0, atol=0, msg=f"rank {rank}")
        assert torch.equal(s["keys"], s["again"]), "the same seed gives the same permutation"
        assert not torch.allclose(s["keys"], s["other_seed"]), "another seed, another mix"


def test_shuffle_bn_mixes_ranks_in_the_batch_statistics() -> None:
    for rank, result in enumerate(_results()):
        s = result["shuffle"]
        own = set(range(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
        assert set(s["encoded_rows"].tolist()) - own, "the slice holds other ranks' samples"
        torch.testing.assert_close(s["running_mean"], s["expected_running_mean"])
        assert not torch.allclose(s["keys"], s["unshuffled"]), "statistics of the own batch"
        # Without batch statistics the keys are per-sample: exactly the unshuffled keys.
        assert torch.equal(s["eval_keys"], s["eval_expected"]), rank


def test_moco_forward_views_enqueues_the_shuffled_keys() -> None:
    results = _results()
    for rank, result in enumerate(results):
        m = result["moco"]
        torch.testing.assert_close(m["enqueued"], m["expected"].float(), msg=f"rank {rank}")
        assert m["step"] == 1 and m["next_seed_differs"]
    torch.testing.assert_close(results[0]["moco"]["enqueued"], results[1]["moco"]["enqueued"])


def test_shuffled_forward_is_a_no_op_in_one_process() -> None:
    encoder, x = _bn_encoder(), _local_batch(0)
    got = shuffled_forward(encoder, x, torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        expected = _bn_encoder()(x)
    assert torch.equal(got, expected)
