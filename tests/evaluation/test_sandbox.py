"""The sandbox under attack: the host and the results must come out unharmed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from comol.evaluation.sandbox import Sandbox, SandboxError, SandboxLimits
from comol.evaluation.sandbox_child import kill_uid, pids_of_uid

SECRET = "comol-test-secret-value-7f3a"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxLimits(timeout_s=3, cpu_s=3, memory_bytes=512 << 20), workers=2) as box:
        yield box


@pytest.fixture
def sentinel():
    """A file outside the sandbox, in a root-owned directory others may read but not write."""
    directory = Path(tempfile.mkdtemp(prefix="comol-sentinel-"))
    os.chmod(directory, 0o755)
    path = directory / "precious.txt"
    path.write_text("untouched")
    os.chmod(path, 0o644)
    yield path
    path.unlink(missing_ok=True)
    directory.rmdir()


def _assert_no_leftovers(box: Sandbox) -> None:
    if box.protection["drop_privileges"]:
        for slot in range(box.workers):
            assert pids_of_uid(box.uid_base + slot) == []


def test_normal_program_passes_and_failures_fail(sandbox) -> None:
    ok, err, exit0, hard_exit = sandbox.map(
        ["print('hi')", "assert 1 == 2", "import sys; sys.exit(0)", "import os; os._exit(0)"]
    )
    assert ok.passed and "hi" in ok.stdout and "__comol" not in ok.stdout
    assert err.status == "failed" and "AssertionError" in err.stderr
    assert exit0.status == "failed"  # exiting half-way is not passing
    assert hard_exit.status == "failed" and hard_exit.returncode == 0


@pytest.mark.parametrize(
    ("name", "program"),
    [
        ("infinite loop", "while True:\n    pass\n"),
        (
            "fork bomb",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        ),
        ("memory bomb", "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n"),
        ("output flood", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
    ],
)
def test_resource_attacks_end_and_fail(sandbox, name: str, program: str) -> None:
    result = sandbox.run(program)
    assert not result.passed, name
    assert result.duration_s < 10, name
    _assert_no_leftovers(sandbox)
    assert sandbox.run("print(6 * 7)").stdout.strip() == "42"  # the sandbox still works afterwards


def test_background_daemon_is_killed(sandbox) -> None:
    result = sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n")
    assert result.passed  # the main program did run to the end; its detached child must not survive
    _assert_no_leftovers(sandbox)


def test_kill_parent_and_evaluator(sandbox) -> None:
    program = (
        "import os, signal\n"
        "for pid in (os.getppid(), {pid}, 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "raise SystemExit(3)\n"
    ).replace("{pid}", str(os.getpid()))
    result = sandbox.run(program)
    assert not result.passed
    assert sandbox.run("pass").passed  # we are alive and so is the sandbox


def test_files_outside_are_untouched(sandbox, sentinel: Path) -> None:
    mode = sentinel.stat().st_mode
    program = (
        "import os, shutil\n"
        f"path = {str(sentinel)!r}\n"
        "for attack in (lambda: open(path, 'w').write('owned'), lambda: os.remove(path),\n"
        "               lambda: os.chmod(path, 0o777), lambda: os.rename(path, path + '.x'),\n"
        "               lambda: shutil.rmtree(os.path.dirname(path)),\n"
        "               lambda: open(os.path.join(os.path.dirname(path), 'new'), 'w')):\n"
        "    try:\n"
        "        attack()\n"
        "    except OSError:\n"
        "        pass\n"
        "open('inside.txt', 'w').write('fine')\n"  # its own directory is writable
        "print(open('inside.txt').read())\n"
    )
    result = sandbox.run(program)
    if not sandbox.protection["drop_privileges"]:
        pytest.skip("not running as root: the program runs as the evaluator's user and could write its files")
    assert result.passed and "fine" in result.stdout
    assert sentinel.read_text() == "untouched"
    assert stat.S_IMODE(sentinel.stat().st_mode) == stat.S_IMODE(mode)
    assert sorted(p.name for p in sentinel.parent.iterdir()) == ["precious.txt"]


def test_environment_is_clean(sandbox, monkeypatch) -> None:
    monkeypatch.setenv("COMOL_TEST_SECRET", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    program = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for pid in ('self', '1', {os.getpid()!r}, str(os.getppid())):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as err:\n"
        "        print('denied', pid, err)\n"
    )
    result = sandbox.run(program)
    assert result.passed
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert "HF_TOKEN" not in result.stdout


def test_network_is_blocked(sandbox) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    arrived: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except OSError:
                continue
            arrived.append(addr)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    program = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'stolen')\n"
        "print('connected')\n"
    )
    try:
        result = sandbox.run(program)
    finally:
        stop.set()
        thread.join()
        server.close()
    if not sandbox.network_isolated:
        pytest.skip("no network namespace on this machine (unshare unavailable or not permitted)")
    assert not result.passed and "connected" not in result.stdout
    assert arrived == []


def test_fallback_without_namespaces_still_contains(sentinel: Path) -> None:
    """``isolation='none'`` (as on machines without unshare) keeps limits, uid drop and the tree kill."""
    with Sandbox(SandboxLimits(timeout_s=2, cpu_s=20), workers=1, isolation="none") as box:
        assert box.protection["namespaces"] is False
        loop, bomb, ok, _daemon = box.map(
            [
                "while True: pass",
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                "print('ok')",
                "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n",
            ]
        )
        assert loop.status == "timeout" and not bomb.passed and ok.passed
        _assert_no_leftovers(box)
        box.run(f"import os\ntry:\n    os.remove({str(sentinel)!r})\nexcept OSError:\n    pass\n")
        left = f"/tmp/comol-test-{secrets.token_hex(8)}"
        try:
            wrote = box.run(f"open({left!r}, 'w').write('x')")
            survived = os.path.lexists(left)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(left)
        assert wrote.passed and not (survived and box.protection["drop_privileges"])
    if os.geteuid() == 0:
        assert sentinel.read_text() == "untouched"


# ------------------------------------------------------------------- host services, files, orphans


def _shared_dir(parent: str | None = None) -> Path:
    """A test directory the sandbox uid may enter (``mkdtemp`` makes it 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="comol-test-", dir=parent))
    os.chmod(directory, 0o755)
    return directory


