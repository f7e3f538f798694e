"""Progress a person can see: in the notebook when stepping through it, in the terminal when
``run_all.sh`` runs the notebooks headlessly.

Papermill stores everything a cell prints in the executed notebook, and a tqdm bar printed there
is thousands of carriage-return updates nobody sees until the cell ends. So ``run_all.sh`` sets
``ALMOST_PROGRESS_LOG`` to a file it follows in the terminal (``tail -F``): bars then write there,
throttled, and the notebook keeps only the one-line messages of :func:`say`. Without the variable
(JupyterLab, a plain Python session) bars are ordinary ``tqdm.auto`` bars.

    with bar(total=210, desc="queries", unit="query") as b:
        b.update(1)
    say("queries: reusing 210 queries of results/cpu (recipe unchanged)")
"""
from __future__ import annotations

import os
import time

from tqdm import tqdm as _plain_tqdm

LOG_ENV = "ALMOST_PROGRESS_LOG"
LOG_INTERVAL_S = 5.0        # at most one update of a bar in the log per this many seconds


def log_path() -> str | None:
    return os.environ.get(LOG_ENV) or None


class _LogBar(_plain_tqdm):
    """A tqdm bar that writes to the progress log and closes the file with the bar."""

    def __init__(self, *args, log: str, **kwargs):
        self._fh = open(log, "a", buffering=1)
        super().__init__(*args, file=self._fh, mininterval=LOG_INTERVAL_S, ncols=110, **kwargs)

    def close(self):
        try:
            super().close()
        finally:
            if not self._fh.closed:
                self._fh.close()


def bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False,
        leave: bool = True):
    """A progress bar: to the log file when running headlessly, a tqdm.auto bar otherwise."""
    log = log_path()
    if log and not disable:
        return _LogBar(total=total, desc=desc, unit=unit, initial=initial, leave=True, log=log)
    from tqdm.auto import tqdm as _auto_tqdm     # a widget in JupyterLab, text elsewhere
    return _auto_tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave)


def say(message: str) -> None:
    """One line for the reader: printed (it stays in the notebook) and, headless, sent to the terminal."""
    print(message, flush=True)
    log = log_path()
    if log:
        with open(log, "a") as fh:
            fh.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")


def headless() -> bool:
    """True when bars go to the progress log (``run_all.sh``): trainers then keep their own bars off."""
    return log_path() is not None


def trainer_callback(desc: str):
    """A transformers ``TrainerCallback`` that drives :func:`bar` over optimizer steps (headless runs)."""
    from transformers import TrainerCallback

    class _StepBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = bar(total=state.max_steps, desc=desc, unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return _StepBar()


def quiet_trainer(trainer) -> None:
    """Headless runs: the step bar is in the terminal, so the trainer's printed log dicts stay out
    of the executed notebook."""
    if headless():
        from transformers import PrinterCallback
        trainer.remove_callback(PrinterCallback)
