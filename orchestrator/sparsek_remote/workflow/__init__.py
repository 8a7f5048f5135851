"""The flows the command line drives, one module each, composing the layers below:
``local`` (a job on this machine). Only the command line imports this package."""

from sparsek_remote.workflow.local import RunOutcome, git_state, make_report, resolve_targets, run_job

__all__ = ["RunOutcome", "git_state", "make_report", "resolve_targets", "run_job"]
