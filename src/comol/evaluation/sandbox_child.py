"""The code that runs in the sandbox's own processes: the in-sandbox bootstrap and the watchdog.

Stand-alone (standard library only, Linux only): :mod:`comol.evaluation.sandbox` passes this file's text to
``python -I -B -c``, so it runs without comol installed, as another user, inside the namespaces. The host
side imports its helpers at the end (killing a uid's processes, reading the status pipe, cleaning up).

``python -c SOURCE run`` reads one JSON line of settings from stdin, then the program, and

1. ``private_mounts``: makes every mount private to its mount namespace (nothing propagates to the host)
   and mounts a fresh, size-limited ``tmpfs`` on each of ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run``
   (those that exist; ``/var/run`` and ``/var/lock`` are links into ``/run`` here) with the work
   directory ``/tmp/work`` inside; ``read_only``: first makes the whole mount tree read-only (and nosuid);
2. drops privileges: to ``uid`` (no supplementary groups) when given, else every capability (a user
   namespace's root, or root that has no usable sandbox uid); sets no_new_privs and a parent-death signal;
3. ``seccomp``: installs a filter under which ``socket(AF_UNIX, ...)`` and ``io_uring_setup`` fail with
   EPERM (no unix socket can be created, so none of the host's can be reached; socketpair still works);
4. sets the resource limits, writes ``ok`` to the status pipe and closes it, and runs the program as
   ``__main__``, printing the completion marker only if it ran to the end.

If a step fails it writes ``<step>: <error>`` to the status pipe and exits 121 without running the program;
the host then refuses the run (it never counts as a sample failure). The program cannot forge the status:
the pipe is closed before it starts.

``python -c SOURCE watch ROOT UID...`` is the watchdog: it reads ``+ PID START`` / ``- PID START`` lines
(the launched process groups) from stdin; at end of input (the evaluator closed the pipe or died, even by
SIGKILL) or on SIGTERM it kills the process groups still listed and every process of the UIDs, removes
the directory ROOT and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import struct
import sys
import time

PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/var/run", "/var/lock")
WORK_DIR = "/tmp/work"
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")  # emptied of the uid's files when not private
SETUP_FAILED = 121

_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the syscall tables merged)
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 24, 22, 38
_SECCOMP_MODE_FILTER = 2
# machine -> (audit arch, socket syscall number); io_uring_setup is 425 on both
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
_SYS_IO_URING_SETUP = 425


class SetupError(Exception):
    """A protection could not be put in place (the message starts with the step's name)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


# ------------------------------------------------------------------------------------------- mounts


def _private_mounts(read_only: bool, scratch_bytes: int, uid: int | None) -> None:
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "private_mounts: make / private")
    if read_only:

        class MountAttr(ctypes.Structure):
            _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns_fd")]

        attr = MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
        libc.syscall.restype = ctypes.c_long
        done = libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            ctypes.c_char_p(b"/"),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        _check(done, "read_only: mount_setattr(/, AT_RECURSIVE, RDONLY)")
        if not os.statvfs("/").f_flag & os.ST_RDONLY:
            raise SetupError("read_only: / is still writable")
    seen: set[str] = set()
    for path in PRIVATE_DIRS:
        real = os.path.realpath(path)
        if real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        mode = "0755" if real == "/run" else "1777"
        data = f"size={scratch_bytes},mode={mode}".encode()
        _check(
            libc.mount(b"tmpfs", real.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, data),
            f"private_mounts: {real}",
        )
        if os.listdir(real):
            raise SetupError(f"private_mounts: {real} is not empty after mounting a tmpfs")
    os.mkdir(WORK_DIR, 0o700)
    if uid is not None:
        os.chown(WORK_DIR, uid, uid)


# -------------------------------------------------------------------------------------- privileges


def _drop_privileges(uid: int | None) -> None:
    libc = _libc()
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif _capabilities()["CapPrm"]:  # root (of a user namespace, or without a usable sandbox uid)
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as handle:
            last = int(handle.read())
        for cap in range(last + 1):
            _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop_capabilities: bounding set {cap}")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()
        _check(libc.capset(header, data), "drop_capabilities: capset")
    caps = _capabilities()
    if caps["CapEff"] or caps["CapPrm"]:
        raise SetupError(f"drop_capabilities: capabilities remain ({caps})")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _capabilities() -> dict[str, int]:
    with open("/proc/self/status", encoding="ascii") as handle:
        return {k: int(v, 16) for k, v in (line.split(":", 1) for line in handle) if k.startswith("Cap")}


