"""Conversations for supervised fine-tuning: parsed, checked, rendered, tokenized and loss-masked.

A conversation is a JSONL line or a Parquet row with a `messages` list; each message has a `role`
(system, user, assistant or tool) and a string `content` (other keys pass through to the template).
Every error names the file and the line (JSONL, counted from 1) or the row (Parquet, counted from 0).

Only assistant turns train, and they are found by prefix rendering: for assistant message i, the
tokens of render(messages[:i], add_generation_prompt=True) are what the model sees before it answers,
and the tokens render(messages[:i + 1]) adds after them are the answer: its content and the template's
end-of-turn token(s), so the model learns to stop. Both renders must be token prefixes of the whole
conversation's render; a template that rewrites earlier turns when later ones follow (one that drops
old reasoning, say) breaks this and is refused. The text is tokenized without the tokenizer's own
special tokens: the template writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from moeforge.platform.data.chat_template import ChatTemplate
from moeforge.platform.data.corpus import CorpusError, jsonl_records, parquet_column

ROLES = ("system", "user", "assistant", "tool")
MESSAGES_FIELD = "messages"


@dataclass(frozen=True)
class Conversation:
    where: str  # "file:line" (JSONL) or "file: row n" (Parquet), for messages
    messages: list[dict]


def _checked(where: str, record) -> Conversation:
    """A record's messages, each with a known role and string content, or one line naming the fault."""
    messages = record.get(MESSAGES_FIELD) if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise CorpusError(f"{where}: no {MESSAGES_FIELD!r} list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise CorpusError(f"{where}: {MESSAGES_FIELD}[{i}] is not an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise CorpusError(f"{where}: {MESSAGES_FIELD}[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise CorpusError(f"{where}: {MESSAGES_FIELD}[{i}] ({role}) has no string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise CorpusError(f"{where}: no assistant message (only assistant turns are trained)")
    return Conversation(where, messages)


def parse_conversations(uri: str, kind: str, data: bytes) -> list[Conversation]:
    """The conversations of one JSONL or Parquet file's bytes, in file order."""
    if kind == "jsonl":
        return [_checked(f"{uri}:{lineno}", record) for lineno, record in jsonl_records(uri, data)]
    if kind == "parquet":
        column = parquet_column(uri, data, MESSAGES_FIELD)
        return [_checked(f"{uri}: row {row}", {MESSAGES_FIELD: value}) for row, value in enumerate(column)]
    raise CorpusError(
        f"{uri}: format=conversations reads JSONL or Parquet records with a {MESSAGES_FIELD!r} list, not {kind} files"
    )


def encode_conversation(conv: Conversation, template: ChatTemplate, tok) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int64, loss mask uint8) of one conversation: the mask is 1 on each assistant
    turn's answer tokens (see the module docstring) and 0 elsewhere, and always 0 on the first token,
    which nothing of its own conversation precedes."""
    messages = conv.messages
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    try:
        texts = [template.render(messages)]
        for i in turns:
            texts += [template.render(messages[:i], add_generation_prompt=True), template.render(messages[: i + 1])]
    except CorpusError as err:
        raise CorpusError(f"{conv.where}: {err}") from None
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    ids = np.array(encodings[0].ids, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for k, i in enumerate(turns):
        before = np.array(encodings[1 + 2 * k].ids, dtype=np.int64)
        after = np.array(encodings[2 + 2 * k].ids, dtype=np.int64)
        if not (len(before) <= len(after) <= len(ids) and np.array_equal(after[: len(before)], before)
                and np.array_equal(ids[: len(after)], after)):
            raise CorpusError(
                f"{conv.where}: chat template {template.source}: rendering {MESSAGES_FIELD}[:{i}] with the "
                f"generation prompt, then {MESSAGES_FIELD}[:{i + 1}], does not give token prefixes of the whole "
                "conversation's rendering, so the assistant turn's tokens cannot be found (the template "
                "rewrites earlier turns)"
            )
        mask[len(before) : len(after)] = 1
    if len(mask):
        mask[0] = 0
    return ids, mask


def fit_to_row(conv: Conversation, ids: np.ndarray, mask: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The conversation cut to at most `row_len` tokens; one with no trained token left is refused."""
    ids, kept = ids[:row_len], mask[:row_len]
    if not kept.any():
        cut = f" after truncation to seq_len + 1 = {row_len} tokens (it has {len(mask)})" if len(mask) > row_len else ""
        raise CorpusError(f"{conv.where}: no assistant token left to train{cut}")
    return ids, kept
