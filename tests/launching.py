"""Launching test workers in several processes: `accelerate launch` (gloo on a CPU) and a free local port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(target: Sequence[str], num_processes: int = 2, setup: Sequence[str] | None = None,
                      timeout: int = 300, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``accelerate launch [setup] TARGET...`` on ``num_processes`` processes (default setup: DDP with gloo on a
    CPU, no mixed precision), one thread each; assert it exits 0, showing the end of stderr otherwise."""
    setup = list(setup) if setup is not None else ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *setup, "--num_processes", str(num_processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), *map(str, target)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
