"""Running untrusted, model-written Python programs in isolation.

Each program runs in its own subprocess, in a fresh temporary directory, under these protections
(the ones that apply on the machine are detected at run time and listed by :attr:`Sandbox.protection`):

* **Resource limits** (always): wall-clock timeout, and ``setrlimit`` limits on CPU time, address space
  (memory), file size, open files and core dumps, set inside the child before the program runs.
* **Clean environment** (always): the child gets only ``PATH``, ``HOME``/``TMPDIR`` (its own directory)
  and a locale; no tokens or keys of the evaluator's environment. Python runs in isolated mode (``-I``).
* **Unprivileged user** (when the evaluator runs as root): the program runs as a dedicated uid/gid with
  no supplementary groups (one uid per worker slot), so it cannot write or delete files it does not own,
  cannot read the evaluator's ``/proc/<pid>/environ`` or signal its processes, and ``RLIMIT_NPROC``
  bounds the number of its processes (root is exempt from that limit, hence the drop).
* **Namespaces** (when ``unshare`` from util-linux works): new network namespace (no interface but a
  down loopback: every connection fails), PID namespace (the program cannot see or signal host
  processes; when the namespace's first process dies the kernel kills every process in it), IPC and
  UTS namespaces, and a private ``/proc``.
* **Whole-tree kill**: the child starts a new session; on timeout the session is killed, the PID
  namespace (if any) takes its processes down, and every leftover process of the slot's uid is killed.

A run counts as passed only if the program exits with status 0 *and* the harness prints its completion
marker after the program has run to the end, so ``sys.exit(0)`` or ``os._exit(0)`` half-way fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout"]

_MARKER_PREFIX = "__comol_sandbox_done__"

# Runs inside the sandboxed interpreter: set the limits, read the program from stdin, run it as
# ``__main__`` and print the completion marker only if it ran to the end. argv: cpu_s, as_bytes,
# fsize_bytes, nproc, nofile. The marker is the first stdin line.
_BOOTSTRAP = """
import resource, sys
def _limit(which, value):
    if value >= 0:
        resource.setrlimit(which, (value, value))
_cpu, _mem, _fsize, _nproc, _nofile = (int(v) for v in sys.argv[1:6])
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_CPU, _cpu)
_limit(resource.RLIMIT_AS, _mem)
_limit(resource.RLIMIT_FSIZE, _fsize)
_limit(resource.RLIMIT_NPROC, _nproc)
_limit(resource.RLIMIT_NOFILE, _nofile)
_marker = sys.stdin.readline().strip()
_source = sys.stdin.read()
sys.stdin.close()
sys.argv = ["program.py"]
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
del _limit, _cpu, _mem, _fsize, _nproc, _nofile
try:
    exec(compile(_source, "program.py", "exec"), _globals)
except SystemExit as _exit:
    print("program called exit(%r)" % (_exit.code,), file=sys.stderr)
    sys.exit(1)
