# The zygote of a preforked Python MCP server (mcp-pool, src/mcp/prefork). Shipped inside the
# service binary and run as `PYTHON -c <this> MODULE FUNCTION ARGV0`; nothing to install.
#
# fd 0 is a SOCK_SEQPACKET control socket to the pool, fd 2 the zygote's log, fd 1 /dev/null.
# The zygote imports MODULE once, rehearses one session in a throwaway child to import what the
# server imports only when running, freezes the GC, reports ready, then serves fork requests:
# one JSON header plus the session's descriptors (SCM_RIGHTS) per message. It never sees a
# user secret: a session's credentials arrive as a sealed memfd that only the child reads.
#
# The child, before any server code runs: becomes the leader of its own session and process
# group, dies with the zygote, joins its cgroups, takes its stdio, environment and working
# directory, lowers RLIMIT_NOFILE, reports to the pool (the kernel attaches its pid, as the
# pool sees it, to that message), and restricts itself with the Landlock ruleset the pool
# built. Then it calls FUNCTION() as the console script would.
import ctypes
import gc
import importlib
import json
import os
import resource
import select
import signal
import socket
import sys
import threading

SYS_LANDLOCK_RESTRICT_SELF = 446  # the same number on every architecture
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
MAX_FDS = 64
MAX_HEADER = 1 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def native_threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def reap(_signum=None, _frame=None):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def child(request, fds, control, zygote_pid, entry):
    """Runs in the forked child; never returns."""
    named = dict(zip(request["fds"], fds))
    report = socket.socket(fileno=named["report"])
    try:
        os.setsid()
        check(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")
        if os.getppid() != zygote_pid:
            os._exit(1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for label, fd in zip(request["fds"], fds):
            if label == "cgroup":
                os.write(fd, b"0")
                os.close(fd)
        control.detach()
        for target, label in enumerate(("stdin", "stdout", "stderr")):
            os.dup2(named[label], target)
            os.close(named[label])
        keep = {0, 1, 2, report.fileno()}
        credentials = named.get("credentials")
        ruleset = named.get("landlock")
        keep.update(fd for fd in (credentials, ruleset) if fd is not None)
        # Nothing of the zygote's or another request's descriptors reaches the server.
        low = 3
        for fd in sorted(keep) + [resource.getrlimit(resource.RLIMIT_NOFILE)[0]]:
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        env = dict(request["env"])
        if credentials is not None:
            # The memfd sits on a kernel-internal mount that Landlock does not restrict, so
            # the server reopens it by this path though it may not read /proc otherwise.
            env[request["credentials_env"]] = "/proc/self/fd/%d" % credentials
        os.environ.clear()
        os.environ.update(env)
        os.chdir(request["cwd"])
        nofile = request.get("nofile")
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if ruleset is not None:
            check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
            check(
                libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_long(ruleset), ctypes.c_long(0)),
                "landlock_restrict_self",
            )
            os.close(ruleset)
        report.send(b"ok")
        report.close()
    except BaseException as err:  # report whatever it was, then leave without server code
        try:
            report.send(("error: %s" % err).encode("utf-8", "replace")[:4000])
        finally:
            os._exit(127)
    sys.argv = [request.get("argv0") or sys.argv[0]]
    code = 0
    try:
        result = entry()
        code = result if isinstance(result, int) else (0 if result is None else 1)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)


REHEARSAL = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "mcp-pool-prefork-rehearsal", "version": "1"}}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
]
REHEARSAL_SECONDS = 10


def rehearse(entry):
    """Runs one throwaway session in a forked child (initialize, tools/list, end of input) and
    imports here what the server imported only once running (an event loop backend, stream
    helpers): otherwise every session pays those imports after its fork, about as long as the
    rest of its start. The child holds no secret either, and whatever else it warmed up dies
    with it. Best effort: any failure just leaves the zygote as it was. Returns how many
    modules were imported."""
    before = set(sys.modules)
    names_r, names_w = os.pipe()
    input_r, input_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(names_r)
            os.close(input_w)
            os.dup2(input_r, 0)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            signal.alarm(REHEARSAL_SECONDS)
            try:
                entry()
            except BaseException:
                pass
            signal.alarm(0)
            new = [name for name in list(sys.modules) if name not in before]
            with os.fdopen(names_w, "w") as out:
                out.write("\n".join(new))
        finally:
            os._exit(0)
    os.close(names_w)
    os.close(input_r)
    try:
        os.write(input_w, "".join(json.dumps(m) + "\n" for m in REHEARSAL).encode())
    except OSError:
        pass
    os.close(input_w)
    chunks = []
    deadline = REHEARSAL_SECONDS + 1
    while True:
        ready, _, _ = select.select([names_r], [], [], deadline)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(names_r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(names_r)
    os.waitpid(pid, 0)
    imported = 0
    for name in b"".join(chunks).decode("utf-8", "replace").split("\n"):
        if name and name not in sys.modules:
            try:
                importlib.import_module(name)
                imported += 1
            except BaseException:
                pass
    return imported


def main():
    module, function = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[3]] if len(sys.argv) > 3 else [module]
    # `-c` puts the working directory first on sys.path, and each child's is its user's state
    # directory: import from the script's directory instead, as the console script would.
    if sys.path and sys.path[0] == "":
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    control = socket.socket(fileno=0)
    try:
        entry = getattr(importlib.import_module(module), function)
    except BaseException as err:
        control.send(json.dumps({"error": "cannot import %s.%s: %s" % (module, function, err)}).encode())
        return 1
    # Twice: a thread started at import makes even the rehearsal's fork unsafe, and one
    # started by a module the rehearsal brought in would be lost the same way.
    preloaded = 0
    for step in ("import", "rehearsal"):
        if step == "rehearsal":
            preloaded = rehearse(entry)
        threads = max(threading.active_count(), native_threads())
        if threads > 1:
            # A thread would be missing from every child (fork copies only the calling
            # thread), with whatever locks it held: unsafe, so the pool spawns instead.
            names = [t.name for t in threading.enumerate()]
            control.send(json.dumps({"threads": threads, "names": names, "after": step}).encode())
            return 1
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, reap)
    zygote_pid = os.getpid()
    control.send(json.dumps({"ready": True, "pid": zygote_pid, "preloaded": preloaded}).encode())
    while True:
        message, fds, _flags, _addr = socket.recv_fds(control, MAX_HEADER, MAX_FDS)
        if not message:
            return 0  # the pool closed the socket: stop
        try:
            request = json.loads(message)
            if len(request["fds"]) != len(fds):
                raise ValueError("%d descriptors for %d labels" % (len(fds), len(request["fds"])))
            pid = os.fork()
        except BaseException as err:
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"error": "fork failed: %s" % err}).encode())
            continue
        if pid == 0:
            child(request, fds, control, zygote_pid, entry)
        for fd in fds:
            os.close(fd)
        reap()
        control.send(json.dumps({"forked": pid}).encode())


if __name__ == "__main__":
    sys.exit(main())
