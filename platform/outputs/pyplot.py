"""matplotlib's pyplot as every run output draws with it: the headless Agg backend (workers and CI
have no display), and without the INFO line "generated new fontManager" that matplotlib logs when
it builds its font cache. Ray workers log at INFO, so without the filter that line would reach the
run's output wherever the cache is built (the first plot on a machine, or each one where the cache
directory is not writable). Import `plt` from here, never matplotlib.pyplot directly."""

from __future__ import annotations

import matplotlib
from moeforge.platform.outputs.log_filters import drop_log_message

matplotlib.use("Agg")
# set before pyplot imports the font manager, which is when the cache is built and the line logged
drop_log_message("matplotlib.font_manager", "generated new fontManager")

import matplotlib.pyplot as plt

__all__ = ["plt"]
