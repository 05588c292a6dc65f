"""mode=tune, split by concern: ``space`` (the checked ``tune`` section), ``trial`` (one Tune trial),
``outputs`` (best.yaml, table, plot) and ``driver`` (the sweep, and the callback that owns each trial run's status).
Only ``space`` is imported here: the rest imports Ray Tune, which a run that does not tune never needs."""
from .space import METRIC, SPACE_KEYS, Dim, TuneSettings, check_tune

__all__ = ["METRIC", "SPACE_KEYS", "Dim", "TuneSettings", "check_tune"]
