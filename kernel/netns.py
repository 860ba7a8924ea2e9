"""Network namespaces: their identity, and running a program inside one we hold open.

`splittun down` must clean up in the namespace the instance ran in, whichever namespace the command itself runs
in (and also after that namespace's supervisord crashed): it holds the namespace open by fd and runs the
interceptor's own cleanup entry point inside it (`python -m actors.interceptor --cleanup`).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000


def netns_id(path: str = "/proc/self/ns/net") -> str:
    """A namespace's identity (st_dev:st_ino of its nsfs file): equal across processes, never reused while
    anything holds the namespace."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def enter(netns_fd: int) -> None:
    """Move the calling thread (of a child about to exec) into the namespace `netns_fd` refers to."""
    if ctypes.CDLL(None, use_errno=True).setns(netns_fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns into the network namespace failed")


def run_in(netns_fd: int, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside the namespace (text output captured; no exception on a non-zero exit)."""
    return subprocess.run(
        list(argv),
        preexec_fn=lambda: enter(netns_fd),
        pass_fds=(netns_fd,),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
