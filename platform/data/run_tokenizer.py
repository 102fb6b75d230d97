"""The tokenizer.json a training run's data was prepared with, found from the run's own records.

A run records its data in run_dir/config.yaml (`data.source`, `data.path`); a prepared token
directory's manifest.json names its tokenizer.json (moeforge-prepare writes both). A run on synthetic
tokens or on one flat token file has no tokenizer. Used by moeforge-generate
(`platform.inference.load.load_for_generation`) to read a run's tokenizer and by moeforge-convert
(`platform.checkpoint.export.export_checkpoint`) to copy it into an export.
"""

from __future__ import annotations

import json
import os

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.data.shards import MANIFEST, ShardError, read_manifest
from moeforge.platform.outputs.run_files import CONFIG
from moeforge.platform.outputs.storage import S3Options, is_s3, open_storage

TOKENIZER_FILE = "tokenizer.json"


def run_tokenizer(run_dir: str) -> tuple[str, S3Options | None]:
    """The tokenizer.json a training run's data was prepared with, and the S3 options to read it:
    run_dir/config.yaml's data.path, a prepared token directory, names it in its manifest.json.
    Raises ConfigError naming run.dir (and asking for tokenizer=) when the run names none."""
    from omegaconf import OmegaConf  # not at import: kernels/gpu_check.sh runs without omegaconf

    storage = open_storage(run_dir)
    try:
        data = OmegaConf.to_container(OmegaConf.create(storage.read_text(CONFIG))).get("data") or {}
    except FileNotFoundError:
        raise ConfigError(
            f"run.dir: {storage.url(CONFIG)} is missing, so the run's tokenizer is unknown; "
            "give tokenizer=<tokenizer.json>"
        ) from None
    source, path = data.get("source"), data.get("path")
    if source != "tokens" or not path:
        raise ConfigError(
            f"run.dir: {run_dir} trained on {source or 'unknown'} data, which has no tokenizer; "
            "give tokenizer=<tokenizer.json>"
        )
    no_tokenizer = ConfigError(
        f"run.dir: the run's data.path {path} is a flat token file or has no {MANIFEST}, so it names no "
        "tokenizer; give tokenizer=<tokenizer.json>"
    )
    if is_s3(path):
        s3 = S3Options(endpoint_url=data.get("endpoint_url"))
        tokens = open_storage(path, s3)
        if not tokens.exists(MANIFEST):
            raise no_tokenizer
        manifest = json.loads(tokens.read_text(MANIFEST))
        return tokens.url((manifest.get("tokenizer") or {}).get("path", TOKENIZER_FILE)), s3
    if not os.path.isdir(path):
        if os.path.isfile(path):
            raise no_tokenizer
        raise ConfigError(
            f"run.dir: the run's data.path {path} no longer exists, so its tokenizer cannot be read; "
            "give tokenizer=<tokenizer.json>"
        )
    try:
        manifest = read_manifest(path)
    except ShardError as err:
        raise ConfigError(f"run.dir: the run's data.path: {err}") from None
    return os.path.join(path, (manifest.get("tokenizer") or {}).get("path", TOKENIZER_FILE)), None
