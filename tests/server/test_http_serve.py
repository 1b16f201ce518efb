"""``localllm_server.server.serve``: binds LOCALLLM_HOST, prints the address, stops cleanly on Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

from .conftest import free_port


def test_serve_binds_localllm_host_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {**os.environ, "LOCALLLM_HOST": f"127.0.0.1:{port}", "LOCALLLM_MODELS": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-c", "from localllm_server.server import serve; serve()"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.strip() == f"localllm listening on http://127.0.0.1:{port}"
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read() == b"localllm is running"
        models = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30).read()
        assert models == b'{"object": "list", "data": []}'
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
