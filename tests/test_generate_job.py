"""moeforge-generate (jobs/generate.py, platform/inference/job.py) on a real training run: a few
steps of the reference loop on prepared tokens, checkpointed. Greedy text from run.dir equals
`generate` on the checkpoint's model loaded directly, MTP speculative decoding gives the same tokens,
a prompts file becomes one JSONL line per prompt, an export of the run (hf_dir) gives the same text,
and every bad input ends before generation in one line naming the cause, exit status 2."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import pytest
import torch
from moeforge.jobs.generate import main
from moeforge.platform.checkpoint.export import export_checkpoint
from moeforge.platform.checkpoint.reshard import load_model_from_checkpoint
from moeforge.platform.checkpoint.store import latest_checkpoint
from moeforge.platform.config import TrainConfig
from moeforge.platform.data.shards import FORMAT, MANIFEST
from moeforge.platform.data.tokenizer import encode_documents, eos_id, tokenizer_hash, train_bpe
from moeforge.platform.data.writer import SplitWriter
from moeforge.platform.inference.generate import generate
from moeforge.platform.inference.requests import TextStreamer
from moeforge.platform.outputs.storage import open_storage
from moeforge.platform.plan.accounting import estimate
from moeforge.platform.train.trainer import Trainer
from safetensors.torch import load_file, save_file
from test_train_loop import SMALL_MODEL  # the loop tests' small model (2 layers, MTP depth 1)
from tokenizers import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 512  # byte-level BPE needs > 256 ids; the model's vocab_size is the tokenizer's
STEPS = 3
PROMPT = "def dumps(obj, *, skipkeys=False,"
NEW = 24
CONTEXT = SMALL_MODEL["max_position_embeddings"]  # 64
ERROR = "moeforge-generate: error: "


def _corpus() -> list[str]:
    """The json package's sources: a small real corpus (~50 KB) that ships with Python."""
    return [p.read_text() for p in sorted(pathlib.Path(json.__file__).parent.glob("*.py"))]


def _prepared_tokens(out: pathlib.Path, texts: list[str], vocab: int) -> Tokenizer:
    """A prepared token directory as moeforge-prepare leaves one (tokenizer.json, train shards,
    manifest.json written last), made in-process: Ray Data would cost more than the whole test."""
    tok = train_bpe(texts, vocab)
    tokens, _ = encode_documents(tok, texts, eos_id(tok))
    storage = open_storage(str(out))
    storage.write_text("tokenizer.json", tok.to_str())
    writer = SplitWriter(storage, "train", "uint16", 1 << 20)
    writer.add(tokens)
    writer.close()
    manifest = {
        "format": FORMAT,
        "dtype": "uint16",
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos_id(tok),
        "tokenizer": {"path": "tokenizer.json", "sha256": tokenizer_hash(tok), "source": "trained"},
        "splits": {"train": {"num_tokens": len(tokens), "shards": writer.shards}},
    }
    storage.write_text(MANIFEST, json.dumps(manifest))
    return tok


