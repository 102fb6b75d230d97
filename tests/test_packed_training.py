"""Training on packed conversations: masked labels, documents isolated inside a row, and the step's
loss as the mean over every trained label of the global batch, in the model and both step engines.

Batches are built here (`packed_rows`, seeded): each row holds one to three documents, each a
masked turn then a trained turn, followed by padding of its own segment, so rows (and so
micro-batches) train different numbers of labels."""

from __future__ import annotations

import pytest
import torch
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import IGNORE_INDEX, build_model, mtp_targets
from moeforge.platform.config import TrainConfig
from moeforge.platform.data.microbatches import (
    PackedBatch,
    loss_scale,
    microbatch_inputs,
    model_inputs,
    replica_batch,
    target_counts,
)
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import run_pipeline_training
from moeforge.platform.train.single import SingleProcessEngine
from pipeline_cases import (
    assert_matches_reference,
    dump_grads,
    max_relative_difference,
    pipeline_config,
    pipeline_record,
    read_metrics,
    reference_run,
    relative_difference,
    tiny_model,
)

SEQ_LEN = 32
FP32_RTOL = 1e-5  # relative: the same math in another kernel or summation order


def packed_rows(gen: torch.Generator, rows: int, seq_len: int, vocab: int) -> PackedBatch:
    """`rows` rows of seq_len + 1 tokens: 1-3 documents (a masked turn, then a trained turn) and
    the padding after them (id 0, a segment of its own, never trained)."""
    width = seq_len + 1
    tokens = torch.randint(1, vocab, (rows, width), generator=gen)
    loss_mask = torch.zeros(rows, width, dtype=torch.bool)
    segments = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        used = int(torch.randint(width // 3, width + 1, (1,), generator=gen))  # tokens in documents
        docs = int(torch.randint(1, 4, (1,), generator=gen))
        cuts = (torch.randperm(used // 2 - 1, generator=gen)[: docs - 1] + 1) * 2  # documents >= 2 long
        bounds = [0, *sorted(int(c) for c in cuts), used]
        for d in range(len(bounds) - 1):
            start, end = bounds[d], bounds[d + 1]
            segments[r, start:end] = d
            answer = int(torch.randint(start + 1, end, (1,), generator=gen))  # the trained turn's start
            loss_mask[r, answer:end] = True
        segments[r, used:] = len(bounds) - 1
        tokens[r, used:] = 0
    return PackedBatch(tokens, loss_mask, segments)


class PackedSource:
    """A BatchSource of packed rows: step s's global batch (held-out batch i's) from its own seeded
    generator, dp replica r's rows its contiguous block (as the default source cuts them)."""

    has_val = True

    def __init__(self, global_batch: int, seq_len: int, vocab_size: int) -> None:
        self.global_batch, self.seq_len, self.vocab_size = global_batch, seq_len, vocab_size

    def _rows(self, seed: int, dp_rank: int, dp_size: int) -> PackedBatch:
        full = packed_rows(
            torch.Generator().manual_seed(seed), self.global_batch, self.seq_len, self.vocab_size
        )
        per = self.global_batch // dp_size
        rows = slice(dp_rank * per, (dp_rank + 1) * per)
        return PackedBatch(full.tokens[rows], full.loss_mask[rows], full.segments[rows])

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> PackedBatch:
        return self._rows(500 + step, dp_rank, dp_size)

    def val_batch(self, i: int, dp_rank: int = 0, dp_size: int = 1) -> PackedBatch:
        return self._rows(900 + i, dp_rank, dp_size)


def _source(cfg: TrainConfig) -> PackedSource:
    return PackedSource(cfg.data.global_batch, cfg.model.seq_len, cfg.model.vocab_size)


def _model(**changes):
    return build_model(ModelConfig(**tiny_model(**changes)), seed=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --- labels ---------------------------------------------------------------------------------------------


def test_labels_follow_the_loss_mask_and_stop_at_documents():
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2]])
    mb = model_inputs(PackedBatch(tokens, mask, segments))
    # position 3's target (9) is trained but begins the next document
    assert mb.labels.tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert mb.segments.tolist() == [[0, 0, 0, 0, 1, 1, 2]] and mb.label_count == 3
    # MTP depth 1 predicts labels[i + 1] from position i: position 3's (10) is in the next document
    assert mtp_targets(mb.labels, 1, mb.segments).tolist() == [[7, 8] + [IGNORE_INDEX] * 5]
    plain = model_inputs(tokens)
    assert torch.equal(plain.labels, tokens[:, 1:]) and plain.segments is None and plain.label_count == 7


def test_loss_scales_are_token_shares():
    assert [loss_scale(7, 21) for _ in range(3)] == [1 / 3] * 3  # equal counts: exactly 1/M
    assert [loss_scale(n, 8, replicas=2) for n in (1, 3)] == [0.25, 0.75]  # dp * n_m / N
    assert loss_scale(0, 0) == 0.0
    source = PackedSource(8, SEQ_LEN, 64)
    whole = target_counts(source.batch(3), mtp_depths=1)
    rows, totals = replica_batch(lambda r, n: source.batch(3, r, n), 1, 4, mtp_depths=1)
    assert torch.equal(rows.tokens, source.batch(3).tokens[2:4])
    assert totals == whole  # every replica counts the whole global batch, LM labels and MTP targets
    microbatches = microbatch_inputs(rows, 2, totals, replicas=4, mtp_depths=1)
    for mb in microbatches:
        n, n_mtp = mb.label_count, int((mtp_targets(mb.labels, 1, mb.segments) != IGNORE_INDEX).sum())
        assert n > 0 and mb.loss_scale == 4 * n / totals[0]
        assert mb.mtp_scales == pytest.approx([(n_mtp / totals[1]) / (n / totals[0])], rel=1e-12)


def test_plain_text_trains_every_label():
    def plain(dp_size: int) -> torch.Tensor:
        return torch.zeros(8 // dp_size, SEQ_LEN + 1, dtype=torch.long)

    # from the shape alone: every label, and every MTP target but the last of each row
    assert replica_batch(lambda r, n: plain(n), 1, 4, mtp_depths=1)[1] == (8 * SEQ_LEN, 8 * (SEQ_LEN - 1))
    microbatches = microbatch_inputs(plain(1), 4, mtp_depths=1)
    assert [mb.loss_scale for mb in microbatches] == [1.0 / 4] * 4  # the uniform 1/M, bit for bit
    assert all(mb.mtp_scales is None and mb.segments is None for mb in microbatches)


# --- the model ------------------------------------------------------------------------------------------


def test_masked_labels_contribute_no_gradient():
    """The LM loss has zero gradient at every position whose label is masked; the targets nothing
    trains on (a masked last token, padding) can change without moving the loss or any gradient.
    The balance loss (over every token of a row, padding included) is off here."""
    model = _model(seq_aux_loss_alpha=0.0)
    width = SEQ_LEN + 1
    tokens = torch.randint(1, 4096, (2, width), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 16 + [1] * 17, [0] * 20 + [1] * 13])
    mask = torch.zeros(2, width, dtype=torch.bool)
    mask[0, 8:16] = mask[0, 24:32] = True  # row 0's last token is a masked target only
    mask[1, 10:20] = True  # row 1 ends in padding
    tokens[1, 20:] = 0

    def run(tokens: torch.Tensor):
        mb = model_inputs(PackedBatch(tokens, mask, segments))
        model.zero_grad(set_to_none=True)
        out = model(mb.input_ids, labels=mb.labels, segments=mb.segments)
        (logits_grad,) = torch.autograd.grad(out.lm_loss, out.logits, retain_graph=True)
        out.loss.backward()
        return mb, out, logits_grad, _grads(model)

    mb, out, logits_grad, grads = run(tokens)
    masked = mb.labels == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert torch.all(logits_grad[masked] == 0)
    assert torch.all(logits_grad[~masked].abs().amax(dim=-1) > 0)

    changed = tokens.clone()
    changed[0, -1] = 17
    changed[1, 20:] = 23
    _, out2, _, grads2 = run(changed)
    assert relative_difference(out2.loss.detach(), out.loss.detach()) <= FP32_RTOL
    worst, name = max_relative_difference(grads2, grads, "gradient of")
    assert worst <= FP32_RTOL, (name, worst)

    # the same change of a trained last token moves the loss: the comparison above can fail
    mask[0, -1] = True
    _, trained, _, trained_grads = run(tokens)
    _, trained2, _, trained_grads2 = run(changed)
    assert relative_difference(trained2.loss.detach(), trained.loss.detach()) > 10 * FP32_RTOL
    assert max_relative_difference(trained_grads2, trained_grads, "gradient of")[0] > 1e-2


def test_documents_in_a_row_do_not_see_each_other():
    """Document B after document A in one row: its logits do not depend on A, equal B's alone at
    position 0, and the row's LM and MTP losses are the token-weighted sums of A's and B's alone
    (MTP's targets stop at the boundary)."""
    model = _model()
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(1, 4096, (12,), generator=gen), torch.randint(1, 4096, (21,), generator=gen)
    segments = torch.tensor([[0] * 12 + [1] * 21])
    mask = torch.ones(1, SEQ_LEN + 1, dtype=torch.bool)

    def packed(first: torch.Tensor):
        mb = model_inputs(PackedBatch(torch.cat((first, b))[None], mask, segments))
        return model(mb.input_ids, labels=mb.labels, segments=mb.segments), mb

    with torch.no_grad():
        row, mb = packed(a)
        other, _ = packed(torch.randint(1, 4096, (12,), generator=gen))
        alone_a = model(a[None, :-1], labels=a[None, 1:])
        alone_b = model(b[None, :-1], labels=b[None, 1:])
        unsegmented = model(mb.input_ids)
    assert relative_difference(other.logits[0, 12:], row.logits[0, 12:]) <= FP32_RTOL
    assert relative_difference(row.logits[0, 12:], alone_b.logits[0]) <= FP32_RTOL
    assert relative_difference(row.logits[0, :11], alone_a.logits[0]) <= FP32_RTOL
    # without segments, B attends A and sits at positions 12..: its logits differ
    assert relative_difference(unsegmented.logits[0, 12:], alone_b.logits[0]) > 1e-3

    assert mb.label_count == 11 + 20
    lm = (alone_a.lm_loss * 11 + alone_b.lm_loss * 20) / 31
    mtp = (alone_a.mtp_loss * 10 + alone_b.mtp_loss * 19) / 29  # depth 1: one target fewer per document
    assert relative_difference(row.lm_loss, lm) <= FP32_RTOL
    assert relative_difference(row.mtp_loss, mtp) <= FP32_RTOL


# --- the one-process step -------------------------------------------------------------------------------


def _engine(tmp_path, microbatches: int) -> SingleProcessEngine:
    raw = pipeline_config(tmp_path / f"m{microbatches}", "single", 1, 1, microbatches, 0)
    raw["parallel"] = {"schedule": "single", "microbatches": microbatches}
    cfg = TrainConfig.from_dict(raw)
    return SingleProcessEngine(cfg, _source(cfg), log=lambda _line: None)


def test_step_gradient_does_not_depend_on_the_microbatch_split(tmp_path):
    """The same global batch in 1, 2 or 4 micro-batches gives the same step gradient and losses:
    each micro-batch weighted by its share of the batch's trained labels. Averaging per-micro-batch
    means instead weights the labels of sparse micro-batches up, and moves the gradient."""
    batch = PackedSource(8, SEQ_LEN, 4096).batch(0)
    counts = [mb.label_count for mb in microbatch_inputs(batch, 4)]
    assert len(set(counts)) > 1, counts
    grads, losses = {}, {}
    for m in (1, 2, 4):
        engine = _engine(tmp_path, m)
        losses[m] = engine.forward_backward(batch)
        grads[m] = _grads(engine.model)
    for m in (2, 4):
        worst, name = max_relative_difference(grads[m], grads[1], "gradient of")
        assert worst <= FP32_RTOL, (m, name, worst)
        for key in ("loss", "lm_loss", "mtp_loss"):
            assert losses[m][key] == pytest.approx(losses[1][key], rel=FP32_RTOL), (m, key)

    engine.model.zero_grad(set_to_none=True)  # the 4-micro-batch engine, as a naive loop would run it
    for mb in microbatch_inputs(batch, 4):
        out = engine.model(mb.input_ids, labels=mb.labels, segments=mb.segments)
        (out.loss / 4).backward()
    worst, name = max_relative_difference(_grads(engine.model), grads[1], "gradient of")
    assert worst > 1e-2, (name, worst)


# --- a pipeline run -------------------------------------------------------------------------------------


class _PackedLoop(SingleProcessEngine):
    """The one-process loop on `PackedSource` (reference_run hands it the config's default source)."""

    def __init__(self, cfg, source, log=print, storage=None) -> None:
        super().__init__(cfg, _source(cfg), log, storage)


def _train_packed(rank: int, world_size: int, raw: dict):
    cfg = TrainConfig.from_dict(raw)
    return run_pipeline_training(cfg, rank, world_size, log=lambda _line: None, source=_source(cfg))


def test_pipeline_on_packed_rows_matches_the_loop(tmp_path, monkeypatch):
    """DualPipeV pp=2 x dp=2 x ep=2, overlapped phase programs: rank 1 holds only middle stages
    (1 and 2), whose attention needs the segments; each replica's micro-batches weigh dp * n_m / N.
    Losses, grad norms, step-1 gradients and parameters match the one-process loop, and so does the
    held-out evaluation after the last step."""
    dump_grads(monkeypatch)
    raw = pipeline_config(tmp_path / "run", "dualpipev", 2, 2, 4, 0, ep=2, chunk_phases=True, overlap=True)
    raw["run"].update(eval_every=2, eval_batches=1)
    spawn_gloo(_train_packed, 4, (raw,))
    record = pipeline_record(tmp_path / "run")
    reference = reference_run(raw, tmp_path / "reference", _PackedLoop)
    assert_matches_reference(record, reference, label="packed dualpipev pp=2 dp=2 ep=2 overlap")
    pipe, ref = read_metrics(tmp_path / "run")[-1], read_metrics(tmp_path / "reference")[-1]
    for key in ("eval_loss", "eval_objective"):
        assert pipe[key] == pytest.approx(ref[key], rel=FP32_RTOL), key
