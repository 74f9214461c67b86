"""Listing a dataset root in parallel on Ray: the driver lists the root's top level, Ray tasks list its folders.

A real pool holds tens of thousands of files in thousands of subject folders, and on S3 every folder is a round trip,
so listing is done where the cluster's CPUs and network are: the driver reads the root's own entries (one call), groups
the top-level folders into a few tasks (:data:`DIRS_PER_TASK` folders at least, :data:`TASKS_PER_CPU` tasks per CPU at
most, so a small dataset costs one task and a big one never hundreds of tiny ones), and each task walks its folders with
``fs.find`` (with :data:`REMOTE_THREADS` threads on S3, where listing waits on the network). The union is exactly what
``fs.find(root)`` returns in the driver, which is what happens when Ray is not running (unit tests of an adapter).

:func:`find_files_with_contents` also reads small files of given suffixes (BIDS JSON sidecars) in the same tasks, right
after listing them: tens of thousands of sidecars read one by one in the driver cost seconds locally and a round trip
each on S3.

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
    "find_files_with_contents",
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
READ_MAX_BYTES = 1 << 20
"""Files larger than this are not read by :func:`find_files_with_contents` (a sidecar is a few hundred bytes)."""

TASK_STATS: Counter[str] = Counter()
"""Ray tasks run by this driver process, by kind (``list_files``, ``dicom_headers``)."""
WORKER_PIDS: dict[str, set[int]] = {}
"""Process ids of the Ray workers that ran each kind of task."""

_CACHE: contextvars.ContextVar[dict[tuple[Any, ...], Any] | None] = contextvars.ContextVar(
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


def _wanted(sizes: dict[str, int], read_suffixes: tuple[str, ...], max_bytes: int) -> list[str]:
    if not read_suffixes:
        return []
    return [p for p, size in sizes.items() if size <= max_bytes and p.lower().endswith(read_suffixes)]


def _read_files(fs: Any, paths: list[str], threads: int) -> dict[str, bytes]:
    """``{path: bytes}`` of ``paths``; a file that vanished or cannot be read is left out (its reader reports it)."""

    def read(path: str) -> bytes | None:
        try:
            return fs.cat_file(path)
        except OSError:
            return None

    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
            data = list(pool.map(read, paths))
    else:
        data = [read(p) for p in paths]
    return {p: d for p, d in zip(paths, data, strict=True) if d is not None}


def _list_folders(
    folders: list[str],
    uri: str,
    options: dict[str, str],
    files_only: bool,
    read_suffixes: tuple[str, ...] = (),
    max_bytes: int = READ_MAX_BYTES,
) -> tuple[int, tuple[dict[str, int], dict[str, bytes]]]:
    """Ray task: every file under ``folders`` (fsspec paths below the root ``uri``) as ``{path: size}``, and the bytes
    of those ending with one of ``read_suffixes`` (at most ``max_bytes`` each) as ``{path: bytes}``."""
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
    wanted = _wanted(out, read_suffixes, max_bytes)
    contents = _read_files(fs, wanted, REMOTE_THREADS if loc.is_remote else 1)
    return os.getpid(), (out, contents)


def _find(
    root: StorageLocation,
    skip: frozenset[str],
    skip_hidden: bool,
    files_only: bool,
    read_suffixes: tuple[str, ...],
    max_bytes: int,
) -> tuple[dict[str, int], dict[str, bytes]]:
    fs = root.fsspec()
    base = root.path.rstrip("/")
    if ray_ready():
        try:
            top = fs.ls(base, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            top = None  # not a folder: fs.find below says what it is
        if top is not None:
            out: dict[str, int] = {}
            folders = []
            for info in top:
                name = info["name"].rstrip("/")
                if info.get("type") == "directory":
                    leaf = name.rsplit("/", 1)[-1]
                    if name != base and leaf not in skip and not (skip_hidden and leaf.startswith(".")):
                        folders.append(name)
                else:
                    out.update(_entries({name: info}, files_only))
            # The root's own files (a few) are read here; everything below it in the tasks that list it.
            contents = _read_files(fs, _wanted(out, read_suffixes, max_bytes), 1)
            chunks = split(sorted(folders), chunk_count(len(folders), DIRS_PER_TASK, ray_cpus()))
            options = dict(root.options)
            for sizes, data in run_chunks(
                "list_files", _list_folders, chunks, root.uri, options, files_only, read_suffixes, max_bytes
            ):
                out.update(sizes)
                contents.update(data)
            return out, contents
    out = _entries(fs.find(base, detail=True), files_only)
    wanted = _wanted(out, read_suffixes, max_bytes)
    return out, _read_files(fs, wanted, REMOTE_THREADS if root.is_remote else 1)


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
    out, _ = _find(root, skip, skip_hidden, files_only, (), READ_MAX_BYTES)
    if cache is not None:
        cache[key] = dict(out)
    return out


def find_files_with_contents(
    root: StorageLocation,
    *,
    read_suffixes: Iterable[str],
    max_bytes: int = READ_MAX_BYTES,
    skip_top: Iterable[str] = (),
    skip_hidden: bool = False,
    files_only: bool = False,
) -> tuple[dict[str, int], dict[str, bytes]]:
    """:func:`find_files`, plus the bytes of every listed file whose name ends with one of ``read_suffixes``
    (case-insensitive) and that holds at most ``max_bytes``, as ``{fsspec path: bytes}``.

    The files are read by the tasks that list their folders (with Ray running), so the driver receives them in a few
    messages instead of opening each one. A file missing from the contents (too large, vanished between listing and
    reading, unreadable) is the caller's to read or report. Within :func:`cached_listings` the listing is shared with
    :func:`find_files` calls of the same arguments.
    """
    skip = frozenset(skip_top)
    suffixes = tuple(sorted({s.lower() for s in read_suffixes}))
    cache = _CACHE.get()
    key = (root.uri, skip, skip_hidden, files_only)
    full_key = (*key, suffixes, max_bytes)
    if cache is not None and full_key in cache:
        sizes, contents = cache[full_key]
        return dict(sizes), dict(contents)
    sizes, contents = _find(root, skip, skip_hidden, files_only, suffixes, max_bytes)
    if cache is not None:
        cache[full_key] = (dict(sizes), dict(contents))
        cache.setdefault(key, dict(sizes))
    return sizes, contents
