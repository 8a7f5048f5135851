"""The benchmark runner: executes a job on this machine and writes a result bundle.

The same code runs inside the image, in a virtualenv on a bare host, and locally.
For each (case, implementation) pair it checks correctness against a float64 oracle
first and times only what passed; see ``execute.run_case`` and ``execute.run_job``.
"""

from sparsek.runner.execute import resolve_device, run_case, run_job

__all__ = ["resolve_device", "run_case", "run_job"]
