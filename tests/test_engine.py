"""score_dataset in one process: values against a direct computation, seeds, order, resuming, bad input."""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value

from datadiet import read_provenance, score_dataset
from datadiet.data import build_image_transform


def _direct_logits(model, dataset, image_column, transform):
    # Independent path: decode each image, transform it, one forward pass per row.
    with torch.no_grad():
        return torch.cat([model(transform(row[image_column])[None]) for row in dataset]).double().numpy()


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_el2n_loss_margin_equal_a_direct_computation(digits, tiny_timm):
    train = digits["train"].select(range(60))
    model = tiny_timm(in_chans=1)
    transform = build_image_transform(16, mean=[0.5], std=[0.5])
    scored = score_dataset(train, model, ["el2n", "loss", "margin", "input_norm"], transform=transform, batch_size=23)
    logits = _direct_logits(model, train, "image", transform)
    labels = np.asarray(train["label"])
    probs = _softmax(logits)
    np.testing.assert_allclose(scored["el2n"], np.linalg.norm(probs - np.eye(10)[labels], axis=1), rtol=1e-5)
    np.testing.assert_allclose(scored["loss"], -np.log(probs[np.arange(60), labels]), rtol=1e-4, atol=1e-6)
    true = logits[np.arange(60), labels]
    logits[np.arange(60), labels] = -np.inf
    np.testing.assert_allclose(scored["margin"], true - logits.max(1), rtol=1e-4, atol=1e-5)
    norms = [float(np.linalg.norm(transform(row["image"]).numpy())) for row in train]
    np.testing.assert_allclose(scored["input_norm"], norms, rtol=1e-5)
    assert scored.features["el2n"] == Value("float32")
    assert scored.column_names == ["image", "label", "el2n", "loss", "margin", "input_norm"]
    assert train.column_names == ["image", "label"]  # the input is unchanged
    assert read_provenance(scored)["scoring"]["methods"] == ["el2n", "loss", "margin", "input_norm"]


def test_several_seeds_give_mean_and_std(digits, tiny_timm):
    train = digits["train"].select(range(64))
    transform = build_image_transform(16)
    scored = score_dataset(
        train,
        model_init=lambda seed: tiny_timm(in_chans=1, seed=seed),
        methods="el2n",
        seeds=[0, 1, 2],
        transform=transform,
    )
    per_seed = [
        np.asarray(score_dataset(train, tiny_timm(in_chans=1, seed=s), "el2n", transform=transform)["el2n"])
        for s in (0, 1, 2)
    ]
    np.testing.assert_allclose(scored["el2n"], np.mean(per_seed, axis=0), rtol=1e-5)
    np.testing.assert_allclose(scored["el2n_std"], np.std(per_seed, axis=0), rtol=1e-4, atol=1e-6)
    assert np.std(per_seed, axis=0).mean() > 0  # the seeds really differ


def test_row_order_follows_the_dataset_not_the_batches(digits, tiny_timm):
    train = digits["train"].select(range(40))
    model = tiny_timm(in_chans=1)
    transform = build_image_transform(16)
    forward = np.asarray(score_dataset(train, model, "loss", transform=transform, batch_size=16)["loss"])
    reverse = train.select(range(39, -1, -1))
    backward = np.asarray(score_dataset(reverse, model, "loss", transform=transform, batch_size=7)["loss"])
    np.testing.assert_allclose(backward[::-1], forward, rtol=1e-5)