def _train_config(run_dir, tokens_dir) -> TrainConfig:
    """The module's training run: reference loop, 3 steps, a checkpoint every step, 2 kept."""
    return TrainConfig.from_dict(
        {
            "model": {**SMALL_MODEL, "vocab_size": VOCAB},
            "run": {"dir": str(run_dir), "steps": STEPS, "log_every": 1, "eval_every": 0},
            "data": {"source": "tokens", "path": str(tokens_dir), "global_batch": 4, "seed": 7},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
            "checkpoint": {"every": 1, "keep": 2},
        }
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run (reference loop, 3 steps, a checkpoint every step, 2 kept) on prepared
    tokens, plus an incomplete newer checkpoint folder (a crashed save) that must be passed over;
    its Hugging Face export, and a copy of the export without the MTP weights."""
    root = tmp_path_factory.mktemp("generate")
    tok = _prepared_tokens(root / "tokens", _corpus(), VOCAB)
    assert tok.get_vocab_size() == VOCAB
    run_dir = root / "run"
    Trainer.single(_train_config(run_dir, root / "tokens"), log=lambda _line: None).train()
    newest = latest_checkpoint(str(run_dir))
    assert newest.endswith(f"step_{STEPS:08d}")
    crashed = run_dir / "checkpoints" / "step_00000009"
    crashed.mkdir()
    (crashed / "meta.json").write_text("{")  # no COMPLETE marker: never a checkpoint

    hf = root / "hf"
    export_checkpoint(str(run_dir), hf)
    no_mtp = root / "hf_no_mtp"  # as transformers' save_pretrained writes it: no MTP layers
    no_mtp.mkdir()
    shutil.copy(hf / "config.json", no_mtp / "config.json")
    mtp_layer = f"model.layers.{SMALL_MODEL['num_hidden_layers']}."
    tensors = load_file(hf / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith(mtp_layer)}, no_mtp / "model.safetensors")

    big = root / "big_tokenizer.json"  # more ids than the model has rows
    train_bpe(_corpus(), 2 * VOCAB).save(str(big))
    return {
        "root": root,
        "dir": run_dir,
        "tok": tok,
        "model": load_model_from_checkpoint(newest),
        "hf": hf,
        "hf_no_mtp": no_mtp,
        "big_tokenizer": big,
    }


def generate_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def direct(run, prompts: list[str], speculative: str = "none") -> list[list[int]]:
    """`generate` on the newest checkpoint's model, loaded here, with the run's tokenizer."""
    ids = [run["tok"].encode(p).ids for p in prompts]
    return generate(run["model"], ids, NEW, eos_id=eos_id(run["tok"]), speculative=speculative).tokens


# --- good runs -----------------------------------------------------------------------------------------------
def test_greedy_from_run_dir_equals_generate_on_the_loaded_model(run, capsys):
    status, out, err = generate_cli(
        capsys, f"run.dir={run['dir']}", f"prompt={PROMPT}", f"max_new_tokens={NEW}"
    )
    assert status == 0, err
    (tokens,) = direct(run, [PROMPT])
    assert len(tokens) == NEW  # no EOS this early: the whole budget
    assert out == run["tok"].decode(tokens) + "\n"
    assert "tokens/s" in err and f"generated {NEW} tokens" in err
    per_token = estimate(run["model"].cfg).kv_cache_bytes_per_token * 2  # a float32 cache: twice BF16's
    assert f"latent cache {per_token:,} bytes/token" in err


def test_speculative_mtp_gives_the_same_greedy_tokens(run, capsys):
    argv = (f"run.dir={run['dir']}", f"prompt={PROMPT}", f"max_new_tokens={NEW}")
    _, plain, _ = generate_cli(capsys, *argv)
    status, out, err = generate_cli(capsys, *argv, "speculative=mtp")
    assert status == 0, err
    assert out == plain
    assert "mtp: acceptance rate" in err and "accepted per step" in err


def test_prompts_file_writes_one_jsonl_line_per_prompt(run, tmp_path, capsys):
    prompts = ["import json\n", PROMPT, "class JSONDecoder(object):\n    "]  # ragged lengths
    lines = [json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")  # a blank line is skipped
    out = tmp_path / "out" / "completions.jsonl"
    status, stdout, err = generate_cli(
        capsys, f"run.dir={run['dir']}", f"prompts_file={src}", f"out={out}", f"max_new_tokens={NEW}",
        "speculative=mtp",
    )  # fmt: skip
    assert status == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["prompt"] for r in rows] == prompts
    for row, tokens in zip(rows, direct(run, prompts, speculative="none")):
        assert row["tokens"] == tokens
        assert row["completion"] == run["tok"].decode(tokens)
        assert row["finish_reason"] == ("eos" if tokens[-1] == eos_id(run["tok"]) else "length")
    assert [r["prompt_tokens"] for r in rows] == [len(run["tok"].encode(p).ids) for p in prompts]
    assert os.listdir(out.parent) == ["completions.jsonl"]  # the temporary name is gone
    assert (
        "tokens/s" in stdout and "acceptance rate" in stdout and f"wrote 3 completion(s) to {out}" in stdout
    )


def test_hf_export_gives_the_same_text_with_its_or_the_stdlib_tokenizer(run, tmp_path, capsys, monkeypatch):
    argv = (f"prompt={PROMPT}", f"max_new_tokens={NEW}")
    _, expected, _ = generate_cli(capsys, f"run.dir={run['dir']}", *argv)
    # moeforge-convert copied the run's tokenizer into the export, and generation uses it
    run_tokenizer = (run["root"] / "tokens" / "tokenizer.json").read_bytes()
    assert (run["hf"] / "tokenizer.json").read_bytes() == run_tokenizer
    status, out, err = generate_cli(capsys, f"hf_dir={run['hf']}", *argv)
    assert status == 0, err
    assert out == expected and "stdlib" not in err
    # a directory without one: the stdlib one (data/tokens/stdlib, cwd-relative) stands in
    hf = tmp_path / "hf"
    shutil.copytree(run["hf"], hf)
    (hf / "tokenizer.json").unlink()
    stdlib = tmp_path / "data" / "tokens" / "stdlib"
    stdlib.mkdir(parents=True)
    (stdlib / "tokenizer.json").write_bytes(run_tokenizer)
    monkeypatch.chdir(tmp_path)
    status, out, err = generate_cli(capsys, f"hf_dir={hf}", *argv, "speculative=mtp")
    assert status == 0, err
    assert out == expected
    assert "using the stdlib tokenizer data/tokens/stdlib/tokenizer.json" in err


@pytest.fixture(scope="module")
def s3_run(run, s3_server):
    """The module's training run again with run.dir on S3 (moto's server), written by the loop
    itself: the same config, data and seed on one thread, so its checkpoints hold the local run's
    tensors. Plus an incomplete newer checkpoint on S3 (a crashed save) that readers must pass over.
    Its tokens stay local: only run.dir is remote."""
    import boto3

    bucket = f"generate-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    run_dir = f"s3://{bucket}/run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", s3_server)  # boto3's standard way to name an S3-compatible store
        Trainer.single(_train_config(run_dir, run["root"] / "tokens"), log=lambda _line: None).train()
    s3.put_object(Bucket=bucket, Key="run/checkpoints/step_00000009/meta.json", Body=b"{")
    return run_dir


def convert_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from moeforge.jobs.convert import main as convert_main

    capsys.readouterr()
    status = convert_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_generate_and_convert_read_a_run_from_s3(run, s3_run, s3_server, tmp_path, capsys, monkeypatch):
    """moeforge-generate run.dir=s3://... and moeforge-convert checkpoint=s3://... (a run directory:
    its newest complete checkpoint) read the run on S3 -- checkpoint, manifests, config.yaml and
    through it the tokenizer -- and give what the same run read locally gives: the same text, and
    an export with the same tensors, config and tokenizer. A run.dir on S3 without a complete
    checkpoint fails in one line naming it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    # MTP drafts verified by the main model: every module of the checkpoint read from S3 is used
    argv = (f"prompt={PROMPT}", f"max_new_tokens={NEW}", "speculative=mtp")
    status, out, err = generate_cli(capsys, f"run.dir={s3_run}", *argv)
    assert status == 0, err
    (tokens,) = direct(run, [PROMPT])  # the local run's newest checkpoint
    assert out == run["tok"].decode(tokens) + "\n" and "mtp: acceptance rate" in err

    out_dir = tmp_path / "hf"
    status, stdout, err = convert_cli(capsys, f"checkpoint={s3_run}", f"out={out_dir}")
    assert status == 0, err
    assert str(out_dir) in stdout and "fp8: no" in stdout
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in run["hf"].iterdir())
    for name in ("config.json", "tokenizer.json"):  # the tokenizer found through config.yaml on S3
        assert (out_dir / name).read_bytes() == (run["hf"] / name).read_bytes(), name
    ours, theirs = load_file(out_dir / "model.safetensors"), load_file(run["hf"] / "model.safetensors")
    assert ours.keys() == theirs.keys()  # step 3's weights (step 2's differ), not the crashed step 9
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key

    empty = s3_run.rsplit("/", 1)[0] + "/no-run"
    status, out, err = generate_cli(capsys, f"run.dir={empty}", "prompt=x")
    assert status == 2 and out == ""
    assert err == (
        f"{ERROR}run.dir: {empty}: no complete checkpoint under {empty}/checkpoints "
        "(train with checkpoint.every=N to write one)\n"
    )


