"""JupyterLab, as students use it: `scripts/lab.sh` starts a real server, the project's kernel is
offered and runs the first cells of notebook 01 on the tiny recipe through the websocket API."""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jupyterlab  # noqa: F401  (a dependency: fail here, plainly, when it is missing)
import nbformat
import pytest
import websocket       # websocket-client, a dependency of jupyter_server
from jupyter_client.kernelspec import KernelSpecManager

from almost_utils.config import load_config
from conftest import ROOT, TINY

KERNEL = "almost"
NOTEBOOK = ROOT / "notebooks" / "01_synthetic_comparisons.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Talks to one running Jupyter server over HTTP with its token."""

    def __init__(self, port, token):
        self.base, self.token = f"http://127.0.0.1:{port}", token

    def request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def landing_url(self, timeout=30):
        """Where the server's front page sends a browser (after redirects)."""
        req = urllib.request.Request(self.base + "/", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.geturl()

    def wait_ready(self, proc, log, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"jupyter server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return self.request("GET", "/api/status", timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        pytest.fail(f"jupyter server did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def _execute(ws, session, code, timeout=300):
    """Run one cell through the kernel's channels; returns (reply content, text of its outputs).

    Waits for both the shell reply and the iopub 'idle' of this request, so no output is missed.
    """
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session,
                   "username": "test", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    reply, idle, texts = None, False, []
    deadline = time.monotonic() + timeout
    while reply is None or not idle:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no reply within {timeout}s to:\n{code[:300]}\noutputs so far: {texts}")
        ws.settimeout(left)
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "execute_reply":
            reply = content
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
        elif kind == "stream":
            texts.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            texts.append(content["data"].get("text/plain", ""))
        elif kind == "error":       # tracebacks come coloured; the colour codes only get in the way
            texts.append(re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(content["traceback"])))
    return reply, "".join(texts)


def _first_cells(nb):
    """The parameters cell, the cell that loads the recipe and the rubric table, in order."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    loads = [c for c in code if "open_run(" in c.source]
    rubric = [c for c in code if "cfg.comparisons.rubric" in c.source]
    for what, found in (("a 'parameters' cell", params), ("an open_run cell", loads),
                        ("the rubric table cell", rubric)):
        assert found, f"{NOTEBOOK.name}: no {what}"
    return params[0].source, loads[0].source, rubric[0].source


def test_lab_runs_notebook01_cells_with_project_kernel(tmp_path):
    # lab.sh runs on this environment (ALMOST_VENV below); with its python, JupyterLab and the
    # kernel present it starts the server directly and never runs setup.sh from a test.
    assert (Path(sys.prefix) / "bin" / "python").is_file(), \
        f"{sys.prefix}: not an environment with bin/python; run the tests in .venv (scripts/setup.sh)"
    specs = KernelSpecManager().find_kernel_specs()
    assert KERNEL in specs, f"kernel {KERNEL!r} is not registered ({sorted(specs)}): run bash scripts/setup.sh"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == KERNEL, f"{NOTEBOOK.name}: kernelspec is not {KERNEL!r}"
    cfg = load_config(TINY, {"output_dir": str(tmp_path / "run")})
    # Like papermill: the notebook's own parameters, then ours overriding them.
    params, loads, rubric = _first_cells(nb)
    injected = f"config_path = {str(TINY)!r}\noverrides = {{'output_dir': {str(cfg.run_dir)!r}}}"

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, ALMOST_VENV=sys.prefix, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), IPYTHONDIR=str(tmp_path / "ipython"))
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        # Own session: at the end we can stop the server and anything it started, and only that.
        proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "lab.sh"), "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={token}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server, kernel_id, ws = Server(port, token), None, None
    try:
        server.wait_ready(proc, log)
        kernelspecs = server.request("GET", "/api/kernelspecs")
        assert KERNEL in kernelspecs["kernelspecs"], sorted(kernelspecs["kernelspecs"])
        assert kernelspecs["default"] == KERNEL
        assert kernelspecs["kernelspecs"][KERNEL]["spec"]["display_name"] == "Python (almost)"
        assert server.landing_url().endswith("/lab/tree/notebooks"), "lab.sh should open notebooks/"

        # path: the kernel starts in notebooks/, as when Lab opens the notebook there
        kernel_id = server.request("POST", "/api/kernels", {"name": KERNEL, "path": "notebooks"})["id"]
        session = uuid.uuid4().hex
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?session_id={session}",
            header=[f"Authorization: token {token}"], timeout=60)
        outputs = []
        for code in (params, injected, loads, rubric):
            reply, text = _execute(ws, session, code)
            assert reply["status"] == "ok", f"cell failed:\n{code[:300]}\n{text[-3000:]}"
            outputs.append(text)
        assert f"run '{cfg.run_name}' -> {cfg.run_dir}" in outputs[2]
        for rank in cfg.comparisons.rubric:
            for c in rank:
                assert c.name in outputs[3], f"rubric table lacks {c.name}:\n{outputs[3]}"
    finally:
        if ws is not None:
            ws.close()
        if kernel_id is not None and proc.poll() is None:
            try:
                server.request("DELETE", f"/api/kernels/{kernel_id}", timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass      # stopping the server below shuts its kernels down as well
        _stop(proc)


def _stop(proc, timeout=30):
    """SIGTERM (the server then shuts its kernels down), SIGKILL to its session if it hangs.

    Kernels run in sessions of their own but watch their parent and exit when it is gone.
    """
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # the session we created for it, nothing else
        proc.wait(timeout)
