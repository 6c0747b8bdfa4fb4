"""``comol sweep``: a results table (methods x datasets, mean ± std over seeds) from one command.

- :mod:`~comol.sweep.plan`: configs x grid points x seeds as picklable :class:`RunSpec` objects, checked.
- :mod:`~comol.sweep.execute`: one run: train (as ``comol train``), evaluate (as ``comol eval``), routers.
- :mod:`~comol.sweep.results`: ``results.json``, per-row mean and std over seeds.
- :mod:`~comol.sweep.render`: ``results.md`` in the paper's layout and the plot.
- :mod:`~comol.sweep.orchestrate`: :func:`run_sweep`, resumable, in-process / accelerate / submitit.
- :mod:`~comol.sweep.paper`: the paper's Tables 2-4 figures, for ``--compare paper``.
"""

from comol.sweep.orchestrate import run_sweep
from comol.sweep.plan import EvalSpec, RunSpec

__all__ = ["EvalSpec", "RunSpec", "run_sweep"]
