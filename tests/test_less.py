"""LESS against an independent reference: real Trainer checkpoints of a tiny Llama with peft LoRA, each row's own loss
differentiated alone, Adam-normalised by hand from the optimizer's live state, cosines averaged over the target set,
weighted by the learning rates logged at the checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from datadiet.scores.less import per_example_loss_gradients  # noqa: E402
from datadiet.tracin.checkpoints import read_adam_state  # noqa: E402
from datadiet.tracin.less import LESS  # noqa: E402

VOCAB = 100


def causal_loss(model, batch):
    """Each row's mean next-token NLL over its trained tokens (labels shifted left by one, -100 left out)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    trained = labels != -100
    return (nll * trained).sum(1) / trained.sum(1)


def make_rows(n, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 16, (1,), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        prompt = int(torch.randint(2, length - 2, (1,), generator=generator))  # completion mask: prompt untrained
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def collate(rows):
    length = max(len(r["input_ids"]) for r in rows)
    pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.tensor([r[k] + [p] * (length - len(r[k])) for r in rows]) for k, p in pads.items()}


def make_model(bias: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                      bias="lora_only" if bias else "none")  # fmt: skip
    return get_peft_model(LlamaForCausalLM(config), lora)


def train_run(tmp_path_factory, bias: bool):
    """A real Trainer run (AdamW, linear decay, weight decay) saving checkpoints at steps 2, 4 and 6, and the live
    optimizer state of each saved checkpoint, keyed by parameter name through the parameter objects themselves."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = make_model(bias)
    names = {param: name for name, param in model.named_parameters() if param.requires_grad}
    captured = {}

    class CaptureOptimizerState(TrainerCallback):
        def on_save(self, args, state, control, optimizer=None, **kwargs):
            captured[state.global_step] = {
                names[p]: {k: v.clone() for k, v in optimizer.state[p].items()} for p in names if p in optimizer.state
            }

    output_dir = tmp_path_factory.mktemp("less_bias" if bias else "less")
    args = TrainingArguments(str(output_dir), per_device_train_batch_size=4, max_steps=6, save_steps=2,
                             logging_steps=1, learning_rate=2e-2, weight_decay=0.1, lr_scheduler_type="linear",
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(make_rows(24, 1)),
                      data_collator=collate, callbacks=[CaptureOptimizerState()])  # fmt: skip
    trainer.train()
    return output_dir, captured


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return train_run(tmp_path_factory, bias=False)


@pytest.fixture(scope="module")
def lora_bias_run(tmp_path_factory):
    return train_run(tmp_path_factory, bias=True)


def logged_lr(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return next(e["learning_rate"] for e in state["log_history"] if e.get("step") == state["global_step"])


def row_gradient(model, row):
    """The gradient of the row's own loss, alone in its batch (no padding), over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = causal_loss(model, collate([row]))[0]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def adam_by_hand(g, state, model):
    """AdamW's bias-corrected update direction from the optimizer's state (paper's Γ), as torch.optim.AdamW."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = torch.cat([state[n]["exp_avg"].reshape(-1) for n in names]).double()
    v = torch.cat([state[n]["exp_avg_sq"].reshape(-1) for n in names]).double()
    t = float(state[names[0]]["step"]) + 1
    b1, b2, eps = 0.9, 0.999, 1e-8  # TrainingArguments' adam_beta1, adam_beta2, adam_epsilon
    m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return (m1 / (1 - b1**t)) / ((v1 / (1 - b2**t)).sqrt() + eps)


def reference_less(bias, output_dir, captured, steps, train_rows, target_sets):
    """LESS computed directly: each row alone through autograd, Adam by hand, mean cosine, lr-weighted, max."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folders = [output_dir / f"checkpoint-{step}" for step in steps]
    lrs = np.array([logged_lr(f) for f in folders])
    total = np.zeros((len(train_rows), len(target_sets)))
    for folder, step, weight in zip(folders, steps, lrs / lrs.sum()):
        model = make_model(bias)
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        model.eval()
        state = captured[step]
        train = torch.stack(
            [F.normalize(adam_by_hand(row_gradient(model, r), state, model), dim=0) for r in train_rows]
        )
        for s, rows in enumerate(target_sets):
            cosines = train @ torch.stack([F.normalize(row_gradient(model, r), dim=0) for r in rows]).T
            total[:, s] += weight * cosines.mean(1).numpy()
    return total.max(1)


def spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@pytest.mark.parametrize("bias", [False, True], ids=["lora", "lora+bias"])
def test_less_exact_equals_per_example_reference(bias, lora_run, lora_bias_run, tmp_path):
    output_dir, captured = lora_bias_run if bias else lora_run
    train_rows, targets = make_rows(40, 2), [make_rows(3, 3), make_rows(4, 4)]
    steps = [2, 4]
    expected = reference_less(bias, output_dir, captured, steps, train_rows, targets)
    less = LESS(make_model(bias), [output_dir / f"checkpoint-{s}" for s in steps], per_example_loss=causal_loss,
                projection_dim=None, batch_size=6, collate_fn=collate)  # fmt: skip
    assert len({c.learning_rate for c in less.checkpoints}) == 2  # the weighting is exercised
    got = less.scores(train_rows, targets)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"\nLESS exact vs reference ({'lora+bias' if bias else 'lora'}): max relative error {error:.2e}")
    assert error <= 1e-4, error
    assert len(np.unique(np.round(expected, 6))) == len(expected)  # scores that tell rows apart: a real check


def test_less_projected_spearman(lora_run, capsys):
    output_dir, captured = lora_run
    train_rows, targets = make_rows(60, 5), [make_rows(4, 6)]
    steps = [2, 4]
    exact = reference_less(False, output_dir, captured, steps, train_rows, targets)
    measured = {}
    for kind in ("countsketch", "gaussian"):
        for dim in (8192, 1024):
            less = LESS(make_model(False), [output_dir / f"checkpoint-{s}" for s in steps],
                        per_example_loss=causal_loss, projection_dim=dim, projection=kind, seed=0, batch_size=8,
                        collate_fn=collate)  # fmt: skip
            measured[kind, dim] = spearman(less.scores(train_rows, targets), exact)
    with capsys.disabled():
        print(f"\nLESS Spearman vs exact ({less.num_parameters} LoRA parameters):",
              ", ".join(f"{k} d={d}: {r:.4f}" for (k, d), r in measured.items()))  # fmt: skip
    assert measured["countsketch", 8192] >= 0.9 and measured["gaussian", 8192] >= 0.9, measured


