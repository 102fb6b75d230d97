"""Export a moeforge model as a Hugging Face DeepSeek-V3 directory, in high precision or in the
published FP8 format (`moeforge-convert`).

    export_hf(model, out_dir, fp8=True, dtype=torch.bfloat16)     # a Transformer in memory
    export_checkpoint("runs/x/checkpoints/step_00001000", out_dir)  # a training checkpoint

The key layout is `model.hf.hf_keys`'s (per-expert keys, MTP depth d at layer num_hidden_layers + d). With
fp8=True the tensors DeepSeek publishes in FP8 are written as they are in deepseek-ai/DeepSeek-V3:
float8_e4m3fn weights plus `<name>_scale_inv`, float32 [ceil(out/128), ceil(in/128)], the dequant
multiplier (w ~ fp8 * scale_inv per 128x128 block, the last row/column blocks ragged), and
config.json's `quantization_config`. Which tensors those are (FP8_WEIGHT): every attention projection
(q_a/q_b or q, kv_a_proj_with_mqa, kv_b, o_proj) and every gate/up/down_proj (dense MLP, shared and
routed experts), in the main layers and the MTP layers alike. The published checkpoint keeps the rest
in BF16/FP32: embeddings, lm_head, norms, the MTP eh_proj and shared_head, the router's gate.weight
(BF16) and e_score_correction_bias (FP32); so do we (the router in FP32, see `model.hf.keeps_fp32`).

An exported checkpoint also gets the tokenizer.json its run's data was prepared with, when the run
names one (`platform.data.run_tokenizer.run_tokenizer`), so moeforge-generate hf_dir=<out> decodes with it.

A directory is written as `<out>.partial` and renamed to `<out>` when complete, so an interrupted
export never leaves a directory that looks like a finished one.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from moeforge.kernels.fp8_format import BLOCK, round_up
from moeforge.kernels.quant import weight_quant
from moeforge.model.hf import hf_config_dict, hf_state_tensors, keeps_fp32, write_hf_directory
from moeforge.model.transformer import Transformer
from moeforge.platform.checkpoint.store import CHECKPOINTS_DIR, CheckpointError, latest_checkpoint, read_meta
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.outputs.storage import check_local_output, file_mode, open_storage
from omegaconf import OmegaConf
from safetensors import safe_open

# config.json's entry, exactly as the published checkpoint has it
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}
FP8_WEIGHT = re.compile(
    r"model\.layers\.\d+\."
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARTIAL_SUFFIX = ".partial"


class ExportError(ValueError):
    """An export cannot start or finish; the message names the path or setting."""


# --- FP8 -----------------------------------------------------------------------------------------------------
def is_fp8_weight(key: str) -> bool:
    """Whether the published checkpoint stores this tensor in FP8 (with a `_scale_inv` beside it)."""
    return FP8_WEIGHT.fullmatch(key) is not None


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], scale_inv float32 [ceil(out/128), ceil(in/128)]).

    kernels.quant.weight_quant does the work: scale = amax(block) / 448, q = e4m3(w / scale). Its
    `scale` is already what the checkpoint calls `weight_scale_inv` (the multiplier that dequantises,
    w ~ q * scale), so no inversion is needed. It wants `in` to be a multiple of 128; zero columns do
    not change any block's amax, so we pad and slice back, which gives the published ragged-block
    scales. Blocks whose amax is below the kernels' 1e-4 floor keep scale 1e-4/448 (all-zero blocks
    become zeros, never NaN)."""
    k = w.shape[1]
    padded = F.pad(w.detach().float(), (0, round_up(k, BLOCK) - k))  # [out, ceil(in/128)*128]
    q, scale = weight_quant(padded)  # q [out, in_pad], scale [ceil(out/128), in_pad/128]
    return q[:, :k].contiguous(), scale.contiguous()


