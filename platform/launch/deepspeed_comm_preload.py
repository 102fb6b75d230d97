"""What DeepSpeed does the first time a process initialises its communication, done on import.

`deepspeed.comm.init_distributed` on the CPU accelerator first probes every op builder's
compatibility (compiler test programs) and then looks for its shared-memory communication op,
which training does not use (`accelerator.skip_shm_comm_op`). `local_spawn`'s forkserver imports
this module before it forks any rank, so each forked rank inherits the probe's result and the
skipped op instead of doing either again. The server has started no thread pool by then, so the
fork stays safe.
"""

from __future__ import annotations

from moeforge.platform.launch.accelerator import skip_shm_comm_op

skip_shm_comm_op()  # runs DeepSpeed's probe (cached for this process and its forks), then marks the op
