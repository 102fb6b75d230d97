"""moeforge-prepare format=conversations: loss masks against an independent per-turn tokenization,
greedy packing, the packed shards on a real local Ray cluster (interrupted and resumed, equal to a
fresh run and to an in-process packing), BatchSource's PackedBatch rows, bad input named in one line,
and the example=sft directory accepted by init.from=hf:."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import uuid

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.data import DataConfig
from moeforge.platform.config.presets import preset_values
from moeforge.platform.data import BatchSource
from moeforge.platform.data.chat_template import load_chat_template
from moeforge.platform.data.conversations import (
    Conversation,
    encode_conversation,
    fit_to_row,
    parse_conversations,
)
from moeforge.platform.data.corpus import CorpusError, InputFile, read_input
from moeforge.platform.data.microbatches import PackedBatch
from moeforge.platform.data.packing import RowPacker
from moeforge.platform.data.prepare import PrepareConfig, is_val_document, prepare
from moeforge.platform.data.sampler import GlobalSampler
from moeforge.platform.data.sft_example import (
    CHAT_TEMPLATE,
    TURN_END,
    example_tokenizer,
    synthetic_conversations,
    tokenizer_config,
    write_sft_example,
)
from moeforge.platform.data.shards import MANIFEST, TokenStream, sha256_file
from moeforge.platform.data.tokenizer import EOS, eos_id, load_tokenizer

from tests.test_prepare import interrupt_after_two_shards

SEQ = 48
ROW = SEQ + 1
# A second template: bos_token first, each turn closed by eos_token (given in its AddedToken form).
BRACKET_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']\\n' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]\\n' }}{% endif %}"
)
BRACKET_CONFIG = {"chat_template": BRACKET_TEMPLATE, "bos_token": EOS, "eos_token": {"content": TURN_END}}
# A template that rewrites earlier answers once later turns follow (as templates that drop old
# reasoning do): prefix rendering cannot find its assistant tokens.
REWRITING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\\n(earlier)<|im_end|>' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer_dir(root, config: dict | None, tok):
    os.makedirs(root, exist_ok=True)
    tok.save(os.path.join(root, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return os.path.join(root, "tokenizer.json")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The example's tokenizer beside three tokenizer configs: ChatML, bracket, rewriting."""
    root = tmp_path_factory.mktemp("chat")
    tok = example_tokenizer(synthetic_conversations())
    paths = {name: _tokenizer_dir(root / name, config, tok) for name, config in (
        ("chatml", tokenizer_config(SEQ)), ("bracket", BRACKET_CONFIG), ("rewriting", {"chat_template": REWRITING_TEMPLATE}))}
    return {"tok": tok, "paths": paths, "root": root}


def _reference(tok, messages, piece, header, prefix=""):
    """Ids and mask from tokenizing each turn on its own: the turns are separated by special tokens,
    so their tokens concatenate to the whole render's. An assistant turn's tokens after its header
    are trained."""
    ids = tok.encode(prefix, add_special_tokens=False).ids if prefix else []
    mask = [0] * len(ids)
    for m in messages:
        turn = tok.encode(piece(m), add_special_tokens=False).ids
        ids += turn
        if m["role"] != "assistant":
            mask += [0] * len(turn)
            continue
        head = tok.encode(header, add_special_tokens=False).ids
        assert turn[: len(head)] == head  # the reference's own assumption
        mask += [0] * len(head) + [1] * (len(turn) - len(head))
    return ids, mask


@pytest.mark.parametrize("name", ["chatml", "bracket"])
def test_masks_select_exactly_the_assistant_tokens(chat, name):
    tok, template = chat["tok"], load_chat_template(chat["paths"][name])
    if name == "chatml":
        piece, header, prefix = (lambda m: f"<|im_start|>{m['role']}\n{m['content']}{TURN_END}"), "<|im_start|>assistant\n", ""
    else:
        piece, header, prefix = (lambda m: f"[{m['role']}]\n{m['content']}{TURN_END}"), "[assistant]\n", EOS
        assert template.bos_token == EOS and template.eos_token == TURN_END
    records = synthetic_conversations(40, seed=5)
    shapes = {tuple(m["role"] for m in r["messages"]) for r in records}
    assert any("tool" in s for s in shapes) and any("system" in s for s in shapes)
    assert any(s.count("assistant") == 2 for s in shapes)
    for record in records:
        ids, mask = encode_conversation(Conversation("x.jsonl:1", record["messages"]), template, tok)
        ref_ids, ref_mask = _reference(tok, record["messages"], piece, header, prefix)
        assert ids.tolist() == ref_ids and mask.tolist() == ref_mask, record
        answers = [m["content"] + TURN_END for m in record["messages"] if m["role"] == "assistant"]
        assert tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False) == "".join(answers)