sys.stdout.flush()
sys.stdout.write("\\n" + _marker + "\\n")
sys.stdout.flush()
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits applied to every sandboxed program.

    Attributes:
        timeout_s: wall-clock seconds before the whole process tree is killed.
        cpu_s: CPU seconds per process (``RLIMIT_CPU``).
        memory_bytes: address space per process (``RLIMIT_AS``).
        file_size_bytes: largest file a process may write, stdout included (``RLIMIT_FSIZE``).
        max_processes: processes of the sandbox uid (``RLIMIT_NPROC``; only enforced when the uid is dropped
            or, without root, counted against the evaluator's own user).
        max_open_files: open file descriptors per process (``RLIMIT_NOFILE``).
        output_bytes: how much of the end of stdout/stderr is kept in the result.
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 64
    max_open_files: int = 256
    output_bytes: int = 8 << 10

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s <= 0:
            raise ValueError("timeout_s and cpu_s must be positive.")
        if min(self.memory_bytes, self.file_size_bytes, self.max_processes, self.max_open_files) <= 0:
            raise ValueError(
                "memory_bytes, file_size_bytes, max_processes and max_open_files must be positive."
            )


@dataclass
class ExecResult:
    """Outcome of one sandboxed program.

    Attributes:
        status: ``passed`` (exit 0 and ran to the end), ``failed`` or ``timeout``.
        returncode: the exit status (negative: killed by that signal), ``None`` after a timeout.
        stdout: the end of the program's standard output (marker removed).
        stderr: the end of its standard error.
        duration_s: wall-clock seconds.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class _Plan:
    """How programs are launched on this machine (decided once by probing)."""

    python: str
    drop_uid: bool
    namespaces: bool
    unshare: str | None
    notes: list[str] = field(default_factory=list)


def _run_quiet(cmd: Sequence[str], **kwargs: object) -> bool:
    try:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=20, env=_base_env("/"), **kwargs
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    return done.returncode == 0


def _base_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def _unshare_flags(root: bool) -> list[str]:
    flags = ["--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
    if not root:
        flags += ["--user", "--map-root-user"]
    return flags


class Sandbox:
    """Runs untrusted Python programs, several at a time, each isolated (see the module docstring).

    Args:
        limits: resource limits of every run.
        workers: programs run concurrently (bounded thread pool; each has its own uid when dropping root).
        python: interpreter for the programs; by default the first of the current interpreter,
            ``/usr/bin/python3`` and ``python3`` on ``PATH`` that the sandbox user can execute.
        isolation: ``"auto"`` uses namespaces when they work; ``"none"`` never uses them.
        uid_base: first uid of the worker slots when running as root (slot ``i`` runs as ``uid_base + i``,
            gid likewise). Pick a range that no real user owns.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        python: str | None = None,
        isolation: Literal["auto", "none"] = "auto",
        uid_base: int = 64000,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.workers = max(1, workers or min(8, os.cpu_count() or 1))
        self.uid_base = uid_base
        self._plan = self._probe(python, isolation)
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._host_root = Path(tempfile.mkdtemp(prefix="comol-sandbox-"))
        os.chmod(self._host_root, 0o711)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------- probing

    def _probe(self, python: str | None, isolation: str) -> _Plan:
        root = os.geteuid() == 0
        candidates = [python] if python else [sys.executable, "/usr/bin/python3", shutil.which("python3")]
        candidates = [c for c in dict.fromkeys(candidates) if c]
        notes: list[str] = []
        chosen: str | None = None
        drop_uid = False
        if root:
            for cand in candidates:
                if _run_quiet(
                    [cand, "-I", "-c", "import resource"],
                    user=self.uid_base,
                    group=self.uid_base,
                    extra_groups=[],
                    cwd="/",
                ):
                    chosen, drop_uid = cand, True
                    break
            if chosen is None:
                logger.warning(
                    "Running as root but no Python interpreter (%s) is executable by uid %d: programs run "
                    "as root (pass python=... with a world-executable interpreter, e.g. /usr/bin/python3).",
                    candidates,
                    self.uid_base,
                )
                notes.append("NOT dropping root: no interpreter executable by the sandbox uid")
        if chosen is None:
            chosen = candidates[0]
        unshare = shutil.which("unshare") if isolation == "auto" else None
        namespaces = False
        if unshare is not None:
            cmd = [unshare, *_unshare_flags(root)]
            if drop_uid:
                cmd += ["--setuid", str(self.uid_base), "--setgid", str(self.uid_base)]
            namespaces = _run_quiet([*cmd, chosen, "-I", "-c", "import resource"], cwd="/")
            if not namespaces:
                notes.append("unshare present but namespaces are not permitted here")
        elif isolation == "auto":
            notes.append("unshare (util-linux) not found")
        if drop_uid:
            notes.insert(0, f"unprivileged uids {self.uid_base}..{self.uid_base + self.workers - 1}")
        if namespaces:
            notes.append("network, PID, IPC and UTS namespaces (no network; host processes invisible)")
        else:
            notes.append("no namespaces: network is NOT blocked and host processes are visible")
        if not root:
            notes.append(
                "not root: programs run as the evaluator's own user (files it can write are exposed)"
            )
        plan = _Plan(python=chosen, drop_uid=drop_uid, namespaces=namespaces, unshare=unshare, notes=notes)
        logger.info("Sandbox: python=%s; %s", chosen, "; ".join(notes))
        return plan

    @property
    def protection(self) -> dict[str, object]:
        """What protects the host on this machine (for logs and result files)."""
        return {
            "python": self._plan.python,
            "drop_privileges": self._plan.drop_uid,
            "namespaces": self._plan.namespaces,
            "network_blocked": self._plan.namespaces,
            "limits": self.limits.__dict__.copy(),
            "notes": list(self._plan.notes),
        }

    @property
    def network_isolated(self) -> bool:
        """Whether programs run without network access."""
        return self._plan.namespaces

    # ------------------------------------------------------------------------------------ running

    def run(self, source: str) -> ExecResult:
        """Run one Python program and report how it ended. Thread-safe; blocks for a free slot."""
        slot = self._slots.get()
        try:
            return self._run_in_slot(source, slot)
        finally:
            self._slots.put(slot)

    def map(self, sources: Sequence[str], progress: Callable[[int], None] | None = None) -> list[ExecResult]:
        """Run many programs on the worker pool; results are in the order of ``sources``.

        Args:
            sources: program texts.
            progress: called with 1 after each program finishes (e.g. ``tqdm.update``).
        """

        def one(source: str) -> ExecResult:
            result = self.run(source)
            if progress is not None:
                progress(1)
            return result

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(one, sources))

    def close(self) -> None:
        """Remove the sandbox's temporary root directory."""
        shutil.rmtree(self._host_root, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, uid: int) -> list[str]:
        lim = self.limits
        nproc = lim.max_processes if self._plan.drop_uid else -1
        args = [str(lim.cpu_s), str(lim.memory_bytes), str(lim.file_size_bytes), str(nproc)]
        args.append(str(lim.max_open_files))
        cmd: list[str] = []
        if self._plan.namespaces:
            assert self._plan.unshare is not None
            cmd = [self._plan.unshare, *_unshare_flags(os.geteuid() == 0)]
            if self._plan.drop_uid:
                cmd += ["--setuid", str(uid), "--setgid", str(uid)]
        return [*cmd, self._plan.python, "-I", "-B", "-c", _BOOTSTRAP, *args]

    def _run_in_slot(self, source: str, slot: int) -> ExecResult:
        uid = self.uid_base + slot
        host_dir = Path(tempfile.mkdtemp(prefix=f"run{slot}-", dir=self._host_root))
        os.chmod(host_dir, 0o711)  # the program may traverse to its directory but not list the others
        work = host_dir / "work"
        work.mkdir(mode=0o700)
        if self._plan.drop_uid:
            os.chown(work, uid, uid)
        out_path, err_path = host_dir / "stdout", host_dir / "stderr"
        marker = f"{_MARKER_PREFIX}{secrets.token_hex(16)}"
        popen_kwargs: dict[str, object] = {}
        if self._plan.drop_uid and not self._plan.namespaces:
            popen_kwargs = {"user": uid, "group": uid, "extra_groups": []}
        start = time.monotonic()
        timed_out = False
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    self._command(uid),
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd=work,
                    env=_base_env(str(work)),
                    start_new_session=True,
                    close_fds=True,
                    **popen_kwargs,  # type: ignore[arg-type]
                )
                try:
                    assert proc.stdin is not None
                    with contextlib.suppress(BrokenPipeError, OSError):
                        proc.stdin.write(f"{marker}\n{source}".encode())
                        proc.stdin.close()
                    proc.wait(timeout=self.limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    self._kill_tree(proc, uid)
            duration = time.monotonic() - start
            stdout = self._tail(out_path)
            stderr = self._tail(err_path)
        finally:
            self._kill_uid(uid)
            shutil.rmtree(host_dir, ignore_errors=True)
        completed = stdout.rstrip().endswith(marker)
        stdout = stdout.replace(f"\n{marker}\n", "").replace(marker, "")
        if timed_out:
            return ExecResult("timeout", None, stdout, stderr, duration)
        status: Status = "passed" if proc.returncode == 0 and completed else "failed"
        return ExecResult(status, proc.returncode, stdout, stderr, duration)

    def _tail(self, path: Path) -> str:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - self.limits.output_bytes))
            return handle.read().decode("utf-8", errors="replace")

    def _kill_tree(self, proc: subprocess.Popen[bytes], uid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.returncode is None:  # pragma: no cover - the kernel failed to deliver SIGKILL
            logger.error("Sandboxed process %d did not die after SIGKILL.", proc.pid)

    def _kill_uid(self, uid: int) -> None:
        """Kill every process whose real or effective uid is the slot's (after the run's tree is gone)."""
        if not self._plan.drop_uid:
            return
        for _ in range(50):
            victims = _pids_of_uid(uid)
            if not victims:
                return
            for pid in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        logger.warning("Processes of sandbox uid %d survived repeated SIGKILL: %s", uid, _pids_of_uid(uid))


def _pids_of_uid(uid: int) -> list[int]:
    """PIDs (as seen from the host) of the live, non-zombie processes with real or effective ``uid``."""
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="utf-8") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        uids = fields.get("Uid", "").split()
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if uids and uid in (int(uids[0]), int(uids[1])):
            pids.append(int(entry))
    return pids
