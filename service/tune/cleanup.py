"""Give back the worker placement groups of trials that Tune stopped.

When ASHA stops a trial, Tune tears down the trial actor; the Ray Train controller it owns dies
with it, before it can shut its worker group down. The worker group's placement group (all the
trial's CPUs/GPUs) then stays reserved: Ray removes a non-detached placement group only once
both its creator actor *and* its job are dead, and the job is the still-running sweep driver.
Ray Train's own ``PlacementGroupCleaner`` is meant to catch this, but it needs the State API
(the dashboard) and resolves the cluster with ``address="auto"``, which fails on a local Ray
started without a dashboard or on a host running several clusters. The next trial's worker group
then waits forever for resources that a dead trial holds.

``PlacementGroupJanitor`` is a Tune callback on the driver: every few seconds it removes the
placement groups of *this job* whose creator actor is dead. Nothing alive can use such a group
(only its creator could hand it out), so removing it is always safe.

``TrialExitBarrier`` makes the end of the experiment mean "no trial process is left": Tune's
``fit()`` returns as soon as it has *asked* the stopped trials' actors to go, while the Train
controllers and workers they own are still being torn down. A stopped trial can meanwhile finish
the epoch it was in (Tune decides on a report while the workers already run the next epoch), log
it, mark its run completed, or see its controller die and mark the run failed. The driver gives
every nested MLflow run its final status from Tune's (deterministic) view, so it must do that
after the last such write: the barrier waits until every actor the experiment started has exited.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)


def is_orphaned(pg: Any, job_id_hex: str) -> bool:
    """Is this GCS ``PlacementGroupTableData`` a live group of our job whose creator actor died?

    Groups created by a driver (Tune's per-trial groups) have a nil creator actor id, which the
    GCS also reports as "dead": they are not orphans.
    """
    from ray.core.generated import gcs_pb2

    states = gcs_pb2.PlacementGroupTableData.PlacementGroupState
    live = {states.Value("PENDING"), states.Value("PREPARED"), states.Value("CREATED")}
    creator = pg.creator_actor_id
    return (
        pg.state in live
        and not pg.is_detached
        and bool(creator)
        and creator != b"\xff" * len(creator)
        and pg.creator_actor_dead
        and pg.creator_job_id.hex() == job_id_hex
    )


def orphaned_placement_groups(job_id_hex: str) -> list[str]:
    """Ids (hex) of live placement groups of ``job_id_hex`` whose creator actor is dead."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if not ray.is_initialized():
        return []
    # The public placement_group_table() drops the creator fields; read the GCS records instead.
    accessor = state._connect_and_get_accessor()
    records = map(gcs_pb2.PlacementGroupTableData.FromString, accessor.get_placement_group_table())
    return [pg.placement_group_id.hex() for pg in records if is_orphaned(pg, job_id_hex)]


def release_orphaned_placement_groups() -> int:
    """Remove this job's orphaned placement groups; returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup

    job_id = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id in orphaned_placement_groups(job_id):
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
        removed += 1
    return removed


class PlacementGroupJanitor(Callback):
    """Tune callback: every ``interval_s``, release placement groups left by stopped trials.

    >>> from ray import tune
    >>> run_config = tune.RunConfig(callbacks=[PlacementGroupJanitor(interval_s=5.0)])
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self._disabled = False
        self.released = 0

    def _sweep(self) -> None:
        if self._disabled:
            return
        try:
            removed = release_orphaned_placement_groups()
        except Exception as exc:  # private Ray API: degrade to Ray's own cleaner, never crash
            log.warning("placement-group janitor disabled (%s: %s)", type(exc).__name__, exc)
            self._disabled = True
            return
        if removed:
            self.released += removed
            log.info("released %d placement group(s) of stopped trials", removed)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._sweep()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._sweep()


def is_lingering(actor: Any, job_id_hex: str) -> bool:
    """Is this GCS ``ActorTableData`` a non-detached actor of our job that has not exited yet?

    Detached actors (Ray Train's placement-group cleaner, its state actor) outlive any trial by
    design and write nothing to a trial's run: they are not waited for.
    """
    from ray.core.generated import gcs_pb2

    dead = gcs_pb2.ActorTableData.ActorState.Value("DEAD")
    return actor.state != dead and not actor.is_detached and actor.job_id.hex() == job_id_hex


def lingering_actors(job_id_hex: str) -> dict[str, str]:
    """Actor id (hex) -> class name of the actors of ``job_id_hex`` that have not exited."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if not ray.is_initialized():
        return {}
    accessor = state._connect_and_get_accessor()
    table = accessor.get_actor_table(ray.JobID.from_hex(job_id_hex), None)
    records = map(gcs_pb2.ActorTableData.FromString, table)
    return {a.actor_id.hex(): a.class_name for a in records if is_lingering(a, job_id_hex)}


class TrialExitBarrier(Callback):
    """Tune callback: the experiment ends once every actor it started (trial actors, their Train
    controllers and workers) has exited, so nothing writes to a trial's MLflow run afterwards.

    Waits at most ``timeout_s`` (then warns with the class names of what is left); actors that
    were alive before the experiment started are not waited for.

    >>> from ray import tune
    >>> run_config = tune.RunConfig(callbacks=[TrialExitBarrier(timeout_s=300.0)])
    """

    def __init__(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._before: set[str] = set()

    def _lingering(self) -> dict[str, str] | None:
        import ray

        try:
            job_id = ray.get_runtime_context().get_job_id()
            return {k: v for k, v in lingering_actors(job_id).items() if k not in self._before}
        except Exception as exc:  # private Ray API: never crash the sweep over it
            log.warning("trial exit barrier disabled (%s: %s)", type(exc).__name__, exc)
            return None

    def setup(self, **info: Any) -> None:
        self._before = set(self._lingering() or {})

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        deadline = time.monotonic() + self.timeout_s
        left = self._lingering()
        while left and time.monotonic() < deadline:
            time.sleep(self.poll_s)
            left = self._lingering()
        if left:
            log.warning(
                "%d actor(s) of stopped trials still alive after %.0f s: %s; the final MLflow "
                "state of their runs may still change",
                len(left),
                self.timeout_s,
                sorted(set(left.values())),
            )
