"""A real waitress server on 127.0.0.1 serving a temporary store with the real models registered."""
from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, app, settings):
        from waitress.server import create_server

        self.port = free_port()
        self.server = create_server(app, host="127.0.0.1", port=self.port, threads=settings.threads,
                                    channel_timeout=30, cleanup_interval=1)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def close(self):
        self.server.close()


@pytest.fixture(scope="session")
def server_store(tmp_path_factory, smollm2_gguf_path, minilm_dir):
    """A temporary model store holding smollm2:135m and all-minilm (registered from the real files)."""
    from localllm.store import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("server-store"))
    store.add_local("smollm2:135m", smollm2_gguf_path)
    store.add_local("all-minilm:latest", minilm_dir)
    return store


@pytest.fixture(scope="session")
def engine(server_store):
    from localllm.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(n_slots=8, max_queue=64, keep_alive=600), store=server_store)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def server(engine):
    """Base URL of a running server (no API key)."""
    from localllm_server.app import Settings, create_app

    settings = Settings(threads=16)
    running = RunningServer(create_app(engine, settings), settings)
    yield running.url
    running.close()
