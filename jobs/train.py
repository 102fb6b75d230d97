"""moeforge-train: compose the Hydra config, validate it, run training.

`parallel=single` runs the one-process reference loop here; any pipeline schedule goes to
platform.launch.ray_train (Ray). A bad config (unknown key, wrong type, missing option) prints one line naming
the field and exits 2, before any work. `-m` sweeps give each member its own run.dir.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from moeforge.platform.cli import one_line, settable_overrides
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.storage import StorageError, check_local_output
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT
_sweep_run_dirs: set[str] = set()  # run.dirs taken by earlier members of this process's -m sweep


def _fail(msg: str, kind: str = "config") -> None:
    print(f"moeforge-train: {kind} error: {msg}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def _sweep_member() -> int | None:
    """This job's index in a -m sweep, None outside one."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return OmegaConf.select(hydra_cfg, "job.num")  # None while the sweep itself is composed


def _sweep_subdir() -> str:
    """`${moeforge.sweep_subdir:}` in conf/train.yaml: '/<n>' for sweep member n, '' otherwise."""
    member = _sweep_member()
    return "" if member is None else f"/{member}"


OmegaConf.register_new_resolver("moeforge.sweep_subdir", _sweep_subdir, replace=True)


CONFIG_NAME = "train"  # conf/train.yaml


def train_groups(conf) -> list[str]:
    """The config groups a training run composes: the groups of conf/train.yaml's defaults list, in
    its order (conf/ holds other jobs' groups too, clusters/ and network/, which moeforge-train
    cannot use). Read from the file itself, so a group added there is listed here."""
    import yaml

    defaults = yaml.safe_load(conf.joinpath(f"{CONFIG_NAME}.yaml").read_text())["defaults"]
    names = (next(iter(entry)) for entry in defaults if isinstance(entry, dict))
    return [name for name in names if not name.startswith(("override ", "hydra/"))]


def _help() -> str:
    """moeforge-train's --help: what it does, its config groups and their options, how to set a key."""
    from importlib.resources import files

    conf = files("moeforge.conf")
    lines = [__doc__.strip(), "", "Config groups (group=option):"]
    for group in train_groups(conf):
        options = sorted(p.name[: -len(".yaml")] for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml"))
        lines.append(f"  {group}: {', '.join(options)}")
    lines += [
        "",
        "Any key of the composed config is set as key=value (run.steps=50 optim.lr=1e-3); an unknown key",
        "is named with the closest one. -m sweeps over comma-separated values. All keys: docs/configuration.md.",
        "Hydra's own options: --hydra-help.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Console entry point: the Hydra app, with Hydra's own errors cut to one line (exit 2).

    HYDRA_FULL_ERROR=1 makes Hydra raise instead of printing its multi-line report; a user who set
    it asks for the full traceback and gets it."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(_help())
        return
    full_error_requested = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        sys.argv[1:] = settable_overrides(sys.argv[1:], TrainConfig.section_types())
    except ConfigError as err:
        _fail(str(err))
    try:
        _train()
    except (HydraException, OmegaConfBaseException) as err:
        if full_error_requested:
            raise
        _fail(one_line(err))


@hydra.main(config_path="pkg://moeforge.conf", config_name=CONFIG_NAME, version_base=None)
def _train(cfg: DictConfig) -> None:
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        config = TrainConfig.from_dict(raw).with_absolute_paths()
    except MissingMandatoryValue as err:  # a "???" of the chosen group, e.g. data=tokens' data.path
        _fail(f"{err.full_key}: required by the chosen config group; set {err.full_key}=...")
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        _fail(str(err).splitlines()[0])
    except ConfigError as err:
        _fail(str(err))
    if _sweep_member() is not None:
        if config.run.dir in _sweep_run_dirs:
            _fail(
                f"run.dir: {config.run.dir} is already used by an earlier member of this sweep; give "
                "each member its own, e.g. 'run.dir=/path/sweep/${hydra:job.num}'"
            )
        _sweep_run_dirs.add(config.run.dir)
    # Imported only once the config is valid: it pulls in torch (seconds), and a bad override should
    # fail at once.
    from moeforge.platform.checkpoint.resume import finished_run_note
    from moeforge.platform.checkpoint.state import CheckpointError

    try:
        check_local_output(config.run.dir, "run.dir", directory=True)
        note = finished_run_note(config)  # a completed run's record is never rewritten
        if note is not None:
            print(f"moeforge-train: {note}", flush=True)
            return
        if config.parallel.schedule == "single":
            from moeforge.platform.launch.cluster_check import check_single_process_fits, machine_resources
            from moeforge.platform.train.trainer import Terminated, Trainer

            check_single_process_fits(config.model, config.resources, machine_resources())

            trainer = None
            try:
                trainer = Trainer.single(config)
                trainer.train()
            except (KeyboardInterrupt, Terminated) as err:  # recorded and checkpointed by the Trainer
                note = "interrupted before the first step" if trainer is None else trainer.interruption_note(err)
                print(f"moeforge-train: {note}", file=sys.stderr, flush=True)
                sys.exit(EXIT_INTERRUPTED)
        else:
            from moeforge.platform.launch.ray_train import PipelineRunError, launch_training

            try:
                summary = launch_training(config, raw)
            except PipelineRunError as err:  # the failed ranks are named; their tracebacks are in the log
                print(f"moeforge-train: run failed: {err}", file=sys.stderr, flush=True)
                sys.exit(EXIT_RUN_FAILED)
            if summary.get("status") == "interrupted":  # Ctrl-C or SIGTERM to this driver: run.dir/STOP
                from moeforge.platform.checkpoint.store import list_checkpoints
                from moeforge.platform.train.trainer import interruption_note

                saved = list_checkpoints(config.run.dir)
                why = (summary.get("error") or "stopped").split(": ", 1)[-1]
                note = interruption_note(why, summary["steps"], saved[-1][0] if saved else None, config.run.dir)
                print(f"moeforge-train: {note}", file=sys.stderr, flush=True)
                sys.exit(EXIT_INTERRUPTED)
    except ConfigError as err:  # checks that need the environment (paths, data) fail the same way
        _fail(str(err))
    except StorageError as err:  # run.dir unreachable (bucket, credentials, endpoint)
        _fail(str(err), kind="storage")
    except CheckpointError as err:  # a checkpoint to resume is damaged or does not fit the run
        _fail(str(err), kind="checkpoint")


if __name__ == "__main__":
    main()
