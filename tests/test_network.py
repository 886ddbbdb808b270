"""Without a network, the commands that reach for the Hub answer in one line with exit status 2 within seconds,
instead of a page of `ConnectError` traceback or half a minute of retries. The Hub endpoint is a closed port on
127.0.0.1 (nothing leaves the machine) and offline mode is off, as on a fresh machine without a connection."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from datasets import Dataset


def _closed_port() -> int:
    """A local port nothing listens on: bound, then released (connections to it are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_network_env(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1"
    )
    return env


@pytest.mark.parametrize(
    "argv",
    [
        ["push", "--dataset_path", "{saved}", "--repo_id", "me/pruned"],
        ["score", "--dataset_name", "me/some-dataset", "--model_name", "resnet10t"],
        ["train", "--dataset_name", "me/some-dataset", "--model_name", "resnet10t", "--max_steps", "5"],
    ],
    ids=["push", "score", "train"],
)
def test_unreachable_hub_is_one_line_exit_2_within_seconds(argv, no_network_env, tmp_path):
    saved = tmp_path / "saved"
    Dataset.from_dict({"text": ["a", "b"], "label": [0, 1], "el2n": [0.1, 0.9]}).save_to_disk(str(saved))
    argv = [arg.format(saved=saved) for arg in argv]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "datadiet.cli", *argv], capture_output=True, text=True, env=no_network_env, cwd=tmp_path
    )
    seconds = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"datadiet {argv[0]}: error: cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "Retrying" not in result.stderr + result.stdout
    assert seconds < 10, f"{seconds:.1f} s"


def test_python_api_raises_a_connection_error_saying_what_to_do(no_network_env, tmp_path):
    code = (
        "from datasets import Dataset\n"
        "from datadiet import push_to_hub\n"
        "from datadiet.validation import HubUnreachableError\n"
        "try:\n"
        "    push_to_hub(Dataset.from_dict({'x': [1]}), 'me/pruned')\n"
        "except HubUnreachableError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=no_network_env)
    assert result.returncode == 0, result.stderr
    assert "save_pruned(dataset, folder)" in result.stdout
