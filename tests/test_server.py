"""`python -m lookfast serve`: the real server in a subprocess on a free 127.0.0.1 port, real HTTP requests (httpx):
predictions equal the model run in-process on the same decoded image, /healthz, malformed uploads get a 4xx JSON
error and the server keeps serving, concurrent clients, and SIGTERM drains a request in flight. Load is bounded:
a few dozen requests, loopback only."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

for _module in ("fastapi", "uvicorn", "multipart", "httpx", "PIL"):
    pytest.importorskip(_module, reason=f"the server tests need the 'serve' extra and httpx ({_module} is missing): "
                                        "pip install -e '.[serve]' httpx")
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from image_files import image_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DP_MODEL = "mobilenetV3_0x5_perceiver_t128"  # the smallest Dyn-Perceiver: quick to build and run at 224 px
STARTUP_S = 180  # a loaded 2-core machine can take long to import torch and build a model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lookfast", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = ""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer within {STARTUP_S} s:\n{self.output}")

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM, wait, and whether the server ended cleanly: exit status 0, or killed by the SIGTERM that uvicorn
        re-raises after its graceful shutdown (its documented behaviour since 0.29)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.output += self.proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output += self.proc.communicate()[0]
            return False
        return self.proc.returncode in (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def dp_server():
    server = Server("--model", f"dyn_perceiver:{DP_MODEL}", "--random-weights", "--seed", "0",
                    "--thresholds", "0.002", "0.5", "0.5", "0", "--max-batch", "8", "--threads", "1")
    yield server
    assert server.stop(), server.output


@pytest.fixture(scope="module")
def dp_local():
    """The server's model, built in-process the same way (same seed), and its transform."""
    from lookfast.images import transform_for
    from lookfast.models import dyn_perceiver as dp

    torch.manual_seed(0)
    model = dp.build(DP_MODEL, ops="fused")
    return model, transform_for(model)


def _post(url: str, data: bytes, name="x.png", field="file", timeout=120) -> httpx.Response:
    return httpx.post(url + "/v1/predict", files={field: (name, data, "application/octet-stream")}, timeout=timeout)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_predict_matches_the_model_in_process(dp_server, dp_local, fmt):
    from lookfast.images import decode_image

    model, transform = dp_local
    data = image_bytes(1 if fmt == "PNG" else 2, fmt=fmt)
    r = _post(dp_server.url, data, name=f"x.{fmt.lower()}")
    assert r.status_code == 200, r.text
    body = r.json()
    logits, exit_index = model.forward_early_exit(decode_image(data, transform)[None], [0.002, 0.5, 0.5, 0.0])
    probs = torch.softmax(logits[0], 0)
    assert body["exit_index"] == int(exit_index[0]) and body["k"] is None
    assert body["model"] == f"dyn_perceiver:{DP_MODEL}" and "random weights" in body["warning"]
    top = body["top5"]
    assert len(top) == 5
    assert [t["class"] for t in top] == torch.topk(probs, 5).indices.tolist()
    np.testing.assert_allclose([t["probability"] for t in top], torch.topk(probs, 5).values.numpy(), rtol=1e-3)
    assert body["latency_ms"]["total"] >= body["latency_ms"]["engine"] > 0


