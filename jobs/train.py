"""moeforge-train: compose the Hydra config, validate it, run training.

`parallel=single` runs the one-process reference loop here; any pipeline schedule goes to
platform.launch (Ray). A bad config prints one line naming the field and exits 2, before any work.
"""

from __future__ import annotations

import sys

import hydra
from moeforge.model.config import ConfigError
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.storage import StorageError
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXIT_BAD_INPUT = 2


def _fail(msg: str, kind: str = "config") -> None:
    print(f"moeforge-train: {kind} error: {msg}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(config_path="pkg://moeforge.conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
        config = TrainConfig.from_dict(raw)
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        _fail(str(err).splitlines()[0])
    except ConfigError as err:
        _fail(str(err))
    try:
        if config.parallel.schedule == "single":
            from moeforge.platform.train_loop import ReferenceTrainer

            ReferenceTrainer(config).train()
        else:
            from moeforge.platform.launch import launch_training

            launch_training(config, raw)
    except ConfigError as err:  # checks that need the environment (paths, data) fail the same way
        _fail(str(err))
    except StorageError as err:  # run.dir unreachable (bucket, credentials, endpoint)
        _fail(str(err), kind="storage")


if __name__ == "__main__":
    main()
