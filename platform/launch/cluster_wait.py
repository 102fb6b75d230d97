"""Waiting for the cluster (driver): at most `cluster.wait_s` for the run's workers, then a clear error.

Which rank runs on which node is `platform.launch.rank_placement_plan.plan_placement` (the plan) and
`platform.launch.rank_placement.place_workers` (its realization in the workers).

Ray Train's own worker-group start waits at most `cluster.wait_s` for its placement group (`workers_wait_at_most`), whose pending demand is what makes an autoscaler
add nodes, and which then gets those very nodes; past that the run fails with what it asked for
and what the cluster has (`wait_error`). A probe placement group reserved and released before Ray
Train's was tried first and dropped: under a short idle timeout the autoscaler removed the nodes
it had added for the probe before Ray Train asked for them, and added two more.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

from moeforge.platform.config.builder import ConfigError

# Ray Train's own limit on one worker-group start (its placement group becoming ready); it reads it
# from the environment and hands it from the driver to its controller (Ray Train v2's
# ENV_VARS_TO_PROPAGATE). Past it the controller fails the start, and retries it for ever unless
# FailureConfig.controller_failure_limit says otherwise (`ray_train.launch_training` sets 0).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def workers_wait_at_most(wait_s: float):
    """Within the block, a Ray Train worker-group start waits at most `wait_s` for its resources
    (`cluster.wait_s`): its placement group's pending demand is what makes an autoscaler add nodes,
    and the nodes it adds go to that same group. The driver's environment is restored after."""
    saved = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = repr(float(wait_s))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = saved


def note_wait(parallel, res, cluster, log=print) -> bool:
    """Say so (one line) when the cluster has too little free right now for the run's workers, so a
    launch that waits for an autoscaler or for other jobs is not silent. Returns whether it said so."""
    import ray
    from moeforge.platform.launch.cluster_check import worker_bundle

    free = ray.available_resources()
    bundle = {k: v for k, v in worker_bundle(res).items() if v > 0}
    if all(parallel.world_size * v <= free.get(k, 0.0) + 1e-9 for k, v in bundle.items()):
        return False
    log(
        f"waiting up to {cluster.wait_s:g}s (cluster.wait_s) for the cluster to host "
        f"{parallel.world_size} workers of {_bundle_text(bundle)} ({cluster.placement_strategy})"
    )
    return True


def is_start_timeout(err: BaseException) -> bool:
    """Whether Ray Train failed the run because its worker group did not start in time (a
    ControllerError around WorkerGroupStartupTimeoutError; matched by name, the class is internal)."""
    failure = getattr(err, "controller_failure", None)
    return type(failure).__name__ == "WorkerGroupStartupTimeoutError"


def wait_error(parallel, res, cluster) -> ConfigError:
    """The error of a run whose workers found no room within `cluster.wait_s`: what it asked for and
    what the cluster has now (totals and free), in cluster_check's words."""
    import ray
    from moeforge.platform.launch.cluster_check import describe_shortfall

    return ConfigError(
        f"cluster.wait_s: the cluster could not host the run's {parallel.world_size} workers within "
        f"{cluster.wait_s:g}s: "
        + describe_shortfall(parallel, res, ray.cluster_resources(), ray.available_resources())
        + f" (placement strategy {cluster.placement_strategy}); use a larger or autoscaling cluster, "
        "fewer workers or smaller resources.*_per_worker / resources.worker_resources, or a longer "
        "cluster.wait_s"
    )


def _bundle_text(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"
