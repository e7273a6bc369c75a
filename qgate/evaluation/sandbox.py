"""Run untrusted Python (model-generated code) in a contained child process.

Every program gets its own process, started with:

- a clean environment: only PATH, LANG, HOME and TMPDIR (the last two inside the throw-away dir);
- an isolated interpreter (`python -I -S -B`): no site-packages, no PYTHON* variables, no .pyc;
- a throw-away working directory, removed afterwards;
- a new session and process group, killed as a whole at the wall-clock timeout;
- resource limits set in the child before the program starts: CPU seconds, address space,
  processes, file size, open files, no core dumps;
- no network.

It can still read whatever any user of the machine may read (the stdlib, world-readable files).

How much more is possible depends on the privileges we run with; `isolation()` probes once and
picks the strongest mode that works on this machine:

- As root (CI containers, these machines): the program runs as a fresh, otherwise unused uid
  (a different one per run), so RLIMIT_NPROC applies (it never applies to uid 0), files outside
  its directory are protected by ordinary permissions, and every process the program leaves
  behind, even one that escaped the process group with setsid(), is killed by uid afterwards.
  With CAP_SYS_ADMIN it also gets a new network namespace (no interfaces but a down loopback:
  the real boundary against network access) and a new mount namespace in which its working
  directory is a size-limited tmpfs, so total disk use is capped, not just the size of one file.
- As an ordinary user: a user + network namespace where the kernel allows unprivileged ones;
  file protection is then only what the user's own permissions give, and leftovers are killed
  by process group only.

Inside the child, before the program runs, socket creation is also disabled (socket.socket,
_socket.socket and the helpers that build sockets raise PermissionError). That in-process guard
is not a security boundary: a program can reach the C level in many ways (ctypes, os.system of a
binary). It only turns an accidental network call into a clear error; the namespace is the
boundary.

The child-side setup runs in `preexec_fn`, which CPython documents as unsafe with threads in the
parent (a lock held by another thread at fork stays held in the child). It only makes a few
system calls, through libc functions resolved at import, and takes no locks, which is what makes
running several sandboxes from a thread pool safe in practice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import os
import random
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from qgate.errors import QgateError

STATUSES = ("passed", "failed", "timeout", "killed", "error")

# Linux constants (sched.h, sys/mount.h, linux/prctl.h)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_BIND = 4096
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_PR_SET_NO_NEW_PRIVS = 38

# Fresh uids come from a range no distribution hands out to users or system accounts.
_UID_RANGE = (1_800_000_000, 1_900_000_000)
# Directories any uid may write to: swept for the sandbox uid's leftovers after each run, and (with a
# private mount namespace) each replaced by a folder of the run's own size-capped tmpfs.
_WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
# Set to 1 to run model code in a mode without a network namespace (only the in-process socket guard).
ALLOW_NO_NETNS_ENV = "QGATE_SANDBOX_ALLOW_NETWORK"
_PROGRAMS = [0]  # programs started in this process (see programs_run); a list so threads add under the lock
_PROGRAMS_LOCK = threading.Lock()
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_MIB = 1024 * 1024


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        unshare, mount, prctl, fork = libc.unshare, libc.mount, libc.prctl, libc.fork
    except (OSError, AttributeError):
        return None
    fork.argtypes, fork.restype = [], ctypes.c_int
    unshare.argtypes = [ctypes.c_int]
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return unshare, mount, prctl, fork


# Resolved once at import: the child (after fork) must not go through the dynamic loader.
_LIBC = _load_libc()


# The first thing the child's interpreter runs. It blocks socket creation (a guard, see the
# module docstring), then runs the program file as __main__.
_BOOTSTRAP = r"""
import sys
def _qgate_block_network():
    import socket, _socket
    def refuse(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the qgate sandbox")
    class NoSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = NoSocket
    for module in (socket, _socket):
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "dup"):
            if hasattr(module, name):
                setattr(module, name, refuse)
