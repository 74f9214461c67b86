"""This project as a dependency-free wheel for a Ray job's ``runtime_env["py_modules"]``, built once per source hash.

The wheel carries no dependencies: the cluster image owns torch, CUDA, Ray and the rest, and Ray installs a
``py_modules`` wheel with ``pip install --target``, which would otherwise try to download all of them. Its version
carries a hash of the sources (``0.1.0+src.<hash>``) because Ray names an uploaded wheel by its file name only: a wheel
with an unchanged name is never uploaded again, so edited code must get a new name. Built wheels are cached by that
hash. Used by :mod:`brainiac.platform.jobs_client`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from base64 import urlsafe_b64encode
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from brainiac.platform.errors import UserError

__all__ = ["MAX_WHEEL_BYTES", "ProjectWheel", "cache_dir", "project_wheel"]

MAX_WHEEL_BYTES = 100 << 20
"""Ray refuses packages above 100 MiB; the project wheel is a few hundred KiB, so anything near this is a mistake."""

_EPOCH_1980 = (1980, 1, 1, 0, 0, 0)
_WHEEL_FORMAT = "1"
"""Bumped when the repacking below changes, so cached wheels built the old way are not reused."""


@dataclass(frozen=True)
class ProjectWheel:
    """The dependency-free wheel of this project that a job installs on the cluster."""

    path: Path
    digest: str
    """sha256 of the package sources it was built from."""
    cached: bool
    """True when an earlier build was reused."""

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class _Source:
    """Where the wheel's contents come from: a source tree (built with pip) or an installed distribution (repacked)."""

    name: str
    version: str
    files: dict[str, Path]
    """Relative name → file: source-tree paths, or ``brainiac/...`` paths of an installed distribution."""
    root: Path | None = None
    """The source tree (where pyproject.toml is), None for an installed distribution."""
    metadata: str = ""
    entry_points: str | None = None

    def digest(self) -> str:
        h = hashlib.sha256(f"{_WHEEL_FORMAT}\0{self.name}\0{self.version}\0".encode())
        for rel in sorted(self.files):
            data = self.files[rel].read_bytes()
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()