def test_adam_state_read_for_the_right_parameter(lora_bias_run):
    """With trainable biases, Trainer puts them in a second (no weight decay) group, so optimizer.pt's positions do
    not follow named_parameters(); each parameter must get the moments the live optimizer held for it."""
    output_dir, captured = lora_bias_run
    model = make_model(True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    state = read_adam_state(output_dir / "checkpoint-4", model)
    assert list(state) == trainable
    for name in trainable:
        assert torch.equal(state[name].exp_avg, captured[4][name]["exp_avg"]), name
        assert torch.equal(state[name].exp_avg_sq, captured[4][name]["exp_avg_sq"]), name
        assert state[name].step == 4 and state[name].betas == (0.9, 0.999) and state[name].eps == 1e-8
    # The test has teeth: reading positions in named_parameters() order gives other parameters' moments.
    saved = torch.load(output_dir / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    naive = [n for i, n in enumerate(trainable) if saved[i]["exp_avg"].shape == captured[4][n]["exp_avg"].shape
             and torch.equal(saved[i]["exp_avg"], captured[4][n]["exp_avg"])]  # fmt: skip
    assert len(naive) < len(trainable)


def test_adam_state_refuses_another_model(lora_run):
    output_dir, _ = lora_run
    with pytest.raises(ValueError, match="(?i)pass the model the checkpoint was trained as"):
        read_adam_state(output_dir / "checkpoint-2", make_model(True))


def test_linear_gradients_equal_loop(lora_bias_run):
    model = make_model(True).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)  # lora_B starts at zero: give every adapter a gradient
    batch = collate(make_rows(5, 7))
    fast = per_example_loss_gradients(model, batch, causal_loss, method="linear")
    slow = per_example_loss_gradients(model, batch, causal_loss, method="loop")
    assert (fast - slow).norm() / slow.norm() <= 1e-5


def test_less_resumes_from_feature_shards(lora_run, tmp_path):
    output_dir, _ = lora_run
    train_rows, targets = make_rows(20, 8), {"task": make_rows(3, 9)}
    checkpoints = [output_dir / "checkpoint-2", output_dir / "checkpoint-4"]

    def run(**kwargs):
        kwargs = {"projection_dim": 256, "seed": 0, "batch_size": 4, "rows_per_shard": 8, **kwargs}
        less = LESS(make_model(False), checkpoints, per_example_loss=causal_loss, collate_fn=collate,
                    output_dir=tmp_path / "run", **kwargs)  # fmt: skip
        return less.scores(train_rows, targets)

    first = run()
    shards = sorted((tmp_path / "run" / "features").rglob("*.parquet"))
    assert len(shards) == 2 * 3  # 2 checkpoints x ceil(20 / 8) shards
    shards[1].unlink()  # an interrupted run: one shard missing
    np.testing.assert_allclose(run(), first, rtol=1e-6)
    # Stored shards are read back, not recomputed: negating the first shard's features (checkpoint 2, rows 0-7)
    # changes the scores of those rows only.
    import pyarrow as pa
    import pyarrow.parquet as pq

    first_shard = tmp_path / "run" / "features" / "checkpoint-0" / "rows-0000000000.parquet"
    column = pq.read_table(first_shard).column("feature").combine_chunks()
    negated = pa.FixedSizeListArray.from_arrays(pa.array(-column.flatten().to_numpy()), column.type.list_size)
    pq.write_table(pa.table({"feature": negated}), first_shard)
    altered = run()
    assert not np.allclose(altered[:8], first[:8]) and np.allclose(altered[8:], first[8:], rtol=1e-6)
    with pytest.raises(ValueError, match="differs in: projection_seed"):
        run(seed=1)


def test_less_with_scores_records_provenance_and_refuses_bad_input(lora_run):
    from datasets import Dataset

    from datadiet.provenance import read_provenance

    output_dir, _ = lora_run
    checkpoints = [output_dir / "checkpoint-2", output_dir / "checkpoint-4"]
    less = LESS(make_model(False), checkpoints, per_example_loss=causal_loss, projection_dim=128, seed=3,
                collate_fn=collate)  # fmt: skip
    scored = less.with_scores(Dataset.from_list(make_rows(6, 10)), {"task": make_rows(2, 11)})
    assert scored.column_names[-1] == "less" and len(scored) == 6
    recorded = read_provenance(scored)["less"]
    assert recorded["projection_seed"] == 3 and recorded["projection_dim"] == 128
    assert recorded["checkpoints"] == [str(c) for c in checkpoints] and recorded["target_sets"] == {"task": 2}
    with pytest.raises(ValueError, match="one loss per row"):
        LESS(make_model(False), checkpoints, per_example_loss=lambda model, batch: causal_loss(model, batch).mean(),
             collate_fn=collate).scores(make_rows(4, 12), make_rows(2, 13))  # fmt: skip
    with pytest.raises(ValueError, match="optimizer.pt"):
        LESS(make_model(False), [(make_model(False).state_dict(), 1.0)], per_example_loss=causal_loss)
    with pytest.raises(ValueError, match="have no rows"):
        less.scores(make_rows(4, 12), {"task": []})
