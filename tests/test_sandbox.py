"""The code sandbox: normal programs, and adversarial ones that must be contained.

Each adversarial test asserts three things: the program did not get what it wanted, it is scored
as a failure (never "passed"), and the harness and machine are fine afterwards (no process of the
sandbox left, its directory gone, the next program runs normally).
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
import time
import uuid

import pytest

from qgate.evaluation import sandbox
from qgate.evaluation.sandbox import isolation, run_untrusted


def _pids_running_as(uid):
    return sandbox._pids_of(uid) if uid is not None else []


def assert_harness_fine(result):
    """Nothing of the run is left, and the sandbox still runs an ordinary program."""
    assert result.status != "error", result.stderr
    assert not _pids_running_as(result.sandbox_uid)
    assert result.workdir and not os.path.exists(os.path.dirname(result.workdir))
    follow_up = run_untrusted("print(6 * 7)", timeout_s=10)
    assert follow_up.status == "passed" and follow_up.stdout == "42\n"


def test_a_normal_program_passes():
    result = run_untrusted("import math\nprint(math.factorial(10))\n")
    assert result.status == "passed" and result.passed
    assert result.returncode == 0
    assert result.stdout == "3628800\n"
    assert result.wall_s < 5


def test_a_failing_assert_is_scored_failed():
    result = run_untrusted("def add(a, b):\n    return a - b\n\nassert add(2, 2) == 4\n")
    assert result.status == "failed" and not result.passed
    assert result.returncode == 1
    assert "AssertionError" in result.stderr
    assert 'File "main.py", line 4' in result.stderr


def test_stdin_is_fed_and_output_is_capped():
    result = run_untrusted("import sys\ndata = sys.stdin.read()\nprint(data.upper() * 10000)",
                           stdin="abc", max_output_bytes=1000)
    assert result.status == "passed"
    assert result.stdout.startswith("ABCABC") and len(result.stdout) == 1000
    assert result.truncated


def test_interpreter_is_isolated_and_environment_is_clean():
    result = run_untrusted("import os, sys\nprint(sys.flags.isolated, sys.flags.no_site)\n"
                           "print(sorted(os.environ))\nprint(os.getcwd() == os.environ['HOME'])")
    assert result.status == "passed"
    lines = result.stdout.splitlines()
    assert lines[0] == "1 1"
    assert lines[1] == str(sorted(["HOME", "LANG", "PATH", "TMPDIR"]))
    assert lines[2] == "True"


def test_infinite_loop_is_stopped_by_the_wall_clock():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert 1.0 <= result.wall_s < 3.0
    assert time.monotonic() - start < 6
    assert_harness_fine(result)


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_untrusted(bomb, timeout_s=2.0, max_processes=16)
    assert result.status in ("timeout", "killed") and not result.passed
    assert time.monotonic() - start < 10
    if isolation().separate_user:
        assert result.sandbox_uid is not None
    assert_harness_fine(result)


def test_processes_that_escape_the_process_group_are_killed():
    # The child leaves the group with setsid(); killing the group alone would miss it.
    marker = uuid.uuid4().hex
    escape = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)  # {marker}\n"
              "print('parent exits')\n")
    result = run_untrusted(escape, timeout_s=5)
    if not isolation().separate_user:
        pytest.skip("needs a separate sandbox uid (root) to find escaped processes")
    assert result.stdout == "parent exits\n"
    assert not _pids_running_as(result.sandbox_uid)
    assert_harness_fine(result)


def test_memory_bomb_is_contained():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    result = run_untrusted(bomb, timeout_s=10, memory_mb=256)
    assert result.status in ("failed", "killed") and not result.passed
    if result.status == "failed":
        assert "MemoryError" in result.stderr
    assert result.wall_s < 10
    assert_harness_fine(result)


@pytest.fixture
def sentinel():
    """A root-owned file with ordinary permissions in a directory everyone may read (not below /tmp, which
    the sandbox replaces with a private one)."""
    base = "/run" if os.geteuid() == 0 and os.access("/run", os.W_OK) else None
    directory = tempfile.mkdtemp(prefix="qgate-test-sentinel-", dir=base)
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "sentinel.txt")
    with open(path, "w") as fh:
        fh.write("keep me")
    os.chmod(path, 0o644)
    yield path
    os.unlink(path)
    os.rmdir(directory)


def test_files_outside_the_work_dir_cannot_be_deleted(sentinel):
    program = (f"import os, shutil\npath = {sentinel!r}\nprint(open(path).read())\n"
               "for attempt in (lambda: os.remove(path), lambda: open(path, 'w').write('gone'),\n"
               "                lambda: os.rename(path, path + '.moved'),\n"
               "                lambda: shutil.rmtree(os.path.dirname(path))):\n"
               "    try:\n        attempt()\n        print('succeeded')\n"
               "    except OSError as exc:\n        print(type(exc).__name__)\n"
               "os.remove(path)\n")
    result = run_untrusted(program, timeout_s=10)
    if not isolation().separate_user:
        pytest.skip("file protection needs a separate sandbox uid (root)")
    lines = result.stdout.splitlines()
    assert lines[0] == "keep me"  # it could see the file: the attempts were real
    assert "succeeded" not in lines and lines[1:] == ["PermissionError"] * 4
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert os.path.exists(sentinel)
    with open(sentinel) as fh:
        assert fh.read() == "keep me"
    assert stat.S_IMODE(os.stat(sentinel).st_mode) == 0o644
    assert_harness_fine(result)


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _no_connection_arrived(server) -> bool:
    time.sleep(0.2)
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def test_socket_creation_is_refused_in_process(listener):
    port = listener.getsockname()[1]
    program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               "print('connected')\n")
    result = run_untrusted(program, timeout_s=10)
    assert result.status == "failed"
    assert "connected" not in result.stdout
    assert "network access is disabled" in result.stderr
    assert _no_connection_arrived(listener)
    assert_harness_fine(result)


def test_network_namespace_blocks_a_raw_socket(listener):
    # Bypasses the in-process guard (the real socket type is the guard's base class): only the
    # namespace stands between this program and the listener.
    if not isolation().network_namespace:
        pytest.skip("no network namespace available here; only the in-process guard applies")
    port = listener.getsockname()[1]
    program = ("import _socket\nreal = _socket.socket.__mro__[1]\ns = real()\n"
               f"s.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')\n")
    result = run_untrusted(program, timeout_s=10)
    assert result.status == "failed"
    assert "connected" not in result.stdout
    assert "Network is unreachable" in result.stderr
    assert _no_connection_arrived(listener)
    assert_harness_fine(result)


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = "qgate-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("QGATE_TEST_SECRET", secret)
    program = (f"import os\nprint(dict(os.environ))\n"
               f"try:\n    print(open('/proc/{os.getpid()}/environ').read())\n"
               "except OSError as exc:\n    print(type(exc).__name__)\n"
               "assert 'QGATE_TEST_SECRET' in os.environ\n")
    result = run_untrusted(program, timeout_s=10)
    assert secret not in result.stdout and secret not in result.stderr
    assert "QGATE_TEST_SECRET" not in result.stdout
    assert result.status == "failed"
    if isolation().pid_namespace:  # the harness' process does not exist in the program's /proc
        assert result.stdout.splitlines()[-1] == "FileNotFoundError"
    elif isolation().separate_user:  # the harness' own environ is unreadable to another uid
        assert result.stdout.splitlines()[-1] == "PermissionError"
    assert_harness_fine(result)


def test_a_huge_file_is_limited_and_the_work_dir_is_gone():
    program = "with open('huge.bin', 'wb') as fh:\n    while True:\n        fh.write(b'x' * (1 << 20))\n"
    result = run_untrusted(program, timeout_s=10, max_file_bytes=4 << 20)
    assert result.status in ("failed", "killed") and not result.passed
    if result.status == "failed":
        assert "File too large" in result.stderr or "No space left" in result.stderr
    assert result.wall_s < 10
    assert not os.path.exists(os.path.join(result.workdir, "huge.bin"))
    assert_harness_fine(result)


def test_many_files_are_capped_by_the_private_work_dir():
    if not isolation().private_workdir:
        pytest.skip("no mount namespace: only the per-file size limit applies")
    program = ("i = 0\nwhile True:\n    with open(f'part{i}', 'wb') as fh:\n"
               "        fh.write(b'x' * (3 << 20))\n    i += 1\n")
    result = run_untrusted(program, timeout_s=10, max_file_bytes=4 << 20, max_dir_bytes=16 << 20)
    assert result.status == "failed" and "No space left on device" in result.stderr
    assert_harness_fine(result)


def test_a_huge_file_in_shared_tmp_is_limited_and_removed():
    target = os.path.join("/tmp", "qgate-test-escape-" + uuid.uuid4().hex)
    program = f"with open({target!r}, 'wb') as fh:\n    while True:\n        fh.write(b'x' * (1 << 20))\n"
    result = run_untrusted(program, timeout_s=10, max_file_bytes=4 << 20)
    assert result.status in ("failed", "killed") and not result.passed
    if isolation().separate_user:
        assert not os.path.exists(target)  # swept by uid after the run
    elif os.path.exists(target):
        assert os.path.getsize(target) <= 4 << 20
        os.unlink(target)
    assert_harness_fine(result)


def test_sandboxes_run_concurrently_from_threads():
    results = [None] * 6

    def work(i):
        results[i] = run_untrusted(f"print({i} * {i})", timeout_s=20)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]
    assert all(r.status == "passed" for r in results)
    uids = {r.sandbox_uid for r in results}
    assert len(uids) == (6 if isolation().separate_user else 1)


def test_isolation_report_says_what_is_in_force():
    report = sandbox.isolation_report()
    assert report["in_process_socket_guard"] is True
    assert os.path.exists(report["interpreter"])
    assert report["python_version"].count(".") == 2
    if os.geteuid() == 0 and sandbox._world_runnable(report["interpreter"]):
        assert report["separate_user"] is True


def test_limits_must_be_positive():
    from qgate.errors import QgateError

    with pytest.raises(QgateError, match="timeout_s"):
        run_untrusted("print(1)", timeout_s=0)
    with pytest.raises(QgateError, match="memory_mb"):
        run_untrusted("print(1)", memory_mb=-5)


@pytest.mark.parametrize("separate_user", [True, False])
def test_weaker_modes_still_run_score_and_time_out(separate_user):
    """The fallbacks used where namespaces (or root) are unavailable keep the same contract."""
    best = isolation()
    if separate_user and not best.separate_user:
        pytest.skip("no separate sandbox uid here")
    mode = sandbox.Isolation(best.interpreter, separate_user, False, False)
    limits = sandbox._Limits(1.0, 256, 16, 1 << 20, 4096, 1 << 20, 64)
    ok = sandbox._run(mode, "import os\nprint(sorted(os.environ), os.path.exists('main.py'))", None, limits)
    assert ok.status == "passed"
    assert ok.stdout == "['HOME', 'LANG', 'PATH', 'TMPDIR'] True\n"
    assert sandbox._run(mode, "assert False", None, limits).status == "failed"
    looping = sandbox._run(mode, "while True:\n    pass", None, limits)
    assert looping.status == "timeout" and looping.wall_s < 3
    assert not os.path.exists(os.path.dirname(looping.workdir))