def test_a_template_that_rewrites_earlier_turns_is_named(chat):
    template = load_chat_template(chat["paths"]["rewriting"])
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    encode_conversation(Conversation("x.jsonl:1", messages[:2]), template, chat["tok"])  # one turn: fine
    with pytest.raises(CorpusError) as err:
        encode_conversation(Conversation("x.jsonl:7", messages), template, chat["tok"])
    line = str(err.value)
    assert line.startswith("x.jsonl:7: chat template ") and "rewriting/tokenizer_config.json" in line
    assert "messages[:1]" in line and "\n" not in line


def test_packing_keeps_boundaries_and_segments_and_resumes_from_a_row_start():
    rng = np.random.default_rng(0)
    lengths = [3, 4, 5, 10, 2, 2, 2, 2, 1, 9, 7, 3]
    docs = [(rng.integers(1, 50, n), rng.integers(0, 2, n).astype(np.uint8)) for n in lengths]

    def pack(first: int):
        packer, rows = RowPacker(10, pad_id=0, start=(0, first)), []
        for j in range(first, len(docs)):
            rows += packer.add(*docs[j], (0, j))
        return rows + packer.flush()

    rows = pack(0)
    assert all(len(r.tokens) == len(r.loss_mask) == len(r.segments) == 10 for r in rows)
    j = 0
    for r, row in enumerate(rows):
        assert row.start == (0, j)
        pos = 0
        for k in range(int(row.segments.max()) + 1):
            if j < len(docs) and pos + lengths[j] <= 10 and (row.segments[pos:pos + lengths[j]] == k).all():
                assert np.array_equal(row.tokens[pos:pos + lengths[j]], docs[j][0])
                assert np.array_equal(row.loss_mask[pos:pos + lengths[j]], docs[j][1])
                pos, j = pos + lengths[j], j + 1
        pad = slice(pos, 10)  # the rest is padding: eos, untrained, a segment after the last document's
        assert (row.tokens[pad] == 0).all() and (row.loss_mask[pad] == 0).all()
        assert (row.segments[pad] == row.segments[pos - 1] + 1).all()
        assert np.all(np.diff(row.segments) >= 0)
        if j < len(docs):  # greedy: the next document did not fit
            assert pos + lengths[j] > 10
    assert j == len(docs) and len(rows) == 6  # [3 4] [5] [10] [2 2 2 2 1] [9] [7 3]
    again = pack(rows[3].start[1])  # re-packing from a row's first document gives the same rows
    assert [r.tokens.tolist() for r in again] == [r.tokens.tolist() for r in rows[3:]]


# --- prepared on Ray ---------------------------------------------------------------------------------------


def _write_inputs(root) -> list[str]:
    """A JSONL file (with a blank line) and a Parquet file of conversations; two are longer than a
    row, one of them with its answer early enough to survive the cut."""
    records = synthetic_conversations(90, seed=9)
    long = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
                         {"role": "user", "content": " ".join(["banana"] * 60)}]}
    lines = [json.dumps(r) for r in records[:50]]
    lines.insert(10, "")
    lines.insert(20, json.dumps(long))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    buf = io.BytesIO()
    pq.write_table(pa.table({"messages": [r["messages"] for r in [*records[50:], long]]}), buf)
    (root / "b.parquet").write_bytes(buf.getvalue())
    return [str(root / "a.jsonl"), str(root / "b.parquet")]


def _config(chat, inputs, output, **kw) -> PrepareConfig:
    base = {"inputs": inputs, "output": str(output), "format": "conversations", "seq_len": SEQ,
            "tokenizer": chat["paths"]["chatml"], "shard_tokens": 3 * ROW + 5, "val_fraction": 0.2, "seed": 3,
            "batch_files": 1}
    return PrepareConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def packed(ray_cluster, chat, tmp_path_factory):
    """Conversations prepared in two goes (interrupted after two shards, then resumed), and again
    in one go elsewhere."""
    root = tmp_path_factory.mktemp("sft")
    inputs = _write_inputs(root)
    cfg = _config(chat, inputs, root / "tokens")
    written = interrupt_after_two_shards(cfg, root / "tokens")
    first_two = {p: os.stat(root / "tokens" / p).st_mtime_ns for p in written}
    lines = []
    resumed = prepare(cfg, log=lines.append)
    fresh = prepare(_config(chat, inputs, root / "fresh"), log=lambda _: None)
    return {"cfg": cfg, "out": root / "tokens", "result": resumed, "fresh": fresh, "first_two": first_two,
            "lines": lines, "chat": chat}


