"""Workers forked from a preloaded launcher, on Linux: a pool's worker starts in about 0.1 s instead of importing
torch (1.9 s on a 2-core machine) and, at its first model, the model's library (diffusers: 3.9 s more).

One launcher process per host process and import path: started once (`python -m parallel_backend.runtime.launcher`),
it imports torch, the worker program and the libraries the host itself has loaded among PRELOAD, then forks a
worker per request. The worker becomes what `python -m parallel_backend.engine.worker` would be: its own session,
the pool's folder as working directory, the environment and log the pool gives it. Its watch on the host starts
first thing after the fork (worker_watch.py), with the launcher as the parent it follows. When the host has gone
(its pipe closes) the launcher kills the workers it forked, stopped ones too, and removes their pool folders.

Why not multiprocessing's forkserver: its children re-import the host's `__main__` (ComfyUI's main.py, with its
side effects) and take their arguments by pickle; this launcher runs only the worker program.

Only CPU workers are forked for now (FORKED_KINDS): a CUDA worker starts as an interpreter of its own
(pool.spawn_worker), as every worker does on macOS and Windows and with TANDEM_FORK_WORKERS=0. The launcher is
built for CUDA too (it never initialises it: TORCH_NVML_BASED_CUDA_CHECK keeps `torch.cuda.is_available()` from
doing so, and a fork is refused once `torch.cuda.is_initialized()`), but no GPU has run a forked worker yet
(tests/gpu has the test that would).

Protocol, one JSON line each way: the host sends {"argv", "env", "cwd", "log"}; the launcher answers
{"pid"} (or {"error"}) in request order, and {"exited": pid, "code"} when a worker ends (Popen's return codes:
negative for a signal).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import environment, pool_files, worker_watch

FORKED_KINDS = ("cpu",)  # device kinds whose workers fork; "cuda" once a GPU has run tests/gpu's forked worker
WORKER_MODULE = "parallel_backend.engine.worker"  # by name: the process boundary, as pool.spawn_worker's command
PRELOAD = ("diffusers",)  # imported in the launcher when the host has imported them (they never touch CUDA)


class ForkedProcess:
    """A worker forked by the launcher, with the part of subprocess.Popen's interface the pool uses."""

    UNKNOWN = 255  # poll()'s code for a worker that ended after its launcher did (nobody reported how)

    def __init__(self, launcher: "Launcher", pid: int):
        self.launcher, self.pid, self.returncode = launcher, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        until = None if timeout is None else time.monotonic() + timeout
        with self.launcher.changed:
            while self.poll() is None:
                left = None if until is None else until - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"worker process {self.pid}", timeout)
                self.launcher.changed.wait(timeout=0.5 if left is None else min(left, 0.5))
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Launcher:
    """The host's side of one launcher process: `spawn(argv, env, cwd, log_path) -> ForkedProcess`."""

    def __init__(self, pythonpath: str):
        self.owner = os.getpid()  # a host that forks gets a launcher of its own in the child
        self.changed = threading.Condition()
        self._exits: dict[int, int] = {}
        self._answers: list[dict] = []
        self._send_lock = threading.Lock()
        env = dict(os.environ, PYTHONPATH=pythonpath, TORCH_NVML_BASED_CUDA_CHECK="1")
        # The host's own modules of those libraries: a package's __init__ alone imports little (diffusers is lazy)
        preload = sorted(name for name in list(sys.modules) if name.split(".")[0] in PRELOAD)
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), *preload],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        cwd=tempfile.gettempdir(), start_new_session=True, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True, name="tandem-launcher").start()
        self._answer(timeout_s=120)  # {"ready": true} once the imports are done

    def alive(self) -> bool:
        return self.process.poll() is None

    def spawn(self, argv: list[str], env: dict, cwd: str, log_path: str) -> ForkedProcess:
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd, "log": log_path})
        with self._send_lock:  # answers come in request order
            self.process.stdin.write(request + "\n")
            self.process.stdin.flush()
            answer = self._answer(timeout_s=30)
        if "pid" not in answer:
            raise OSError(f"the worker launcher could not fork: {answer.get('error')}")
        return ForkedProcess(self, answer["pid"])

    def exit_code(self, pid: int) -> int | None:
        with self.changed:
            if pid in self._exits:
                return self._exits[pid]
        if not self.alive():  # the launcher is gone, and with it how its workers end; one that still runs has not
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return ForkedProcess.UNKNOWN
        return None

    def _answer(self, timeout_s: float) -> dict:
        until = time.monotonic() + timeout_s
        with self.changed:
            while not self._answers:
                if not self.alive() or time.monotonic() > until:
                    raise OSError("the worker launcher stopped answering"
                                  + ("" if self.alive() else f" (it exited with code {self.process.poll()})"))
                self.changed.wait(timeout=0.2)
            return self._answers.pop(0)

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self.changed:
                if "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                else:
                    self._answers.append(message)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()



