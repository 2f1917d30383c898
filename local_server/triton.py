"""A real tritonserver on this machine, without Docker (the local flavour).

The nvidia-pytriton wheel ships a tritonserver 2.51 binary, its libraries and the python backend,
but no onnxruntime backend. This module
1. copies the wheel's server folder once into build/tritonserver and adds the python-backend stub;
2. builds a runnable copy (local_server/repository.py) of model_repository/ and one of
   evaluation_repository/ (the oracle and the baseline, loaded as a second
   `--model-repository`), where each ONNX model runs in the python-backend stand-in;
3. starts the server bound to 127.0.0.1 with the model control API off (or, for Triton's own
   tools such as Model Analyzer, in explicit mode with every model loaded at start), waits until
   the server and every model are ready, and stops it by PID.
Used by local_server/serve.py (the command behind scripts/serve.sh), the tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from export.repositories import MODEL_REPOSITORY, evaluation_beside
from export.triton_configs import NAIVE, TARGET_FUSION, USER_ENCODER
from local_server.processes import (
    is_running,
    kill_lingering,
    process_label,
    process_tree,
    remove_shm_regions,
    shm_regions,
    stub_pids,
    wait_gone,
)
from local_server.repository import (
    ServerError,
    build_local_repository,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO_ROOT / "build"


# "none": the production setting (models fixed at start, no load/unload API); "explicit": the
# model control API on, every model loaded at start (`--load-model=*`), for tools that load
# config variants (Model Analyzer's remote mode) or new versions.
MODEL_CONTROL_MODES = ("none", "explicit")


def _site_packages() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent.parent


def prepare_server(build_dir: Path = BUILD_DIR) -> Path:
    """Copy the wheel's tritonserver folder (once) and install the python-backend stub."""
    target = build_dir / "tritonserver"
    stub = target / "backends" / "python" / "triton_python_backend_stub"
    if stub.exists():
        return target
    source = _site_packages() / "pytriton" / "tritonserver"
    if not (source / "bin" / "tritonserver").exists():
        raise ServerError(
            f"no tritonserver binary in {source}: is nvidia-pytriton==0.7.0 installed?"
        )
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_source = source / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub_source.exists():
        raise ServerError(f"the wheel has no python backend stub for Python {py}")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy2(stub_source, stub)
    return target


def _require(local: Path, source: Path, models: tuple[str, ...]) -> None:
    missing = [m for m in models if not (local / m).exists()]
    if missing:
        raise ServerError(f"model repository {source} lacks {missing}: run `python -m export`")


