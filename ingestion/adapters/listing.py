"""Listing a dataset root in parallel on Ray: the driver lists the root's top level, Ray tasks list its folders.

A real pool holds tens of thousands of files in thousands of subject folders, and on S3 every folder is a round trip,
so listing is done where the cluster's CPUs and network are: the driver reads the root's own entries (one call), groups
the top-level folders into a few tasks (:data:`DIRS_PER_TASK` folders at least, :data:`TASKS_PER_CPU` tasks per CPU at
most, so a small dataset costs one task and a big one never hundreds of tiny ones), and each task walks its folders with
``fs.find`` (with :data:`REMOTE_THREADS` threads on S3, where listing waits on the network). The union is exactly what
``fs.find(root)`` returns in the driver, which is what happens when Ray is not running (unit tests of an adapter).

Like :mod:`brainiac.ingestion.harvest`, this module is imported by Ray workers and so imports only light modules
(fsspec and the storage helpers): no pandas, no deltalake.

:data:`TASK_STATS` counts the tasks the driver ran and :data:`WORKER_PIDS` records the processes that answered, so a
test (or a curious user) can see that listing and DICOM header reading really happen on Ray.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from brainiac.platform.storage import StorageLocation

__all__ = [
    "TASK_STATS",
    "WORKER_PIDS",
    "cached_listings",
    "find_files",
    "ray_cpus",
    "ray_ready",
    "run_chunks",
]

DIRS_PER_TASK = 16
"""Top-level folders listed by one task, at least."""
TASKS_PER_CPU = 2
"""Tasks per Ray CPU, at most, for one listing or one pass over DICOM headers."""
REMOTE_THREADS = 16
"""Concurrent listing calls inside one task on S3."""

TASK_STATS: Counter[str] = Counter()
"""Ray tasks run by this driver process, by kind (``list_files``, ``dicom_headers``)."""
WORKER_PIDS: dict[str, set[int]] = {}
"""Process ids of the Ray workers that ran each kind of task."""

_CACHE: contextvars.ContextVar[dict[tuple[Any, ...], dict[str, int]] | None] = contextvars.ContextVar(
    "brainiac_listing_cache", default=None
)

T = TypeVar("T")
R = TypeVar("R")


def ray_ready() -> bool:
    """True when this process is connected to Ray (never imports Ray: an adapter used on its own stays light)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def ray_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def chunk_count(items: int, min_per_chunk: int, cpus: int) -> int:
    """How many chunks to cut ``items`` into: at least ``min_per_chunk`` each, at most ``TASKS_PER_CPU`` per CPU."""
    if items <= 0:
        return 0
    return max(1, min(math.ceil(items / min_per_chunk), TASKS_PER_CPU * cpus))


def split(items: Sequence[T], chunks: int) -> list[list[T]]:
    """``items`` cut into ``chunks`` contiguous runs of near-equal length (order kept)."""
    if chunks <= 0:
        return []
    size, extra = divmod(len(items), chunks)
    out, start = [], 0
    for i in range(chunks):
        end = start + size + (i < extra)
        out.append(list(items[start:end]))
        start = end
    return [c for c in out if c]


_REMOTES: dict[Callable[..., Any], Any] = {}


def run_chunks(kind: str, fn: Callable[..., tuple[int, R]], chunks: Sequence[Any], *args: Any) -> Iterator[R]:
    """Run ``fn(chunk, *args)`` for every chunk as Ray tasks and yield the results in chunk order.

    ``fn`` must be a module-level function of a light module returning ``(os.getpid(), result)``; the pid goes to
    :data:`WORKER_PIDS`.
    """
    import ray

    remote = _REMOTES.get(fn)
    if remote is None:
        remote = _REMOTES[fn] = ray.remote(num_cpus=1)(fn).options(name=f"brainiac.{kind}")
    refs = [remote.remote(chunk, *args) for chunk in chunks]
    TASK_STATS[kind] += len(refs)
    pids = WORKER_PIDS.setdefault(kind, set())
    done = 0
    try:
        for ref in refs:
            pid, result = ray.get(ref)
            done += 1
            pids.add(pid)
            yield result
    finally:
        for ref in refs[done:]:  # a consumer that stops early (or an error) leaves no task running
            with contextlib.suppress(Exception):
                ray.cancel(ref)


@contextlib.contextmanager
def cached_listings() -> Iterator[None]:
    """Within the block, listing the same root twice (layout detection, then discovery) lists it once."""
    token = _CACHE.set({})
    try:
        yield
    finally:
        _CACHE.reset(token)


def _entries(listing: dict[str, Any], files_only: bool) -> dict[str, int]:
    return {
        path: int(info.get("size") or 0)
        for path, info in listing.items()
        if not files_only or info.get("type", "file") == "file"
    }


def _list_folders(
    folders: list[str], uri: str, options: dict[str, str], files_only: bool
) -> tuple[int, dict[str, int]]:
    """Ray task: every file under ``folders`` (fsspec paths below the root ``uri``), as ``{path: size}``."""
    loc = StorageLocation.resolve(uri, options or None)
    fs = loc.fsspec()
    out: dict[str, int] = {}
    threads = min(REMOTE_THREADS, len(folders)) if loc.is_remote else 1
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for listing in pool.map(lambda d: fs.find(d, detail=True), folders):
                out.update(_entries(listing, files_only))
    else:
        for folder in folders:
            out.update(_entries(fs.find(folder, detail=True), files_only))
    return os.getpid(), out


def find_files(
    root: StorageLocation,
    *,
    skip_top: Iterable[str] = (),
    skip_hidden: bool = False,
    files_only: bool = False,
) -> dict[str, int]:
    """Every file under ``root`` as ``{fsspec path: size}``: what ``fs.find(root.path, detail=True)`` returns.

    Args:
        root: the folder to list.
        skip_top: names of top-level folders not to list (the caller would drop everything below them anyway).
        skip_hidden: also skip top-level folders whose name starts with a dot.
        files_only: keep only entries whose type is ``file`` (fsspec may report others, e.g. a socket).

    With Ray running, the root's folders are listed in Ray tasks; otherwise in this process.
    """
    skip = frozenset(skip_top)
    cache = _CACHE.get()
    key = (root.uri, skip, skip_hidden, files_only)
    if cache is not None and key in cache:
        return dict(cache[key])
    fs = root.fsspec()
    base = root.path.rstrip("/")
    out: dict[str, int] | None = None
    if ray_ready():
        try:
            top = fs.ls(base, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            top = None  # not a folder: fs.find below says what it is
        if top is not None:
            out = {}
            folders = []
            for info in top:
                name = info["name"].rstrip("/")
                if info.get("type") == "directory":
                    leaf = name.rsplit("/", 1)[-1]
                    if name != base and leaf not in skip and not (skip_hidden and leaf.startswith(".")):
                        folders.append(name)
                else:
                    out.update(_entries({name: info}, files_only))
            chunks = split(sorted(folders), chunk_count(len(folders), DIRS_PER_TASK, ray_cpus()))
            options = dict(root.options)
            for part in run_chunks("list_files", _list_folders, chunks, root.uri, options, files_only):
                out.update(part)
    if out is None:
        out = _entries(fs.find(base, detail=True), files_only)
    if cache is not None:
        cache[key] = dict(out)
    return out
