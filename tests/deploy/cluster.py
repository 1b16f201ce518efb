"""Real server processes on loopback ports: ``localllm serve`` replicas, gunicorn, and nginx running the shipped
``deploy/nginx/localllm.conf`` (its listen address and replica list filled in) — for tests/deploy and
benchmarks/bench_replicas.py.

nginx runs as its own binary with a prefix in a temporary folder (``-p``, ``-e``, ``-c``, ``-g``): every temp path,
log and the pid file in that folder, nothing read or written in /etc or /var, no root needed.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NGINX_DIR = REPO_ROOT / "deploy" / "nginx"
SHIPPED_CONF = NGINX_DIR / "localllm.conf"
SHIPPED_REPLICAS = NGINX_DIR / "localllm" / "replicas.conf"
SHIPPED_LISTEN = "listen 127.0.0.1:8080;"       # the one line of the shipped config a test replaces
SMOLLM2 = "smollm2:135m"
MINILM = "all-minilm"
WAIT = 120                                       # bound on any wait for a process (2 shared cores)
TRUSTED_PROXY = "127.0.0.1"                      # the address nginx connects to the replicas from


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, seconds: float = WAIT, every: float = 0.05):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:g} s waiting until {what}")


def http_request(port: int, method: str, path: str, body=None, headers: dict | None = None,
                 source: str | None = None, timeout: float = WAIT) -> tuple[int, dict, bytes]:
    """One plain HTTP request to 127.0.0.1:``port`` (from the loopback address ``source`` when given):
    (status, lower-cased headers, body)."""
    headers = dict(headers or {})
    if body is not None:
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def answers(port: int) -> bool:
    try:
        return http_request(port, "GET", "/", timeout=5)[0] == 200
    except OSError:
        return False


def metric(port: int, name: str) -> int:
    """A counter or gauge of the server on ``port`` (its /metrics), summed over its labels."""
    _, _, body = http_request(port, "GET", "/metrics")
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in body.decode().splitlines()
               if line.startswith(name + "{"))


def active_requests(port: int) -> int:
    """Generation requests decoding in the server on ``port``."""
    return metric(port, "localllm_requests_active")


class ServerProcess:
    """A server subprocess on 127.0.0.1:``port`` serving the test store; its output in ``log_path``."""

    def __init__(self, command: list[str], port: int, env: dict, log_path: Path, warm_model: str = SMOLLM2):
        self.command, self.port, self.env, self.log_path = command, port, env, log_path
        self.warm_model = warm_model
        self.process = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: answers(self.port) or self.process.poll() is not None, f"{self.log_path.name} answers")
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.command} exited with {self.process.returncode}:\n{self.log()}")
        # the model loaded (its kernels read from the cache) before any test waits behind nginx
        status, _, body = http_request(self.port, "POST", "/api/generate",
                                       {"model": self.warm_model, "prompt": "Hi", "stream": False,
                                        "options": {"num_predict": 1}})
        assert status == 200, body

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)


def server_env(store_root: Path, port: int, name: str, **extra) -> dict:
    env = dict(os.environ, LOCALLLM_MODELS=str(store_root), LOCALLLM_HOST=f"127.0.0.1:{port}",
               LOCALLLM_NUM_PARALLEL="2", LOCALLLM_MAX_QUEUE="8", LOCALLLM_KEEP_ALIVE="600",
               LOCALLLM_REPLICA_NAME=name, LOCALLLM_TRUSTED_PROXY=TRUSTED_PROXY, LOCALLLM_ACCESS_LOG="1",
               NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_replica(store_root: Path, log_dir: Path, name: str, warm_model: str = SMOLLM2, **extra) -> ServerProcess:
    """``localllm serve`` (waitress), as a user starts it; ``warm_model`` loaded before it is returned."""
    port = free_port()
    return ServerProcess([sys.executable, "-m", "localllm.cli", "serve"], port,
                         server_env(store_root, port, name, **extra), log_dir / f"{name}.log", warm_model)


def start_gunicorn(store_root: Path, log_dir: Path, name: str) -> ServerProcess:
    """``gunicorn 'localllm_server.app:get_app()'``: one gthread worker (one engine), threads for the requests."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
               "--worker-class", "gthread", "--threads", "8", "--forwarded-allow-ips", TRUSTED_PROXY,
               "localllm_server.app:get_app()"]
    return ServerProcess(command, port, server_env(store_root, port, name), log_dir / f"{name}.log")


