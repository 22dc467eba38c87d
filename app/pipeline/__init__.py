"""One claimed attempt, phase by phase.

    attempt.py   what every phase gets: the injected deps, the stop request, the workspace,
                 the progress sender
    clone.py     clone       CloneInput  -> git.CloneResult (the commit SHA resume needs;
                             a resumed attempt clones the checkpoint's commit)
    restore.py   restore_checkpoint  RestoreInput -> Restored (the steps left, or a full run)
    run_cli.py   run_cli     CliInput    -> CliOutput
    partial.py   (inside run_cli) each finished step's files as partial docs
    collect.py   collect     CollectInput -> Collected
    upload.py    upload      Collected   -> Uploaded
    runner.py    runs the phases in order (stop checked, each timed under its name), then
                 `decide_outcome` and the final report

Each phase module states what it reads and writes and raises `JobFailure` with the
retryability it knows; only `outcome.decide_outcome` turns what happened into the report.
"""

from app.pipeline.attempt import RunnerDeps, RunState, StopReason, Workspace
from app.pipeline.runner import run_attempt

__all__ = ["RunState", "RunnerDeps", "StopReason", "Workspace", "run_attempt"]
