"""Start one worker process fast, with its stdout and stderr on pipes, in a process group of its own.

``os.posix_spawnp`` (vfork + exec in C) costs a fraction of ``subprocess.Popen``'s
Python-side work, which matters when a batch runs 100,000 tiny tasks. It cannot
change the child's working directory, so a worker whose directory differs from
ours, or whose ``PATH`` the batch overrides, starts through ``Popen`` instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


class Worker:
    """A started worker: its pid, the read ends of its stdout/stderr pipes, and its exit status."""

    def __init__(self, pid: int, stdout: int, stderr: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._popen = popen

    def poll(self) -> int | None:
        """The exit status (negative: killed by that signal) once it has ended, else None."""
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            else:
                with contextlib.suppress(ChildProcessError):
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        """Block until it ends; its exit status."""
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.wait()
            else:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to its whole process group (its children too); no error if it is gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL its process group."""
        self.signal_group(signal.SIGKILL)


def spawn(argv: list[str], *, env: dict[str, str], cwd: str | None, stdin: Path | None) -> Worker:
    """Start ``argv`` (looked up on PATH) with ``stdin`` (default /dev/null) and piped stdout/stderr.

    ``cwd``: a working directory other than ours (None: ours). Raises OSError (e.g.
    ENOENT) if it cannot be started, ValueError for an argument or environment value
    with a NUL byte.
    """
    if cwd is not None or env.get("PATH") != os.environ.get("PATH"):
        return _spawn_popen(argv, env=env, cwd=cwd, stdin=stdin)
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, str(stdin) if stdin is not None else os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_write, 1),
        (os.POSIX_SPAWN_DUP2, err_write, 2),
    ]  # every other descriptor of ours is close-on-exec (PEP 446)
    try:
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True)
    except BaseException:
        for fd in (out_read, err_read):
            os.close(fd)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    return Worker(pid, out_read, err_read)


def same_directory(path: str | None) -> bool:
    """True if ``path`` (None: unset) is this process's working directory."""
    return path is None or os.path.realpath(path) == os.getcwd()


def _spawn_popen(argv: list[str], *, env: dict[str, str], cwd: str | None, stdin: Path | None) -> Worker:
    with open(stdin if stdin is not None else os.devnull, "rb") as source:
        popen = subprocess.Popen(
            argv, cwd=cwd or None, env=env, stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stopping it stops its children
        )  # fmt: skip
    assert popen.stdout is not None and popen.stderr is not None
    # The worker's reader owns and closes these descriptors, as for a spawned worker.
    stdout, stderr = os.dup(popen.stdout.fileno()), os.dup(popen.stderr.fileno())
    popen.stdout.close()
    popen.stderr.close()
    return Worker(popen.pid, stdout, stderr, popen)
