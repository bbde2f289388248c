"""bench/server_models.py's three minimal proxies forward a chat call and keep their upstream
connection for the next one: its comparison of server models measures proxies that work."""
import json
import os
import subprocess
import sys

import openai
import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "bench", "server_models.py")


@pytest.mark.parametrize("model", ["threads", "selectors", "asyncio"])
def test_each_server_model_relays_chat_calls(fake_upstream, model):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--serve", model, str(fake_upstream.port)],
                            stdout=subprocess.PIPE, text=True, cwd=os.path.join(ROOT, "bench"))
    try:
        port = int(proc.stdout.readline())
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="unused", max_retries=0,
                               timeout=10)
        for _ in range(3):  # the second and third reuse the kept-alive upstream connection
            answer = client.chat.completions.create(model="glm-5", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "Hello world"
        assert len(fake_upstream.requests) == 3
        assert json.loads(fake_upstream.requests[-1].body)["messages"] == [{"role": "user", "content": "hi"}]
    finally:
        proc.kill()
        proc.wait()