def _parent_death_signal(parent: int) -> None:
    # after the credential change, which clears it; then make sure the parent did not die before
    _check(_libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent_death_signal")
    if os.getppid() != parent:
        raise SetupError("parent_death_signal: the parent is already gone")


def _seccomp() -> None:
    machine = os.uname().machine
    if machine not in _SECCOMP_ARCH:
        raise SetupError(f"seccomp: no filter for machine {machine!r}")
    arch, sys_socket = _SECCOMP_ARCH[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    # seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (the int domain is the low word: little endian)
    program = [
        (ld, 0, 0, 4),  # 0: A = arch
        (jeq, 1, 0, arch),  # 1: native -> 3
        (ret, 0, 0, deny),  # 2: a foreign ABI (e.g. int 0x80): refuse every call
        (ld, 0, 0, 0),  # 3: A = syscall number
        (jge, 5, 0, 0x40000000),  # 4: x32 ABI -> 10
        (jeq, 4, 0, _SYS_IO_URING_SETUP),  # 5: -> 10
        (jeq, 1, 0, sys_socket),  # 6: -> 8
        (ret, 0, 0, allow),  # 7
        (ld, 0, 0, 16),  # 8: A = domain
        (jeq, 0, 1, 1),  # 9: AF_UNIX -> 10, else -> 11
        (ret, 0, 0, deny),  # 10
        (ret, 0, 0, allow),  # 11
    ]
    blob = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    filters = ctypes.create_string_buffer(blob)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(program), ctypes.addressof(filters))
    libc = _libc()
    _check(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def _limits(cfg: dict) -> None:
    pairs = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, cfg["cpu_s"]),
        (resource.RLIMIT_AS, cfg["memory_bytes"]),
        (resource.RLIMIT_FSIZE, cfg["file_size_bytes"]),
        (resource.RLIMIT_NPROC, cfg["max_processes"]),
        (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
    ]
    for which, value in pairs:
        if value >= 0:
            resource.setrlimit(which, (value, value))


def setup(cfg: dict, parent: int) -> None:
    """Put every protection of ``cfg`` in place (raises :class:`SetupError` naming the step that failed)."""
    uid = cfg["uid"]
    try:
        if cfg["private_mounts"]:
            _private_mounts(cfg["read_only"], cfg["scratch_bytes"], uid)
            os.chdir(WORK_DIR)
        _drop_privileges(uid)
        _parent_death_signal(parent)
        if cfg["seccomp"]:
            _seccomp()
        _limits(cfg)
    except SetupError:
        raise
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise SetupError(f"setup: {err}") from err


def run() -> None:
    """The bootstrap (``run``): settings line, protections, then the program from stdin."""
    parent = os.getppid()
    cfg = json.loads(sys.stdin.readline())
    status = cfg["status_fd"]
    try:
        setup(cfg, parent)
    except SetupError as err:
        os.write(status, str(err).encode())
        os._exit(SETUP_FAILED)
    os.write(status, b"ok")
    os.close(status)
    source = sys.stdin.read()
    sys.stdin.close()
    sys.argv = ["program.py"]
    marker = cfg["marker"]
    del cfg, status, parent
    program_globals = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), program_globals)
    except SystemExit as exit_:
        print(f"program called exit({exit_.code!r})", file=sys.stderr)
        sys.exit(1)
    sys.stdout.flush()
    sys.stdout.write("\n" + marker + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------- host side


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pids_of_uid(uid: int) -> list[int]:
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


def kill_uid(uid: int, attempts: int = 50) -> list[int]:
    """SIGKILL every process of ``uid`` until none is left; returns the survivors (normally none)."""
    for _ in range(attempts):
        victims = pids_of_uid(uid)
        if not victims:
            return []
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return pids_of_uid(uid)


def read_status(fd: int) -> str:
    """What the bootstrap wrote to the status pipe (``ok``, an error, or nothing if it died first)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def remove_files_of(uid: int) -> None:
    """Without private mounts: delete what ``uid`` left at the top of the shared temporary directories."""
    for directory in SHARED_TMP:
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)


def watch(root: str, uids: list[int]) -> None:
    """The watchdog (``watch``): clean up after the evaluator once its pipe closes."""

    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    live: dict[int, str] = {}
    try:
        for line in sys.stdin:
            op, pid, start = line.split()
            if op == "+":
                live[int(pid)] = start
            else:
                live.pop(int(pid), None)
    finally:
        for pid, start in live.items():
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        for uid in uids:
            kill_uid(uid)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run()
    elif sys.argv[1:2] == ["watch"]:
        watch(sys.argv[2], [int(u) for u in sys.argv[3:]])
    else:
        sys.exit(f"usage: {sys.argv[0]} run | watch ROOT UID...")
