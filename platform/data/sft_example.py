"""`moeforge-prepare example=sft output=<dir>`: a small, self-contained supervised fine-tuning example.

    <dir>/model/               a random DeepSeek-V3 model of the tiny family in the Hugging Face layout
                               (config.json, model.safetensors), with its tokenizer.json and a
                               tokenizer_config.json whose chat_template the conversations are rendered with
    <dir>/conversations.jsonl  synthetic conversations: arithmetic and string tasks from a seeded RNG,
                               some with a system message, a tool turn or a second exchange
    <dir>/tokens/              those conversations packed for the model's seq_len (format=conversations)

Everything is made here, on the CPU, in seconds; nothing is downloaded. The tokenizer is a byte-level
BPE trained (train_bpe) on a few KB of the conversations' text, with the chat template's special
tokens added. The same output and seed give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
from collections.abc import Callable

from moeforge.model.config import ModelConfig
from moeforge.platform.config.builder import ConfigError, build_config
from moeforge.platform.config.presets import preset_values
from moeforge.platform.data.chat_template import CONFIG_FILE
from moeforge.platform.data.prepare import TOKENIZER_FILE, PrepareConfig, PrepareResult, prepare
from moeforge.platform.data.tokenizer import EOS, train_bpe
from moeforge.platform.outputs.storage import is_s3

CONVERSATIONS = 300
BPE_VOCAB = 512  # an upper bound: a few KB of text supply fewer merges
BPE_TRAIN_BYTES = 6000
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
# ChatML without newlines between turns: an answer's trained tokens end with TURN_END, where
# generation stops (config.json's eos_token_id).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_WORDS = (
    "apple", "banana", "cherry", "planet", "river", "window", "garden", "silver", "rocket", "violin",
    "pencil", "marble", "forest", "candle", "tiger", "orange", "puzzle", "mirror", "cactus", "harbor",
    "lemon", "falcon", "meadow", "copper", "island",
)
_SYSTEM = ("You are a careful assistant. Answer briefly.", "You answer with the result only.")


def _task(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair."""
    kind = rng.randrange(5)
    a, b = rng.randrange(2, 100), rng.randrange(2, 100)
    word = rng.choice(_WORDS)
    if kind == 0:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."
    if kind == 2:
        return f"Reverse the word {word}.", word[::-1]
    if kind == 3:
        return f"Write {word} in capitals.", word.upper()
    return f"How many letters are in {word}?", f"{word} has {len(word)} letters."


def synthetic_conversations(count: int = CONVERSATIONS, seed: int = 1234) -> list[dict]:
    """`count` records {"messages": [...]}, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(_SYSTEM)}] if rng.random() < 0.3 else []
        shape = rng.random()
        if shape < 0.15:  # the answer comes from a tool, whose output is context, not a target
            a, b = rng.randrange(2, 30), rng.randrange(2, 30)
            messages += [
                {"role": "user", "content": f"What is {a} * {b}?"},
                {"role": "assistant", "content": f"calc({a} * {b})"},
                {"role": "tool", "content": str(a * b)},
                {"role": "assistant", "content": f"{a} * {b} = {a * b}."},
            ]
        else:
            for _ in range(2 if shape > 0.75 else 1):
                question, answer = _task(rng)
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def example_tokenizer(conversations: list[dict]):
    """A byte-level BPE trained on the first few KB of the messages' text, plus the turn markers as
    special tokens (added last, so they are the highest ids)."""
    texts, size = [], 0
    for record in conversations:
        for message in record["messages"]:
            texts.append(f"{message['role']}\n{message['content']}")
            size += len(texts[-1])
        if size >= BPE_TRAIN_BYTES:
            break
    tok = train_bpe(texts, BPE_VOCAB)
    tok.add_special_tokens([TURN_START, TURN_END])
    return tok


def tokenizer_config(seq_len: int) -> dict:
    """tokenizer_config.json in the Hugging Face layout, with the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": TURN_END,
        "pad_token": EOS,
        "model_max_length": seq_len,
    }


def _write_model(model_dir: str, vocab_size: int, eos_token_id: int, seed: int) -> ModelConfig:
    """A random model of the tiny family (conf/model/tiny.yaml) with the tokenizer's vocabulary."""
    from moeforge.model.hf import hf_config_dict, hf_state_tensors, write_hf_directory
    from moeforge.model.transformer import build_model

    values = preset_values("model", "tiny")
    # A short run wants a faster router bias than V3's (see conf/experiment/tiny_cpu_single.yaml).
    cfg = build_config(ModelConfig, {**values, "vocab_size": vocab_size, "bias_update_speed": 0.01}, "model")
    model = build_model(cfg, seed=seed)
    config = {**hf_config_dict(cfg), "eos_token_id": eos_token_id}
    write_hf_directory(hf_state_tensors(model), config, model_dir)
    return cfg


def write_sft_example(cfg: PrepareConfig, log: Callable[[str], None] = print) -> PrepareResult:
    """Write the example into cfg.output (see the module docstring) and print how to fine-tune on it.
    cfg's seed, val_fraction, shard size and Ray settings apply; the example sets the rest."""
    if is_s3(cfg.output):
        raise ConfigError("output: example=sft writes a local directory (init.from=hf: reads a local model)")
    root = os.path.abspath(cfg.output)
    model_dir, tokens_dir = os.path.join(root, "model"), os.path.join(root, "tokens")
    data_path = os.path.join(root, "conversations.jsonl")
    os.makedirs(model_dir, exist_ok=True)

    conversations = synthetic_conversations(CONVERSATIONS, cfg.seed)
    with open(data_path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in conversations)
    tok = example_tokenizer(conversations)
    seq_len = int(preset_values("model", "tiny")["seq_len"])
    tok.save(os.path.join(model_dir, TOKENIZER_FILE))
    with open(os.path.join(model_dir, CONFIG_FILE), "w") as f:
        json.dump(tokenizer_config(seq_len), f, indent=2)
    model_cfg = _write_model(model_dir, tok.get_vocab_size(), tok.token_to_id(TURN_END), cfg.seed)
    log(f"prepare: example sft: {len(conversations)} conversations -> {data_path}")
    log(f"prepare: example sft: random tiny DeepSeek-V3 ({model_cfg.vocab_size} ids, seq_len {model_cfg.seq_len}) "
        f"and its tokenizer with a chat template -> {model_dir}")

    packed = dataclasses.replace(
        cfg, example=None, format="conversations", inputs=[data_path], output=tokens_dir,
        tokenizer=os.path.join(model_dir, TOKENIZER_FILE), seq_len=model_cfg.seq_len,
    )
    result = prepare(packed, log)
    # conf/experiment/sft_tiny_cpu.yaml, with this output's paths
    command = ["moeforge-train", "experiment=sft_tiny_cpu", f"init.from=hf:{model_dir}",
               f"data.path={tokens_dir}", f"run.dir={os.path.join(root, 'run')}"]
    log("prepare: example sft: fine-tune with:")
    log(f"  {shlex.join(command)}")
    return result