def test_resume_skips_scored_rows_and_checks_the_config(digits, tiny_timm, tmp_path):
    train = digits["train"].select(range(120))
    model = tiny_timm(in_chans=1)
    transform = build_image_transform(16)
    full = score_dataset(train, model, ["el2n"], transform=transform, batch_size=10, output_dir=tmp_path, save_every=2)
    shards = sorted((tmp_path / "seed-0" / "scores").glob("*.parquet"))
    assert len(shards) == 6
    for shard in shards[3:]:  # as if the run had died after 60 rows
        shard.unlink()
    calls = []
    hook = model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    resumed = score_dataset(train, model, ["el2n"], transform=transform, batch_size=10, output_dir=tmp_path)
    hook.remove()
    assert sum(calls) == 60  # only the missing rows were scored again
    np.testing.assert_array_equal(resumed["el2n"], full["el2n"])
    with pytest.raises(ValueError, match="different configuration"):
        score_dataset(train, model, ["el2n", "loss"], transform=transform, output_dir=tmp_path)


def test_proxy_models_are_trained_once_and_reloaded_on_resume(digits, tiny_timm, tmp_path):
    train = digits["train"].select(range(32))
    transform = build_image_transform(16)
    options = {"methods": "el2n", "transform": transform, "batch_size": 16, "output_dir": tmp_path}
    options["training_kwargs"] = {"learning_rate": 0.05}
    built = []

    def model_init(seed):
        built.append(seed)
        return tiny_timm(in_chans=1, seed=seed)

    first = score_dataset(train, model_init=model_init, seeds=[0], train_epochs=1, **options)
    weights = tmp_path / "seed-0" / "model.safetensors"
    assert weights.exists() and not list(weights.parent.glob("*.tmp"))
    untrained = score_dataset(train, tiny_timm(in_chans=1, seed=0), "el2n", transform=transform)
    assert not np.allclose(first["el2n"], untrained["el2n"])  # the model was trained before scoring
    for shard in (tmp_path / "seed-0" / "scores").glob("*.parquet"):
        shard.unlink()  # rescoring is needed, retraining is not: the saved weights are loaded
    again = score_dataset(train, model_init=model_init, seeds=[0], train_epochs=1, **options)
    assert built == [0, 0]
    np.testing.assert_allclose(again["el2n"], first["el2n"], rtol=1e-5)


def test_the_engine_trains_proxies_through_the_function_it_is_given(digits, tiny_timm):
    from datadiet.engine import score_dataset as engine_score_dataset

    train = digits["train"].select(range(24))
    transform = build_image_transform(16)
    options = {"methods": "el2n", "transform": transform, "batch_size": 8}
    calls = []

    def train_proxy(model, dataset, *, epochs, seed, learning_rate, **rest):
        # A plain torch step on the first 8 rows: no Trainer anywhere.
        calls.append((len(dataset), epochs, seed, learning_rate))
        images = torch.stack([transform(image) for image in dataset[:8]["image"]])
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
        model.train()
        torch.nn.functional.cross_entropy(model(images), torch.tensor(dataset[:8]["label"])).backward()
        optimizer.step()
        return model.eval(), {}

    with pytest.raises(ValueError, match="train_proxy="):
        engine_score_dataset(
            train, model_init=lambda seed: tiny_timm(in_chans=1, seed=seed), train_epochs=1, **options
        )
    scored = engine_score_dataset(
        train,
        model_init=lambda seed: tiny_timm(in_chans=1, seed=seed),
        seeds=[3],
        train_epochs=2,
        train_proxy=train_proxy,
        training_kwargs={"learning_rate": 0.5},
        **options,
    )
    assert calls == [(24, 2, 3, 0.5)]
    expected = train_proxy(tiny_timm(in_chans=1, seed=3), train, epochs=2, seed=3, learning_rate=0.5)[0]
    direct = score_dataset(train, expected, **options)
    np.testing.assert_allclose(scored["el2n"], direct["el2n"], rtol=1e-5)
    untrained = score_dataset(train, tiny_timm(in_chans=1, seed=3), **options)
    assert not np.allclose(scored["el2n"], untrained["el2n"])


