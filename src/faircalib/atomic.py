"""Files that are either complete or absent: written under a temporary sibling name, then
renamed into place (a rename within one directory is atomic on POSIX file systems), so a
killed process leaves at most a hidden `.NAME.tmp-PID` file, never a truncated NAME."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from faircalib.errors import OutputError


def tmp_name(path: Path) -> Path:
    """The temporary sibling of `path` this process writes first."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def os_error_message(path: Path, exc: OSError) -> str:
    """One line for a failed write: what, where, and what to do about it."""
    reason = exc.strerror or str(exc)
    return (
        f"cannot write {path}: {reason}; choose a writable location with free space "
        "(or free some) and run the command again"
    )


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `path` only if the block finishes."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(os_error_message(path, exc)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


# benchmark records: JSON without whitespace (their Markdown twins are what people read; the
# repository's tracked files must stay under 60 MB)
COMPACT: dict[str, Any] = {"indent": None, "separators": (",", ":")}


def write_json(path: Path, obj: Any, indent: int | None = 2, **kwargs: Any) -> None:
    write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


# colours a PNG keeps: line plots use a dozen, plus the antialiasing shades between them
PNG_COLOURS = 64


def save_figure(fig: Any, path: Path, **kwargs: Any) -> None:
    """matplotlib's savefig, atomically (the format comes from `path`'s suffix). A PNG is
    stored with a palette of `PNG_COLOURS` colours (Pillow, which matplotlib already needs):
    a plot looks the same at about a quarter of the bytes, and results live in a size-capped
    git tree."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or None
    with replacing(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
        if fmt == "png":
            palette_png(tmp)


def palette_png(path: Path) -> None:
    """Rewrite the PNG at `path` in place with a `PNG_COLOURS`-colour palette."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.quantize(colors=PNG_COLOURS, method=Image.Quantize.MEDIANCUT).save(
        path, format="PNG", optimize=True
    )


def check_writable_dir(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be written there (as root, permission
    bits prove nothing: a read-only mount or /proc is found only by trying)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():  # mkdir would say only "File exists"
        raise OutputError(f"{directory} exists and is not a directory; choose another output path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(os_error_message(directory, exc)) from exc


def current_umask() -> int:
    """The process umask (read from /proc where it can be, which changes nothing; elsewhere
    set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(path: Path) -> Path:
    """Give an output what any ordinary file gets: directories 0777 and files 0666 minus the
    umask (0755 / 0644 under the usual 022), so colleagues can read it. Temporary files and
    directories (mkstemp, mkdtemp) are created 0600 / 0700 and keep that through the rename
    that publishes them; this undoes it. Symlinks are left alone."""
    path = Path(path)
    mask = current_umask()
    try:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o777 & ~mask)
            for child in path.rglob("*"):
                if child.is_symlink():
                    continue
                child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)
        elif path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)
    except OSError as exc:
        raise OutputError(os_error_message(path, exc)) from exc
    return path
