"""normext's benchmark, `python -m normext.bench`: normext against torch native ops and the unfused native
chain on the measured copy roofline. cases.py: what is measured; timing.py: how; runner.py: the loop and
the command line; report.py: table, JSON, chart."""

from normext.bench.runner import main, run

__all__ = ["main", "run"]