def _reachable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


class _UnixServer:
    """A unix socket server that records whatever a client sends (a thread, stopped by ``close``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        if not address.startswith("\0"):
            os.chmod(address, 0o777)
        self.sock.listen(4)
        self.sock.settimeout(0.1)
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.received.append(conn.recv(100))
                except OSError:
                    self.received.append(b"<connected>")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_host_unix_sockets_are_unreachable(sandbox) -> None:
    """Sockets in /tmp, /dev/shm, outside the private directories, and abstract ones: none reachable."""
    dirs = [_shared_dir(), _shared_dir("/dev/shm")]
    here = Path(__file__).resolve().parent
    if os.access(here, os.W_OK) and _reachable_by_others(here):
        dirs.append(_shared_dir(str(here)))  # not one of the private mounts: only the filter stops this
    addresses = [str(d / "service.sock") for d in dirs] + [f"\0comol-test-{os.getpid()}-{id(dirs)}"]
    servers = [_UnixServer(a) for a in addresses]
    program = (
        "import socket\n"
        f"for address in {addresses!r}:\n"
        "    try:\n"
        "        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "        s.settimeout(2)\n"
        "        s.connect(address)\n"
        "        s.sendall(b'stolen')\n"
        "        print('delivered', repr(address))\n"
        "    except OSError as err:\n"
        "        print('refused', repr(address), err)\n"
    )
    try:
        result = sandbox.run(program)
    finally:
        for server in servers:
            server.close()
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)
    claims = sandbox.protection
    if not claims["network_blocked"]:
        assert not claims.get("host_unix_sockets_blocked") or not claims.get("namespaces")
        pytest.skip(f"no network isolation on this machine: {claims.get('missing')}")
    assert result.passed, result.stderr
    assert "delivered" not in result.stdout
    assert [s.received for s in servers] == [[]] * len(servers)
    assert claims["host_unix_sockets_blocked"] and sandbox.network_isolated


def test_protection_claims_only_what_is_in_force(monkeypatch) -> None:
    """Without unshare, no namespace-based layer is claimed; ``strict`` refuses; a failed setup raises."""
    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "unshare" else which(name, *a, **k)
    )
    with Sandbox(SandboxLimits(timeout_s=3), workers=1) as box:
        claims = box.protection
        assert claims["namespaces"] is False and claims["network_blocked"] is False
        assert claims["private_tmp"] is False and not box.network_isolated
        assert {"namespaces", "private_tmp", "read_only_root"} <= set(claims["missing"])
    with pytest.raises(SandboxError, match="strict"):
        Sandbox(SandboxLimits(timeout_s=3), workers=1, isolation="strict")
    monkeypatch.undo()
    with Sandbox(SandboxLimits(timeout_s=3), workers=1) as box:
        if not box.protection["private_tmp"]:
            pytest.skip("no private mounts on this machine")
        settings = box._settings
        monkeypatch.setattr(box, "_settings", lambda *a: settings(*a) | {"scratch_bytes": "x"})
        with pytest.raises(SandboxError, match="private_mounts"):
            box.run("print('never')")


def test_nothing_survives_a_program(sandbox) -> None:
    """Files in /tmp, /dev/shm, /var/tmp and the work directory are gone, for the host and the next run."""
    token = f"comol-test-{secrets.token_hex(8)}"
    places = ["/tmp", "/dev/shm", "/var/tmp", "."]
    writer = (
        "import os\n"
        f"for d in {places!r}:\n"
        f"    open(os.path.join(d, {token!r}), 'w').write('left behind')\n"
        "print('written')\n"
    )
    reader = (
        "import os\n"
        f"for d in {places!r}:\n"
        "    try:\n"
        f"        print('found', d, open(os.path.join(d, {token!r})).read())\n"
        "    except OSError:\n"
        "        print('absent', d)\n"
    )
    try:
        written = sandbox.run(writer)
        read = sandbox.map([reader] * sandbox.workers)  # every slot, whichever wrote
        on_host = [d for d in places[:3] if os.path.lexists(os.path.join(d, token))]
    finally:
        for d in places[:3]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, token))
    assert written.passed and "written" in written.stdout, written.stderr
    assert on_host == []
    for result in read:
        assert result.passed and "found" not in result.stdout


def _descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live descendant of ``root``."""
    parent_of: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parent_of[int(entry)] = (int(fields[1]), fields[19])
    found: set[tuple[int, str]] = set()
    frontier = {root}
    while frontier:
        children = {pid for pid, (ppid, _) in parent_of.items() if ppid in frontier}
        found |= {(pid, parent_of[pid][1]) for pid in children}
        frontier = children
    return found


