"""A model and its tokenizer for generation: a training run's newest complete checkpoint or a Hugging
Face directory, on a device in a dtype, with the vocabulary check.

    loaded = load_for_generation(run_dir="runs/tiny_cpu_dualpipe")   # newest complete checkpoint
    loaded = load_for_generation(hf_dir="exports/tiny", dtype="bfloat16")

Where the pieces come from:
- a training run (`run_dir`, local or s3://): the newest COMPLETE checkpoint under run_dir/checkpoints,
  written by any parallel layout (pp/dp/ep, ZeRO), read whole by
  `platform.checkpoint.reshard.load_model_from_checkpoint`; and the tokenizer its data was prepared with
  (`platform.data.run_tokenizer.run_tokenizer`: the run's config.yaml names its token directory, whose
  manifest.json names the tokenizer.json). A run on synthetic tokens or on one flat token file has no
  tokenizer: give one.
- a Hugging Face DeepSeek-V3 directory (`hf_dir`): `model.hf.load_hf_checkpoint` (MTP modules when
  the directory has their weights), and hf_dir/tokenizer.json. moeforge-convert copies the run's
  tokenizer.json into the export when the run has one; a directory without one gets the stdlib
  tokenizer -- conf/data/stdlib.yaml's path (moeforge-prepare's default output, what `data=stdlib` and
  `make train` train on), relative to the working directory -- with a note on stderr. That is the
  right one for a model trained on the stdlib corpus; for any other model give `tokenizer=`.
- `tokenizer` (a tokenizer.json, local or s3://) replaces either source's tokenizer.

The vocabulary check: a tokenizer with more ids than the model's vocab_size does not belong to it
(its ids would index past the embedding) and is refused. A smaller one is accepted, as training
accepts it (BatchSource): embedding tables are often padded past the tokenizer to a round number
of rows. Model ids without a token decode to nothing.

A completion ends at the end-of-text token (LoadedModel.eos_id: the tokenizer's, or hf_dir's
config.json `eos_token_id`). Every failure raises ConfigError naming the setting, the file or the
cause; the vocabularies are compared from the recorded configs, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import sys
from collections.abc import Callable

import torch
from moeforge.model.transformer import Transformer
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import CHECKPOINTS_DIR, latest_checkpoint, read_meta
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.data.corpus import CorpusError
from moeforge.platform.data.run_tokenizer import TOKENIZER_FILE, run_tokenizer
from moeforge.platform.data.tokenizer import eos_id as find_eos_id
from moeforge.platform.data.tokenizer import load_tokenizer
from moeforge.platform.outputs.storage import S3Options, is_s3, join
from tokenizers import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _stdlib_tokenizer() -> str:
    """The stdlib corpus' tokenizer.json: conf/data/stdlib.yaml's token directory."""
    from omegaconf import OmegaConf  # not at import: kernels/gpu_check.sh runs without omegaconf

    text = importlib.resources.files("moeforge.conf").joinpath("data/stdlib.yaml").read_text()
    return join(str(OmegaConf.create(text)["path"]), TOKENIZER_FILE)


@dataclasses.dataclass
class LoadedModel:
    """A model ready for `generate` and the tokenizer that goes with it."""

    model: Transformer
    tokenizer: Tokenizer
    eos_id: int | None  # where a completion ends (None: only max_new_tokens ends it)
    source: str  # the checkpoint or Hugging Face directory the weights came from
    tokenizer_path: str

    @property
    def context(self) -> int:
        """Positions the model attends over: prompt + new tokens must fit."""
        return self.model.cfg.max_position_embeddings


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch.device; a GPU that is not there is refused."""
    if not isinstance(device, str) or not (device == "cpu" or device.split(":")[0] == "cuda"):
        raise ConfigError(f"device: must be cpu, cuda or cuda:N, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device} requested, but torch sees no CUDA GPU (use device=cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {device} requested, but torch sees {torch.cuda.device_count()} GPU(s)"
            )
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def newest_checkpoint(run_dir: str) -> str:
    """The newest complete checkpoint of a training run; ConfigError naming run.dir when there is
    none (no checkpoint was written, or only incomplete ones)."""
    if not is_s3(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run.dir: {run_dir}: no such directory")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ConfigError(
            f"run.dir: {run_dir}: no complete checkpoint under {join(run_dir, CHECKPOINTS_DIR)} "
            "(train with checkpoint.every=N to write one)"
        )
    return path