def to_published_dtypes(
    tensors: Mapping[str, torch.Tensor], *, fp8: bool, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Cast tensors from hf_state_tensors (full precision) to what is written: with fp8, every
    FP8_WEIGHT becomes e4m3 followed by its `_scale_inv`; the rest goes to dtype (None keeps it), the
    router excepted (fp32). Quantising from the full-precision tensor, not from dtype, avoids
    rounding twice."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if fp8 and is_fp8_weight(key):
            out[key], out[key + "_scale_inv"] = quantize_fp8_block(t)
        elif dtype is not None and not keeps_fp32(key):
            out[key] = t.to(dtype)
        else:
            out[key] = t
    return out


# --- writing -------------------------------------------------------------------------------------------------
def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as a local Path, refused when it is an S3 URL, exists and is not an empty directory,
    or cannot be created (under a file, or an unwritable directory)."""
    text = os.fspath(out_dir)
    if text.startswith("s3://"):
        raise ExportError(f"{text}: the export is written to a local directory (copy it to S3 afterwards)")
    path = Path(text)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"{path}: exists and is not empty (refusing to overwrite)")
    check_local_output(text, "out", directory=True)
    return path


@contextmanager
def _partial_dir(out: Path) -> Iterator[Path]:
    """Yield `<out>.partial` to write into; rename it to `out` only if the body succeeds."""
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if partial.exists():  # the leftover of an interrupted export to the same place
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (check_out_dir); a file that appeared since makes this fail loudly
    os.rename(partial, out)


def export_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    fp8: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Write `model` as a Hugging Face DeepSeek-V3 directory at `out_dir`; return its path.

    fp8: the published FP8 format (module docstring). dtype: of every other tensor but the router
    (None: the model's own, usually float32). max_shard_bytes: split into shards with an index.
    extra_files: name -> bytes written beside the weights (a tokenizer.json).
    `out_dir` must not exist or be empty; it appears only once complete."""
    out = check_out_dir(out_dir)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    tensors = to_published_dtypes(hf_state_tensors(model), fp8=fp8, dtype=dtype)
    config = hf_config_dict(model.cfg)
    high = dtype if dtype is not None else next(model.parameters()).dtype
    config["torch_dtype"] = str(high).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    with _partial_dir(out) as partial:
        write_hf_directory(tensors, config, partial, max_shard_bytes)
        for name, data in (extra_files or {}).items():
            (partial / name).write_bytes(data)
        mode = file_mode()
        for written in partial.iterdir():  # safetensors creates its files owner-only (0600)
            os.chmod(written, mode)
    return str(out)


def resolve_checkpoint(path: str) -> str:
    """A complete moeforge checkpoint at `path` (a step directory), or the newest one under `path`
    (a run directory). Raises ExportError naming the path otherwise."""
    if not path.startswith("s3://") and not os.path.isdir(path):
        raise ExportError(f"{path}: no such directory")
    try:
        read_meta(path)
        return path
    except CheckpointError as err:
        newest = latest_checkpoint(path)
        if newest is None:
            raise ExportError(f"{err} (and no complete checkpoint under {path}/checkpoints)") from None
        return newest


def export_checkpoint(
    checkpoint_path: str,
    out_dir: str | os.PathLike,
    *,
    fp8: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> str:
    """Export the model of a moeforge training checkpoint (a step directory, or a run directory for
    its newest complete checkpoint; local or s3://, any pp/dp/ep layout) with export_hf, and the
    run's tokenizer.json beside it when the run names one."""
    check_out_dir(out_dir)  # before reading a checkpoint that may be hundreds of GB
    path = resolve_checkpoint(str(checkpoint_path))
    extra_files = _run_tokenizer_file(path)
    # Imported here: the resharding reader is a sibling room's module (`platform.checkpoint.reshard`).
    from moeforge.platform.checkpoint.reshard import load_model_from_checkpoint

    model = load_model_from_checkpoint(path)
    return export_hf(
        model, out_dir, fp8=fp8, dtype=dtype, max_shard_bytes=max_shard_bytes, extra_files=extra_files
    )


def _run_tokenizer_file(checkpoint: str) -> dict[str, bytes]:
    """{"tokenizer.json": its bytes} for the run of a checkpoint (<run>/checkpoints/step_N) whose data
    names a tokenizer (`platform.data.run_tokenizer.run_tokenizer`); {} for a checkpoint outside a run,
    a run on synthetic or flat-file tokens, or a tokenizer file that is gone."""
    # Imported here: run_tokenizer reads the run's config.yaml through `platform.outputs.run_files`, whose
    # plotting imports are not needed by an export without a run.
    from moeforge.platform.data.run_tokenizer import TOKENIZER_FILE, run_tokenizer

    parent, _, _step = checkpoint.rstrip("/").rpartition("/")
    run_dir, _, folder = parent.rpartition("/")
    if folder != CHECKPOINTS_DIR:
        return {}
    try:
        url, s3 = run_tokenizer(run_dir or ".")
        where, _, name = url.rpartition("/")
        return {TOKENIZER_FILE: open_storage(where or ".", s3).read_bytes(name)}
    except (ConfigError, FileNotFoundError):
        return {}


# --- what was written ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportSummary:
    """What an exported directory holds, read back from its files."""

    path: str
    files: int
    tensors: int
    fp8_weights: int
    bytes: int
    dtypes: dict[str, int]  # safetensors dtype name -> tensor count

    def line(self) -> str:
        kinds = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        fp8 = (
            f"fp8: {self.fp8_weights} e4m3 weights with 128x128 scale_inv" if self.fp8_weights else "fp8: no"
        )
        return (
            f"wrote {self.tensors} tensors ({kinds}), {self.bytes / 2**20:.1f} MiB in {self.files} "
            f"safetensors file(s); {fp8}; {self.path}"
        )


def summarize_hf_directory(path: str | os.PathLike) -> ExportSummary:
    """Count the tensors, FP8 weights and bytes of a written directory (reads headers only)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    dtypes: dict[str, int] = {}
    fp8 = 0
    for f in files:
        with safe_open(f, "pt") as h:
            for key in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                kind = h.get_slice(key).get_dtype()
                dtypes[kind] = dtypes.get(kind, 0) + 1
                fp8 += kind.startswith("F8")
    return ExportSummary(
        path=str(path),
        files=len(files),
        tensors=sum(dtypes.values()),
        fp8_weights=fp8,
        bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        dtypes=dtypes,
    )


# --- the job -------------------------------------------------------------------------------------------------
JOB_KEYS = ("checkpoint", "out", "fp8", "dtype", "max_shard_gb")


def job_values(argv: Sequence[str]) -> dict[str, Any]:
    """conf/convert.yaml with `key=value` overrides (values parsed as YAML: fp8=true is a bool).

    Not Hydra's compose as the other jobs do: `checkpoint` is also a config group (conf/checkpoint/),
    and Hydra reads any `checkpoint=...` override as the choice of an option in that group."""
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" not in arg:
            raise ConfigError(f"{arg!r}: expected key=value with a key among {', '.join(JOB_KEYS)}")
        if key not in JOB_KEYS:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(JOB_KEYS)})")
    text = importlib.resources.files("moeforge.conf").joinpath("convert.yaml").read_text()
    base = OmegaConf.create(text)
    return OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(list(argv))), resolve=True)


def run_job(values: Mapping[str, Any]) -> str:
    """moeforge-convert: conf/convert.yaml's values -> export_checkpoint; returns the summary line.
    Every bad value fails with a ConfigError naming its key, before any tensor is read."""
    unknown = sorted(set(values) - set(JOB_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(JOB_KEYS)})")
    checkpoint, out = values.get("checkpoint"), values.get("out")
    for key, value in (("checkpoint", checkpoint), ("out", out)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: required ({key}=<path>), got {value!r}")
    if not isinstance(values.get("fp8"), bool):
        raise ConfigError(f"fp8: must be true or false, got {values.get('fp8')!r}")
    dtype = values.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)} or null, got {dtype!r}")
    shard_gb = values.get("max_shard_gb")
    if shard_gb is not None and (
        isinstance(shard_gb, bool) or not isinstance(shard_gb, int | float) or shard_gb <= 0
    ):
        raise ConfigError(f"max_shard_gb: must be a number > 0 or null, got {shard_gb!r}")
    try:
        checkpoint = resolve_checkpoint(checkpoint)
    except ExportError as err:
        raise ConfigError(f"checkpoint: {err}") from None
    try:
        check_out_dir(out)
    except ExportError as err:
        raise ConfigError(f"out: {err}") from None
    written = export_checkpoint(
        checkpoint,
        out,
        fp8=values["fp8"],
        dtype=None if dtype is None else DTYPES[dtype],
        max_shard_bytes=None if shard_gb is None else int(shard_gb * 1e9),
    )
    return summarize_hf_directory(written).line()
