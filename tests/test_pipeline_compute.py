"""ModelCompute (one process): the B/W split defers the GEMM weight gradients to W, and B + W give
exactly the gradients of one ordinary backward; two chunks of one rank share the embedding."""

from __future__ import annotations

import torch
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import build_model
from moeforge.platform.config.builder import build_config
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.engine.stages import MicroBatch, ModelCompute, StageChunk, build_rank, split_layers
from moeforge.platform.precision import apply_precision
from pipeline_cases import tiny_model


def _setup(num_stages: int, stages: list[int]):
    cfg = build_config(ModelConfig, tiny_model(seq_len=16), "model")
    specs = split_layers(cfg.num_hidden_layers, num_stages)
    model, module = build_rank(cfg, [specs[s] for s in stages], seed=3)
    apply_precision(module, PrecisionConfig())
    chunks = {c: StageChunk(model, specs[s], module) for c, s in enumerate(stages)}
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1))
    return cfg, module, chunks, MicroBatch(tokens[:, :-1], tokens[:, 1:])


def test_split_backward_defers_gemm_weight_grads_and_matches_full_backward():
    cfg, module, chunks, batch = _setup(1, [0])
    compute = ModelCompute(chunks, loss_scale=0.5)
    compute.start_step([batch])
    assert compute.forward(0, 0, None) is None  # the last stage keeps its loss
    assert compute.backward_input(0, 0, None) is None  # the first stage has no input gradient
    q_a = module.layers["1"].self_attn.q_a_proj.weight
    norm = module.norm.weight
    assert id(q_a) not in compute.param_grads and q_a.grad is None  # deferred to W
    assert id(norm) in compute.param_grads  # non-GEMM parameters get theirs in B
    compute.backward_weight(0, 0)
    grads = compute.take_grads()
    assert q_a.grad is None  # collected into the returned dict

    ref = apply_precision(build_model(cfg, seed=3), PrecisionConfig())
    (ref(batch.input_ids, labels=batch.labels).loss * 0.5).backward()
    params = dict(module.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[id(params[name])], p.grad, rtol=1e-5, atol=1e-9, msg=name)
    assert compute.losses[0]["loss"] > 0


def test_two_chunks_share_the_embedding_and_pass_gradients():
    """DualPipe pp=2, rank 0: chunk 0 = stage 0 (embedding), chunk 1 = stage 1 (head + MTP, which
    reads the same embedding Parameter). Chaining them by hand equals the full model."""
    cfg, module, chunks, batch = _setup(2, [0, 1])
    compute = ModelCompute(chunks, loss_scale=1.0)
    assert sum(1 for p in compute.params if p is module.embed.weight) == 1
    compute.start_step([batch])
    h = compute.forward(0, 0, None)
    assert compute.forward(1, 0, h) is None
    grad_h = compute.backward_full(1, 0, None)
    assert compute.backward_input(0, 0, grad_h) is None
    compute.backward_weight(0, 0)
    grads = compute.take_grads()
    ref = apply_precision(build_model(cfg, seed=3), PrecisionConfig())
    ref(batch.input_ids, labels=batch.labels).loss.backward()
    torch.testing.assert_close(grads[id(module.embed.weight)], ref.embed.weight.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[id(module.head.weight)], ref.head.weight.grad, rtol=1e-5, atol=1e-9)