def _reference_rows(packed) -> dict[str, dict[str, np.ndarray]]:
    """The same files parsed, encoded and packed in this process; "truncated": conversations cut."""
    cfg, chat = packed["cfg"], packed["chat"]
    tok, template = chat["tok"], load_chat_template(cfg.tokenizer)
    out = {"truncated": 0}
    for split in ("train", "val"):
        packer, rows = RowPacker(ROW, eos_id(tok)), []
        for index, src in enumerate(packed["result"].manifest["sources"]):
            f = InputFile(src["uri"], src["kind"], src["bytes"])
            for j, conv in enumerate(parse_conversations(f.uri, f.kind, read_input(f))):
                if is_val_document(cfg.seed, f.uri, j, cfg.val_fraction) != (split == "val"):
                    continue
                ids, mask = encode_conversation(conv, template, tok)
                out["truncated"] += len(ids) > ROW
                ids, mask = fit_to_row(conv, ids, mask, ROW)
                rows += packer.add(ids, mask, (index, j))
        rows += packer.flush()
        out[split] = {name: np.stack([getattr(r, name) for r in rows]).astype(np.int64)
                      for name in ("tokens", "loss_mask", "segments")}
    return out


def test_packed_shards_equal_in_process_packing_and_an_uninterrupted_run(packed):
    out, manifest = packed["out"], packed["result"].manifest
    assert manifest == json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "conversations" and manifest["seq_len"] == SEQ
    assert manifest["chat_template"]["sha256"] == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    assert manifest["streams"] == {"loss_mask": "uint8", "segments": "uint8"}
    assert manifest["shard_tokens"] == 3 * ROW  # whole rows per shard
    reference = _reference_rows(packed)
    for split in ("train", "val"):
        info = manifest["splits"][split]
        for stream in ("shards", "loss_mask", "segments"):
            assert [s["num_tokens"] for s in info[stream]] == [s["num_tokens"] for s in info["shards"]]
            for shard in info[stream]:
                assert sha256_file(str(out / shard["path"])) == shard["sha256"]
        streams = {name: TokenStream.from_prepared(str(out), split, stream=stream)
                   for name, stream in (("tokens", "shards"), ("loss_mask", "loss_mask"), ("segments", "segments"))}
        for name, stream in streams.items():
            assert stream.num_tokens % ROW == 0
            assert np.array_equal(stream.read(0, stream.num_tokens).reshape(-1, ROW), reference[split][name]), name
        assert info["num_rows"] == len(reference[split]["tokens"]) > 0
        assert info["trained_tokens"] == int(reference[split]["loss_mask"].sum()) > 0
    assert manifest["splits"]["train"]["num_docs"] + manifest["splits"]["val"]["num_docs"] == 92
    truncated = reference["truncated"]
    assert manifest["splits"]["train"]["truncated_docs"] + manifest["splits"]["val"]["truncated_docs"] == truncated
    assert truncated >= 2  # the two long ones at least
    assert any(f"{truncated} conversations were longer than seq_len + 1 = 49 tokens" in x for x in packed["lines"])
    # interrupted after two shards and resumed: those were kept, the rest equals one uninterrupted run
    assert packed["result"].shards_skipped == 2
    for path, mtime in packed["first_two"].items():
        assert os.stat(out / path).st_mtime_ns == mtime
    assert packed["fresh"].manifest["splits"] == manifest["splits"]
    assert not (out / "_progress.json").exists()


def test_rerun_of_complete_conversations_does_nothing(packed):
    lines = []
    again = prepare(packed["cfg"], log=lines.append)
    assert again.already_complete and any("nothing to do" in line for line in lines)