def test_streamed_pieces_are_whole_characters():
    tok = train_bpe(_corpus(), VOCAB)
    text = "héllo wörld — ok ✓"
    pieces: list[str] = []
    streamer = TextStreamer(tok, pieces.append)
    for token in tok.encode(text).ids:
        streamer.push(token)
    streamer.finish()
    assert "".join(pieces) == text
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)


# --- bad input: one line naming the cause, exit 2, nothing generated -----------------------------------------
def _prompts(tmp_path, text: str) -> pathlib.Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    return path


GOOD_LINE = json.dumps({"prompt": "a"})
NOT_A_STRING = json.dumps({"prompt": 3})
TORN = '{"prompt": "b'  # an interrupted write


BAD = {
    "vocabulary": (
        lambda r, t: [f"run.dir={r['dir']}", "prompt=x", f"tokenizer={r['big_tokenizer']}"],
        f"vocabulary: tokenizer {{big_tokenizer}} has {2 * VOCAB} ids, more than the model's vocab_size {VOCAB}",
    ),
    "prompt_longer_than_context": (
        lambda r, t: [f"run.dir={r['dir']}", "prompt=" + "json.dumps(value) " * 40],
        f"prompt: longer than the context: {{n}} tokens > max_position_embeddings {CONTEXT}",
    ),
    "prompt_and_new_tokens_past_context": (
        lambda r, t: [f"run.dir={r['dir']}", "prompt=import json", "max_new_tokens=100"],
        f"prompt: {{n}} token(s) + max_new_tokens 100 do not fit the context (max_position_embeddings {CONTEXT})",
    ),
    "mtp_without_mtp_modules": (
        lambda r, t: [
            f"hf_dir={r['hf_no_mtp']}",
            "prompt=x",
            f"tokenizer={r['root'] / 'tokens' / 'tokenizer.json'}",
            "speculative=mtp",
        ],
        "speculative: mtp needs MTP modules, but the model from {hf_no_mtp} has none",
    ),
    "no_complete_checkpoint": (
        lambda r, t: [f"run.dir={r['root']}", "prompt=x"],
        "run.dir: {root}: no complete checkpoint under {root}/checkpoints",
    ),
    "neither_source": (lambda r, t: ["prompt=x"], "run.dir / hf_dir: give one (run.dir="),
    "both_sources": (
        lambda r, t: [f"run.dir={r['dir']}", f"hf_dir={r['hf']}", "prompt=x"],
        "run.dir / hf_dir: give one, not both",
    ),
    "missing_prompts_file": (
        lambda r, t: [f"run.dir={r['dir']}", f"prompts_file={t / 'nope.jsonl'}", f"out={t / 'o.jsonl'}"],
        "prompts_file: {tmp}/nope.jsonl: no such file",
    ),
    "bad_jsonl_line": (
        lambda r, t: [
            f"run.dir={r['dir']}",
            f"prompts_file={_prompts(t, GOOD_LINE + chr(10) + NOT_A_STRING)}",
            f"out={t / 'o.jsonl'}",
        ],
        'prompts_file: {tmp}/prompts.jsonl:2: expected an object with a string "prompt"',
    ),
    "torn_jsonl_line": (
        lambda r, t: [
            f"run.dir={r['dir']}",
            f"prompts_file={_prompts(t, GOOD_LINE + chr(10) * 2 + TORN)}",
            f"out={t / 'o.jsonl'}",
        ],
        "prompts_file: {tmp}/prompts.jsonl:3: not valid JSON",
    ),
    "prompts_file_without_out": (
        lambda r, t: [f"run.dir={r['dir']}", f"prompts_file={_prompts(t, GOOD_LINE)}"],
        "out: required with prompts_file",
    ),
    "out_is_a_directory": (
        lambda r, t: [f"run.dir={r['dir']}", f"prompts_file={_prompts(t, GOOD_LINE)}", f"out={t}"],
        "out: {tmp} is a directory",
    ),
    "no_prompt": (lambda r, t: [f"run.dir={r['dir']}"], "prompt / prompts_file: give one"),
    "bad_speculative": (
        lambda r, t: [f"run.dir={r['dir']}", "prompt=x", "speculative=eagle"],
        "speculative: must be one of none, mtp, got 'eagle'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_before_generating_in_one_line(case, run, tmp_path, capsys):
    make_argv, expected = BAD[case]
    argv = make_argv(run, tmp_path)
    prompt = next((a.removeprefix("prompt=") for a in argv if a.startswith("prompt=")), "")
    n = len(run["tok"].encode(prompt).ids)
    expected = expected.format(
        tmp=tmp_path, n=n, **{k: v for k, v in run.items() if isinstance(v, pathlib.Path)}
    )
    status, out, err = generate_cli(capsys, *argv)
    assert status == 2
    assert out == ""  # nothing generated, nothing streamed
    assert err.startswith(ERROR) and err.count("\n") == 1, err
    assert expected in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(run, capsys):
    status, _, err = generate_cli(capsys, f"run.dir={run['dir']}", "prompt=x", "device=cuda")
    assert status == 2 and "device: cuda requested, but torch sees no CUDA GPU" in err


def test_console_entry_point_fails_in_one_line_without_traceback(run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moeforge.jobs.generate", f"run.dir={run['root']}", "prompt=x"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"{ERROR}run.dir: {run['root']}: no complete checkpoint under {run['root']}/checkpoints "
        "(train with checkpoint.every=N to write one)"
    )
