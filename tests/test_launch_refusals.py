"""`launch_training` refuses a pipeline config that cannot run before any worker starts, naming the
field, and writes nothing into run.dir.

The pipeline path end to end through Ray Train (a DualPipe pp=2 x dp=2 x ep=2 ZeRO-1 run on two
nodes, tracked, evaluated, its communication held to NCCL's rules and its figures to the
single-process loop) is tests/test_placement.py's; the same schedules on gloo processes are
tests/test_pipeline_executor.py's and tests/test_ep_parity.py's; a rank raising through
moeforge-train is tests/test_train_job.py's; a worker killed and restarted by Ray Train,
tests/test_recovery.py's."""

from __future__ import annotations

import pytest
from moeforge.platform.config import TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.launch.ray_train import launch_training
from pipeline_cases import pipeline_config


@pytest.mark.parametrize(
    "parallel, field",
    [
        ({"schedule": "dualpipe", "pp": 2, "microbatches": 3}, "parallel.microbatches"),  # odd for DualPipe
        (
            {"schedule": "1f1b", "pp": 3, "microbatches": 2, "dp": 1},
            "layers_per_stage",
        ),  # 4 layers / 3 stages
        ({"schedule": "1f1b", "pp": 2, "microbatches": 2, "layers_per_stage": [1, 2]}, "sums to 3"),
        ({"schedule": "1f1b", "pp": 4, "microbatches": 2, "resources": {"cpus_per_worker": 4}}, "the cluster has 8"),
    ],
)
def test_bad_pipeline_config_refused_before_launch(ray_cluster, tmp_path, parallel, field):
    raw = pipeline_config(tmp_path / "run", "1f1b", 2, 1, 2, 0)
    parallel = dict(parallel)
    raw["resources"].update(parallel.pop("resources", {}))
    raw["parallel"].update(parallel)
    raw["data"]["global_batch"] = 12 if parallel.get("pp") == 3 or parallel.get("microbatches") == 3 else 8
    with pytest.raises(ConfigError, match=field):
        launch_training(TrainConfig.from_dict(raw), raw)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