def server_env() -> dict[str, str]:
    """The environment tritonserver runs in: the wheel's libraries on LD_LIBRARY_PATH, and this
    venv's python first on PATH, whose packages (numpy, onnxruntime) the python-backend stub
    imports. No PYTHONPATH: nothing the server runs imports the project by module name (the
    local stand-in loads its helper by path, local_server/repository.py), so the server works
    from any working directory, as Triton's tools start it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    libs = _site_packages() / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def exec_tritonserver(argv: list[str], build_dir: Path = BUILD_DIR) -> None:
    """Replace this process by the local tritonserver with `argv` (scripts/tritonserver.sh):
    its backends and caches folders set, HTTP, gRPC and metrics bound to 127.0.0.1 unless
    `argv` says otherwise (later flags win), in `server_env()`. For tools that launch
    tritonserver themselves, such as Model Analyzer's local launch mode."""
    server_dir = prepare_server(build_dir)
    binary = str(server_dir / "bin" / "tritonserver")
    defaults = [f"--backend-directory={server_dir / 'backends'}",
                f"--cache-directory={server_dir / 'caches'}",
                "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                "--metrics-address=127.0.0.1"]
    os.execve(binary, [binary, *defaults, *argv], server_env())


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether tritonserver could bind `port`. SO_REUSEADDR as gRPC sets it: connections of a
    crashed server left in TIME_WAIT do not keep its port from a restart."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child: the server gets SIGTERM if the process that started it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerExitedError(ServerError):
    """The server process exited before it was ready."""


@dataclass
class LocalServer:
    """A running tritonserver (local flavour). Stop it with `stop()`."""

    args: list[str]
    env: dict[str, str]
    grpc_port: int
    http_port: int | None
    metrics_port: int | None
    log_file: Path
    models: list[str] = field(default_factory=list)
    local_repository: Path | None = None
    # every runnable copy this server loads (serving first, then evaluation), removed by stop()
    local_repositories: list[Path] = field(default_factory=list)
    process: subprocess.Popen | None = None
    # python-backend stubs of the running server: pid -> label ("stub:<model>") and its
    # /dev/shm regions, recorded once every model is ready
    stubs: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    restarts: int = 0
    cleanup: dict[str, object] = field(default_factory=dict)
    cwd: Path | None = None  # the server's working directory (default: the caller's)

    @property
    def pid(self) -> int:
        return self.process.pid

    def local_model_dir(self, name: str) -> Path:
        """Model `name`'s folder in the runnable copy that holds it (serving or evaluation)."""
        found = [local / name for local in self.local_repositories if (local / name).is_dir()]
        if not found:
            raise ServerError(f"no model {name!r} in {self.local_repositories}")
        return found[0]

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def console_file(self) -> Path:
        """The server's stdout/stderr: what it prints before its log opens (an abort at start)."""
        return self.log_file.with_suffix(".console")

    def launch(self) -> None:
        if self.log_file.exists():
            self.log_file.unlink()
        with self.console_file.open("wb") as console:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=console, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent, cwd=self.cwd,
            )
        self.stubs = {}

    def _no_log(self) -> str:
        console = (self.console_file.read_text(errors="replace").strip()
                   if self.console_file.exists() else "")
        return "(no server log)" + (f"; its console:\n{console[-3000:]}" if console else "")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return self._no_log()
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def errors_in_log(self) -> str:
        """The server's own error lines (model load failures), else the log's tail."""
        if not self.log_file.exists():
            return self._no_log()
        text = self.log_file.read_text(errors="replace").splitlines()
        errors = [line for line in text
                  if (line.startswith("E") or "error" in line.lower())
                  and "CudaDriverHelper" not in line]  # harmless on a machine without a GPU
        return "\n".join(errors[-20:]) if errors else self.log_tail()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerExitedError(
                        f"tritonserver exited with code {self.process.returncode} while starting; "
                        f"its log ({self.log_file}) says:\n{self.errors_in_log()}"
                    )
                with contextlib.suppress(Exception):
                    if client.is_server_ready() and all(
                        client.is_model_ready(m) for m in self.models
                    ):
                        self.stubs = {p: (process_label(p), shm_regions([p]))
                                      for p in stub_pids(self.pid)}
                        return
                time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise ServerError(
            f"tritonserver not ready after {timeout_s:.0f}s; its log ({self.log_file}) says:\n"
            f"{self.errors_in_log()}"
        )

    def dead_stubs(self) -> list[str]:
        """Models whose python-backend stub died. Triton 2.51 never relaunches a stub: the
        model then fails every request ("Stub process ... is not healthy") while the server and
        the model still report ready, so readiness cannot tell; the process table can."""
        return sorted(label for pid, (label, _) in self.stubs.items() if not is_running(pid))

    def _terminate(self, timeout_s: float, sig: int) -> int | None:
        """Stop the server with `sig` (SIGKILL after `timeout_s`), then make sure nothing
        outlives it: stubs still running 10 s later are killed by PID, and the /dev/shm regions
        of killed stubs removed (a stub blocked on a dead parent never exits by itself)."""
        if self.process is None:
            return None
        stubs = dict(self.stubs)
        for pid in process_tree(self.pid)[1:]:
            stubs.setdefault(pid, (process_label(pid), shm_regions([pid])))
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        killed = kill_lingering(wait_gone(stubs, 10.0))
        if killed:
            wait_gone(killed, 5.0)
        dead = [pid for pid in stubs if pid in killed or not is_running(pid)]
        removed = remove_shm_regions(r for pid in dead for r in stubs[pid][1])
        self.cleanup = {"lingering_stubs_killed": killed, "shm_removed": removed}
        return self.process.returncode

    def restart(self, timeout_s: float = 180.0, attempts: int = 3) -> None:
        """Kill the server and start it again on the same ports and repository. A server that
        dies while starting (seen once in many restarts: killed at once with SIGABRT, before its
        log opened, right after the previous one was killed on the same ports) is started again,
        up to `attempts` times, a second apart; the last failure is raised."""
        self._terminate(5.0, signal.SIGKILL)
        self.restarts += 1
        for attempt in range(1, attempts + 1):
            self.launch()
            try:
                self.wait_ready(timeout_s)
                return
            except ServerExitedError:
                if attempt == attempts:
                    raise
                time.sleep(1.0)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; clean up. Returns the exit code."""
        code = self._terminate(timeout_s, signal.SIGTERM)
        for local in self.local_repositories:
            shutil.rmtree(local, ignore_errors=True)
        return code


def start_server(
    grpc_port: int = 8001,
    http_port: int | None = None,
    metrics_port: int | None = None,
    repository: Path = MODEL_REPOSITORY,
    evaluation: Path | None = None,
    with_evaluation: bool = True,
    build_dir: Path = BUILD_DIR,
    log_file: Path | None = None,
    cache_bytes: int = 0,
    extra_args: list[str] | None = None,
    model_control: str = "none",
    wait: bool = True,
    timeout_s: float = 180.0,
) -> LocalServer:
    """Start tritonserver on 127.0.0.1 on the serving `repository` and, unless
    `with_evaluation` is False, its evaluation repository (`evaluation`, default the one beside
    it: export/repositories.py). Only gRPC is on unless http/metrics ports are given.
    `model_control` "explicit" opens Triton's model control API (load/unload, still on
    127.0.0.1 only) and loads every model at start, as Model Analyzer's remote mode needs."""
    if model_control not in MODEL_CONTROL_MODES:
        raise ServerError(f"model control must be one of {MODEL_CONTROL_MODES}, "
                          f"got {model_control!r}")
    for label, port in (("gRPC", grpc_port), ("HTTP", http_port), ("metrics", metrics_port)):
        if port is not None and not port_is_free(port):
            raise ServerError(
                f"{label} port {port} on 127.0.0.1 is already in use (another tritonserver?); "
                f"choose another with --{label.lower()}-port"
            )
    server_dir = prepare_server(build_dir)
    local_repo = build_local_repository(
        repository, build_dir / f"model_repository_local_{grpc_port}"
    )
    _require(local_repo, repository, (USER_ENCODER, TARGET_FUSION))
    local_repos = [local_repo]
    if with_evaluation:
        source = Path(evaluation) if evaluation is not None else evaluation_beside(repository)
        if not source.is_dir():
            raise ServerError(f"no evaluation repository at {source} (ranker_naive, "
                              "ranker_base): run `python -m export`, or serve without it")
        local_repos.append(build_local_repository(
            source, build_dir / f"evaluation_repository_local_{grpc_port}"))
        # the oracle is what every family has; ranker_base is the reference model's own baseline
        _require(local_repos[-1], source, (NAIVE,))
    log_file = log_file or build_dir / "logs" / f"tritonserver_{grpc_port}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    args = [
        str(server_dir / "bin" / "tritonserver"),
        *(f"--model-repository={local}" for local in local_repos),
        f"--backend-directory={server_dir / 'backends'}",
        f"--cache-directory={server_dir / 'caches'}",
        f"--model-control-mode={model_control}",
        *(["--load-model=*"] if model_control == "explicit" else []),
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--log-file={log_file}",
        "--allow-grpc=true", "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
        f"--allow-http={'true' if http_port else 'false'}",
        f"--allow-metrics={'true' if metrics_port else 'false'}",
    ]
    if http_port:
        args += ["--http-address=127.0.0.1", f"--http-port={http_port}"]
    if metrics_port:
        args += ["--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}"]
    if cache_bytes:
        args.append(f"--cache-config=local,size={cache_bytes}")
    args += extra_args or []
    env = server_env()
    models = sorted(p.name for local in local_repos for p in local.iterdir()
                    if (p / "config.pbtxt").exists())
    server = LocalServer(args, env, grpc_port, http_port, metrics_port, log_file, models,
                         local_repo, local_repos)
    server.launch()
    if wait:
        server.wait_ready(timeout_s)
    return server