def replica_lines(ports: list[int]) -> str:
    """The shipped replica list with its addresses replaced by ``ports`` (each line keeps the shipped parameters:
    max_fails, fail_timeout)."""
    shipped = [line.strip() for line in SHIPPED_REPLICAS.read_text().splitlines()
               if line.strip().startswith("server ")]
    parameters = shipped[0].split(None, 2)[2]            # "max_fails=1 fail_timeout=10s;"
    assert all(line.split(None, 2)[2] == parameters for line in shipped)
    return "".join(f"server 127.0.0.1:{port} {parameters}\n" for port in ports)


def prepare_prefix(binary: str, folder: Path, conf_text: str, replicas_text: str) -> Path:
    """An nginx prefix in ``folder``: ``localllm.conf`` and ``localllm/replicas.conf`` as given, inside the smallest
    main config (temp paths and the access log in the folder); returns the main config's path."""
    for sub in ("logs", "temp", "localllm"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "localllm" / "replicas.conf").write_text(replicas_text)
    (folder / "localllm.conf").write_text(conf_text)
    temp = "\n".join(f"    {kind}_temp_path {folder / 'temp' / kind};" for kind in temp_path_kinds(binary))
    user = "user root;\n" if os.geteuid() == 0 else ""    # workers that can read a root-only temp folder
    main = folder / "nginx.conf"
    main.write_text(f"{user}worker_processes 1;\nevents {{ worker_connections 512; }}\n"
                    f"http {{\n{temp}\n    access_log {folder / 'logs' / 'access.log'};\n"
                    f"    include {folder / 'localllm.conf'};\n}}\n")
    return main


def temp_path_kinds(binary: str) -> list[str]:
    """The modules with a temp path built into this nginx (``nginx -V``): each needs its own folder here."""
    built = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    kinds = [kind.replace("-", "_") for kind in re.findall(r"--http-([a-z-]+)-temp-path=", built)]
    return [kind for kind in kinds if f"--without-http_{kind}_module" not in built] or ["client_body", "proxy"]


def nginx_command(binary: str, folder: Path, main: Path, *extra: str) -> list[str]:
    return [binary, "-p", str(folder), "-e", "stderr", "-c", str(main),
            "-g", f"daemon off; pid {folder / 'nginx.pid'}; error_log stderr;", *extra]


