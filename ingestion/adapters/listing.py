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

On a local disk the walk is this module's own (``os.scandir``), because what is listed is also what will be read, and a
dataset is not always made of plain files (issue #18):

- a symlink whose real path lies inside the dataset root is listed under its own name with its target's size (DataLad
  and git-annex exports are trees of symlinks into ``.git/annex/objects``); one that resolves outside the root is
  reported as ``symlink_outside_root`` and never read, a dangling one (or a loop) as ``broken_symlink``;
- a symlink to a folder is not followed (loops, files counted twice) and, like a FIFO, socket or device, is reported as
  ``not_a_file``, so that no reader opens a folder named ``x.nii.gz`` or blocks on a FIFO;
- a folder that cannot be listed or an entry that cannot be stat-ed (permission denied, vanished since its folder was
  read) is reported as ``unreadable`` with the errno name, and the walk goes on.

These reports are :data:`ListingProblem` tuples (path, reason, detail); the adapters turn them into quarantine rows. The
detail never quotes a path (a symlink's target may name another user's files). On S3 there are no symlinks nor
permissions per key: listing there is ``fs.find`` as before and reports nothing.

Like :mod:`brainiac.ingestion.harvest`, this module is imported by Ray workers and so imports only light modules
(fsspec and the storage helpers): no pandas, no deltalake.

:data:`TASK_STATS` counts the tasks the driver ran and :data:`WORKER_PIDS` records the processes that answered, so a
test (or a curious user) can see that listing and DICOM header reading really happen on Ray.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import math
import os
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

from brainiac.platform.storage import StorageLocation

