"""Helpers of the crash-safety tests (test_crash.py, test_s3_faults.py): run a ``brainiac`` command in a child process
that kills itself with SIGKILL at a fault point (:mod:`brainiac.platform.faults`), check that every Delta table of a
catalog still opens and reads, and compare two catalogs by their keys, ignoring timestamps and table versions.

Not a test module (no ``test_`` prefix): the test modules load it by path, since pytest imports them with
``--import-mode=importlib``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from brainiac.ingestion.duplicates import QUEUE_TABLE
from brainiac.platform.catalog import SCHEMAS, Catalog
from brainiac.platform.faults import ENV

BRAINIAC = Path(sys.executable).with_name("brainiac")
"""The ``brainiac`` console script of the interpreter running the tests."""

KEYS: dict[str, list[str]] = {
    "scans": ["scan_id", "dataset", "source_uri", "status"],
    "quarantine": ["source_uri", "dataset", "reason"],
    "duplicates": ["group_id", "scan_id", "dataset", "method"],
    QUEUE_TABLE: ["scan_id", "dataset"],
    "volumes": ["scan_id", "preprocess_version", "dataset", "qc_pass"],
    "splits": ["subject_id", "seed", "split", "group_id"],
    "preprocess_configs": ["preprocess_version"],
}
"""What is compared per table: every row's key columns, as a multiset (a row written twice is a difference)."""


@dataclass(frozen=True)
class Run:
    """A finished child process."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        """Whether it died of SIGKILL (a fault point fired, or an outside kill)."""
        return self.returncode == -signal.SIGKILL

    def tail(self, n: int = 3000) -> str:
        head = f"exit {self.returncode} after {self.seconds:.1f}s"
        return f"{head}\n--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}"


def run_cli(
    args: list[str], *, fault: str | None = None, env: dict[str, str] | None = None, timeout: float = 180
) -> Run:
    """``brainiac ARGS`` in a child process with this process's environment plus ``env``; ``fault`` sets
    ``BRAINIAC_FAULT_POINT`` (``<point>:<n>``) so the child SIGKILLs itself there."""
    environ = {**os.environ, **(env or {})}
    environ.pop(ENV, None)
    if fault:
        environ[ENV] = fault
    started = time.perf_counter()
    proc = subprocess.run([str(BRAINIAC), *args], env=environ, capture_output=True, text=True, timeout=timeout)
    return Run(tuple(args), proc.returncode, proc.stdout, proc.stderr, round(time.perf_counter() - started, 2))


def session_ray_env() -> dict[str, str]:
    """Environment that makes a child job connect to this process's Ray (the session fixture's) instead of starting its
    own: a killed job is then a dead driver of a live cluster, as on a real cluster, and each child saves Ray's
    start-up."""
    import ray

    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def table_names(catalog: Catalog) -> list[str]:
    """The catalog's tables: every known name that exists, plus any other folder holding a ``_delta_log`` (local)."""
    names = set(SCHEMAS) | {QUEUE_TABLE}
    if not catalog.location.is_remote:
        names |= {p.parent.name for p in Path(catalog.uri).glob("*/_delta_log")}
    return sorted(n for n in names if catalog.table(n) is not None)


def open_every_table(catalog: Catalog) -> dict[str, int]:
    """Open every table of ``catalog`` at its latest version and read it whole (so every file its log names must
    exist and decode); returns rows per table. Raises whatever opening or reading raises."""
    rows = {}
    for name in table_names(catalog):
        table = catalog.table(name)
        assert table is not None
        rows[name] = table.to_pyarrow_dataset().to_table().num_rows
    return rows


def snapshot(catalog: Catalog, tables: list[str] | None = None) -> dict[str, Counter]:
    """Each table's rows reduced to their key columns (:data:`KEYS`), as multisets: what two catalogs must share to
    be the same catalog, timestamps and versions aside."""
    out = {}
    for name in tables or list(KEYS):
        table = catalog.table(name)
        if table is None:
            out[name] = Counter()
            continue
        data = table.to_pyarrow_dataset().to_table(columns=KEYS[name]).to_pylist()
        out[name] = Counter(tuple(r[k] for k in KEYS[name]) for r in data)
    return out


def signature_keys(catalog: Catalog) -> Counter:
    """``scan_signatures`` rows by (scan_id, dataset, signature_version)."""
    table = catalog.table("scan_signatures")
    if table is None:
        return Counter()
    data = table.to_pyarrow_dataset().to_table(columns=["scan_id", "dataset", "signature_version"]).to_pylist()
    return Counter((r["scan_id"], r["dataset"], r["signature_version"]) for r in data)


def diff(got: dict[str, Counter], want: dict[str, Counter]) -> dict[str, dict[str, list]]:
    """Per table, the key rows only in ``got`` (extra) and only in ``want`` (missing); empty when they agree."""
    out = {}
    for name in sorted(set(got) | set(want)):
        a, b = got.get(name, Counter()), want.get(name, Counter())
        if a != b:
            out[name] = {"extra": sorted((a - b).elements())[:5], "missing": sorted((b - a).elements())[:5]}
    return out


def orphan_files(catalog: Catalog, name: str) -> list[str]:
    """Parquet files under a local table's folder that its latest version does not reference."""
    table = catalog.table(name)
    assert table is not None and not catalog.location.is_remote
    root = Path(catalog.uri) / name
    live = {str(Path(u)) for u in table.file_uris()}
    return sorted(str(p) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts and str(p) not in live)


class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of a server, which a test can cut off and restore: while it is down, every
    open connection is reset and new ones are refused (nothing listens on its port), as when a network path or an
    object store's endpoint goes away for a while; the server behind it keeps its state.

    Example:
        >>> proxy = TcpProxy("127.0.0.1", 5555).start()  # doctest: +SKIP
        >>> proxy.down(); time.sleep(3); proxy.up()  # doctest: +SKIP
    """

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self.target = (host, port)
        self._socket = socket
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self.port = 0
        self.refused_since: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self.up()
        return self

    def up(self) -> None:
        """Listen (again) on the proxy's port."""
        import threading

        sock = self._socket.socket(self._socket.AF_INET, self._socket.SOCK_STREAM)
        sock.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        for attempt in range(50):  # the old listener's accept thread may hold the port for a moment after down()
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        sock.listen(64)
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock
            self.refused_since = None
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def down(self) -> None:
        """Stop listening and reset every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
            self.refused_since = time.monotonic()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(self._socket.SHUT_RDWR)  # wakes the thread blocked in accept(), freeing the port
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                # Linger 0: closing resets the connection; shutdown first wakes the relay thread blocked reading it.
                conn.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(self._socket.SHUT_RDWR)
                conn.close()

    def stop(self) -> None:
        self.down()

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = self._socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
