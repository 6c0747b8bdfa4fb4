"""Running untrusted, model-written Python programs in isolation.

Each program runs in its own subprocess under layers of protection. Which layers work on the machine is
probed once, when the :class:`Sandbox` is made; :attr:`Sandbox.protection` reports, layer by layer, what
is in force, and nothing else is claimed. Policy (``isolation``): ``"auto"`` applies every layer that
works and logs a warning naming each one that does not; ``"strict"`` refuses (:class:`SandboxError`)
unless every layer works; ``"none"`` uses no namespaces (hence no private mounts) but keeps the rest.
A run whose setup fails after probing raises :class:`SandboxError`; it is never scored as a failure.

Layers (see :mod:`comol.evaluation.sandbox_child` for how each is set up):

* ``limits`` (always): wall-clock timeout; ``setrlimit`` on CPU time, address space, file size, open
  files, core dumps (and processes, when the uid is dropped). Clean environment, Python in isolated mode.
* ``unprivileged_uid`` (as root): a dedicated uid/gid per worker slot, no supplementary groups; without
  it every capability is dropped (root of a user namespace). Always no_new_privs and a parent-death signal.
* ``namespaces`` (when util-linux ``unshare`` works): network (no interface but a down loopback, so no IP
  traffic and no abstract unix socket of the host), PID (host processes invisible; when its first process
  dies the kernel kills the rest), IPC, UTS, mount, and a private ``/proc``.
* ``private_tmp``: fresh size-limited tmpfs on ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run`` (host
  unix sockets there are out of sight; the work directory is ``/tmp/work``); all vanish with the run.
* ``read_only_root``: the rest of the file system is read-only (and nosuid).
* ``unix_socket_filter``: a seccomp filter refuses ``socket(AF_UNIX)`` and io_uring, so no unix socket of
  the host can be reached wherever it lives.
* ``watchdog``: a separate process; if the evaluator dies (even by SIGKILL) it kills every launched
  process group and every process of the sandbox uids, and removes the temporary directory.

A run counts as passed only if the program exits with status 0 *and* the harness prints its completion
marker after the program has run to the end, so ``sys.exit(0)`` or ``os._exit(0)`` half-way fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from comol.evaluation import sandbox_child
from comol.evaluation.sandbox_child import WORK_DIR, kill_uid, read_status, remove_files_of

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout"]

_MARKER_PREFIX = "__comol_sandbox_done__"
_CHILD_SOURCE = Path(sandbox_child.__file__).read_text(encoding="utf-8")
ISOLATIONS = ("auto", "strict", "none")  # the policies of the module docstring
LAYERS = ("unprivileged_uid", "namespaces", "private_tmp", "read_only_root", "unix_socket_filter")


class SandboxError(RuntimeError):
    """The sandbox cannot run programs with the protection it promised (or was required to have)."""


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
        scratch_bytes: size of each private tmpfs (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run``).
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 64
    max_open_files: int = 256
    output_bytes: int = 8 << 10
    scratch_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s <= 0:
            raise ValueError("timeout_s and cpu_s must be positive.")
        sizes = (self.memory_bytes, self.file_size_bytes, self.max_processes, self.max_open_files)
        if min(*sizes, self.scratch_bytes) <= 0:
            raise ValueError(
                "memory_bytes, file_size_bytes, max_processes, max_open_files and scratch_bytes must be "
                "positive."
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
    unshare: str | None
    setpriv: str | None
    layers: dict[str, bool]
    notes: list[str] = field(default_factory=list)


def _base_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def _unshare_flags(root: bool) -> list[str]:
    flags = ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
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
        isolation: ``"auto"``, ``"strict"`` or ``"none"`` (the policy of the module docstring).
        uid_base: first uid of the worker slots when running as root (slot ``i`` runs as ``uid_base + i``,
            gid likewise). Pick a range that no real user owns.

    Raises:
        SandboxError: with ``isolation="strict"``, when a layer is not available.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        python: str | None = None,
        isolation: Literal["auto", "strict", "none"] = "auto",
        uid_base: int = 64000,
    ) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be 'auto', 'strict' or 'none', got {isolation!r}.")
        self.limits = limits or SandboxLimits()
        self.workers = max(1, workers or min(8, os.cpu_count() or 1))
        self.uid_base = uid_base
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._host_root = Path(tempfile.mkdtemp(prefix="comol-sandbox-"))
        os.chmod(self._host_root, 0o711)
        self._watchdog: subprocess.Popen[bytes] | None = None
        try:
            self._plan = self._probe(python, isolation)
            self._start_watchdog()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------- probing

    def _probe(self, python: str | None, isolation: str) -> _Plan:
        root = os.geteuid() == 0
        candidates = [python] if python else [sys.executable, "/usr/bin/python3", shutil.which("python3")]
        candidates = [c for c in dict.fromkeys(candidates) if c]
        chosen: str | None = None
        if root:
            for cand in candidates:
                if self._quiet([cand, "-I", "-c", "import resource, json"], as_uid=self.uid_base):
                    chosen = cand
                    break
        layers = dict.fromkeys(LAYERS, False)
        layers["unprivileged_uid"] = chosen is not None
        notes: list[str] = []
        if root and chosen is None:
            notes.append(f"no interpreter of {candidates} is executable by uid {self.uid_base}")
        elif not root:
            notes.append("not root: programs run as the evaluator's user, without capabilities")
        setpriv = shutil.which("setpriv")
        if setpriv is not None and not self._quiet([setpriv, "--pdeathsig", "KILL", "true"]):
            setpriv = None
        plan = _Plan(
            python=chosen or candidates[0], unshare=None, setpriv=setpriv, layers=layers, notes=notes
        )
        unshare = shutil.which("unshare") if isolation != "none" else None
        if isolation != "none" and unshare is None:
            notes.append("unshare (util-linux) not found")
        if unshare is not None and setpriv is None:
            notes.append(
                "setpriv (util-linux) not found: only the watchdog stops unshare if the evaluator dies"
            )
        wanted = {"namespaces": unshare is not None, "private_tmp": unshare is not None}
        wanted |= {"read_only_root": unshare is not None, "unix_socket_filter": True}
        plan.unshare = unshare
        for _ in range(len(wanted) + 1):  # drop the failing layer and try again
            plan.layers.update(wanted)
            error = self._setup_error(plan)
            if error is None:
                break
            layer = next(
                (name for name, step in _STEP_OF_LAYER.items() if error.startswith(step) and wanted[name]),
                "namespaces" if wanted["namespaces"] else None,
            )
            if layer is None:
                raise SandboxError(f"The sandbox cannot start even without namespaces: {error}")
            notes.append(f"{layer} not available: {error}")
            wanted[layer] = False
            if layer == "namespaces":
                wanted["private_tmp"] = wanted["read_only_root"] = False
            elif layer == "private_tmp":
                wanted["read_only_root"] = False
        missing = [name for name, on in plan.layers.items() if not on]
        if missing and isolation == "strict":
            raise SandboxError(
                f"isolation='strict' but these sandbox layers are not available: {missing} ({notes}); "
                "run as root where util-linux unshare works, or pass isolation='auto' to accept less."
            )
        if missing:
            logger.warning("Sandbox layers NOT in force: %s (%s)", ", ".join(missing), "; ".join(notes))
        logger.info(
            "Sandbox: python=%s; layers in force: %s", plan.python, [k for k, v in layers.items() if v]
        )
        return plan

    def _quiet(self, cmd: Sequence[str], as_uid: int | None = None) -> bool:
        user = {"user": as_uid, "group": as_uid, "extra_groups": []} if as_uid is not None else {}
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=20,
                env=_base_env("/"),
                cwd="/",
                **user,
            )
        except (OSError, subprocess.SubprocessError, ValueError):
            return False
        return done.returncode == 0

    def _setup_error(self, plan: _Plan) -> str | None:
        """Run a trivial program under ``plan``; the setup step that failed, or ``None``."""
        self._plan = plan
        try:
            result = self._run_in_slot("import json", 0, probing=True)
        except SandboxError as err:
            return str(err)
        return None if result.passed else f"setup: probe program failed: {result.stderr[-500:]}"

    @property
    def protection(self) -> dict[str, object]:
        """What protects the host on this machine, layer by layer (for logs and result files)."""
        layers = dict(self._plan.layers)
        return {
            "python": self._plan.python,
            "layers": layers,
            "missing": [name for name, on in layers.items() if not on],
            "drop_privileges": layers["unprivileged_uid"],
            "namespaces": layers["namespaces"],
            "network_blocked": layers["namespaces"] and layers["unix_socket_filter"],
            "host_unix_sockets_blocked": layers["unix_socket_filter"],
            "private_tmp": layers["private_tmp"],
            "limits": self.limits.__dict__.copy(),
            "notes": list(self._plan.notes),
        }

    @property
    def network_isolated(self) -> bool:
        """Whether programs can reach no host service: no IP network and no unix socket."""
        return bool(self.protection["network_blocked"])

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
        """Stop the watchdog (which kills what is left) and remove the temporary root directory."""
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                assert self._watchdog.stdin is not None
                self._watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=30)
            self._watchdog = None
        shutil.rmtree(self._host_root, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_watchdog(self) -> None:
        uids = (
            [str(self.uid_base + s) for s in range(self.workers)]
            if self._plan.layers["unprivileged_uid"]
            else []
        )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _CHILD_SOURCE, "watch", str(self._host_root), *uids],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,  # a signal to the evaluator's process group does not reach it
        )

    def _tell_watchdog(self, op: str, pid: int, start: str | None) -> None:
        if self._watchdog is None or start is None:
            return
        assert self._watchdog.stdin is not None
        with contextlib.suppress(OSError):
            self._watchdog.stdin.write(f"{op} {pid} {start}\n".encode())
            self._watchdog.stdin.flush()

    def _settings(self, uid: int | None, marker: str, status_fd: int) -> dict[str, object]:
        lim, layers = self.limits, self._plan.layers
        return {
            "uid": uid,
            "marker": marker,
            "status_fd": status_fd,
            "private_mounts": layers["private_tmp"],
            "read_only": layers["read_only_root"],
            "seccomp": layers["unix_socket_filter"],
            "scratch_bytes": lim.scratch_bytes,
            "cpu_s": lim.cpu_s,
            "memory_bytes": lim.memory_bytes,
            "file_size_bytes": lim.file_size_bytes,
            "max_processes": lim.max_processes if uid is not None else -1,
            "max_open_files": lim.max_open_files,
        }

    def _run_in_slot(self, source: str, slot: int, probing: bool = False) -> ExecResult:
        root, layers = os.geteuid() == 0, self._plan.layers
        uid = self.uid_base + slot if layers["unprivileged_uid"] else None
        host_dir = Path(tempfile.mkdtemp(prefix=f"run{slot}-", dir=self._host_root))
        os.chmod(host_dir, 0o711)  # the program may traverse to its directory but not list the others
        if layers["private_tmp"]:
            work = WORK_DIR  # inside the run's own tmpfs; host_dir only keeps the output files
        else:
            work = str(host_dir / "work")
            os.mkdir(work, 0o700)
            if uid is not None:
                os.chown(work, uid, uid)
        cmd = [self._plan.python, "-I", "-B", "-c", _CHILD_SOURCE, "run"]
        popen_kwargs: dict[str, object] = {}
        if layers["namespaces"]:
            assert self._plan.unshare is not None
            cmd = [self._plan.unshare, *_unshare_flags(root), *cmd]
            if self._plan.setpriv is not None:  # unshare dies with the evaluator's thread
                cmd = [self._plan.setpriv, "--pdeathsig", "KILL", *cmd]
            popen_kwargs["cwd"] = "/"
        else:
            popen_kwargs["cwd"] = work
        out_path, err_path = host_dir / "stdout", host_dir / "stderr"
        marker = f"{_MARKER_PREFIX}{secrets.token_hex(16)}"
        status_r, status_w = os.pipe()
        start = time.monotonic()
        timed_out = False
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                settings = json.dumps(self._settings(uid, marker, status_w))
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    env=_base_env(work),
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(status_w,),
                    **popen_kwargs,  # type: ignore[arg-type]
                )
                os.close(status_w)
                status_w = -1
                started = sandbox_child._start_time(proc.pid)
                self._tell_watchdog("+", proc.pid, started)
                try:
                    assert proc.stdin is not None
                    with contextlib.suppress(BrokenPipeError, OSError):
                        proc.stdin.write(f"{settings}\n{source}".encode())
                        proc.stdin.close()
                    proc.wait(timeout=self.limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    self._kill_tree(proc)
                    self._tell_watchdog("-", proc.pid, started)
            duration = time.monotonic() - start
            status = read_status(status_r)
            stdout = self._tail(out_path)
            stderr = self._tail(err_path)
        finally:
            if status_w >= 0:
                os.close(status_w)
            os.close(status_r)
            if uid is not None:
                survivors = kill_uid(uid)
                if survivors:
                    logger.warning(
                        "Processes of sandbox uid %d survived repeated SIGKILL: %s", uid, survivors
                    )
                if not layers["private_tmp"]:
                    remove_files_of(uid)
            shutil.rmtree(host_dir, ignore_errors=True)
        if status != "ok" and not (timed_out and not status and not probing):
            message = status or f"the sandbox exited ({proc.returncode}) before its setup finished"
            if not status and stderr.strip():
                message += f": {stderr.strip()[-300:]}"
            if not probing:
                message = f"Sandbox setup failed for a run after probing succeeded: {message}"
            raise SandboxError(message)
        completed = stdout.rstrip().endswith(marker)
        stdout = stdout.replace(f"\n{marker}\n", "").replace(marker, "")
        if timed_out:
            return ExecResult("timeout", None, stdout, stderr, duration)
        result: Status = "passed" if proc.returncode == 0 and completed else "failed"
        return ExecResult(result, proc.returncode, stdout, stderr, duration)

    def _tail(self, path: Path) -> str:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - self.limits.output_bytes))
            return handle.read().decode("utf-8", errors="replace")

    def _kill_tree(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.returncode is None:  # pragma: no cover - the kernel failed to deliver SIGKILL
            logger.error("Sandboxed process %d did not die after SIGKILL.", proc.pid)


# the prefix of the setup error that each layer's failure produces (see sandbox_child.setup)
_STEP_OF_LAYER = {
    "private_tmp": "private_mounts",
    "read_only_root": "read_only",
    "unix_socket_filter": "seccomp",
}
