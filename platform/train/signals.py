"""`on_stop_signals(handler)`: the one place a run installs its Ctrl-C and SIGTERM handler.

Both ways a run waits to stop use it: the Trainer notes the signal and stops at the next step
boundary (`platform.train.trainer.Trainer`), and a Ray driver writes run.dir/STOP for its workers
(`platform.launch.ray_train.stop_file_on_signal`). Python delivers signals only to the main thread, so
elsewhere the block runs without a handler.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Run the block with `handler` for SIGINT and SIGTERM (main thread only), then restore the
    handlers that were there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
