"""Stage splitting: layer ranges, rank modules named like the full model, chained stages = full model."""

from __future__ import annotations

import importlib.resources

import pytest
import torch
import yaml
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import build_model
from moeforge.platform.config.builder import ConfigError, build_config
from moeforge.platform.engine.stages import StageChunk, build_rank, split_layers
from moeforge.platform.engine.topology import Topology


def tiny_cfg(**changes) -> ModelConfig:
    text = importlib.resources.files("moeforge.conf").joinpath("model/tiny.yaml").read_text()
    values = yaml.safe_load(text)
    values.pop("arch", None)
    values.update(seq_len=16, **changes)
    return build_config(ModelConfig, values, "model")


def test_split_even_and_explicit():
    specs = split_layers(4, 2)
    assert [list(s.layers) for s in specs] == [[0, 1], [2, 3]]
    assert [(s.first, s.last) for s in specs] == [(True, False), (False, True)]
    specs = split_layers(5, 3, [1, 3, 1])
    assert [list(s.layers) for s in specs] == [[0], [1, 2, 3], [4]]
    assert split_layers(3, 1)[0].first and split_layers(3, 1)[0].last


@pytest.mark.parametrize(
    "args, field",
    [((5, 2, None), "layers_per_stage"), ((4, 2, [1, 2]), "sums to"), ((4, 2, [4]), "needs 2 entries")],
)
def test_split_errors_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        split_layers(*args)


@pytest.mark.parametrize("schedule, pp", [("1f1b", 4), ("dualpipe", 2), ("dualpipe", 4), ("dualpipev", 2)])
def test_chained_stages_equal_full_model(schedule, pp):
    """Every rank's modules, built alone, carry the full model's names and values; running the
    stages in order reproduces the full model's loss and its gradients."""
    cfg = tiny_cfg()
    topo = Topology.for_schedule(schedule, pp, 1, tied_embedding=True)
    specs = split_layers(cfg.num_hidden_layers, topo.num_stages)
    full = build_model(cfg, seed=7)
    full_params = dict(full.named_parameters())
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    ref = full(ids, labels=labels)
    ref.loss.backward()

    chunk_of_stage = {}
    for r in range(pp):
        stages = topo.stages_of(r)
        model, rank_module = build_rank(cfg, [specs[s] for s in stages], seed=7)
        for name, p in rank_module.named_parameters():
            assert torch.equal(p, full_params[name]), name
        # DualPipe: the two ranks of a pair hold the same parameter names in the same order.
        if schedule == "dualpipe":
            names = [n for n, _ in rank_module.named_parameters()]
            _, other = build_rank(cfg, [specs[s] for s in topo.stages_of(pp - 1 - r)], seed=7)
            assert names == [n for n, _ in other.named_parameters()]
        for s in stages:
            chunk_of_stage.setdefault(s, (StageChunk(model, specs[s], rank_module), rank_module))

    h = None
    for s in range(topo.num_stages):
        chunk, _ = chunk_of_stage[s]
        h = chunk.forward(h, ids, labels)
    torch.testing.assert_close(h.loss, ref.loss, rtol=1e-6, atol=0)
    h.loss.backward()
    grads: dict[str, torch.Tensor] = {}
    for s in range(topo.num_stages):
        _, rank_module = chunk_of_stage[s]
        for name, p in rank_module.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad  # a Parameter shared by two chunks of a rank has one grad
    # The embedding copy on a separate last-stage rank gets only its MTP share: sum the copies.
    embeds = {
        id(rm.embed.weight): rm.embed.weight.grad for _, rm in chunk_of_stage.values() if hasattr(rm, "embed")
    }
    grads["embed.weight"] = sum(g for g in embeds.values() if g is not None)
    for name, p in full.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-8, msg=name)
