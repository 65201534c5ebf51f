"""`vllm serve MODEL --kv-cache-dtype cq1` answers the `openai` client: completion, chat, streaming."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(cq_model, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "vllm-cq"),
        "serve",
        cq_model,
        "--kv-cache-dtype",
        "cq1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--served-model-name",
        "tiny",
    ]
    if torch.cuda.is_available():
        cmd += ["--gpu-memory-utilization", "0.2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"server did not start (rc {proc.poll()}):\n{log.read()[-4000:]}")
            time.sleep(1)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def test_openai_client_completion_chat_and_stream(server):
    from openai import OpenAI

    url, log = server
    client = OpenAI(base_url=url + "/v1", api_key="none")
    comp = client.completions.create(model="tiny", prompt="The river ran past", max_tokens=8, temperature=0)
    assert comp.usage.completion_tokens == 8 and comp.choices[0].text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert chat.usage.completion_tokens >= 1 and chat.choices[0].message.content is not None
    pieces = list(
        client.completions.create(model="tiny", prompt="Numbers have", max_tokens=6, stream=True, temperature=0)
    )
    assert (
        "".join(p.choices[0].text for p in pieces if p.choices)
        == client.completions.create(model="tiny", prompt="Numbers have", max_tokens=6, temperature=0).choices[0].text
    )
    log.seek(0)
    text = log.read()
    assert "vllm-cq: cq1 KV cache" in text  # the server really runs with the cq1 cache
    assert "the last 128 tokens of each sequence kept exactly" in text  # and the default recent window
