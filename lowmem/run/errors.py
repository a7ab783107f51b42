"""The exception types for problems the user can fix; the CLI prints them as one line and exits non-zero."""
from __future__ import annotations

import errno


class UserError(Exception):
    """A bad flag, file or value: the message names the problem and the fix."""


class DiskFull(UserError):
    """A write failed for lack of space; what was there before is intact."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when torch or safetensors wrap it in their own exception types."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left" in text or "disk quota" in text or "file write failed" in text


def log_dir_full(log_dir: str, exc: BaseException) -> DiskFull | None:
    """The one-line error for a log write that failed for lack of space; None for any other failure."""
    if not is_disk_full(exc):
        return None
    return DiskFull(f"the disk under the log dir '{log_dir}' is full ({str(exc).splitlines()[0][:120]}); the "
                    "checkpoints are intact: free space (or set --log_dir elsewhere) and resume with "
                    "--is_keep_training=True")