def _images(n, size=8):
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    return [PILImage.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_transformers_vit_with_an_image_processor():
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
        )
    ).eval()
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    ds = Dataset.from_dict(
        {"img": _images(10), "label": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]},
        features=Features({"img": Image(), "label": ClassLabel(num_classes=3)}),
    )
    scored = score_dataset(ds, model, "el2n", transform=processor, batch_size=4)
    with torch.no_grad():
        logits = model(pixel_values=processor(images=list(ds["img"]), return_tensors="pt")["pixel_values"]).logits
    probs = logits.softmax(-1).numpy()
    np.testing.assert_allclose(scored["el2n"], np.linalg.norm(probs - np.eye(3)[ds["label"]], axis=1), rtol=1e-5)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3, "movie": 4, "very": 5, "not": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_text_classifier_with_a_tokenizer_and_padding():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=7,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
    ).eval()
    texts = ["good movie", "bad", "very very good movie", "not good", "bad movie not very good"]
    ds = Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0, 0]})
    tokenizer = _tiny_tokenizer()
    scored = score_dataset(ds, model, "loss", transform=tokenizer, batch_size=2)
    with torch.no_grad():  # one text at a time: no padding at all
        expected = [
            torch.nn.functional.cross_entropy(
                model(**tokenizer(t, return_tensors="pt")).logits, torch.tensor([y])
            ).item()
            for t, y in zip(texts, ds["label"])
        ]
    np.testing.assert_allclose(scored["loss"], expected, rtol=1e-4)


@pytest.fixture
def small(digits):
    return digits["train"].select(range(20))


def test_bad_input(small, tiny_timm):
    model = tiny_timm(in_chans=1)
    transform = build_image_transform(16)
    with pytest.raises(ValueError, match="No label column found"):
        score_dataset(
            small.rename_column("label", "digit").cast_column("digit", Value("int64")), model, transform=transform
        )
    with pytest.raises(ValueError, match="Column 'target' is not in the dataset"):
        score_dataset(small, model, label_column="target", transform=transform)
    with pytest.raises(ValueError, match=r"Labels outside the model's 3 classes at rows \[3"):
        score_dataset(small, tiny_timm(num_classes=3, in_chans=1), transform=transform)
    with pytest.raises(
        ValueError, match="Unknown score method 'el2' \\(did you mean 'el2n'\\?\\). Valid methods: .*el2n"
    ):
        score_dataset(small, model, ["el2"], transform=transform)
    scored = score_dataset(small, model, "el2n", transform=transform)
    with pytest.raises(ValueError, match=r"already has column\(s\) \['el2n'\]: pass overwrite=True"):
        score_dataset(scored, model, "el2n", transform=transform)
    again = score_dataset(scored, model, "el2n", transform=transform, overwrite=True)
    assert again.column_names == scored.column_names
    with pytest.raises(ValueError, match="empty"):
        score_dataset(small.select([]), model, transform=transform)


def test_training_kwargs_are_checked_before_any_proxy_trains(small, tiny_timm):
    """A key score_dataset sets itself names score_dataset's own argument; a key the training does not take names the
    closest DataDietConfig field; both before model_init is ever called."""
    built = []

    def model_init(seed):
        built.append(seed)
        return tiny_timm(in_chans=1)

    options = dict(model_init=model_init, train_epochs=1, batch_size=8, transform=build_image_transform(16))
    with pytest.raises(ValueError, match=r"training_kwargs=\{'seed': \.\.\.\}: .* pass seeds= to score_dataset"):
        score_dataset(small, methods="el2n", training_kwargs={"seed": 3}, **options)
    with pytest.raises(ValueError, match="pass image_column= to score_dataset"):
        score_dataset(small, methods="el2n", training_kwargs={"image_column": "image"}, **options)
    with pytest.raises(ValueError, match="'learning_rat' is none of them. Did you mean 'learning_rate'"):
        score_dataset(small, methods="el2n", training_kwargs={"learning_rat": 0.1}, **options)
    assert built == []
    scored = score_dataset(
        small, methods="el2n", training_kwargs={"learning_rate": 0.1, "weight_decay": 0.0}, **options
    )
    assert built == [0] and np.isfinite(scored["el2n"]).all()