_qgate_block_network()
del _qgate_block_network
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program.

    status: passed (exit 0), failed (non-zero exit, e.g. an exception or a failed assert),
    timeout (wall clock or CPU limit), killed (ended by a signal: memory, file size, ...),
    error (the sandbox itself could not start the program).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    signal: str | None = None
    truncated: bool = False
    workdir: str = ""
    sandbox_uid: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """How programs are contained on this machine (probed once, see `isolation()`)."""

    interpreter: str
    separate_user: bool
    network_namespace: bool
    private_workdir: bool
    user_namespace: bool = False
    python_version: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    ipc_namespace: bool = False  # SysV shm/msg/sem and POSIX message queues die with the program
    pid_namespace: bool = False  # its own /proc: other processes (and their command lines) are invisible
    private_dirs: tuple[str, ...] = ()  # world-writable folders replaced by the run's own tmpfs

    @property
    def unshare_flags(self) -> int:
        flags = 0
        if self.network_namespace:
            flags |= _CLONE_NEWNET
        if self.private_workdir:
            flags |= _CLONE_NEWNS
        if self.user_namespace:
            flags |= _CLONE_NEWUSER
        if self.ipc_namespace:
            flags |= _CLONE_NEWIPC
        if self.pid_namespace:
            flags |= _CLONE_NEWPID
        return flags

    @property
    def mode(self) -> str:
        """One word per boundary in force, e.g. "uid+net+mount+ipc+pid" (recorded with every result)."""
        parts = [name for name, on in (("uid", self.separate_user), ("userns", self.user_namespace),
                                       ("net", self.network_namespace), ("mount", self.private_workdir),
                                       ("ipc", self.ipc_namespace), ("pid", self.pid_namespace)) if on]
        return "+".join(parts) or "process-only"

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "interpreter": self.interpreter,
            "python_version": self.python_version,
            "separate_user": self.separate_user,
            "network_namespace": self.network_namespace,
            "private_workdir": self.private_workdir,
            "user_namespace": self.user_namespace,
            "ipc_namespace": self.ipc_namespace,
            "pid_namespace": self.pid_namespace,
            "private_dirs": list(self.private_dirs),
            "in_process_socket_guard": True,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _ChildPlan:
    """Everything the child needs before exec, computed in the parent (no work after fork)."""

    workdir: bytes
    program_path: bytes
    source: bytes
    unshare_flags: int
    private_workdir: bool
    tmpfs_options: bytes
    uid: int | None
    limits: tuple[tuple[int, int, int], ...]
    private_dirs: tuple[tuple[bytes, bytes], ...] = ()  # (folder in the work tmpfs, world-writable folder it covers)
    new_pid: bool = False


def run_untrusted(
    source: str,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_processes: int = 16,
    max_file_bytes: int = 16 * _MIB,
    stdin: str | bytes | None = None,
    *,
    max_output_bytes: int = 64 * 1024,
    max_dir_bytes: int = 64 * _MIB,
    max_open_files: int = 64,
) -> SandboxResult:
    """Run `source` as a Python program in the sandbox and report how it ended.

    Never raises for anything the program does; a program that cannot be started at all comes
    back with status "error". stdout/stderr are cut at `max_output_bytes` each; no single file
    (stdout included) may exceed `max_file_bytes`; with a private work dir, all files together
    stay under `max_dir_bytes`.
    """
    limits = _Limits(timeout_s, memory_mb, max_processes, max_file_bytes, max_output_bytes,
                     max_dir_bytes, max_open_files)
    for name, value in vars(limits).items():
        if not value > 0:
            raise QgateError(f"sandbox: {name}={value!r}; expected a positive number")
    mode = isolation()
    check_network_isolation(mode)
    with _PROGRAMS_LOCK:
        _PROGRAMS[0] += 1
    return _run(mode, source, stdin, limits)


def check_network_isolation(mode: Isolation | None = None) -> None:
    """Model code runs only where the network is cut by a namespace, unless the user opted in."""
    mode = mode or isolation()
    if not mode.network_namespace and os.environ.get(ALLOW_NO_NETNS_ENV) != "1":
        raise QgateError(
            f"the code sandbox has no network namespace on this machine (mode {mode.mode}): model-generated "
            f"code could reach the network past the in-process guard; refusing to run it. Set "
            f"{ALLOW_NO_NETNS_ENV}=1 to run it anyway (the mode is recorded with the results)")


def programs_run() -> int:
    """How many programs this process has handed to the sandbox (to tell whether a task executed code)."""
    return _PROGRAMS[0]


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_processes: int
    max_file_bytes: int
    max_output_bytes: int
    max_dir_bytes: int
    max_open_files: int


def _run(mode: Isolation, source: str, stdin, limits: _Limits) -> SandboxResult:
    uid = _fresh_uid() if mode.separate_user else None
    run_root = tempfile.mkdtemp(prefix="qgate-sandbox-")
    try:
        return _run_in(run_root, mode, uid, source, stdin, limits)
    finally:
        if uid is not None:
            _kill_user(uid, mode.interpreter)
            _remove_files_of(uid)
        _rmtree(run_root)


