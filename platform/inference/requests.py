"""A generation request and its outputs: the decoding settings and prompts checked against the model
before any token is generated, the completions as JSONL rows, the streamed text, the statistics line.

Prompts file (JSONL): one JSON object per line with a string "prompt"; blank lines are skipped, the
other fields are carried to the output. Output rows (JSONL, one per prompt, in order): the input
line's fields, then "completion" (the decoded text), "tokens" (the new ids, EOS included when it
ended the row), "prompt_tokens" and "finish_reason" ("eos" or "length"). The output file is written
under a temporary name and renamed into place when whole (Storage.write_bytes): a reader never sees
a half-written file. Every check raises ConfigError naming the setting, or the file and line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.inference.generate import SPECULATIVE_MODES, GenerationResult, GenerationStats
from moeforge.platform.inference.load import LoadedModel
from moeforge.platform.outputs.storage import Storage, check_local_output, is_s3, open_storage
from tokenizers import Tokenizer

PROMPT_KEY = "prompt"


# --- the request ---------------------------------------------------------------------------------------------
def check_settings(
    max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any, speculative: Any
) -> None:
    """The decoding settings, each refused by name when out of range (before any loading)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature >= 0:
        raise ConfigError(f"temperature: must be a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k: must be an integer >= 1 or null, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise ConfigError(f"top_p: must be a number in (0, 1] or null, got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    if speculative not in SPECULATIVE_MODES:
        raise ConfigError(f"speculative: must be one of {', '.join(SPECULATIVE_MODES)}, got {speculative!r}")


def encode_prompts(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    speculative: str = "none",
    where: Sequence[str] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, checked against the model: prompt + new tokens within the context,
    MTP modules present for speculative="mtp". `where[i]` names prompt i in an error (default
    "prompt"; "prompts_file: <path>:<line>" for a file).

    A prompt is encoded with the tokenizer's own special-token template (`add_special_tokens`: a BOS
    for tokenizers that define one, nothing for moeforge's byte-level BPE). An empty prompt starts a
    fresh document: it is the end-of-text token alone, the separator training puts between documents."""
    if speculative == "mtp" and len(loaded.model.mtp) == 0:
        raise ConfigError(
            f"speculative: mtp needs MTP modules, but the model from {loaded.source} has none "
            "(num_nextn_predict_layers = 0, or its MTP weights were not saved); use speculative=none"
        )
    where = list(where) if where is not None else ["prompt"] * len(prompts)
    context = loaded.context
    out = []
    for text, name in zip(prompts, where):
        ids = loaded.tokenizer.encode(text, add_special_tokens=True).ids
        if not ids:
            if loaded.eos_id is None:
                raise ConfigError(f"{name}: empty, and the tokenizer has no end-of-text token to start from")
            ids = [loaded.eos_id]  # a fresh document
        if len(ids) > context:
            raise ConfigError(
                f"{name}: longer than the context: {len(ids)} tokens > max_position_embeddings {context}"
            )
        # the last new token is never fed back, so the cache needs len + max_new_tokens - 1 positions
        if len(ids) + max_new_tokens - 1 > context:
            raise ConfigError(
                f"{name}: {len(ids)} token(s) + max_new_tokens {max_new_tokens} do not fit the context "
                f"(max_position_embeddings {context}); lower max_new_tokens"
            )
        out.append(ids)
    return out


# --- prompts in, completions out -----------------------------------------------------------------------------
@dataclasses.dataclass
class PromptRecord:
    """One line of a prompts file: the JSON object (its other fields go to the output) and where."""

    fields: dict[str, Any]
    where: str  # "prompts_file: <path>:<line>"

    @property
    def prompt(self) -> str:
        return self.fields[PROMPT_KEY]


def read_prompts_file(path: str) -> list[PromptRecord]:
    """The prompts of a JSONL file: one JSON object per line with a string "prompt" (blank lines are
    skipped). A missing file, a line that is not such an object, or no prompt at all fails naming
    the file and the line."""
    if not os.path.isfile(path):
        raise ConfigError(f"prompts_file: {path}: no such file")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"prompts_file: {path}: unreadable ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"prompts_file: {path}:{number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(fields, dict) or not isinstance(fields.get(PROMPT_KEY), str):
            raise ConfigError(f'{where}: expected an object with a string "prompt", got {line.strip()[:60]}')
        records.append(PromptRecord(fields, where))
    if not records:
        raise ConfigError(f"prompts_file: {path}: holds no prompts")
    return records


def completion_records(
    loaded: LoadedModel,
    records: Sequence[PromptRecord],
    prompt_ids: Sequence[Sequence[int]],
    result: GenerationResult,
) -> list[dict[str, Any]]:
    """One output object per prompt: the input line's fields, then "completion" (decoded text),
    "tokens" (the new ids, EOS included when it ended the row), "prompt_tokens" and
    "finish_reason" ("eos" or "length")."""
    out = []
    for record, ids, tokens in zip(records, prompt_ids, result.tokens):
        ended = loaded.eos_id is not None and bool(tokens) and tokens[-1] == loaded.eos_id
        out.append(
            {
                **record.fields,
                "completion": loaded.tokenizer.decode(tokens),
                "tokens": list(tokens),
                "prompt_tokens": len(ids),
                "finish_reason": "eos" if ended else "length",
            }
        )
    return out


def output_target(path: str) -> tuple[Storage, str]:
    """The storage and file name `out` is written to, checked before any token is generated: an
    S3 bucket must be reachable (StorageError otherwise), a local path must be a file that can be
    written (not a directory, not under a file or in an unwritable directory)."""
    if is_s3(path):
        parent, _, name = path.rpartition("/")
        return open_storage(parent), name
    check_local_output(path, "out", directory=False)
    return open_storage(os.path.dirname(os.path.abspath(path))), os.path.basename(path)


def write_jsonl(target: tuple[Storage, str], rows: Sequence[Mapping[str, Any]]) -> str:
    """Write rows as JSONL to `target` (output_target's) under a temporary name, renamed into place
    when whole (Storage.write_bytes): a reader never sees a half-written file. Returns its path."""
    storage, name = target
    storage.write_text(name, "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))
    return storage.url(name)


class TextStreamer:
    """Decoded text of a growing token list, written piece by piece as tokens arrive.

    Each new token re-decodes the whole completion and writes what is new: a token can end inside a
    multi-byte character (byte-level BPE) and some decoders change a piece by its neighbours (a
    leading-space marker), so decoding tokens one at a time would be wrong. A text ending in U+FFFD
    (an unfinished character) waits for the next token."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], Any]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> None:
        self.tokens.append(token)
        self._show(self.tokenizer.decode(self.tokens), final=False)

    def finish(self) -> None:
        self._show(self.tokenizer.decode(self.tokens), final=True)

    def _show(self, text: str, final: bool) -> None:
        if not final and text.endswith("\ufffd"):
            return
        new = text[len(self.shown) :]  # earlier text never changes once its characters are whole
        if new:
            self.write(new)
        self.shown = text


def format_stats(stats: GenerationStats, speculative: str, cache_bytes_per_token: int = 0) -> str:
    """GenerationStats in one line: tokens, time, throughput, the latent cache's bytes per token
    (when given) and, under MTP, the acceptance."""
    rate = stats.tokens_generated / stats.wall_time_s if stats.wall_time_s > 0 else 0.0
    line = (
        f"generated {stats.tokens_generated} tokens for {stats.prompts} prompt(s) in {stats.wall_time_s:.2f}s "
        f"({rate:.1f} tokens/s); {stats.prefill_forwards} prefill + {stats.steps} decode forwards, "
        f"{stats.tokens_per_step:.2f} tokens per step"
    )
    if cache_bytes_per_token:
        line += f"; latent cache {cache_bytes_per_token:,} bytes/token"
    if speculative == "mtp":
        line += (
            f"; mtp: acceptance rate {stats.acceptance_rate:.1%} ({stats.accepted}/{stats.drafted} drafts), "
            f"{stats.accepted_per_step:.2f} accepted per step"
        )
    return line
