"""moeforge-prepare: compose the Hydra config and prepare token shards (`platform.data.prepare.prepare`).

`format=conversations` packs chat records into rows with loss masks
(`platform.data.prepare_conversations.prepare_conversations`); `example=sft` writes a small fine-tuning
example instead (`platform.data.sft_example.write_sft_example`).

Bad input (a config value, a missing or empty input, an unreachable S3 endpoint, missing
credentials, a RAY_ADDRESS where no Ray cluster answers: `RayConnectionError`, a ConfigError)
prints one line to stderr and exits 2, before any shard is written.
"""

from __future__ import annotations

import sys

import hydra
from moeforge.platform.config.builder import ConfigError, build
from moeforge.platform.data.corpus import CorpusError
from moeforge.platform.data.prepare import PrepareConfig, prepare
from moeforge.platform.data.sft_example import write_sft_example
from moeforge.platform.outputs.storage import StorageError
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXIT_BAD_INPUT = 2


def _fail(msg: str) -> None:
    print(f"moeforge-prepare: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(config_path="pkg://moeforge.conf", config_name="prepare", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        config = build(PrepareConfig, OmegaConf.to_container(cfg, resolve=True), "prepare")
        run = write_sft_example if config.example == "sft" else prepare
        run(config, log=lambda line: print(line, flush=True))
    except OmegaConfBaseException as err:
        _fail(str(err).splitlines()[0])
    except (ConfigError, CorpusError, StorageError) as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
