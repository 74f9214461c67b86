"""Deterministic crash points for the crash-safety tests: a job calls :func:`maybe_crash` at each place where a kill
would leave a distinct state on storage (just before or after a commit), and a test sets ``BRAINIAC_FAULT_POINT`` to
make the job kill itself there with ``SIGKILL``, exactly as ``kill -9`` or the OOM killer would: no ``finally`` block,
no ``atexit`` handler, no flush runs.

The value is ``<point>:<n>`` (kill on the n-th time ``<point>`` is reached in this process; ``<point>`` alone means the
first time). Unset, a call costs one dictionary lookup in ``os.environ``; nothing is counted.

Points are named ``<job or table>.<what just happened>``; tests/reliability/test_crash.py lists the ones the jobs
have. Only driver code calls it: a Ray worker inherits the environment, and killing a worker tests Ray's retries, not
the catalog's commits.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

__all__ = ["ENV", "maybe_crash", "parse"]

ENV = "BRAINIAC_FAULT_POINT"

_hits: Counter[str] = Counter()


def parse(value: str) -> tuple[str, int]:
    """``"<point>:<n>"`` → ``(point, n)``; ``"<point>"`` → ``(point, 1)``.

    Raises:
        ValueError: an empty point or a count that is not a positive integer.
    """
    point, sep, count = value.strip().rpartition(":")
    if not sep:
        point, count = count, "1"
    if not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV} must be '<point>:<n>' with n >= 1, got {value!r}")
    return point, int(count)


def maybe_crash(point: str) -> None:
    """Kill this process with ``SIGKILL`` if ``BRAINIAC_FAULT_POINT`` names ``point`` and this is its n-th hit.

    The process announces the kill on stderr first (one line, so a test can tell which point fired), then dies without
    running any cleanup: whatever is on storage at this moment is what a real crash would leave.
    """
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, count = parse(wanted)
    if name != point:
        return
    _hits[point] += 1
    if _hits[point] == count:
        sys.stderr.write(f"brainiac fault point {point}:{count} reached: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
