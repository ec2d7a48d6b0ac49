"""`make lab` for real: JupyterLab comes up on 127.0.0.1 (as root too, saying so), answers its
status API only with its token, lists the notebooks and the "peftkit (.venv)" kernel, and stops
on its shutdown API with make exiting cleanly."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = ".venv/.peftkit-installed"  # the install `make test` already did: not redone here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_make_lab_serves_the_notebooks_on_localhost_and_stops(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "HOME": str(tmp_path), "JUPYTER_TOKEN": token}  # no user jupyter config
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env.pop(var, None)
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "-o", STAMP, "lab", f"LAB_PORT={port}"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # make and jupyter in their own group, to clean up on failure
    )
    try:
        status = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = _get(f"{base}/status?token={token}")
                break
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.5)
        assert status is not None, f"JupyterLab did not come up (exit {proc.poll()})"
        code, body = status
        assert code == 200 and "started" in json.loads(body)
        assert _get(f"{base}/status")[0] == 403  # the token is required
        assert _get(f"{base}/status?token=wrong")[0] == 403

        code, body = _get(f"{base}/contents?token={token}")
        assert code == 200
        listed = {c["name"] for c in json.loads(body)["content"] if c["type"] == "notebook"}
        assert listed == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} and listed
        code, body = _get(f"{base}/kernelspecs?token={token}")
        assert code == 200 and "peftkit" in json.loads(body)["kernelspecs"]

        assert _get(f"{base}/shutdown?token={token}", method="POST")[0] == 200
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    assert f"127.0.0.1:{port}" in out
    assert "Running as root is not recommended" not in out
    as_root = "running as root so JupyterLab starts with --allow-root" in out
    assert as_root == (os.geteuid() == 0)