def _run_in(run_root: str, mode: Isolation, uid: int | None, source: str, stdin, limits: _Limits) -> SandboxResult:
    workdir = os.path.join(run_root, "work")
    os.chmod(run_root, 0o711)  # the sandbox uid may pass through to work/, not list the root
    os.mkdir(workdir, 0o700)
    io_dir = os.path.join(run_root, "io")  # output files stay private to the parent
    os.mkdir(io_dir, 0o700)
    program = os.path.join(workdir, "main.py")
    source_bytes = source.encode("utf-8", "surrogatepass")
    if uid is not None:
        os.chown(workdir, uid, uid)
    if not mode.private_workdir:
        with open(program, "wb") as fh:
            fh.write(source_bytes)

    cpu_s = max(1, int(limits.timeout_s + 0.999)) + 1  # SIGXCPU after the wall clock would have hit
    memory = limits.memory_mb * _MIB
    nproc = _nproc_limit(limits.max_processes, uid)
    rlimits = (
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_FSIZE, limits.max_file_bytes, limits.max_file_bytes),
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_CORE, 0, 0),
    )
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    private = ()
    if mode.private_workdir:  # world-writable folders become folders of the work tmpfs: same size cap
        # relative to the work dir (the child's cwd): once /tmp is covered, the work dir's path is hidden
        private = tuple((os.fsencode(f".shared{i}"), os.fsencode(d))
                        for i, d in enumerate(mode.private_dirs))
    plan = _ChildPlan(
        workdir=os.fsencode(workdir),
        program_path=os.fsencode(program),
        source=source_bytes,
        unshare_flags=mode.unshare_flags,
        private_workdir=mode.private_workdir,
        tmpfs_options=f"size={limits.max_dir_bytes},nr_inodes=4096,mode=0700{owner}".encode(),
        uid=uid,
        limits=rlimits,
        private_dirs=private,
        new_pid=mode.pid_namespace,
    )
    env = {"PATH": _CHILD_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    argv = [mode.interpreter, "-I", "-S", "-B", "-c", _BOOTSTRAP, "main.py"]

    stdout_path, stderr_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
    stdin_file = subprocess.DEVNULL
    if stdin is not None:
        stdin_path = os.path.join(io_dir, "stdin")
        with open(stdin_path, "wb") as fh:
            fh.write(stdin.encode() if isinstance(stdin, str) else stdin)
        stdin_file = open(stdin_path, "rb")
    start = time.monotonic()
    try:
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    argv, env=env, stdin=stdin_file, stdout=out, stderr=err, close_fds=True,
                    start_new_session=True, preexec_fn=functools.partial(_enter_sandbox, plan),
                )
            except (OSError, subprocess.SubprocessError) as exc:
                return SandboxResult("error", None, "", f"sandbox could not start the program: {exc}",
                                     time.monotonic() - start, workdir=workdir, sandbox_uid=uid)
            timed_out = not _wait_for_exit(proc, limits.timeout_s)
            # Kill the whole group while the leader is still unreaped (its id cannot be reused yet).
            _kill_group(proc.pid)
            returncode = proc.wait()
            wall_s = time.monotonic() - start
    finally:
        if stdin_file is not subprocess.DEVNULL:
            stdin_file.close()

    stdout, cut_out = _read_capped(stdout_path, limits.max_output_bytes)
    stderr, cut_err = _read_capped(stderr_path, limits.max_output_bytes)
    sig = _signal_name(-returncode) if returncode < 0 else None
    if timed_out or sig == "SIGXCPU":
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif returncode > 0:
        status = "failed"
    else:
        status = "killed"
    return SandboxResult(status, returncode, stdout, stderr, round(wall_s, 4), sig, cut_out or cut_err,
                         workdir, uid)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _enter_sandbox(plan: _ChildPlan) -> None:
    """Runs in the child between fork and exec: namespaces, limits, then drop privileges."""
    if plan.unshare_flags:
        unshare, mount, _, fork = _LIBC
        if unshare(plan.unshare_flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        if plan.private_workdir:
            # Our mounts must not propagate back to the host's mount table.
            if mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
            if mount(b"tmpfs", plan.workdir, b"tmpfs", _MS_NOSUID | _MS_NODEV, plan.tmpfs_options) != 0:
                raise OSError(ctypes.get_errno(), "mount tmpfs")
            fd = os.open(plan.program_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            view = memoryview(plan.source)
            while view:
                view = view[os.write(fd, view):]
            os.close(fd)
            os.chdir(plan.workdir)  # before /tmp (which holds the work dir) is covered
            for inside, shared in plan.private_dirs:
                os.mkdir(inside, 0o1777)
                os.chmod(inside, 0o1777)
                if mount(inside, shared, None, _MS_BIND, None) != 0:
                    raise OSError(ctypes.get_errno(), f"bind {shared!r}")
            if plan.private_dirs and not os.path.exists(plan.program_path):
                # the work dir sat in a folder now covered (/tmp): show it at its own path again, so that
                # paths the program derives from its cwd (runpy's abspath, HOME, TMPDIR) resolve
                os.makedirs(plan.workdir, 0o711, exist_ok=True)
                if mount(b".", plan.workdir, None, _MS_BIND, None) != 0:
                    raise OSError(ctypes.get_errno(), "bind the work dir")
        if plan.new_pid:
            # CLONE_NEWPID takes effect for children. This process stays outside and waits; its child is
            # pid 1 of the new namespace (everything in it dies with pid 1), mounts the namespace's own
            # /proc and waits in turn; the program runs as pid 2, where signals act as usual (pid 1 ignores
            # those it has no handler for). How the program ended is passed back up through a pipe.
            status_r, status_w = os.pipe()
            pid = fork()
            if pid < 0:
                raise OSError(ctypes.get_errno(), "fork")
            if pid > 0:
                os.close(status_w)
                _wait_outside(pid, status_r)
            os.close(status_r)
            if mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) != 0:
                raise OSError(ctypes.get_errno(), "mount /proc")
            pid = fork()
            if pid < 0:
                raise OSError(ctypes.get_errno(), "fork")
            if pid > 0:
                _wait_as_init(pid, status_w)
            os.close(status_w)
    if not plan.private_workdir:
        os.chdir(plan.workdir)
    os.umask(0o077)
    for which, soft, hard in plan.limits:
        resource.setrlimit(which, (soft, hard))
    if plan.uid is not None:
        os.setgroups([])
        os.setresgid(plan.uid, plan.uid, plan.uid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    if _LIBC is not None:
        _LIBC[2](_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries grant nothing from here on


def _close_fds_but(keep: int) -> None:
    # the parent learns "exec done" when every copy of its status pipe is closed: only the program keeps one
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)


def _wait_outside(pid: int, status_r: int) -> None:
    """The process the parent started, outside the pid namespace: wait for the namespace's pid 1, then end
    as the program ended (its exit status, or the signal that killed it). Never returns."""
    try:
        _close_fds_but(status_r)
        status = _waitpid(pid)
        sig = os.read(status_r, 1)
        if sig:
            _die_by(sig[0])
        if os.WIFSIGNALED(status):
            _die_by(os.WTERMSIG(status))
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
    finally:
        os._exit(1)


def _wait_as_init(pid: int, status_w: int) -> None:
    """pid 1 of the namespace: reap every process until the program ends; report a killing signal up the
    pipe (pid 1 cannot die by its own signal), else exit with the program's status. Never returns."""
    try:
        _close_fds_but(status_w)
        while True:
            try:
                done, status = os.wait()
            except InterruptedError:
                continue
            if done == pid:
                break
        if os.WIFSIGNALED(status):
            os.write(status_w, bytes([os.WTERMSIG(status)]))
            os._exit(1)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
    finally:
        os._exit(1)


def _waitpid(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _die_by(sig: int) -> None:
    try:  # SIGKILL has no handler to reset; off the main thread Python refuses to: both fine
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def _nproc_limit(max_processes: int, uid: int | None) -> int:
    # RLIMIT_NPROC counts all processes of the real uid. A fresh uid starts at zero; without one
    # the user's existing processes count too, so the budget goes on top of them.
    if uid is not None:
        return max_processes
    return len(_pids_of(os.getuid())) + max_processes


def _wait_for_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the process exits without reaping it; False on timeout."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout_s)
            return bool(ready)
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as fh:
                text = fh.read(2048)
        except OSError:
            continue
        state = uid_line = None
        for line in text.splitlines():
            if line.startswith(b"State:"):
                state = line.split()[1]
            elif line.startswith(b"Uid:"):
                uid_line = line.split()
                break
        if uid_line and int(uid_line[1]) == uid and state not in (b"Z", b"X"):
            pids.append(int(name))
    return pids


def _kill_user(uid: int, interpreter: str) -> None:
    """Kill every process of the sandbox uid, including ones that left the process group.

    kill(-1) sent *as* that uid reaches exactly its processes, atomically with respect to fork,
    so a fork bomb cannot outrun it.
    """
    if not sys.platform.startswith("linux"):
        return
    for _ in range(20):
        if not _pids_of(uid):
            return
        try:
            subprocess.run([interpreter, "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
                           user=uid, group=uid, extra_groups=[], env={"PATH": _CHILD_PATH},
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.01)


def _remove_files_of(uid: int) -> None:
    """Remove what the sandbox uid created in the shared world-writable directories."""
    for directory in _WORLD_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_uid != uid:
                continue
            if stat.S_ISDIR(info.st_mode):
                _rmtree(entry.path)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def _rmtree(path: str) -> None:
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=_force_remove)
    else:
        shutil.rmtree(path, onerror=_force_remove)


def _force_remove(func, path, exc) -> None:
    # A program may leave read-only directories behind; make them writable and try again.
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _read_capped(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def _fresh_uid() -> int:
    """A uid no process uses right now, from a range no account has."""
    low, high = _UID_RANGE
    for _ in range(100):
        uid = random.SystemRandom().randrange(low, high)
        if not _pids_of(uid):
            return uid
    raise RuntimeError("no free sandbox uid found")


def _world_runnable(path: str) -> bool:
    """True if any uid could execute `path`: every directory on the way is searchable by others."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        directory = os.path.dirname(path)
        while True:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(directory)
            if parent == directory:
                return True
            directory = parent
    except OSError:
        return False


def _interpreters() -> list[str]:
    """Candidate interpreters, ours first; a system python3 for when ours sits in a private home."""
    names = [getattr(sys, "_base_executable", None), sys.executable,
             shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}", path=_CHILD_PATH),
             shutil.which("python3", path=_CHILD_PATH)]
    seen: list[str] = []
    for name in names:
        if name and os.path.exists(name) and os.path.realpath(name) not in seen:
            seen.append(os.path.realpath(name))
    return seen


def _candidate_modes() -> list[Isolation]:
    interpreters = _interpreters()
    linux = _LIBC is not None
    modes: list[Isolation] = []
    if os.geteuid() == 0:
        shared = [p for p in interpreters if _world_runnable(p)]
        private = tuple(_world_writable_dirs()) if linux else ()
        for interp in shared:
            if linux:
                modes.append(Isolation(interp, True, True, True, ipc_namespace=True, pid_namespace=True,
                                       private_dirs=private))
                modes.append(Isolation(interp, True, True, True, ipc_namespace=True))
                modes.append(Isolation(interp, True, True, True))
                modes.append(Isolation(interp, True, True, False))
            modes.append(Isolation(interp, True, False, False))
        if not shared and interpreters:
            note = ("no interpreter reachable by an unprivileged uid: programs run as root, "
                    "RLIMIT_NPROC does not apply and files outside the work dir are not protected")
            if linux:
                modes.append(Isolation(interpreters[0], False, True, True, notes=(note,)))
            modes.append(Isolation(interpreters[0], False, False, False, notes=(note,)))
    else:
        note = "not root: runs as the calling user; files that user may delete are not protected"
        for interp in interpreters[:1]:
            if linux:
                modes.append(Isolation(interp, False, True, False, user_namespace=True, notes=(note,)))
            modes.append(Isolation(interp, False, False, False,
                                   notes=(note, "no network namespace: only the in-process socket guard")))
    return modes


def _world_writable_dirs() -> list[str]:
    """Folders any uid may write to: the usual ones and any other found within four levels of / (not
    below /proc, /sys or /dev); a folder inside one already listed is covered with it."""
    found = [d for d in _WORLD_WRITABLE_DIRS if os.path.isdir(d) and not os.path.islink(d)
             and os.stat(d).st_mode & stat.S_IWOTH]

    def walk(directory: str, depth: int) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if mode & stat.S_IWOTH:
                if entry.path not in found:
                    found.append(entry.path)
            elif depth > 1 and entry.path not in ("/proc", "/sys", "/dev"):
                walk(entry.path, depth - 1)

    walk("/", 4)
    found = [d for d in found if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in found)]
    return found


_PROBE = "import os, sys; print(os.getuid(), '%d.%d.%d' % sys.version_info[:3])"


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """The strongest containment that works here, found by running a probe program in each mode."""
    failures = []
    probe_limits = _Limits(20.0, 512, 16, _MIB, 4096, _MIB, 64)
    for mode in _candidate_modes():
        result = _run(mode, _PROBE, None, probe_limits)
        words = result.stdout.split()
        dropped = len(words) == 2 and words[0] != "0"
        if result.status == "passed" and len(words) == 2 and (dropped or not mode.separate_user):
            return dataclasses.replace(mode, python_version=words[1])
        failures.append(f"{mode.describe()}: {result.stderr.strip()[-300:]}")
    raise RuntimeError("the code sandbox cannot run any program on this machine:\n" + "\n".join(failures))


def isolation_report() -> dict:
    """Provenance for results: how programs were contained on this machine."""
    return isolation().describe()
