"""Fixtures for the deployment tests: the nginx binary (missing: a skip, a failure in CI) and a model store shared
by every server process. The processes themselves: ``cluster.py``."""
from __future__ import annotations

import os

import pytest

from .cluster import SMOLLM2, find_nginx


def nginx_binary() -> str:
    binary = find_nginx()
    if binary is None:
        message = "nginx is not installed (.ci/run installs it with apt-get)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def nginx_path() -> str:
    return nginx_binary()


@pytest.fixture(scope="session")
def deploy_store(tmp_path_factory, smollm2_gguf_path, minilm_dir):
    """A temporary model store with smollm2:135m and all-minilm, shared by every server process."""
    from localllm.store import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("deploy-store"))
    store.add_local(SMOLLM2, smollm2_gguf_path)
    store.add_local("all-minilm:latest", minilm_dir)
    return store
