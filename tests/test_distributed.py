"""Scoring under real `accelerate launch` runs of two CPU processes (real CIFAR-10 images, timm `test_resnet`): every
row scored exactly once and equal to one process, streaming input keyed by a row id, resuming after a SIGKILL
without rescoring, the configuration check, the silent-fallback guards, and every accelerate config in
`recipes/accelerate_configs/`."""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from datadiet.engine import get_process_state, join_scores, load_scores, score_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "score_cifar.py"
CONFIGS = REPO / "recipes" / "accelerate_configs"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
METHODS = ["el2n", "grand"]
ROWS = 1000

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(PYTHONPATH=str(REPO / "src"), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def _two_process_flags(config_file: Path | None = None) -> list[str]:
    if config_file is not None:
        return ["--config_file", str(config_file), "--main_process_port", str(_free_port())]
    return [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]


def _script_args(setup: dict, result: Path, **options) -> list[str]:
    args = [str(SCRIPT), "--data", str(setup["data"]), "--weights", str(setup["weights"]), "--result", str(result)]
    for key, value in options.items():
        args += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return args


def _launch(launch_flags: list[str], script_args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ACCELERATE, "launch", *launch_flags, *script_args],
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, f"launch failed ({run.returncode}):\n{run.stderr[-4000:]}"


def _shards(folder: Path) -> list[Path]:
    return sorted((folder / "seed-0" / "scores").glob("*.parquet"))


def _shard_ids(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: pq.read_table(path, columns=["row_id"]).column("row_id").to_numpy() for path in _shards(folder)}


@pytest.fixture(scope="module")
def setup(cifar10_train, tmp_path_factory):
    """1,000 real CIFAR-10 rows with a row id, test_resnet weights every process loads, and the one-process scores."""
    import timm
    from safetensors.torch import save_model

    folder = tmp_path_factory.mktemp("distributed")
    dataset = cifar10_train.select(range(ROWS))
    dataset = dataset.add_column("row_id", list(range(ROWS)))
    dataset.save_to_disk(str(folder / "data"))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    save_model(model, str(folder / "weights.safetensors"))
    one_process = score_dataset(dataset, model, METHODS, batch_size=64)
    reference = {method: np.asarray(one_process[method][:]) for method in METHODS}
    return {
        "folder": folder,
        "data": folder / "data",
        "weights": folder / "weights.safetensors",
        "dataset": dataset,
        "model": model,
        "reference": reference,
    }


@pytest.fixture(scope="module")
def two_process_run(setup):
    """One real two-process launch scoring the rows as a `Dataset` and as a stream."""
    folder = setup["folder"]
    run = _launch(
        _two_process_flags(),
        _script_args(
            setup,
            folder / "two.parquet",
            methods=METHODS,
            output_dir=folder / "two",
            stream_output_dir=folder / "two_stream",
            stream_result=folder / "two_stream.parquet",
            batch_size=64,
            save_every=2,
        ),
    )
    _check_ok(run)
    return {
        "result": folder / "two.parquet",
        "output_dir": folder / "two",
        "stream_result": folder / "two_stream.parquet",
        "stream_output_dir": folder / "two_stream",
        "stderr": run.stderr,
    }


def test_one_process_scores_match_direct_computations(setup):
    # Independent checks of the one-process reference the launches are compared with.
    dataset = setup["dataset"].select(range(64))
    images = torch.stack(
        [torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) for img in dataset["img"]]
    )
    labels = torch.as_tensor(dataset["label"])
    model = setup["model"].eval()
    # EL2N = ||softmax(f(x)) - onehot(y)||_2 (Paul et al. 2021, eq. 2).
    with torch.no_grad():
        probabilities = torch.softmax(model(images).double(), dim=-1).numpy()
    expected = np.linalg.norm(probabilities - np.eye(10)[labels.numpy()], axis=1)
    np.testing.assert_allclose(setup["reference"]["el2n"][:64], expected, rtol=1e-5)
    # GraNd = ||grad_theta loss(f(x), y)||_2 over all parameters, one example at a time (naive loop).
    norms = []
    for image, label in zip(images[:8], labels[:8]):
        gradients = torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(image[None]), label[None]), list(model.parameters())
        )
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in gradients)).item())
    np.testing.assert_allclose(setup["reference"]["grand"][:8], norms, rtol=1e-4)


