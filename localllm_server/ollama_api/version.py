"""GET /api/version."""
from __future__ import annotations


class VersionResource:
    def on_get(self, req, resp):
        import localllm

        resp.media = {"version": localllm.__version__}