__all__ = [
    "TASK_STATS",
    "WORKER_PIDS",
    "Listing",
    "ListingProblem",
    "cached_listings",
    "describe_oserror",
    "find_files",
    "find_files_with_contents",
    "find_listing",
    "inside",
    "ray_cpus",
    "ray_ready",
    "readable_inside",
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

ListingProblem = tuple[str, str, str]
"""``(fsspec path, quarantine reason, detail)`` of an entry listing could not or must not use (see the module doc)."""


class Listing(NamedTuple):
    """What :func:`find_listing` returns."""

    sizes: dict[str, int]
    """Every usable file as ``{fsspec path: size}`` (a symlink inside the root under its own path, its target's size)."""
    contents: dict[str, bytes]
    """Bytes of the small files asked for, by fsspec path."""
    problems: list[ListingProblem]
    """Entries left out of ``sizes`` and why (local disks only)."""


def describe_oserror(exc: OSError) -> str:
    """``EACCES (Permission denied)``: the errno name and message of ``exc`` without the file name it carries."""
    name = errno.errorcode.get(exc.errno, "") if isinstance(exc.errno, int) else ""
    text = exc.strerror or type(exc).__name__
    return f"{name} ({text})" if name else text


def inside(path: str, real_root: str) -> bool:
    """True if the real path ``path`` is ``real_root`` or lies below it (both already resolved)."""
    base = real_root.rstrip("/")
    return path == base or path.startswith(base + "/")


def readable_inside(path: str, real_root: str) -> bool:
    """True if the local ``path`` is (or links to) a regular file whose real path lies under ``real_root``: the test to
    pass before reading a file found by any other walk than this module's (never raises)."""
    try:
        return inside(os.path.realpath(path), real_root) and stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _follow_link(path: str, real_root: str) -> tuple[int | None, ListingProblem | None]:
    """A symlink's target size if it is a regular file inside ``real_root``, else why it is left out."""
    if not inside(os.path.realpath(path), real_root):
        return None, (path, "symlink_outside_root", "the symlink's target resolves outside the dataset root; not read")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, (path, "broken_symlink", "the symlink's target does not exist")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, (path, "broken_symlink", "the symlink is a loop")
        return None, (path, "unreadable", f"the symlink's target could not be stat-ed: {describe_oserror(exc)}")
    if stat.S_ISREG(st.st_mode):
        return st.st_size, None
    if stat.S_ISDIR(st.st_mode):
        return None, (path, "not_a_file", "a symlink to a folder (symlinked folders are not followed)")
    return None, (path, "not_a_file", "a symlink to a FIFO, socket or device, not a regular file")


def _scan_local(folder: str, real_root: str) -> tuple[dict[str, int], list[str], list[ListingProblem]]:
    """One local folder: its usable files ``{path: size}``, its subfolders (symlinked ones are not followed) and the
    entries left out. Never raises for an entry or the folder itself: each becomes a problem."""
    files: dict[str, int] = {}
    folders: list[str] = []
    problems: list[ListingProblem] = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as exc:
        problems.append((folder, "unreadable", f"the folder could not be listed: {describe_oserror(exc)}"))
        return files, folders, problems
    for entry in entries:
        path = f"{folder.rstrip('/')}/{entry.name}"
        try:
            if entry.is_symlink():
                size, problem = _follow_link(path, real_root)
                if problem is not None:
                    problems.append(problem)
                else:
                    files[path] = int(size or 0)
            elif entry.is_dir(follow_symlinks=False):
                folders.append(path)
            elif entry.is_file(follow_symlinks=False):
                files[path] = entry.stat(follow_symlinks=False).st_size
            else:
                problems.append((path, "not_a_file", "a FIFO, socket or device, not a regular file"))
        except OSError as exc:  # vanished since the folder was read, or cannot be stat-ed
            problems.append((path, "unreadable", f"could not be stat-ed: {describe_oserror(exc)}"))
    return files, folders, problems


def _walk_local(folders: Iterable[str], real_root: str) -> tuple[dict[str, int], list[ListingProblem]]:
    """Every usable file under ``folders`` (local paths below ``real_root``) and the entries left out."""
    sizes: dict[str, int] = {}
    problems: list[ListingProblem] = []
    stack = list(folders)[::-1]
    while stack:
        files, below, found = _scan_local(stack.pop(), real_root)
        sizes.update(files)
        problems += found
        stack.extend(reversed(below))
    return sizes, problems


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
    real_root: str | None = None,
) -> tuple[int, tuple[dict[str, int], dict[str, bytes], list[ListingProblem]]]:
    """Ray task: every file under ``folders`` (fsspec paths below the root ``uri``) as ``{path: size}``, the bytes
    of those ending with one of ``read_suffixes`` (at most ``max_bytes`` each) as ``{path: bytes}``, and the entries
    left out (local disks: walked by :func:`_walk_local` with symlinks judged against ``real_root``)."""
    loc = StorageLocation.resolve(uri, options or None)
    fs = loc.fsspec()
    out: dict[str, int] = {}
    problems: list[ListingProblem] = []
    threads = min(REMOTE_THREADS, len(folders)) if loc.is_remote else 1
    if real_root is not None and not loc.is_remote:
        out, problems = _walk_local(folders, real_root)
    elif threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for listing in pool.map(lambda d: fs.find(d, detail=True), folders):
                out.update(_entries(listing, files_only))
    else:
        for folder in folders:
            out.update(_entries(fs.find(folder, detail=True), files_only))
    wanted = _wanted(out, read_suffixes, max_bytes)
    contents = _read_files(fs, wanted, REMOTE_THREADS if loc.is_remote else 1)
    return os.getpid(), (out, contents, problems)


def _keep_folder(name: str, base: str, skip: frozenset[str], skip_hidden: bool) -> bool:
    leaf = name.rsplit("/", 1)[-1]
    return name != base and leaf not in skip and not (skip_hidden and leaf.startswith("."))


