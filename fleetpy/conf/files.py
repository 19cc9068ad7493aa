"""Writing a file so that a reader, or a crash, sees the old content or the new, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(
    path: Path, content: bytes | str, mode: int = 0o644, uid: int | None = None, gid: int | None = None
) -> None:
    """Write `content` beside `path` and rename it over `path` (one rename is atomic).

    The temporary name ends in "~", so nothing that lists a directory of units or states
    takes it for one of its own. `uid`/`gid` set the owner, when given.
    """
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp~", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
            if uid is not None or gid is not None:
                os.fchown(f.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
