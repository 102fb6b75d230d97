"""DeepSpeed's accelerator and device, taken from the device a process trains on.

DeepSpeed chooses one accelerator per process, once: the first `get_accelerator()` reads
DS_ACCELERATOR (or auto-detects), and `import deepspeed` itself makes that call (its op builders
are bound to the accelerator at import), so the choice must be made before anything imports
deepspeed. The accelerator decides where DeepSpeed's engine puts the module and ZeRO its buffers
(the CPU accelerator moves everything to the CPU whatever the worker's device) and which
communication backend it uses, so it must follow the worker's device: "cuda" for a CUDA device,
"cpu" for anything else.

A DS_ACCELERATOR that contradicts the device is refused, not overridden: it has no correct use
here (a CPU accelerator on a CUDA worker puts ZeRO's collectives on CPU tensors over NCCL groups,
and the reverse asks for a GPU the worker does not train on), and an environment that sets it
usually is not the one the run was meant for (a stale export, a CPU node image), which is worth
knowing before the run starts rather than after a silent fix.

On a CUDA device DeepSpeed picks its GPU from LOCAL_RANK and puts ZeRO's buffers on the current
CUDA device, while moeforge trains on the device Ray Train assigned; with several GPUs on a node
the two need not agree (Ray's device index is not the worker's local rank). `bind_device` makes
them one device.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

import torch

ACCELERATOR_ENV = "DS_ACCELERATOR"


class AcceleratorError(RuntimeError):
    """DeepSpeed's accelerator cannot be the one this process's device needs."""


def accelerator_for(device: torch.device | str) -> str:
    """The DeepSpeed accelerator for training on `device`: "cuda" for a CUDA device, else "cpu"."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def resolved_accelerator() -> str | None:
    """The accelerator DeepSpeed has already chosen in this process, or None when it has not
    (read from its module without importing deepspeed, which would make the choice)."""
    module = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(module, "ds_accelerator", None) if module is not None else None
    return None if chosen is None else chosen.device_name()


def use_accelerator_for(device: torch.device | str, environ: MutableMapping[str, str] | None = None) -> str:
    """Set DS_ACCELERATOR for training on `device` and return it. Call before deepspeed is
    imported. Raises AcceleratorError when the environment's DS_ACCELERATOR says otherwise, or
    when DeepSpeed already chose another accelerator in this process."""
    environ = os.environ if environ is None else environ
    want = accelerator_for(device)
    given = environ.get(ACCELERATOR_ENV)
    if given is not None and given != want:
        raise AcceleratorError(
            f"{ACCELERATOR_ENV}={given} contradicts this worker's device {torch.device(device)}, which "
            f"needs DeepSpeed's {want!r} accelerator: unset {ACCELERATOR_ENV} (moeforge sets it from "
            "the device, resources.gpus_per_worker)"
        )
    environ[ACCELERATOR_ENV] = want
    chosen = resolved_accelerator()
    if chosen is not None and chosen != want:
        raise AcceleratorError(
            f"DeepSpeed already chose its {chosen!r} accelerator in this process, but this worker trains "
            f"on {torch.device(device)} and needs {want!r}: something imported deepspeed before the "
            "device was chosen"
        )
    return want


def bind_device(device: torch.device | str, environ: MutableMapping[str, str] | None = None) -> torch.device:
    """Make `device` the process's device for DeepSpeed as well: on CUDA, the current CUDA device
    (where ZeRO allocates) and LOCAL_RANK (the index DeepSpeed's engine takes its device from).
    A CPU device changes nothing. Returns the device with its index."""
    environ = os.environ if environ is None else environ
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    environ["LOCAL_RANK"] = str(device.index)
    return device


def init_deepspeed_comm() -> None:
    """Create DeepSpeed's communication backend over the process group already set up, once per
    process (`deepspeed.initialize` and the engine find it). Every caller goes through here.

    On the CPU accelerator DeepSpeed would first JIT-build its shared-memory op, which serves only
    `inference_all_reduce`, a call training never makes; ZeRO's collectives go to the process group
    either way. The op is marked unavailable instead (`skip_shm_comm_op`): no C++ compile on a fresh
    machine, and none again whenever another `ninja` on the PATH finds the last build's log."""
    from deepspeed import comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    if ds_comm.is_initialized():
        return
    skip_shm_comm_op()
    ds_comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)


def skip_shm_comm_op() -> None:
    """Mark DeepSpeed's shared-memory comm op unavailable in this process (and the processes it
    forks), so that creating the comm backend neither builds nor loads it. DeepSpeed keeps one dict
    of compatible ops per process for this purpose; accelerators without the op change nothing."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def deepspeed_devices() -> tuple[torch.device, torch.device]:
    """Where DeepSpeed will put things in this process: the engine's device (from LOCAL_RANK) and
    the device ZeRO allocates its buffers on (the accelerator's current device)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    engine = accelerator.device_name(local_rank) if local_rank >= 0 else accelerator.device_name()
    return torch.device(engine), torch.device(accelerator.current_device_name())
