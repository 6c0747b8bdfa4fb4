"""The sandbox under attack: the host and the results must come out unharmed."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from comol.evaluation.sandbox import Sandbox, SandboxLimits, _pids_of_uid

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
            assert _pids_of_uid(box.uid_base + slot) == []


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
    if os.geteuid() == 0:
        assert sentinel.read_text() == "untouched"