def check_vocabulary(model_vocab: int, tokenizer: Tokenizer, tokenizer_path: str, source: str) -> None:
    """Refuse a tokenizer with more ids than the model has embedding rows (see the module docstring)."""
    ids = tokenizer.get_vocab_size(with_added_tokens=True)
    if ids > model_vocab:
        raise ConfigError(
            f"vocabulary: tokenizer {tokenizer_path} has {ids} ids, more than the model's vocab_size "
            f"{model_vocab} ({source}); they do not belong together"
        )


def _read_tokenizer(path: str, s3: S3Options | None = None) -> Tokenizer:
    try:
        return load_tokenizer(path, s3)
    except CorpusError as err:
        raise ConfigError(f"tokenizer: {err}") from None


def _tokenizer_eos(tokenizer: Tokenizer) -> int | None:
    try:
        return find_eos_id(tokenizer)
    except CorpusError:
        return None


def load_for_generation(
    *,
    run_dir: str | None = None,
    hf_dir: str | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> LoadedModel:
    """The model and tokenizer of a training run (`run_dir`) or a Hugging Face directory (`hf_dir`):
    exactly one of the two. `tokenizer` (a tokenizer.json) replaces the source's. The model is in
    eval mode on `device` in `dtype` (the router stays float32). Raises ConfigError naming the
    setting when a source, its checkpoint or its tokenizer is missing, or the vocabularies disagree;
    the vocabularies are compared from the recorded configs, before any weight is read."""
    if (run_dir is None) == (hf_dir is None):
        both = "give one, not both" if run_dir is not None else "give one"
        raise ConfigError(
            f"run.dir / hf_dir: {both} (run.dir=<a training run> or hf_dir=<a Hugging Face directory>)"
        )
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    if run_dir is not None:
        source = newest_checkpoint(run_dir)
        tok_path, s3 = (tokenizer, None) if tokenizer else run_tokenizer(run_dir)
        tok = _read_tokenizer(tok_path, s3)
        recorded = read_meta(source).extra.get("model") or {}  # the run's ModelConfig, before any weight
        if "vocab_size" in recorded:
            check_vocabulary(int(recorded["vocab_size"]), tok, tok_path, source)
        model = _load_checkpoint_model(source, dev, torch_dtype)
        eos = _tokenizer_eos(tok)
    else:
        source = hf_dir
        hf_config = _hf_config(hf_dir)
        tok_path = tokenizer or os.path.join(hf_dir, TOKENIZER_FILE)
        if tokenizer is None and not os.path.isfile(tok_path):
            stdlib = _stdlib_tokenizer()
            if not os.path.isfile(stdlib):
                raise ConfigError(
                    f"tokenizer: {hf_dir} has no {TOKENIZER_FILE} and the stdlib tokenizer {stdlib} does not "
                    "exist (run moeforge-prepare); give tokenizer=<tokenizer.json>"
                )
            log(f"moeforge-generate: {hf_dir} has no {TOKENIZER_FILE}; using the stdlib tokenizer {stdlib}")
            tok_path = stdlib
        tok = _read_tokenizer(tok_path)
        if isinstance(hf_config.get("vocab_size"), int):
            check_vocabulary(hf_config["vocab_size"], tok, tok_path, source)
        model = _load_hf_model(hf_dir, dev, torch_dtype)
        eos = hf_config.get("eos_token_id")
        eos = eos if isinstance(eos, int) and 0 <= eos < model.cfg.vocab_size else _tokenizer_eos(tok)
    check_vocabulary(model.cfg.vocab_size, tok, tok_path, source)
    return LoadedModel(model.eval(), tok, eos, source, tok_path)


def _load_checkpoint_model(path: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    from moeforge.model.hf import keeps_fp32
    from moeforge.platform.checkpoint.reshard import load_model_from_checkpoint

    try:
        model = load_model_from_checkpoint(path)  # fp32 on the CPU, whatever layout wrote it
    except CheckpointError as err:
        raise ConfigError(f"run.dir: {err}") from None
    model.to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keeps_fp32(name):  # as load_hf_checkpoint: the router stays fp32
                param.data = param.data.to(dtype)
    return model


def _hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"hf_dir: {hf_dir}: no such directory")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"hf_dir: {path}: missing (not a Hugging Face model directory)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"hf_dir: {path}: unreadable ({err})") from None


def _load_hf_model(hf_dir: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    from moeforge.model import hf

    try:
        return hf.load_hf_checkpoint(hf_dir, device=device, dtype=dtype)
    except (hf.CheckpointError, ValueError, OSError) as err:  # ValueError: a config the model refuses
        raise ConfigError(f"hf_dir: {hf_dir}: {err}") from None
