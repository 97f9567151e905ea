"""External commands: how they are shown (:func:`format_command`, a line a user can copy and paste) and
how a command whose children must not outlive it is run (:func:`run_process_group`)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from typing import Sequence


def format_command(argv: Sequence[object]) -> str:
    """A command line a user can copy and paste into a POSIX shell."""
    return " ".join(shlex.quote(str(a)) for a in argv)


def run_process_group(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` (its output captured as text) in a process group of its own and, if the call ends
    early (the timeout, Ctrl-C, the CLI's SIGTERM exception), kill the whole group before re-raising: a
    compiler driver's children (cc1plus, as) would otherwise go on running after the driver is killed."""
    if os.name != "posix":  # no process groups: the program alone is killed
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:  # already gone
                pass
            proc.wait()
            raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
