"""Shared fixtures: ONE Ray instance per test session, and a real MLflow tracking server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The commands set this first (pipeline.quiet); tests call their parts directly, so set it before any
# test module imports MLflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Loopback only, for Ray, gloo and the MLflow server.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # address="local": a fresh instance even if a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:``port`` with a sqlite store under ``root``; returns once healthy."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_until_answers(f"http://127.0.0.1:{port}/health", proc, root / "server.log", timeout=120)
    return proc


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, timeout: float, poll_s: float = 0.5) -> None:
    """Return once ``url`` answers; if ``proc`` (the server) exits first or ``timeout`` seconds pass,
    kill it and raise with the end of its ``log``."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{url} did not answer: {log.read_text()[-3000:]}")
            time.sleep(poll_s)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a sqlite store; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def start_s3_server(root: Path, port: int, check_credentials: bool = False) -> subprocess.Popen:
    """moto's standalone S3-compatible server on 127.0.0.1 (a real HTTP server: pyarrow's C++ client
    and other processes reach it, which in-process mocks do not). ``check_credentials``: refuse
    unknown keys from the first request (moto checks none unless INITIAL_NO_AUTH_ACTION_COUNT is set)."""
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else {})}
    log = open(root / f"moto-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_until_answers(f"http://127.0.0.1:{port}/moto-api/", proc, root / f"moto-{port}.log", timeout=60, poll_s=0.3)
    return proc


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server for the session; yields the AWS variables that point at it (the
    only way bnflow learns an endpoint and credentials)."""
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    proc = start_s3_server(root, port)
    yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bnflow-test",
           "AWS_SECRET_ACCESS_KEY": "bnflow-test", "AWS_DEFAULT_REGION": "us-east-1"}
    stop(proc)


def start_ray_head(root: Path, token: str, num_cpus: int = 2) -> tuple[str, subprocess.Popen]:
    """A real `ray start --head` with token auth, on loopback ports of its own and its own temp dir
    (so ``ray.init()`` elsewhere never attaches to it); returns (dashboard address, process).
    ``python`` in its jobs is this interpreter. Stop it with ``stop_ray_head``."""
    temp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # Ray's socket paths must stay short
    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
                                            "--object-manager-port", "--dashboard-agent-listen-port",
                                            "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp), "--num-cpus", str(num_cpus), "--disable-usage-stats",
           *[str(x) for kv in ports.items() for x in kv]]
    log = open(root / "ray-head.log", "a")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.temp_dir = temp
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    deadline = time.time() + 120
    while True:
        try:
            req = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(req, timeout=2)
            return address, proc
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                stop_ray_head(proc)
                raise RuntimeError(f"ray head did not start: {(root / 'ray-head.log').read_text()[-2000:]}")
            time.sleep(1)


def stop_ray_head(proc: subprocess.Popen) -> None:
    """Stop the head and every process it started (`ray stop` would stop every Ray on the machine)."""
    import psutil

    marker = str(proc.temp_dir)
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=3)  # `ray start --block` rarely ends on SIGTERM alone: SIGKILL follows
    except subprocess.TimeoutExpired:
        pass
    for _ in range(3):
        for p in psutil.process_iter(["cmdline"]):
            try:
                if marker in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(proc.pid, 9)  # workers renamed "ray::..." carry no marker; they share the session
        except (ProcessLookupError, PermissionError):
            pass
        time.sleep(1)


def start_cli(args, ray_tmp: str, env_extra=None):
    """The CLI in a fresh process with its own embedded Ray, whose processes carry ``ray_tmp`` (a
    short path: Ray's socket paths must fit in 107 characters) in their command lines."""
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    # Default SIGINT in the child, as in a terminal (a background parent may have it ignored).
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_line(proc, needle, timeout=240):
    deadline = time.time() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return seen
        assert time.time() < deadline, f"no '{needle}' in:\n{''.join(seen[-30:])}"
    raise AssertionError(f"process ended before '{needle}':\n{''.join(seen[-30:])}\n{proc.stderr.read()[-3000:]}")