def test_two_processes_score_every_row_once_like_one_process(setup, two_process_run):
    assert '"num_processes": 2' in Path(str(two_process_run["result"]) + ".json").read_text()
    result = pq.read_table(two_process_run["result"]).to_pandas()
    np.testing.assert_array_equal(result["row_id"], np.arange(ROWS))  # same row order as the dataset
    for method in METHODS:
        np.testing.assert_allclose(result[method], setup["reference"][method], rtol=1e-5, err_msg=method)

    # Each process wrote its own contiguous block of rows; together they hold every row exactly once.
    shard_ids = _shard_ids(two_process_run["output_dir"])
    by_rank = {
        rank: np.concatenate([ids for name, ids in shard_ids.items() if name.startswith(f"rank000{rank}")])
        for rank in (0, 1)
    }
    np.testing.assert_array_equal(np.sort(by_rank[0]), np.arange(ROWS // 2))
    np.testing.assert_array_equal(np.sort(by_rank[1]), np.arange(ROWS // 2, ROWS))

    scores = load_scores(two_process_run["output_dir"])
    np.testing.assert_array_equal(scores["row_id"], np.arange(ROWS))
    np.testing.assert_allclose(scores["grand"], setup["reference"]["grand"], rtol=1e-5)


def test_two_processes_stream_with_row_ids(setup, two_process_run):
    result = pq.read_table(two_process_run["stream_result"]).to_pandas()
    np.testing.assert_array_equal(result["row_id"], np.arange(ROWS))
    for method in METHODS:
        np.testing.assert_allclose(result[method], setup["reference"][method], rtol=1e-5, err_msg=method)
    shard_ids = _shard_ids(two_process_run["stream_output_dir"])
    all_ids = np.concatenate(list(shard_ids.values()))
    assert len(all_ids) == ROWS and len(np.unique(all_ids)) == ROWS
    assert {name[:8] for name in shard_ids} == {"rank0000", "rank0001"}  # both processes read part of the stream

    # The scores join back to a reordered view of the data by row id.
    shuffled = setup["dataset"].select_columns(["row_id", "label"]).shuffle(seed=0)
    joined = join_scores(shuffled, load_scores(two_process_run["stream_output_dir"]), "row_id")
    np.testing.assert_allclose(joined["el2n"], setup["reference"]["el2n"][np.asarray(shuffled["row_id"])], rtol=1e-5)


def test_rerun_with_another_configuration_fails(setup, two_process_run):
    with pytest.raises(ValueError, match=r"different configuration \(differs in: methods\)"):
        score_dataset(setup["dataset"], setup["model"], ["el2n"], output_dir=two_process_run["output_dir"])
    changed = copy.deepcopy(setup["model"])
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    with pytest.raises(ValueError, match=r"differs in: model"):
        score_dataset(setup["dataset"], changed, METHODS, output_dir=two_process_run["output_dir"])


def test_sigkill_mid_run_then_resume_without_rescoring(setup):
    folder = setup["folder"]
    output_dir, result = folder / "killed", folder / "killed.parquet"
    options = {"methods": METHODS, "output_dir": output_dir, "batch_size": 50, "save_every": 1}
    config = CONFIGS / "cpu_2proc.yaml"
    launcher = subprocess.Popen(
        [ACCELERATE, "launch", *_two_process_flags(config), *_script_args(setup, result, delay=0.2, **options)],
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while len(_shards(output_dir)) < 2:
            assert launcher.poll() is None, (
                f"the run ended before it could be killed:\n{launcher.stderr.read()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no shard was written within 180 s"
            time.sleep(0.02)
        victim = int(Path(f"{result}.rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    assert not result.exists()
    before = {path.name: path.read_bytes() for path in _shards(output_dir)}
    rows_before = sum(len(ids) for ids in _shard_ids(output_dir).values())
    assert 0 < rows_before < ROWS, f"the kill should interrupt the run mid-way, {rows_before} rows were scored"

    rerun = _launch(_two_process_flags(config), _script_args(setup, result, **options))
    _check_ok(rerun)
    assert "already scored" in rerun.stderr
    # Nothing written before the kill was rewritten, and no row was scored twice: the rerun scored only the rest.
    for name, content in before.items():
        assert (output_dir / "seed-0" / "scores" / name).read_bytes() == content
    all_ids = np.concatenate(list(_shard_ids(output_dir).values()))
    assert len(all_ids) == ROWS and len(np.unique(all_ids)) == ROWS
    resumed = pq.read_table(result).to_pandas()
    np.testing.assert_array_equal(resumed["row_id"], np.arange(ROWS))
    for method in METHODS:
        np.testing.assert_allclose(resumed[method], setup["reference"][method], rtol=1e-5, err_msg=method)


def test_cpu_flag_with_two_processes_fails_with_a_working_command(setup):
    # `accelerate launch --cpu --num_processes 2` starts one process: it must not quietly score everything alone.
    flags = [
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    run = _launch(flags, _script_args(setup, setup["folder"] / "cpu_flag.parquet", rows=16))
    assert run.returncode != 0
    assert "was asked for 2 processes but started one" in run.stderr
    assert "cpu_2proc.yaml" in run.stderr and "torchrun --nproc_per_node 2" in run.stderr
    assert not (setup["folder"] / "cpu_flag.parquet").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback happens on machines without a GPU")
def test_multi_gpu_launch_with_a_non_cpu_accelerator_fails(setup):
    # The user's script creates Accelerator() (cpu=False) first: on a machine with no GPU each of the two processes
    # believes it is alone and would score every row.
    run = _launch(
        _two_process_flags(),
        _script_args(setup, setup["folder"] / "fallback.parquet", rows=16, init_accelerator_first=[]),
    )
    assert run.returncode != 0
    assert "WORLD_SIZE=2" in run.stderr and "Accelerator(cpu=True)" in run.stderr
    assert not (setup["folder"] / "fallback.parquet").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback happens on machines without a GPU")
def test_users_own_accelerator_in_a_training_script_is_refused_or_works(tmp_path):
    # cpu_2proc.yaml promises a clear message when the user's own Accelerator() (cpu=False) holds one process on
    # each of the two ranks; with Accelerator(cpu=True) the same script trains data-parallel.
    script = Path(__file__).resolve().parent / "scripts" / "own_accelerator.py"
    flags = _two_process_flags(CONFIGS / "cpu_2proc.yaml")
    refused = _launch(flags, [str(script), str(tmp_path / "refused")])
    assert refused.returncode != 0
    assert "WORLD_SIZE=2 but accelerate's process state holds 1 process(es)" in refused.stderr
    assert "Accelerator(cpu=True)" in refused.stderr and "trained:" not in refused.stdout
    works = _launch(flags, [str(script), str(tmp_path / "works"), "--cpu"])
    _check_ok(works)
    assert sorted(re.findall(r"trained: world size (\d), process (\d)", works.stdout)) == [("2", "0"), ("2", "1")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallbacks happen on machines without a GPU")
def test_stock_trainer_with_score_callback_is_refused_or_works(tmp_path):
    # A stock Trainer with ScoreCallback: `--cpu --num_processes 2` starts one process, and cpu_2proc.yaml with a
    # TrainingArguments lacking use_cpu=True leaves each of the two processes training alone. Both are refused before
    # anything is recorded; with use_cpu=True the same script trains data-parallel.
    script = Path(__file__).resolve().parent / "scripts" / "stock_trainer.py"
    cpu_flag = ["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    one = _launch([*cpu_flag, "--dynamo_backend", "no"], [str(script), str(tmp_path / "one")])
    assert one.returncode != 0 and "trained:" not in one.stdout
    assert "`accelerate launch` was asked for 2 processes but started one" in one.stderr
    assert "cpu_2proc.yaml" in one.stderr and "--multi_gpu --num_processes 2" in one.stderr
    flags = _two_process_flags(CONFIGS / "cpu_2proc.yaml")
    alone = _launch(flags, [str(script), str(tmp_path / "alone")])
    assert alone.returncode != 0 and "trained:" not in alone.stdout
    assert "WORLD_SIZE=2 but the Trainer runs 1 process(es)" in alone.stderr and "use_cpu=True" in alone.stderr
    works = _launch(flags, [str(script), str(tmp_path / "works"), "--use_cpu"])
    _check_ok(works)
    lines = re.findall(r"trained: world size (\d), process (\d), rows (\d+), forgetting (.*)", works.stdout)
    assert sorted(line[:3] for line in lines) == [("2", "0", "32"), ("2", "1", "32")]
    assert lines[0][3] == lines[1][3]  # every process holds the scores gathered from both


def test_world_size_without_a_launcher_fails(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        get_process_state()


def test_streaming_needs_a_row_id_and_an_output_dir(setup, tmp_path):
    stream = setup["dataset"].select(range(8)).to_iterable_dataset()
    with pytest.raises(ValueError, match="row_id_column"):
        score_dataset(stream, setup["model"], "el2n", output_dir=tmp_path)
    with pytest.raises(ValueError, match="output_dir"):
        score_dataset(stream, setup["model"], "el2n", row_id_column="row_id")
    with pytest.raises(ValueError, match="integer ids"):
        score_dataset(stream, setup["model"], "el2n", row_id_column="img", output_dir=tmp_path)


def test_bf16_autocast_scores_close_to_float32(setup):
    subset = setup["dataset"].select(range(64))
    bf16 = np.asarray(score_dataset(subset, setup["model"], "el2n", mixed_precision="bf16")["el2n"])
    float32 = setup["reference"]["el2n"][:64]
    assert not np.array_equal(bf16, float32)  # autocast really ran in bfloat16
    np.testing.assert_allclose(bf16, float32, atol=2e-2)


def test_every_accelerate_config_is_read_by_accelerate():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    expected = {
        "cpu_2proc.yaml": "multi_gpu",
        "single_gpu.yaml": None,
        "multi_gpu.yaml": "multi_gpu",
        "fsdp.yaml": "use_fsdp",
    }
    assert {path.name for path in CONFIGS.glob("*.yaml")} == set(expected)
    for name, mode in expected.items():
        args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
        args, _, _ = _validate_launch_command(args)  # what `accelerate launch` runs: unknown keys fail here
        assert bool(args.multi_gpu) == (mode == "multi_gpu") and bool(args.use_fsdp) == (mode == "use_fsdp"), name
        if mode is None:
            assert args.num_processes == 1
            continue
        assert args.num_processes >= 2
        env = prepare_multi_gpu_env(args)
        if mode == "use_fsdp":
            with patch_environment(**{key: value for key, value in env.items() if key.startswith("FSDP_")}):
                plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward
    assert "README.md" in os.listdir(CONFIGS)
    readme = (CONFIGS / "README.md").read_text()
    for name in expected:
        assert f"recipes/accelerate_configs/{name}" in readme, f"{name} has no command in the README"