_launchers: dict[str, Launcher] = {}
_launchers_lock = threading.Lock()


def forks(device: str) -> bool:
    """Whether a worker for `device` of this machine is forked from the launcher (Linux, a kind in FORKED_KINDS,
    TANDEM_FORK_WORKERS not 0)."""
    return (sys.platform.startswith("linux") and device.split(":")[0] in FORKED_KINDS
            and environment.text("TANDEM_FORK_WORKERS") != "0")


def launcher_for(pythonpath: str) -> Launcher:
    """This host's launcher for workers with import path `pythonpath`, started on first use (again if it died)."""
    with _launchers_lock:
        launcher = _launchers.get(pythonpath)
        if launcher is None or launcher.owner != os.getpid() or not launcher.alive():
            launcher = _launchers[pythonpath] = Launcher(pythonpath)
        return launcher


# ---- the launcher process --------------------------------------------------------------------------------------


def _say(message: dict) -> None:
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the host has gone: the end of its pipe, read next, ends its workers
        pass


def _reap(workers: dict[int, str]) -> None:
    """Reports the workers that ended; `workers` (pid -> pool folder) keeps those still running."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        workers.pop(pid, None)
        _say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _end_with_host(workers: dict[int, str]) -> None:
    """The host has gone: its workers end (stopped and frozen ones too) and their pool folders go."""
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid, folder in workers.items():
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        if os.path.basename(folder).startswith(pool_files.PREFIX):  # only a pool's folder, whatever was asked
            shutil.rmtree(folder, ignore_errors=True)


def _become_worker(request: dict, launcher: int) -> None:
    """In the forked child of process `launcher`: what `python -m WORKER_MODULE argv` started with `env` in `cwd`
    would be. Never returns."""
    code = 1
    try:
        worker_watch.start_from_argv(request["argv"], parent_pid=launcher)  # first: the host may be gone already
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log), os.close(null)  # the launcher's pipes were 0 and 1: nothing of them stays open here
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # The import path `python -m` gives: the working directory, then PYTHONPATH, then the interpreter's own.
        paths = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [request["cwd"], *paths, *[p for p in sys.path[1:] if p not in paths]]
        sys.argv = [WORKER_MODULE, *request["argv"]]
        sys.stdout.reconfigure(line_buffering=True)  # fd 1 and 2 are the log now
        sys.stderr.reconfigure(line_buffering=True)
        worker = importlib.import_module(WORKER_MODULE)
        code = worker.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve(host: int, preload: list[str]) -> None:
    """Forks a worker per request of process `host` until the host has gone (its pipe closes), then ends them."""
    if not worker_watch.follow_parent(host) and worker_watch.host_gone(host):
        return
    import torch

    importlib.import_module(WORKER_MODULE)
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module the host could import but this process cannot is the worker's
            pass  # to import (or not) as a fresh process would
    _say({"ready": True})
    workers: dict[int, str] = {}  # pid -> its pool's folder
    launcher = os.getpid()
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.05)
        _reap(workers)
        if not readable:
            continue
        line = sys.stdin.readline()
        if not line:  # the host has gone (or closed us)
            _end_with_host(workers)
            return
        request = json.loads(line)
        if torch.cuda.is_initialized():
            _say({"error": "CUDA is initialised in the launcher; a forked worker could not use it"})
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            _say({"error": str(exc)})
            continue
        if pid == 0:
            _become_worker(request, launcher)
        workers[pid] = request["cwd"]
        _say({"pid": pid})


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])
    sys.stdout.flush()
    os._exit(0)
