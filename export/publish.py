"""Write the artifact into a staging directory beside ``--out`` and move it into place only when
complete, so an interrupted or failed export never leaves a manifest naming missing files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.manifest import MANIFEST_NAME

from .errors import OutputDirError


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise OutputDirError(
            f"--out {out} exists, is not empty and holds no {MANIFEST_NAME}: refusing to replace a directory "
            "that is not an artifact of ours; choose an empty or new directory"
        )


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a fresh directory on the same filesystem as ``out``; remove it on any error or Ctrl-C."""
    out = out.expanduser().resolve()
    _check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise OutputDirError(f"cannot create a directory next to {out}: {exc}; check the path and permissions") from exc
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the artifact should be readable like any output
    try:
        yield stage
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputDirError(
            f"writing the artifact failed ({exc}); nothing was written to {out}. Free disk space or fix "
            "permissions and run again"
        ) from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish(stage: Path, out: Path) -> None:
    """Replace ``out`` by ``stage``. The old artifact, if any, is moved aside first and removed last."""
    out = out.expanduser().resolve()
    _check_target(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "artifact")
    try:
        os.rename(stage, out)
    except OSError:
        if old is not None:
            os.rename(old / "artifact", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
