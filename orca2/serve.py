"""Serve a model for the length of a step: start a server command, wait until it answers, stop it after.

The on-policy loop samples from π_t, a new model each round; at scale π_t is served (vLLM, SGLang, TGI,
llama.cpp — any OpenAI-compatible server) and asked through the `openai:` path. `served(template, model)`
fills `{model}` (π_t's folder), `{port}` (a free local port) and `{name}` (the model name to answer to) into
the command, starts it in its own
process group, polls GET <base>/models until it answers, yields the base URL, and stops the group
(SIGTERM, then SIGKILL) however the step ends. Its output goes to a log file beside the run, never to the
terminal's progress bars.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from orca2.errors import Orca2Error


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it): a server's, or the launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(
    template: str,
    model: str,
    log_path: str | os.PathLike[str],
    *,
    timeout: float = 900.0,
    poll: float = 0.5,
    name: str = "student",
) -> Iterator[str]:
    """Run `template` (with {model}, {port} and {name}) while the block runs; yield its OpenAI base URL."""
    port = free_port()
    try:
        command = template.format(model=model, port=port, name=name)
    except (KeyError, IndexError) as exc:
        raise Orca2Error(
            f"server command {template!r}: unknown placeholder {exc} (use {{model}}, {{port}}, {{name}})"
        ) from None
    base = f"http://127.0.0.1:{port}/v1"
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise Orca2Error(
                        f"server command exited with code {proc.returncode} before answering "
                        f"({command!r}; its output: {log_path})"
                    )
                try:
                    with urllib.request.urlopen(f"{base}/models", timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise Orca2Error(
                        f"server command did not answer on {base} within {timeout:.0f} s ({command!r}; "
                        f"its output: {log_path})"
                    )
                time.sleep(poll)
            yield base
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
