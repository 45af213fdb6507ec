"""Serving π_t for a step: a real server process (the loopback server's command line) started, awaited, stopped;
the loop samples through it; a model retrained in place is not answered from the cache."""

import json
import os
import shutil
import sys
import urllib.request

import pytest

from orca2.errors import Orca2Error
from orca2.serve import served

LOOPBACK = f"{sys.executable} -m orca2.testing.loopback --port {{port}}"


def test_served_server_answers_then_is_stopped(tmp_path):
    with served(LOOPBACK, "/models/pi-1", tmp_path / "server.log", timeout=60) as url:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
            assert json.load(response)["data"]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/models", timeout=2)  # the process group is gone


def test_a_server_that_dies_or_never_answers_is_one_line(tmp_path):
    with pytest.raises(Orca2Error, match=r"server command exited with code 3 before answering .* its output: "):
        with served(f"{sys.executable} -c 'import sys; sys.exit(3)'", "m", tmp_path / "a.log", timeout=30):
            pass
    with pytest.raises(Orca2Error, match="did not answer on http://127.0.0.1:.* within 1 s"):
        with served(f"{sys.executable} -c 'import time; time.sleep(30)'", "m", tmp_path / "b.log", timeout=1):
            pass
    with pytest.raises(Orca2Error, match=r"unknown placeholder 'gpu'"):
        with served("serve {model} --gpu {gpu}", "m", tmp_path / "c.log"):
            pass


def test_a_model_retrained_in_place_is_asked_again(tmp_path, tiny_model):
    from orca2.ask import Request, ask
    from orca2.models import ClientConfig, Sampling

    model = tmp_path / "student"
    shutil.copytree(tiny_model, model)
    client = ClientConfig(cache_dir=str(tmp_path / "cache"))
    requests = [Request([{"role": "user", "content": "hi"}], {})]
    with ask(f"local:{model}", requests, Sampling(max_tokens=4), client) as answers:
        assert answers.cached_at_start == 0
    with ask(f"local:{model}", requests, Sampling(max_tokens=4), client) as answers:
        assert answers.cached_at_start == 1  # the same weights: from the cache
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    with ask(f"local:{model}", requests, Sampling(max_tokens=4), client) as answers:
        assert answers.cached_at_start == 0
