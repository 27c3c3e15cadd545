"""Where a run's time goes, for benchmarks.simulation: with MPLE_PROFILE=FILE in the environment (Ray's workers
and SuperNodes' ClientApps inherit it), the server and every holder process append one JSON line per timed phase
to FILE: `{"side": "server"|"holder", "phase": NAME, "s": SECONDS, "pid": PID, "t": WHEN IT ENDED}`. Without it, `timed` costs one
dictionary lookup. `timed(side, phase)` is a context manager or a function decorator. Phase names only, never a value of the run: nothing here can carry a secret."""

from __future__ import annotations

import contextlib
import json
import os
import time

PROFILE_ENV = "MPLE_PROFILE"


@contextlib.contextmanager
def timed(side: str, phase: str):
    path = os.environ.get(PROFILE_ENV)
    if not path:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        line = json.dumps({"side": side, "phase": phase, "s": time.perf_counter() - started, "pid": os.getpid(),
                           "t": time.time()})
        with open(path, "a") as handle:  # one short write per line: lines of concurrent processes do not interleave
            handle.write(line + "\n")


def read_profile(path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
