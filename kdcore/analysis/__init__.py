"""Analysis tools over real runs: ``kd design``, ``kd temperature``, ``kd compare`` and the
debugging parts of ``kd eval`` (``--grads``, ``--worst``).

Each module is importable on its own and returns plain dicts (what ``--json`` prints); the
commands in :mod:`kdcore.builtins.analysis` only parse arguments and print.
"""

from kdcore.analysis.compare import compare_runs, pareto_front
from kdcore.analysis.debug import gradient_report, worst_positions
from kdcore.analysis.design import design_student
from kdcore.analysis.temperature import temperature_stats

__all__ = [
    "compare_runs",
    "design_student",
    "gradient_report",
    "pareto_front",
    "temperature_stats",
    "worst_positions",
]
