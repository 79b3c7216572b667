"""Testing seams of the worker: faults and delays a test switches on through the environment the
worker starts with (mock only what cannot be made to happen on demand). Unset, each costs a step
one cached lookup."""

from __future__ import annotations

import functools
import os
import time

# slow every load by this many seconds, so a test can observe "loading";
LOAD_DELAY_ENV = "CORTEX_TEST_LOAD_DELAY_S"
# hold every load while this file exists, so a test decides when "loading" ends, however slow the machine;
LOAD_GATE_ENV = "CORTEX_TEST_LOAD_GATE_FILE"
# sleep this long in every step, to emulate a slower device (e.g. so a client can disconnect mid-way);
STEP_DELAY_ENV = "CORTEX_TEST_STEP_DELAY_S"
# stall one step for 30 s if this file exists (deleted first: one stall, even across restarts),
# so a test can watch the step watchdog fire; with a tensor-parallel group, one rank takes it.
STALL_FILE_ENV = "CORTEX_TEST_STALL_FILE"
# fail one step with an error if this file exists (deleted first); checked after the stall file,
# so with both, one rank of a group stalls and another fails the same step.
FAIL_FILE_ENV = "CORTEX_TEST_FAIL_FILE"


def before_load() -> None:
    """The load delay, then the wait on the load gate file."""
    delay = float(os.environ.get(LOAD_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    gate = os.environ.get(LOAD_GATE_ENV)
    while gate and os.path.exists(gate):
        time.sleep(0.02)


@functools.cache
def _step_hooks() -> tuple[float, str | None, str | None]:
    """The step hooks (delay, stall file, fail file), read once: three environment lookups on every
    step cost a one-stream decode step ~15 us for nothing."""
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    return delay, os.environ.get(STALL_FILE_ENV), os.environ.get(FAIL_FILE_ENV)


def before_step() -> None:
    """The step delay, then a stall or a failure if its file exists."""
    delay, stall_file, fail_file = _step_hooks()
    if delay:
        time.sleep(delay)
    for path, act in ((stall_file, lambda: time.sleep(30)), (fail_file, _fail)):
        if path:
            try:
                os.unlink(path)  # the rank that takes the file acts; a TP peer finds it gone
            except FileNotFoundError:
                continue
            act()
            return


def _fail() -> None:
    raise RuntimeError("test fault: this step fails")