def _find(
    root: StorageLocation,
    skip: frozenset[str],
    skip_hidden: bool,
    files_only: bool,
    read_suffixes: tuple[str, ...],
    max_bytes: int,
    within: StorageLocation | None = None,
) -> Listing:
    fs = root.fsspec()
    base = root.path.rstrip("/")
    if not root.is_remote and os.path.isdir(base):
        # Local folder: this module's walk (symlinks judged against the real path of ``within``, default the root).
        real_root = os.path.realpath((within or root).path)
        out, subfolders, problems = _scan_local(base, real_root)
        folders = [f for f in subfolders if _keep_folder(f, base, skip, skip_hidden)]
        contents = _read_files(fs, _wanted(out, read_suffixes, max_bytes), 1)
        parts: Iterable[tuple[dict[str, int], dict[str, bytes], list[ListingProblem]]]
        if ray_ready() and folders:
            chunks = split(sorted(folders), chunk_count(len(folders), DIRS_PER_TASK, ray_cpus()))
            parts = run_chunks(
                "list_files", _list_folders, chunks, root.uri, {}, files_only, read_suffixes, max_bytes, real_root
            )
        else:
            parts = [_list_folders(folders, root.uri, {}, files_only, read_suffixes, max_bytes, real_root)[1]]
        for sizes, data, found in parts:
            out.update(sizes)
            contents.update(data)
            problems += found
        return Listing(out, contents, problems)
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
                    if _keep_folder(name, base, skip, skip_hidden):
                        folders.append(name)
                else:
                    out.update(_entries({name: info}, files_only))
            # The root's own files (a few) are read here; everything below it in the tasks that list it.
            contents = _read_files(fs, _wanted(out, read_suffixes, max_bytes), 1)
            chunks = split(sorted(folders), chunk_count(len(folders), DIRS_PER_TASK, ray_cpus()))
            options = dict(root.options)
            for sizes, data, _ in run_chunks(
                "list_files", _list_folders, chunks, root.uri, options, files_only, read_suffixes, max_bytes
            ):
                out.update(sizes)
                contents.update(data)
            return Listing(out, contents, [])
    out = _entries(fs.find(base, detail=True), files_only)
    wanted = _wanted(out, read_suffixes, max_bytes)
    return Listing(out, _read_files(fs, wanted, REMOTE_THREADS if root.is_remote else 1), [])


def find_listing(
    root: StorageLocation,
    *,
    read_suffixes: Iterable[str] = (),
    max_bytes: int = READ_MAX_BYTES,
    skip_top: Iterable[str] = (),
    skip_hidden: bool = False,
    files_only: bool = False,
    within: StorageLocation | None = None,
) -> Listing:
    """Every usable file under ``root``, the bytes of the small ones asked for, and the entries left out.

    Args:
        root: the folder to list.
        read_suffixes: read the files whose name ends with one of these (case-insensitive) and that hold at most
            ``max_bytes`` (see :func:`find_files_with_contents`).
        max_bytes: size limit of the files read.
        skip_top: names of top-level folders not to list (the caller would drop everything below them anyway).
        skip_hidden: also skip top-level folders whose name starts with a dot.
        files_only: on S3, keep only entries whose type is ``file`` (locally only regular files, and symlinks to
            regular files inside the root, are ever listed).
        within: the dataset root symlinks must stay inside (default ``root``; e.g. the dataset root when listing its
            ``derivatives`` folder).

    With Ray running, the root's folders are listed in Ray tasks; otherwise in this process. Within
    :func:`cached_listings` a root is listed once for the same arguments.
    """
    skip = frozenset(skip_top)
    suffixes = tuple(sorted({s.lower() for s in read_suffixes}))
    cache = _CACHE.get()
    key = (root.uri, skip, skip_hidden, files_only, within.uri if within is not None else None)
    full_key = (*key, suffixes, max_bytes) if suffixes else key
    if cache is not None and full_key in cache:
        sizes, contents, problems = cache[full_key]
        return Listing(dict(sizes), dict(contents), list(problems))
    found = _find(root, skip, skip_hidden, files_only, suffixes, max_bytes, within)
    if cache is not None:
        cache[full_key] = Listing(dict(found.sizes), dict(found.contents), list(found.problems))
        cache.setdefault(key, Listing(dict(found.sizes), {}, list(found.problems)))
    return found


def find_files(
    root: StorageLocation,
    *,
    skip_top: Iterable[str] = (),
    skip_hidden: bool = False,
    files_only: bool = False,
) -> dict[str, int]:
    """Every file under ``root`` as ``{fsspec path: size}``: what ``fs.find(root.path, detail=True)`` returns for a
    tree of plain files (see :func:`find_listing` for symlinks, special files and unreadable entries, left out here).

    Args:
        root: the folder to list.
        skip_top: names of top-level folders not to list (the caller would drop everything below them anyway).
        skip_hidden: also skip top-level folders whose name starts with a dot.
        files_only: keep only entries whose type is ``file`` (fsspec may report others on S3).

    With Ray running, the root's folders are listed in Ray tasks; otherwise in this process.
    """
    return find_listing(root, skip_top=skip_top, skip_hidden=skip_hidden, files_only=files_only).sizes


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
    found = find_listing(
        root,
        read_suffixes=read_suffixes,
        max_bytes=max_bytes,
        skip_top=skip_top,
        skip_hidden=skip_hidden,
        files_only=files_only,
    )
    return found.sizes, found.contents