def cache_dir() -> Path:
    """``$BRAINIAC_CACHE_DIR``, else ``$XDG_CACHE_HOME/brainiac``, else ``~/.cache/brainiac``."""
    if os.environ.get("BRAINIAC_CACHE_DIR"):
        return Path(os.environ["BRAINIAC_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "brainiac"


def _skip(path: Path) -> bool:
    return any(part == "__pycache__" or part.startswith(".") for part in path.parts) or path.suffix in (".pyc", ".pyo")


def _source_tree() -> _Source | None:
    """The project's source tree, found from where this module is imported from (never from the CWD)."""
    root = Path(__file__).resolve().parents[1]  # <root>/platform/wheel.py
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    meta = tomllib.loads(pyproject.read_text())
    project = meta.get("project", {})
    if project.get("name") != "brainiac":
        return None
    files = {"pyproject.toml": pyproject}
    readme = project.get("readme")
    readme = readme.get("file") if isinstance(readme, dict) else readme
    for extra in (readme, "setup.py", "setup.cfg", "MANIFEST.in"):
        if extra and (root / extra).is_file():
            files[extra] = root / extra
    package_dirs = set(meta.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values())
    for folder in sorted(package_dirs):
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not _skip(rel):
                files[rel.as_posix()] = path
    return _Source("brainiac", str(project.get("version", "0")), files, root=root)


def _installed_distribution() -> _Source:
    """The installed (non-editable) ``brainiac`` distribution, repacked file by file."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("brainiac")
    except PackageNotFoundError as exc:
        raise UserError("brainiac is neither installed nor run from its source tree; cannot build a wheel") from exc
    files = {}
    for f in dist.files or ():
        rel = Path(str(f))
        if rel.parts and rel.parts[0] == "brainiac" and not _skip(rel):
            files[rel.as_posix()] = Path(str(f.locate()))
    if not files:
        raise UserError("the installed brainiac distribution lists no package files; reinstall it")
    return _Source(
        "brainiac", dist.version.split("+")[0], files,
        metadata=dist.read_text("METADATA") or "", entry_points=dist.read_text("entry_points.txt"),
    )  # fmt: skip


def _strip_metadata(text: str, version: str) -> str:
    """Core metadata without dependencies (``Requires-Dist``/``Provides-Extra``) or description, at ``version``."""
    out: list[str] = []
    dropping = False
    for line in text.split("\n"):
        if not line.strip():
            break  # the header ends at the first blank line; the body is the README
        if line[0] in " \t":  # continuation of the previous field
            if not dropping:
                out.append(line)
            continue
        key = line.split(":", 1)[0].strip().lower()
        dropping = key in ("requires-dist", "provides-extra", "version", "description")
        if key == "version":
            out.append(f"Version: {version}")
        elif not dropping:
            out.append(line)
    return "\n".join(out) + "\n\n"


def _write_wheel(path: Path, dist_info: str, entries: Iterable[tuple[str, bytes]]) -> None:
    """A wheel with a fresh RECORD and fixed timestamps (same content → same bytes)."""
    record = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name, _EPOCH_1980), data, compress_type=zipfile.ZIP_DEFLATED)
            digest = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(zipfile.ZipInfo(f"{dist_info}/RECORD", _EPOCH_1980), "\n".join(record) + "\n")


def _build_from_tree(src: _Source, version: str, out: Path, tmp: Path) -> None:
    """``pip wheel`` on a copy of the sources (so no build/ or egg-info lands in the checkout), then repack it."""
    copy = tmp / "src"
    for rel, path in src.files.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy / rel)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
           "-w", str(tmp / "dist"), str(copy)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})  # noqa: S603 - pip wheel of the user's own project, argument list (no shell)
    built = sorted((tmp / "dist").glob("*.whl"))
    if proc.returncode != 0 or len(built) != 1:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel produced"]
        raise UserError(f"building the project wheel from {src.root} failed: {last[0]}")
    new_info = f"{src.name}-{version}.dist-info"
    entries = []
    with zipfile.ZipFile(built[0]) as zin:
        for name in zin.namelist():
            top, _, rest = name.partition("/")
            if top.endswith(".dist-info"):
                if rest == "RECORD":
                    continue
                data = zin.read(name)
                if rest == "METADATA":
                    data = _strip_metadata(data.decode(), version).encode()
                entries.append((f"{new_info}/{rest}", data))
            else:
                entries.append((name, zin.read(name)))
    _write_wheel(out, new_info, entries)


def _build_from_distribution(src: _Source, version: str, out: Path) -> None:
    info = f"{src.name}-{version}.dist-info"
    wheel_file = "Wheel-Version: 1.0\nGenerator: brainiac.platform.wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries = [(rel, path.read_bytes()) for rel, path in sorted(src.files.items())]
    entries.append((f"{info}/METADATA", _strip_metadata(src.metadata, version).encode()))
    entries.append((f"{info}/WHEEL", wheel_file.encode()))
    if src.entry_points:
        entries.append((f"{info}/entry_points.txt", src.entry_points.encode()))
    _write_wheel(out, info, entries)


def project_wheel(cache: Path | None = None) -> ProjectWheel:
    """This project as a dependency-free wheel, built once per source hash and cached.

    Raises:
        UserError: the build failed, or the wheel is over :data:`MAX_WHEEL_BYTES` (data files in a package folder?).
    """
    src = _source_tree() or _installed_distribution()
    digest = src.digest()
    version = f"{src.version}+src.{digest[:12]}"
    folder = Path(cache or cache_dir()) / "wheels"
    target = folder / f"{src.name}-{version}-py3-none-any.whl"
    if target.is_file():
        return ProjectWheel(target, digest, cached=True)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="brainiac-wheel-") as tmp:
        out = Path(tmp) / target.name
        if src.root is not None:
            _build_from_tree(src, version, out, Path(tmp))
        else:
            _build_from_distribution(src, version, out)
        size = out.stat().st_size
        if size > MAX_WHEEL_BYTES:
            raise UserError(
                f"the project wheel is {size / 2**20:.0f} MiB (Ray's limit is {MAX_WHEEL_BYTES >> 20} MiB): "
                "move data files out of the package folders"
            )
        partial = folder / f".{target.name}.{os.getpid()}"
        shutil.copyfile(out, partial)
        os.replace(partial, target)  # atomic: a concurrent submit sees the whole wheel or none
    return ProjectWheel(target, digest, cached=False)