def test_healthz(dp_server):
    r = httpx.get(dp_server.url + "/healthz", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["random_weights"] is True and body["model"] == f"dyn_perceiver:{DP_MODEL}"
    assert body["dtype"] == "float32"
    assert body["engine"]["kind"] == "multi_exit"


@pytest.mark.parametrize("data, field, status, message", [
    (b"this is not an image", "file", 400, "cannot decode"),
    (image_bytes(3)[:200], "file", 400, "cannot decode"),       # a truncated PNG
    (b"", "file", 400, "empty"),
    (image_bytes(4), "image", 422, "field 'file'"),             # wrong form field
], ids=["garbage", "truncated", "empty", "wrong-field"])
def test_malformed_upload_gets_4xx_and_the_server_keeps_serving(dp_server, data, field, status, message):
    r = _post(dp_server.url, data, field=field)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    ok = _post(dp_server.url, image_bytes(5))
    assert ok.status_code == 200 and len(ok.json()["top5"]) == 5


def test_no_multipart_body_gets_4xx(dp_server):
    r = httpx.post(dp_server.url + "/v1/predict", content=b"raw bytes", timeout=60)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert httpx.get(dp_server.url + "/healthz", timeout=30).status_code == 200


def test_concurrent_clients(dp_server, dp_local):
    from lookfast.images import decode_image

    model, transform = dp_local
    images = [image_bytes(10 + i) for i in range(8)]
    results: dict[int, httpx.Response] = {}

    def client(i):
        results[i] = _post(dp_server.url, images[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(8))
    x = torch.stack([decode_image(d, transform) for d in images])
    _, exits = model.forward_early_exit(x, [0.002, 0.5, 0.5, 0.0])
    for i in range(8):
        assert results[i].status_code == 200, results[i].text
        assert results[i].json()["exit_index"] == int(exits[i])


def test_bfloat16_server_answers_float32_typed_json():
    """--dtype bfloat16: /healthz says so, and /v1/predict answers the same JSON shape and types as float32, with
    probabilities within the bf16 rule of tests/test_models_bf16.py (at most 2x the error of the official computation
    run in bf16) of the float32 official computation on the same decoded image."""
    from lookfast.images import decode_image, transform_for
    from lookfast.models.spec import ModelSpec

    data = image_bytes(8)
    probs = {}
    for dtype in ("float32", "bfloat16"):  # the official computation (ops="reference") of the server's weights
        model = ModelSpec.parse(f"dyn_perceiver:{DP_MODEL}", random_weights=True, options={"ops": "reference"},
                                dtype=dtype).load()
        with torch.no_grad():
            logits = model(decode_image(data, transform_for(model))[None].to(next(model.parameters()).dtype))[-1]
        probs[dtype] = torch.softmax(logits[0].double(), 0)
    tol = 2 * float((probs["bfloat16"] - probs["float32"]).abs().max())
    assert 0 < tol < 0.1
    server = Server("--model", f"dyn_perceiver:{DP_MODEL}", "--random-weights", "--seed", "0", "--dtype", "bfloat16",
                    "--max-batch", "4", "--threads", "1")
    try:
        health = httpx.get(server.url + "/healthz", timeout=30).json()
        assert health["dtype"] == "bfloat16" and health["status"] == "ok"
        r = _post(server.url, data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["exit_index"] == 3 and body["k"] is None and len(body["top5"]) == 5
        for t in body["top5"]:
            assert type(t["class"]) is int and type(t["probability"]) is float
            assert abs(t["probability"] - float(probs["float32"][t["class"]])) <= tol, (t, tol)
        ps = [t["probability"] for t in body["top5"]]
        assert ps == sorted(ps, reverse=True)
    finally:
        assert server.stop(), server.output


def test_sigterm_drains_a_request_in_flight():
    # A long max_wait keeps the request waiting in the engine for a fuller batch: SIGTERM arrives while it is
    # in flight, and the drain must still answer it.
    server = Server("--model", f"dyn_perceiver:{DP_MODEL}", "--random-weights", "--seed", "0",
                    "--max-batch", "8", "--max-wait-ms", "20000", "--threads", "1")
    try:
        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("r", _post(server.url, image_bytes(6))))
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            waiting = httpx.get(server.url + "/healthz", timeout=30).json()["engine"]["waiting_per_stage"]
            if sum(waiting):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the request never reached the engine")
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        r = box.get("r")
        assert r is not None and r.status_code == 200, (r and r.text, server.output)
        assert r.json()["exit_index"] == 3
        assert time.monotonic() - t_term < 15  # the drain ran the partial batch at once, not after max_wait
        assert server.stop(), server.output
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/healthz", timeout=5)
    finally:
        server.stop()


def test_lookwhere_server_with_k_mass():
    server = Server("--model", "lookwhere:dinov2", "--random-weights", "--seed", "0", "--high-res-size", "182",
                    "--num-classes", "10", "--k-mass", "0.3", "--k-min", "4", "--max-batch", "4", "--threads", "1")
    try:
        r = _post(server.url, image_bytes(7, size=(250, 182)))
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["k"], int) and 4 <= body["k"] <= 169 and body["exit_index"] == 1
        assert len(body["top5"]) == 5
        assert httpx.get(server.url + "/healthz", timeout=30).json()["engine"]["kind"] == "lookwhere"
    finally:
        assert server.stop(), server.output


def test_bad_command_lines_fail_clearly():
    env = dict(os.environ, PYTHONPATH=ROOT)
    for flags, message in ((["--model", "dyn_perceiver:nope", "--random-weights"], "unknown Dyn-Perceiver config"),
                           (["--model", f"dyn_perceiver:{DP_MODEL}"], "--checkpoint PATH or --random-weights"),
                           (["--model", f"dyn_perceiver:{DP_MODEL}", "--random-weights", "--k-mass", "0.5"],
                            "lookwhere"),
                           (["--model", f"dyn_perceiver:{DP_MODEL}", "--random-weights", "--dtype", "float64"],
                            "--dtype")):
        p = subprocess.run([sys.executable, "-m", "lookfast", "serve", *flags], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=STARTUP_S)
        assert p.returncode == 2 and message in p.stderr, p.stderr