def test_batch_source_returns_packed_rows(packed):
    out = str(packed["out"])
    cfg = DataConfig(source="tokens", path=out, global_batch=4, seed=3)
    vocab = packed["chat"]["tok"].get_vocab_size()
    src = BatchSource(cfg, vocab, SEQ)
    reference = _reference_rows(packed)
    assert src.packed and src.num_samples == len(reference["train"]["tokens"]) and src.has_val
    batch = src.batch(2)
    assert isinstance(batch, PackedBatch)
    assert batch.tokens.shape == batch.loss_mask.shape == batch.segments.shape == (4, ROW)
    assert batch.tokens.dtype == torch.int64 and batch.loss_mask.dtype == torch.bool
    indices = GlobalSampler(src.num_samples, 3).rank_indices(2, 4)
    for name, field in (("tokens", batch.tokens), ("loss_mask", batch.loss_mask), ("segments", batch.segments)):
        assert np.array_equal(field.long().numpy(), reference["train"][name][indices])
    halves = [src.batch(2, rank, 2) for rank in (0, 1)]  # dp ranks take contiguous halves
    assert torch.equal(torch.cat([h.tokens for h in halves]), batch.tokens)
    assert torch.equal(torch.cat([h.segments for h in halves]), batch.segments)
    val = src.val_batch(0)
    rows = len(reference["val"]["tokens"])
    assert np.array_equal(val.tokens.numpy(), reference["val"]["tokens"][np.arange(4) % rows])
    with pytest.raises(ConfigError) as err:
        BatchSource(cfg, vocab, 64)
    assert str(err.value).startswith(f"data.path: {out} holds conversations packed for seq_len {SEQ}")
    assert "model's seq_len is 64" in str(err.value)


def test_batch_source_reads_packed_rows_from_s3(packed, s3_server, tmp_path):
    """The local cache of an s3:// directory fetches the loss-mask and segment shards too."""
    bucket = f"sft-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket)
    for folder, _, names in os.walk(packed["out"]):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), packed["out"])
            client.upload_file(os.path.join(folder, name), bucket, f"tokens/{rel}")
    cfg = DataConfig(source="tokens", path=f"s3://{bucket}/tokens", global_batch=4, seed=3,
                     cache_dir=str(tmp_path / "cache"), endpoint_url=s3_server)
    local = DataConfig(source="tokens", path=str(packed["out"]), global_batch=4, seed=3)
    vocab = packed["chat"]["tok"].get_vocab_size()
    remote, here = BatchSource(cfg, vocab, SEQ).batch(1), BatchSource(local, vocab, SEQ).batch(1)
    assert torch.equal(remote.loss_mask, here.loss_mask) and torch.equal(remote.segments, here.segments)
    assert (tmp_path / "cache" / bucket / "tokens" / "tokenizer_config.json").exists()


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_records_are_named_with_file_and_line(tmp_path, chat):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = [
        ({"text": "no messages"}, "no 'messages' list"),
        ({"messages": [{"role": "robot", "content": "x"}]},
         "messages[0].role 'robot' is not one of system, user, assistant, tool"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0] (user) has no string 'content'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message (only assistant turns are trained)"),
    ]
    for record, message in cases:
        data = "\n".join(json.dumps(r) for r in (good, good, record)).encode()
        with pytest.raises(CorpusError) as err:
            parse_conversations("in.jsonl", "jsonl", data)
        assert str(err.value) == f"in.jsonl:3: {message}"
    buf = io.BytesIO()
    pq.write_table(pa.table({"messages": [good["messages"], [{"role": "critic", "content": "x"}]]}), buf)
    with pytest.raises(CorpusError, match=r"^in.parquet: row 1: messages\[0\].role 'critic'"):
        parse_conversations("in.parquet", "parquet", buf.getvalue())
    with pytest.raises(CorpusError, match=r"^notes.txt: format=conversations reads JSONL or Parquet"):
        parse_conversations("notes.txt", "text", b"hello")

    long = Conversation("in.jsonl:4", [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}])
    ids, mask = encode_conversation(long, load_chat_template(chat["paths"]["chatml"]), chat["tok"])
    with pytest.raises(CorpusError) as err:
        fit_to_row(long, ids, mask, 17)
    assert str(err.value) == f"in.jsonl:4: no assistant token left to train after truncation to seq_len + 1 = 17 tokens (it has {len(ids)})"