def _alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    left = set()
    for pid, start in processes:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[19] == start and fields[0] != "Z":
                left.add((pid, start))
    return left


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_programs_die_with_the_evaluator(sig: int) -> None:
    """An evaluator killed mid-run leaves no sandboxed process, no ``unshare`` and no temporary directory."""
    nap = f"{47 + sig / 100:.2f}"  # a distinctive sleep duration, to find the program's processes
    program = f"import os\nif os.fork() == 0:\n    os.setsid()\nos.execv('/bin/sleep', ['sleep', {nap!r}])\n"
    read_end, write_end = os.pipe()
    evaluator = os.fork()
    if evaluator == 0:  # the evaluator: make a sandbox, say where its files are, run a program for ever
        try:
            os.close(read_end)
            box = Sandbox(SandboxLimits(timeout_s=60, cpu_s=60), workers=1, uid_base=64100)
            os.write(write_end, f"{box._host_root}\n".encode())
            box.run(program)
        finally:
            os._exit(0)
    os.close(write_end)
    seen: set[tuple[int, str]] = set()
    host_root = ""
    try:
        with os.fdopen(read_end) as reader:
            host_root = reader.readline().strip()
        assert host_root and os.path.isdir(host_root)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen = _descendants(evaluator)
            if sum(_cmdline(pid) == f"sleep\0{nap}\0".encode() for pid, _ in seen) == 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the program did not start: {seen}")
        os.kill(evaluator, sig)
        os.waitpid(evaluator, 0)
        deadline = time.monotonic() + 10
        while (_alive(seen) or os.path.exists(host_root)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {(pid, _cmdline(pid)) for pid, _ in _alive(seen)}
        assert left == set(), "processes outlived the evaluator"
        assert not os.path.exists(host_root), "the temporary directory outlived the evaluator"
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(evaluator, signal.SIGKILL)
            os.waitpid(evaluator, 0)
        for pid, _ in _alive(seen):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        kill_uid(64100)
        if host_root:
            shutil.rmtree(host_root, ignore_errors=True)
