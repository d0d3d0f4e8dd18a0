"""Test launcher: run a script (``train.py``) with a fault planted after an outer step of meta-training.

``[torchrun ...] tests/_fault_launcher.py train.py ARGS...`` with
``OUROBOROS_TEST_FAULT="rank=1,step=3,once=/tmp/marker[,mode=exit|hang]"`` makes that rank die
(``os._exit(17)``) or hang at the end of outer step ``step`` (after that step's checkpoint, where a
crash between steps would hit). With ``once`` it fires only if the marker file does not exist yet (and
creates it), so a relaunch of the same command runs through.

Why a launcher: the fault is test machinery; the library only offers ``MetaTrainer.step_callbacks``,
and this script appends the fault callback to every trainer the run builds, so production code never
reads the variable.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENV_FAULT = "OUROBOROS_TEST_FAULT"


def parse(spec: str) -> dict[str, str] | None:
    """``"rank=1,step=3,once=PATH"`` -> its fields (None when empty)."""
    return dict(kv.split("=", 1) for kv in spec.split(",") if "=" in kv) if spec else None


def fault_callback(fault: dict[str, str]) -> Callable[[Any, dict], None]:
    """A ``MetaTrainer`` step callback that exits or hangs the chosen rank after the chosen step."""
    from meta import distributed as D

    def fire(trainer: Any, metrics: dict) -> None:
        if int(fault.get("step", -1)) != trainer.step or int(fault.get("rank", 0)) != D.rank():
            return
        once = fault.get("once")
        if once:
            if os.path.exists(once):
                return
            Path(once).write_text(f"rank {D.rank()} step {trainer.step}\n")
        if fault.get("mode", "exit") == "hang":
            while True:
                time.sleep(3600)
        os._exit(17)

    return fire


def install(fault: dict[str, str]) -> None:
    """Every MetaTrainer built from now on carries the fault callback."""
    from meta.trainer import MetaTrainer

    init = MetaTrainer.__init__

    def patched(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.step_callbacks.append(fault_callback(fault))

    MetaTrainer.__init__ = patched


def main() -> None:
    fault = parse(os.environ.get(ENV_FAULT, ""))
    if fault:
        install(fault)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
