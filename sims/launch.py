"""Start N local processes of one command under jax.distributed (coordinator on 127.0.0.1).

    python -m sims.launch --processes 2 -- python -m sims.sweep sims/grids/tiny.toml --out runs/tiny2

Each process gets LINATTN_COORDINATOR, LINATTN_NUM_PROCESSES, LINATTN_PROCESS_ID and
JAX_NUM_CPU_DEVICES (linattn.distributed.launch_env); a script that calls
linattn.distributed.initialize_from_env() first then joins the others (gloo collectives on CPU).
Output lines are prefixed with the process index. If a process fails, the others are stopped and
the launcher exits with that process's status. For testing, and for many-core CPUs; on a cluster
use its own launcher (srun): jax.distributed.initialize() reads its environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from linattn.cli import Parser, fail, positive
from linattn.distributed import launch_env

PROG = "python -m sims.launch"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
               usage=f"{PROG} [-h] --processes N [--port P] [--local-devices K] -- COMMAND ...")
    p.add_argument("--processes", type=positive(int), required=True, help="number of processes")
    p.add_argument("--port", type=positive(int), default=None,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--local-devices", type=positive(int), default=None,
                   help=f"CPU devices per process (JAX_NUM_CPU_DEVICES; default: cores / processes, "
                        f"at least 1; {os.cpu_count()} cores here)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, command): the command is everything after the first `--`."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _pump(i: int, stream, lock: threading.Lock) -> None:
    """Copy a process's output to ours line by line, each line prefixed with [i]."""
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(f"[{i}] {line.decode(errors='replace')}")
            sys.stdout.flush()
    stream.close()


def _stop(procs: list, grace: float = 5.0) -> None:
    """SIGTERM the process groups of the launched processes still running, SIGKILL after `grace` s."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with _ignore():
            os.killpg(p.pid, signal.SIGTERM)
    t_end = time.time() + grace
    for p in live:
        try:
            p.wait(max(t_end - time.time(), 0.01))
        except subprocess.TimeoutExpired:
            with _ignore():
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class _ignore:
    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        return kind is not None and issubclass(kind, ProcessLookupError)


def status_of(code: int) -> int:
    """A child's return code as an exit status (killed by signal s: 128 + s)."""
    return 128 - code if code < 0 else code


def launch(command: list[str], processes: int, port: int, local_devices: int) -> int:
    """Run `command` in `processes` processes; 0 when all succeed, else the first failure's status."""
    lock = threading.Lock()
    procs, pumps = [], []
    for i in range(processes):
        env = {**os.environ, **launch_env(port, processes, i, local_devices)}
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(i, p.stdout, lock), daemon=True)
        t.start()
        pumps.append(t)
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = status_of(failed[0].returncode)
                with lock:
                    print(f"{PROG}: process {procs.index(failed[0])} exited with status {status}; stopping the others",
                          file=sys.stderr, flush=True)
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)
    if status == 0:
        status = next((status_of(p.returncode) for p in procs if p.returncode != 0), 0)
    return status


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, command = split_argv(argv)
    args = parser().parse_args(opts)
    if not command:
        fail(PROG, "no command: give it after --, e.g. -- python -m sims.sweep GRID.toml --out DIR")
    local = args.local_devices or max(1, (os.cpu_count() or 1) // args.processes)
    return launch(command, args.processes, args.port or free_port(), local)


if __name__ == "__main__":
    sys.exit(main())