def test_nan_logits_name_the_rows(small, tiny_timm):
    from PIL import Image as PILImage

    model = tiny_timm(in_chans=1)
    images = list(small["image"])
    images[4] = PILImage.new("L", (8, 8), color=255)
    broken = Dataset.from_dict({"image": images, "label": small["label"]}, features=small.features)

    def transform(image):
        x = build_image_transform(16)(image)
        return x / 0.0 if x.min() == 1.0 else x  # inf/NaN input for the all-white image only

    with pytest.raises(ValueError, match=r"NaN or infinite logits for rows \[4\]"):
        score_dataset(broken, model, "el2n", transform=transform)


def test_check_or_write_config_refuses_another_configuration(tmp_path):
    from datadiet.engine.store import check_or_write_config

    check_or_write_config(tmp_path / "run", {"b": 1, "a": [0]})
    assert (tmp_path / "run" / "datadiet_scoring.json").read_text().startswith('{\n  "a"')  # sorted keys
    check_or_write_config(tmp_path / "run", {"a": [0], "b": 1})  # same values: resumes
    with pytest.raises(ValueError, match=r"different configuration \(differs in: b, c\)"):
        check_or_write_config(tmp_path / "run", {"a": [0], "b": 2, "c": 3})
    with pytest.raises(ValueError, match=r"differs in: b\)"):
        check_or_write_config(tmp_path / "run", {"a": [0]})  # a key stored earlier is missing


def test_check_or_write_config_with_its_own_file_message_and_key_order(tmp_path):
    # The shape another run store (the curve's) needs: its own file, message and key order, old keys ignored.
    from datadiet.engine.store import check_or_write_config

    def mismatch(folder, differing, stored):
        return f"{folder} was made with other values of {differing} (was { {k: stored.get(k) for k in differing} })"

    options = {"file_name": "curve_config.json", "new_keys_only": True, "sort_keys": False, "mismatch": mismatch}
    check_or_write_config(tmp_path, {"z": 1, "a": 2, "old": 3}, **options)
    assert (tmp_path / "curve_config.json").read_text() == '{\n  "z": 1,\n  "a": 2,\n  "old": 3\n}'
    check_or_write_config(tmp_path, {"z": 1, "a": 2}, **options)  # a dropped key does not count
    with pytest.raises(ValueError, match=r"other values of \['a'\] \(was \{'a': 2\}\)"):
        check_or_write_config(tmp_path, {"z": 1, "a": 5}, **options)
    assert not list(tmp_path.glob("*.tmp"))


def test_prefetch_keeps_order_raises_where_loading_failed_and_stops_when_closed():
    import threading

    from datadiet.engine.prefetch import prefetch

    main = threading.get_ident()
    threads = []

    def load(item):
        threads.append(threading.get_ident())
        if item == 5:
            raise KeyError("row 5 is broken")
        return item * 10

    loaded = prefetch(load, range(8))
    assert [next(loaded) for _ in range(5)] == [0, 10, 20, 30, 40]
    with pytest.raises(KeyError, match="row 5 is broken"):
        next(loaded)
    assert threads and main not in threads  # loaded in the background, not in the caller's thread
    closed = prefetch(lambda item: item, range(10**9))  # never exhausted: closing must stop the thread
    assert next(closed) == 0
    closed.close()
    assert not any(t.name == "datadiet-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth must be at least 1"):
        next(prefetch(load, range(3), depth=0))


def test_a_transform_error_stops_scoring_with_its_own_message(small, tiny_timm):
    model = tiny_timm(in_chans=1)

    def transform(image):
        raise OSError("cannot decode this image")

    with pytest.raises(OSError, match="cannot decode this image"):
        score_dataset(small, model, "el2n", transform=transform)