def test_a_bad_record_fails_the_ray_run_before_the_output_is_complete(ray_cluster, chat, tmp_path):
    lines = [json.dumps(r) for r in synthetic_conversations(5, seed=1)]
    lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError) as err:
        prepare(_config(chat, [str(tmp_path / "c.jsonl")], tmp_path / "out"), log=lambda _: None)
    assert str(err.value) == f"{tmp_path / 'c.jsonl'}:4: messages[1].role 'bot' is not one of system, user, assistant, tool"
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_missing_template_and_settings_are_refused(chat, tmp_path):
    bare = _tokenizer_dir(tmp_path / "bare", None, chat["tok"])
    with pytest.raises(CorpusError, match=rf"^{tmp_path / 'bare' / 'tokenizer_config.json'}: no such file;"):
        load_chat_template(bare)
    no_template = _tokenizer_dir(tmp_path / "plain", {"eos_token": TURN_END}, chat["tok"])
    with pytest.raises(CorpusError, match=rf"^{tmp_path / 'plain' / 'tokenizer_config.json'}: no chat_template in it;"):
        load_chat_template(no_template)
    broken = _tokenizer_dir(tmp_path / "broken", {"chat_template": "{% for m in messages %}"}, chat["tok"])
    with pytest.raises(CorpusError, match=r"broken/tokenizer_config.json: chat_template does not parse"):
        load_chat_template(broken)
    with pytest.raises(ConfigError, match="^seq_len: is required with format=conversations"):
        PrepareConfig(format="conversations", tokenizer=bare)
    with pytest.raises(ConfigError, match="^tokenizer: is required with format=conversations"):
        PrepareConfig(format="conversations", seq_len=SEQ)
    with pytest.raises(ConfigError, match="^seq_len: only format=conversations packs rows"):
        PrepareConfig(seq_len=SEQ)


def test_cli_names_a_tokenizer_without_a_chat_template_in_one_line(chat, tmp_path):
    bare = _tokenizer_dir(tmp_path / "bare", None, chat["tok"])
    (tmp_path / "c.jsonl").write_text(json.dumps(synthetic_conversations(1)[0]) + "\n")
    args = ["format=conversations", f"inputs=[{tmp_path / 'c.jsonl'}]", f"tokenizer={bare}", f"seq_len={SEQ}",
            f"output={tmp_path / 'out'}"]
    proc = subprocess.run([sys.executable, "-m", "moeforge.jobs.prepare", *args], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"moeforge-prepare: error: {tmp_path / 'bare' / 'tokenizer_config.json'}: no such file")
    assert not (tmp_path / "out").exists()


# --- the example -------------------------------------------------------------------------------------------


def test_sft_example_is_accepted_by_init_from_hf(ray_cluster, tmp_path):
    import moeforge.jobs.train  # noqa: F401  registers conf/train.yaml's ${moeforge.sweep_subdir:} resolver
    from moeforge.platform.cli import compose_values, settable_overrides
    from moeforge.platform.config import TrainConfig

    lines = []
    result = write_sft_example(PrepareConfig(output=str(tmp_path / "ex"), example="sft"), log=lines.append)
    root = tmp_path / "ex"
    assert len((root / "conversations.jsonl").read_text().splitlines()) == 300
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(root / "model"))
    manifest = result.manifest
    assert manifest["kind"] == "conversations" and manifest["splits"]["train"]["num_rows"] > 0
    command = shlex.split(lines[lines.index(next(x for x in lines if x.endswith("fine-tune with:"))) + 1])
    assert command[0] == "moeforge-train" and f"init.from=hf:{root / 'model'}" in command
    values, _ = compose_values("train", settable_overrides(command[1:], TrainConfig.section_types()))
    cfg = TrainConfig.from_dict(values)  # init.from=hf: reads the directory's config.json
    assert cfg.init.kind == "hf" and cfg.model.seq_len == manifest["seq_len"] == 128
    tiny = preset_values("model", "tiny")
    assert cfg.model.hidden_size == tiny["hidden_size"] and cfg.model.n_routed_experts == tiny["n_routed_experts"]
    tok = load_tokenizer(str(root / "model" / "tokenizer.json"))
    assert cfg.model.vocab_size == manifest["vocab_size"] == tok.get_vocab_size()
    assert load_chat_template(str(root / "model" / "tokenizer.json")).text == CHAT_TEMPLATE
    batch = BatchSource(cfg.data, cfg.model.vocab_size, cfg.model.seq_len).batch(0)
    assert isinstance(batch, PackedBatch) and batch.tokens.shape == (cfg.data.global_batch, 129)
