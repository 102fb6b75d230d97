"""What DeepSpeed does the first time a process initialises its communication, done on import.

`deepspeed.comm.init_distributed` on the CPU accelerator first probes every op builder's
compatibility (compiler test programs, seconds of CPU) and then loads its shared-memory
communication op, JIT-built once per machine. `local_spawn`'s forkserver imports this module before
it forks any rank, so each forked rank inherits both results instead of paying for them again. The
server has started no thread pool by then, so the fork stays safe.
"""

from __future__ import annotations

import deepspeed.ops
from deepspeed.comm.torch import build_shm_op

deepspeed.ops.__compatible_ops__  # noqa: B018 -- the probe runs on first access and is cached
build_shm_op()  # cached by DeepSpeed's op builders for the rest of the process (and its forks)
