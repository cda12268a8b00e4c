"""Files in and out, in one place.

Reading: `read_text`, `read_json`, `read_yaml` turn every way a read can fail (missing, a folder, no permission,
not UTF-8, not JSON/YAML, the wrong top-level type) into one-line `ClcliError`s that say what the file was for.
Writing: `atomic_path` and, for files that go together, `atomic_files` (a reader never sees half a file, a crash
never destroys the previous version; a file gets the mode the umask gives new files) and `check_output_file` /
`check_output_dir`, called before any work so that a bad output path fails at once.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from clcli.errors import ClcliError, one_line

_KINDS = {dict: "a mapping", list: "a list"}


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of `path`; `what` names the file in the error ("recipe", "run.json of the run", ...)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClcliError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ClcliError(f"{what} {path} is a folder, not a file") from None
    except PermissionError:
        raise ClcliError(f"cannot read {what} {path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ClcliError(f"{what} {path} is not UTF-8 text (byte {e.start}); is it the right file?") from None
    except OSError as e:
        raise ClcliError(f"cannot read {what} {path} ({one_line(e)})") from None


def _check_kind(value: Any, path: Path, what: str, expect: type | None) -> Any:
    if expect is not None and not isinstance(value, expect):
        got = "empty" if value is None else f"{_KINDS.get(type(value), type(value).__name__)}"
        raise ClcliError(f"{what} {path} must hold {_KINDS.get(expect, expect.__name__)}, it is {got}")
    return value


def read_json(path: str | os.PathLike, what: str = "JSON file", expect: type | None = dict) -> Any:
    """The JSON value in `path`, checked to be of type `expect` (None: any)."""
    return _read_parsed(path, what, expect, "JSON", json.loads, json.JSONDecodeError,
                        lambda e: f"{e.msg} at line {e.lineno}")


def read_yaml(path: str | os.PathLike, what: str = "YAML file", expect: type | None = dict) -> Any:
    """The YAML value in `path`, checked to be of type `expect` (None: any). An empty file holds None, which is an
    error whenever a type is expected."""
    import yaml

    return _read_parsed(path, what, expect, "YAML", yaml.safe_load, yaml.YAMLError,
                        lambda e: one_line(e, limit=None))


def _read_parsed(path, what: str, expect: type | None, language: str, parse, parse_error: type, describe) -> Any:
    path = Path(path)
    text = read_text(path, what)
    try:
        value = parse(text)
    except parse_error as e:
        raise ClcliError(f"{what} {path} is not valid {language} ({describe(e)})") from None
    except RecursionError:
        raise ClcliError(f"{what} {path} is not valid {language} (nested too deeply)") from None
    return _check_kind(value, path, what, expect)


def _creatable(folder: Path, what: str, original: Path) -> None:
    """`folder` exists as a writable folder or can be made (its nearest existing ancestor is a writable folder)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        if probe.is_symlink():  # a dangling link cannot be made into a folder
            raise ClcliError(f"{what} {original}: {probe} is a broken link")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ClcliError(f"{what} {original}: {probe} is a file, not a folder")
    try:  # a real write tells what os.access cannot (root, read-only mounts, /proc)
        with tempfile.TemporaryFile(dir=probe, prefix=".clcli-write-check."):
            pass
    except OSError as e:
        reason = "permission denied" if isinstance(e, PermissionError) else e.strerror or type(e).__name__
        raise ClcliError(f"{what} {original}: cannot write in {probe} ({reason})") from None


def check_output_file(path: str | os.PathLike, what: str = "output file", *, force: bool = False) -> None:
    """Fail now, before any work, if a file cannot be written at `path`: it exists (without `force`), it is a
    folder, a parent is a file, or nothing can be created there."""
    path = Path(path)
    if path.is_dir():
        raise ClcliError(f"{what} {path} is a folder")
    if path.exists() and not force:
        raise ClcliError(f"{what} {path} already exists; use --force to replace it")
    _creatable(path.parent, what, path)


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """Fail now, before any work, if `path` cannot be (or be made into) a folder files can be written in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ClcliError(f"{what} {path} is a file, not a folder")
    _creatable(path, what, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def write_error(path: str | os.PathLike, error: OSError, needed: int | None = None) -> ClcliError:
    """The one line for a write that failed: a full disk (or quota) says how much the file needed and how much is
    free; any other failure quotes the system's reason."""
    import errno
    import shutil

    path = Path(path)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {_size(shutil.disk_usage(path.parent).free)} free"
        except OSError:
            free = ""
        need = f"it needed about {_size(needed)}" if needed else "nothing more fits"
        return ClcliError(f"no space left on the device for {path} ({need}{free})")
    return ClcliError(f"cannot write {path} ({error.strerror or one_line(error)})")


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError that `error` is, that it was raised while handling, or that its message quotes as Rust writers
    do ("... No space left on device (os error 28)": safetensors), if any."""
    import re

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        quoted = re.search(r"\(os error (\d+)\)", str(error))
        if quoted:
            code = int(quoted.group(1))
            return OSError(code, os.strerror(code))
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


@contextmanager
def atomic_path(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path for `path`; on success fsync it and rename it over `path`. The file ends with the
    mode a new file gets (0666 less the umask). A write that fails (a full disk: about
    `needed` bytes) is a one-line error, and `path` keeps what it held."""
    path = Path(path)
    with atomic_files(path.parent, [path.name], needed) as folder:
        yield folder / path.name


@contextmanager
def atomic_files(folder: str | os.PathLike, names: list[str], needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside the files `names` of `folder`, in which the caller writes each of them (they
    exist, empty, to begin with); on success each is fsynced and renamed into `folder` in the order given. Name the
    file that refers to the others last (an ONNX graph after its external data): a reader that finds it finds the
    rest. A write that fails is a one-line error and `folder` keeps what it held."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{names[-1]}.", suffix=".tmp", dir=folder))
        for name in names:
            (tmp / name).touch()
    except OSError as e:
        raise write_error(folder / names[-1], e, needed) from None
    try:
        yield tmp
        for name in names:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o666 & ~_umask())
        for name in names:
            os.replace(tmp / name, folder / name)
        _fsync_dir(folder)
    except Exception as e:  # noqa: BLE001 - a writer may wrap the OSError (torch.save: a RuntimeError after it)
        cause = _os_error(e)
        if cause is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # first: the free space the error quotes is what the user has
        raise write_error(folder / names[-1], cause, needed) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
