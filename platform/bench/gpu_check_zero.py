"""The zero step of gpu_check: moeforge's ZeRO-1 step against the reference loop's update.

One process, one rank (NCCL on CUDA, gloo on CPU), the tiny model in fp32 on one fixed batch: what a
single GPU can show of ZeroStep, chiefly that DeepSpeed's engine and its fp32 partition stay on the
device and that its update equals the reference's within rounding (see zero_step_check's bounds).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from moeforge.platform.bench.gpu_check_results import Results, one_rank_group
from moeforge.platform.bench.gpu_check_train import SEED, train_config

# The ZeRO check: tiny model, fp32, one fixed batch.
ZERO = {
    "gpu": {"seq_len": 128, "global_batch": 8, "steps": 6},
    "tiny": {"seq_len": 16, "global_batch": 2, "steps": 2},
}
ZERO_LR = 1.0e-2
GRAD_NORM_RTOL = 1e-5
PARAM_ATOL_PER_LR_STEP = 1e-5
PARAM_RTOL_PER_STEP = 2.0**-23  # two roundings of fp32 (2 x 2^-24)


def zero_step_check(res: Results, device, size: str, **_: Any) -> bool:
    """ZeroStep (ZeRO-1 through DeepSpeed) over a one-process group against the reference update.

    Both sides start from the same weights (drawn on CPU generators) and receive the same gradients
    each step: the ZeRO module's backward, handed to ZeroStep and, as copies, to the reference's
    clip (platform.optim.adamw) and AdamW (build_adamw, the optimizer ZeroStep hands to DeepSpeed).
    Checks, each step:
    - the module's parameters, DeepSpeed's engine and its fp32 partition stay on `device`;
    - the global gradient norm DeepSpeed computes equals the reference's within GRAD_NORM_RTOL
      (1e-5 relative): two fp32 sums of the same squares in different orders differ by rounding,
      ~1e-7 relative;
    - every parameter after step k equals the reference's within k * (PARAM_RTOL_PER_STEP * |p| +
      PARAM_ATOL_PER_LR_STEP * lr): two fp32 roundings of |p| and 1e-5 of what AdamW can move a
      parameter in a step (about lr). Given equal gradients the two updates do the same element-wise
      arithmetic; they differ only through the clip coefficient (the norm's rounding: DeepSpeed
      divides by norm / max_norm, the reference multiplies by max_norm / norm), which AdamW's
      m / sqrt(v) all but cancels, and through where p + update rounds when the updates differ in
      their last bit (one rounding of |p|: 1.2e-7 for a norm weight of 1). A wrong LR, a skipped or
      doubled step, a missing weight decay (lr * 0.1 * |p| a step, 4,000 times the relative bound)
      or a master copy not written back moves them far more;
    - the loss, on one fixed batch, falls.
    """
    import torch
    import torch.distributed as dist
    from moeforge.model.transformer import build_model
    from moeforge.platform.data.batches import BatchSource
    from moeforge.platform.data.microbatches import inputs_and_labels
    from moeforge.platform.launch.accelerator import bind_device, use_accelerator_for
    from moeforge.platform.optim.adamw import build_adamw, clip_grads_with_norm_, global_grad_norm
    from moeforge.platform.optim.lr_schedule import set_lr

    z = ZERO[size]
    use_accelerator_for(device)  # before deepspeed is imported
    device = bind_device(device)
    from moeforge.platform.engine.topology import Topology, create_process_groups
    from moeforge.platform.optim.zero_step import ZeroStep

    with tempfile.TemporaryDirectory(prefix="moeforge-gpu-check-") as tmp:
        cfg = train_config(
            "tiny",
            "fp32",
            device,
            os.path.join(tmp, "run"),
            model="tiny",
            seq_len=z["seq_len"],
            global_batch=z["global_batch"],
            microbatches=1,
            lr=ZERO_LR,
            warmup_steps=0,
        )
        with one_rank_group(device, tmp) as backend:
            groups = create_process_groups(Topology.for_schedule("single", 1, 1), 0)
            model = build_model(cfg.model, seed=SEED).to(device)
            reference = build_model(cfg.model, seed=SEED).to(device)
            start = {n: p.detach().clone() for n, p in reference.named_parameters()}
            zero = ZeroStep(
                model,
                cfg.optim,
                cfg.precision,
                groups,
                rank=0,
                zero_stage=1,
                param_copies=1,
                replicated=[],
                bucket_elements=cfg.parallel.zero_bucket_elements,
            )
            optimizer = build_adamw(reference.named_parameters(), cfg.optim, cfg.precision)
            names = {id(p): n for n, p in model.named_parameters()}
            ref_params = dict(reference.named_parameters())
            batch = BatchSource(cfg.data, cfg.model.vocab_size, cfg.model.seq_len).batch(0)
            input_ids, labels = inputs_and_labels(batch.to(device))
            res.write(
                "zero",
                "setup",
                device=str(device),
                backend=backend,
                world_size=dist.get_world_size(),
                zero_stage=1,
                params=sum(p.numel() for p in zero.params),
                lr=ZERO_LR,
                grad_norm_rtol=GRAD_NORM_RTOL,
                param_rtol_per_step=PARAM_RTOL_PER_STEP,
                param_atol_per_lr_step=PARAM_ATOL_PER_LR_STEP,
            )
            ok, losses = True, []
            for i in range(z["steps"]):
                loss = model(input_ids, labels=labels).loss
                grads = torch.autograd.grad(loss, zero.params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(zero.params, grads)]
                for p, g in zip(zero.params, grads):
                    ref_params[names[id(p)]].grad = g.detach().clone()
                ref_norm = global_grad_norm(list(ref_params.values()))
                clip_grads_with_norm_(list(ref_params.values()), ref_norm, cfg.optim.grad_clip)
                set_lr(optimizer, ZERO_LR)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                norm = zero.step({id(p): g for p, g in zip(zero.params, grads)}, ZERO_LR)
                del grads
                losses.append(float(loss.detach()))
                steps = i + 1
                with torch.no_grad():  # the largest |difference| / its bound, over every element
                    diff, ratio = 0.0, 0.0
                    for n, p in model.named_parameters():
                        want = ref_params[n]
                        gap = (p - want).abs()
                        bound = steps * (PARAM_RTOL_PER_STEP * want.abs() + PARAM_ATOL_PER_LR_STEP * ZERO_LR)
                        diff, ratio = max(diff, float(gap.max())), max(ratio, float((gap / bound).max()))
                    moved = max(float((ref_params[n] - start[n]).abs().max()) for n in start)
                where = {str(p.device) for p in model.parameters()}
                where |= {str(t.device) for t in zero.optimizer.single_partition_of_fp32_groups}
                where.add(str(zero.engine.device))
                on_device = where == {str(device)}
                norm_rel = abs(norm - float(ref_norm)) / max(float(ref_norm), 1e-30)
                passed = on_device and norm_rel <= GRAD_NORM_RTOL and ratio <= 1.0
                ok = ok and passed
                res.write(
                    "zero",
                    "step",
                    iteration=steps,
                    loss=losses[-1],
                    grad_norm=norm,
                    grad_norm_reference=float(ref_norm),
                    grad_norm_rel_diff=norm_rel,
                    max_param_diff=diff,
                    param_diff_over_bound=ratio,
                    max_param_moved=moved,
                    devices=sorted(where),
                    on_device=on_device,
                    passed=passed,
                )
            with torch.no_grad():
                final = float(model(input_ids, labels=labels).loss)
            falls = final < losses[0]
            res.write("zero", "loss", first_loss=losses[0], final_loss=final, passed=falls)
            return ok and falls
