"""Adversarial programs against the sandbox's namespaces: nothing they create in shared kernel or file
system state outlives the run, shared memory is capped with the work dir, other processes' command
lines and the results database are out of reach, and a mode without a network namespace runs model
code only when the user opted in. Each program is small, bounded in time and size; leftovers the test
could find on the host are removed by the test if the sandbox failed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from qgate.errors import QgateError
from qgate.evaluation import sandbox
from qgate.evaluation.sandbox import isolation, run_untrusted

MIB = 1 << 20


def needs(flag: str):
    return pytest.mark.skipif(not getattr(isolation(), flag), reason=f"this machine's sandbox has no {flag}")


def sysv_keys(kind: str) -> set[int]:
    """Keys of the host's SysV IPC objects (/proc/sysvipc/{shm,msg,sem})."""
    lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines if line.strip()}


@needs("ipc_namespace")
@pytest.mark.parametrize("kind,call", [
    ("shm", "libc.shmget(key, 4096, 0o1000 | 0o666)"),
    ("msg", "libc.msgget(key, 0o1000 | 0o666)"),
    ("sem", "libc.semget(key, 1, 0o1000 | 0o666)"),
])
def test_sysv_ipc_objects_die_with_the_program(kind, call):
    key = int.from_bytes(os.urandom(3), "big") + 1
    program = (f"import ctypes, ctypes.util\nlibc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
               f"key = {key}\nident = {call}\nprint(ident)\nassert ident >= 0, ctypes.get_errno()\n")
    result = run_untrusted(program, timeout_s=10)
    assert result.status == "passed", result.stderr  # it was created, inside its own namespace
    assert key not in sysv_keys(kind)


@needs("ipc_namespace")
def test_posix_message_queues_die_with_the_program():
    name = f"/qgate-leak-{uuid.uuid4().hex[:12]}"
    program = ("import ctypes, ctypes.util\n"
               "libc = ctypes.CDLL(ctypes.util.find_library('rt') or ctypes.util.find_library('c'), use_errno=True)\n"
               "libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]\n"
               f"fd = libc.mq_open({name.encode()!r}, 0o100 | 0o2, 0o666, None)\nprint(fd)\n"
               "assert fd >= 0, ctypes.get_errno()\n")
    result = run_untrusted(program, timeout_s=10)
    assert result.status == "passed", result.stderr
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("rt") or ctypes.util.find_library("c"), use_errno=True)
    libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    fd = libc.mq_open(name.encode(), os.O_RDONLY)  # the host's namespace: the queue must not be there
    if fd >= 0:
        os.close(fd)
        libc.mq_unlink(name.encode())
    assert fd < 0 and ctypes.get_errno() == 2  # ENOENT


@needs("private_workdir")
def test_files_fifos_and_folders_in_world_writable_folders_are_private():
    shared = [d for d in isolation().private_dirs if os.path.isdir(d)]
    assert {"/tmp", "/var/tmp", "/dev/shm"} <= set(shared)
    tag = f"qgate-leak-{uuid.uuid4().hex[:12]}"
    program = (f"import os\nfor d in {shared!r}:\n"
               f"    open(os.path.join(d, {tag!r} + '.txt'), 'w').write('x')\n"
               f"    os.mkfifo(os.path.join(d, {tag!r} + '.fifo'))\n"
               f"    os.mkdir(os.path.join(d, {tag!r} + '.d'))\nprint('made', len({shared!r}))\n")
    result = run_untrusted(program, timeout_s=10)
    assert result.status == "passed", result.stderr
    leftovers = [os.path.join(d, name) for d in shared for name in os.listdir(d) if name.startswith(tag)]
    for path in leftovers:
        (os.rmdir if os.path.isdir(path) and not os.path.islink(path) else os.unlink)(path)
    assert leftovers == []
    if os.path.isdir("/run/lock") and os.stat("/run/lock").st_mode & 0o002:
        assert "/run/lock" in shared


@needs("private_workdir")
def test_dev_shm_counts_against_the_disk_cap():
    program = ("import os\nwritten = 0\ntry:\n    for i in range(64):\n"
               "        with open(f'/dev/shm/part{i}', 'wb') as fh:\n            fh.write(b'x' * (1 << 20))\n"
               "        written += 1\nexcept OSError as exc:\n    print(type(exc).__name__, exc.errno)\n"
               "print('written', written)\n")
    result = run_untrusted(program, timeout_s=20, max_file_bytes=2 * MIB, max_dir_bytes=8 * MIB)
    lines = result.stdout.splitlines()
    assert lines[0] == "OSError 28", result.stdout + result.stderr  # ENOSPC
    written = int(lines[1].split()[1])
    assert 4 <= written < 8  # within the 8 MiB shared with the work dir
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("part")]


@needs("pid_namespace")
def test_other_processes_command_lines_cannot_be_read():
    secret = "postgresql://qgate:" + uuid.uuid4().hex + "@db/qgate"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", secret])
    try:
        program = ("import os\nfound = []\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
                   "        try:\n            found.append(open(f'/proc/{pid}/cmdline', 'rb').read())\n"
                   "        except OSError:\n            pass\n"
                   "print(len(found), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
                   "print(b''.join(found).decode(errors='replace'))\n")
        result = run_untrusted(program, timeout_s=10)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert result.status == "passed", result.stderr
    assert secret not in result.stdout
    count, pids = result.stdout.splitlines()[0].split(" ", 1)
    assert pids == "[1, 2]"  # its pid-1 reaper and itself: nothing of the host


@needs("separate_user")
def test_the_results_database_is_not_readable_by_the_program(tmp_path):
    from qgate.store import open_store

    base = "/run" if os.access("/run", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="qgate-test-db-", dir=base)
    os.chmod(folder, 0o755)  # only the database's own mode protects it
    db = os.path.join(folder, "q.db")
    try:
        open_store(db).close()
        program = (f"try:\n    print(len(open({db!r}, 'rb').read()))\n"
                   "except OSError as exc:\n    print(type(exc).__name__)\n")
        result = run_untrusted(program, timeout_s=10)
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    assert result.stdout.strip() == "PermissionError"


def test_a_mode_without_network_isolation_needs_an_explicit_opt_in(monkeypatch):
    weaker = sandbox.Isolation(isolation().interpreter, isolation().separate_user, False, False,
                               python_version=isolation().python_version)
    monkeypatch.setattr(sandbox, "isolation", lambda: weaker)
    monkeypatch.delenv(sandbox.ALLOW_NO_NETNS_ENV, raising=False)
    with pytest.raises(QgateError, match=f"no network namespace.*{sandbox.ALLOW_NO_NETNS_ENV}=1"):
        run_untrusted("print('model code')")
    monkeypatch.setenv(sandbox.ALLOW_NO_NETNS_ENV, "1")
    result = run_untrusted("print('model code')", timeout_s=10)
    assert result.status == "passed" and result.stdout == "model code\n"


def test_the_mode_names_each_boundary():
    mode = isolation()
    words = mode.mode.split("+")
    assert ("net" in words) == mode.network_namespace and ("pid" in words) == mode.pid_namespace
    assert ("ipc" in words) == mode.ipc_namespace and ("uid" in words) == mode.separate_user
    assert sandbox.isolation_report()["mode"] == mode.mode
