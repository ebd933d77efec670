"""The demo over HTTP: the app on a free local port, called through gradio_client like any visitor."""

from __future__ import annotations

import json

import httpx
import pytest
from gradio_client import Client

from tracing.models import DEFAULT_MODEL_NAME
from tests.conftest import free_port
from ui.app import Settings, launch


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server[0]


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def test_the_api_names_and_parameters(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    params = {name: [p["parameter_name"] for p in ep["parameters"]] for name, ep in endpoints.items()}
    assert params["/lens"] == ["prompt", "model", "backend", "top_k", "temperature", "target", "metric",
                               "first_position"]
    assert params["/chat"] == ["message", "history", "model", "system", "temperature", "top_p", "max_tokens", "seed"]
    assert params["/compare"][:6] == ["prompt", "target", "model_a", "backend_a", "model_b", "backend_b"]
    assert "/trace_reply" in params and "/stop" in params


def test_lens_over_http(client):
    heatmap, chart, position, table, summary, json_file, csv_file = client.predict(
        "The capital of Germany is", DEFAULT_MODEL_NAME, "hooks", 5, 1.0, " Berlin", "top-1 probability",
        api_name="/lens",
    )
    figure = json.loads(heatmap["plot"])
    assert figure["data"][0]["type"] == "heatmap"
    assert figure["data"][0]["text"][-1][-1] == "␣Berlin"
    assert position["value"] == 4 if isinstance(position, dict) else position == 4
    assert table["headers"][0] == "layer" and table["data"][0][1].startswith("␣Berlin")
    assert "`␣Berlin`" in summary
    with open(json_file) as f:
        data = json.load(f)
    assert data["topk"][-1][-1][0]["token"] == " Berlin" and data["backend"] == "hooks"
    assert open(csv_file, encoding="utf-8").readline().startswith("row,layer,lens,position")


def test_chat_over_http_streams(client):
    job = client.submit("What is the capital of Germany?", [], DEFAULT_MODEL_NAME, "", 0.0, 0.95, 40, 1,
                        api_name="/chat")
    updates = list(job)
    assert len(updates) >= 3  # streamed: the question, then the answer in pieces
    history, box = updates[-1]
    assert box == ""
    answer = "".join(part["text"] for part in history[-1]["content"])
    assert history[-1]["role"] == "assistant" and "Berlin" in answer


def test_compare_over_http(client):
    summary, chart, map_a, map_b = client.predict(
        "The capital of Germany is", " Berlin", DEFAULT_MODEL_NAME, "hooks", DEFAULT_MODEL_NAME, "hooks",
        5, 1.0, "target probability", api_name="/compare",
    )
    lines = [t for t in json.loads(chart["plot"])["data"] if t.get("yaxis", "y") == "y"]
    assert len(lines) == 2 and lines[0]["y"] == lines[1]["y"]
    assert summary.count("first becomes top-1 at **layer 30**") == 2


def test_errors_come_back_as_messages_and_the_app_stays_up(client, server):
    with pytest.raises(Exception) as info:
        client.predict("x", "/etc/passwd", "hooks", 5, 1.0, "", "entropy", api_name="/lens")
    assert "not in the list of choices" in str(info.value)  # refused before our code even runs
    with pytest.raises(Exception) as info:
        client.predict("The capital of Germany is", DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "Berlin", "entropy",
                       api_name="/lens")
    assert "' Berlin' is one token" in str(info.value)
    with pytest.raises(Exception) as info:
        client.predict("x", DEFAULT_MODEL_NAME, "hooks", 500, 1.0, "", "entropy", api_name="/lens")
    assert "maximum" in str(info.value)
    # Uploads are bounded at the door (only the Steer tab's control-vector file, at most 16 MB).
    response = httpx.post(f"{server}gradio_api/upload", files={"files": ("a.gguf", bytes(17 * 2**20))})
    assert response.status_code >= 400
    # Still serving.
    *_, summary, _, _ = client.predict("Hello", DEFAULT_MODEL_NAME, "hooks", 3, 1.0, "", "entropy", api_name="/lens")
    assert "After `o`" not in summary and "predicts" in summary


def test_auth_protects_the_app():
    demo, _, url = launch(Settings(public=True), block=False, server_name="127.0.0.1", server_port=free_port(),
                          auth=("ann", "s3cret"), quiet=True)
    try:
        assert httpx.get(f"{url}config").status_code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False)
        client = Client(url, auth=("ann", "s3cret"), verbose=False)
        assert "/lens" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        demo.close()