def check_shipped_config(binary: str, folder: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` on the shipped ``localllm.conf`` and ``localllm/replicas.conf`` exactly as they are."""
    main = prepare_prefix(binary, folder, SHIPPED_CONF.read_text(), SHIPPED_REPLICAS.read_text())
    return subprocess.run(nginx_command(binary, folder, main, "-t"), capture_output=True, text=True)


class Nginx:
    """nginx with the shipped ``localllm.conf`` in front of the servers on ``upstream_ports``."""

    def __init__(self, binary: str, folder: Path, upstream_ports: list[int]):
        self.binary, self.folder = binary, folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shipped = SHIPPED_CONF.read_text()
        assert shipped.count(SHIPPED_LISTEN) == 1, f"{SHIPPED_CONF} no longer has the line {SHIPPED_LISTEN!r}"
        main = prepare_prefix(binary, folder, shipped.replace(SHIPPED_LISTEN, f"listen 127.0.0.1:{self.port};"),
                              replica_lines(upstream_ports))
        with open(folder / "logs" / "error.log", "ab") as errors:
            self.process = subprocess.Popen(nginx_command(binary, folder, main), stdout=subprocess.DEVNULL,
                                            stderr=errors)
        wait_until(lambda: answers(self.port) or self.process.poll() is not None, "nginx answers")
        if self.process.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.error_log()}")

    def error_log(self) -> str:
        return (self.folder / "logs" / "error.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)        # fast shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)


def find_nginx() -> str | None:
    """The nginx binary on PATH or in the usual sbin folders (not on a user's PATH), or None."""
    return shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(path, os.X_OK)), None)


# ---- Ray Serve (tests/deploy/test_ray_serve.py) ----------------------------------------------------------------

RAY_DIR = REPO_ROOT / "deploy" / "ray"
SHIPPED_RAY_CONFIG = RAY_DIR / "serve_config.yaml"
RAY_REPLICA_PREFIX = "SERVE_REPLICA::"           # Ray Serve's replica actors: SERVE_REPLICA::app#deployment#id


class RayCluster:
    """A one-node Ray cluster on 127.0.0.1 (``ray start --head --block``), with a Serve config deployed on it by
    ``serve run --non-blocking``: ``config`` (the shipped one, adapted by the caller) is written to ``folder``, and
    Serve's HTTP proxy listens on ``self.port``.

    Ray turns a loopback ``--node-ip-address`` into the machine's address unless clustering is off:
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's local-only mode, its default on macOS and Windows) keeps every
    process on 127.0.0.1; a process that joins needs that setting before it imports ray, so the pytest process
    never joins: ``driver()`` runs a driver process for what only Ray's API does. Token authentication is on,
    with a token made for this cluster and passed in ``RAY_AUTH_TOKEN`` (nothing is read from or written to
    ~/.ray). Every port is a free one, the session folder a short one (Ray's socket paths must fit in 108 bytes).
    ``stop()`` SIGTERMs ``ray start``, which stops the processes of its node (never ``ray stop``: that stops every
    Ray on the machine)."""

    def __init__(self, folder: Path, config: dict, num_cpus: int):
        import secrets
        import tempfile

        import yaml

        self.folder = folder
        self.gcs_port, self.port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.token = secrets.token_hex(32)
        config = dict(config, http_options={**config.get("http_options", {}), "host": "127.0.0.1",
                                            "port": self.port})
        self.config_path = folder / "serve_config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
                   "--include-dashboard=false", f"--dashboard-port={free_port()}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        with open(folder / "ray-head.log", "ab") as log:
            self.process = subprocess.Popen(command, env=self.ray_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._gcs_answers() or self.process.poll() is not None, "the Ray head answers")
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log('ray-head.log')}")
            deploy = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "run", "--non-blocking",
                                     f"--address={self.address}", str(self.config_path)],
                                    env=self.ray_env(), capture_output=True, text=True, timeout=WAIT)
            (folder / "serve-run.log").write_text(deploy.stdout + deploy.stderr)
            if deploy.returncode != 0:
                raise RuntimeError(f"serve run failed ({deploy.returncode}):\n{deploy.stdout}{deploy.stderr}")
            self.driver("wait")                      # every replica of every application up (its models loaded)
            wait_until(lambda: self._app_answers() or self.process.poll() is not None,
                       "the Serve application answers", every=0.5)
        except BaseException:
            self.stop()
            raise

    def ray_env(self) -> dict:
        return dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                    RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2", PYTHONUNBUFFERED="1")

    def _gcs_answers(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1).close()
            return True
        except OSError:
            return False

    def _app_answers(self) -> bool:
        try:
            return http_request(self.port, "GET", "/v1/models", timeout=10)[0] == 200
        except OSError:
            return False

    def log(self, name: str) -> str:
        path = self.folder / name
        return path.read_text(errors="replace") if path.exists() else ""

    def driver(self, *args: str) -> str:
        """Run ``RAY_DRIVER`` with ``args`` in a process that joins the cluster as a Ray driver; its output."""
        done = subprocess.run([sys.executable, "-c", RAY_DRIVER, self.address, *args], env=self.ray_env(),
                              capture_output=True, text=True, timeout=WAIT)
        if done.returncode != 0:
            raise RuntimeError(f"Ray driver {args} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def replica_actors(self, deployment: str) -> dict[str, str]:
        """{replica id: actor name} of a deployment's live replicas (the id a replica sends as X-Localllm-Replica)."""
        names = json.loads(self.driver("list").splitlines()[-1])
        return {name.rsplit("#", 1)[1]: name for name in names
                if name.startswith(RAY_REPLICA_PREFIX) and f"#{deployment}#" in name}

    def kill_replica(self, deployment: str, replica_id: str) -> None:
        """Kill a replica's actor at once (as a crash would); Ray Serve starts another in its place."""
        self.driver("kill", f"{RAY_REPLICA_PREFIX}", f"#{deployment}#{replica_id}")

    def stop(self) -> None:
        """Stop the node: ``ray start`` stops its processes on SIGTERM (Ray Serve's proxy drains for at most
        ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``), the replicas' worker processes with them."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# A Ray driver, run by RayCluster.driver: argv = address, then "wait" (until every Serve application runs; one
# that fails to deploy: exit 1 with its message), "list" (the names of the actors Ray Serve made, as JSON) or
# "kill <name start> <name end>" (the one actor so named).
RAY_DRIVER = f"""
import json, sys, time
import ray
address, action, *rest = sys.argv[1:]
ray.init(address=address, namespace="serve", log_to_driver=False, logging_level="ERROR")
if action == "wait":
    from ray import serve
    deadline = time.monotonic() + {WAIT}
    while True:
        applications = serve.status().applications
        if applications and all(a.status == "RUNNING" for a in applications.values()):
            break
        failed = {{n: a.message for n, a in applications.items() if a.status == "DEPLOY_FAILED"}}
        if failed or time.monotonic() > deadline:
            sys.exit(f"Serve applications not running: {{failed or applications}}")
        time.sleep(0.5)
elif action == "list":
    print(json.dumps([actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                      if actor["namespace"] == "serve"]))
elif action == "kill":
    [name] = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
              if actor["namespace"] == "serve" and actor["name"].startswith(rest[0])
              and actor["name"].endswith(rest[1])]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
ray.shutdown()
"""
