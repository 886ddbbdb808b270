"""The package's public surface: every exported name resolves, and importing it stays light."""

import subprocess
import sys

import datadiet


def test_every_public_name_resolves():
    missing = [name for name in datadiet.__all__ if getattr(datadiet, name, None) is None]
    assert not missing
    assert set(datadiet.__all__) <= set(dir(datadiet))


def test_unknown_attribute_is_an_attribute_error():
    try:
        datadiet.not_a_name  # noqa: B018
    except AttributeError as error:
        assert "not_a_name" in str(error)
    else:
        raise AssertionError("datadiet.not_a_name did not raise AttributeError")


def test_import_does_not_load_transformers_and_tracin_score_registers_on_demand():
    code = (
        "import sys, datadiet\n"
        "assert 'transformers' not in sys.modules, 'import datadiet loaded transformers'\n"
        "from datadiet.scores import get_score_spec, list_scores\n"
        "assert 'tracin_self_influence' in list_scores()\n"
        "assert get_score_spec('tracin_self_influence').needs == 'gradients'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scores_are_pure_torch_and_register_tracin_without_the_driver():
    code = (
        "import sys\n"
        "from datadiet.scores import get_score\n"
        "get_score('tracin_self_influence')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'datasets', 'accelerate', 'timm', 'huggingface_hub')]\n"
        "assert not loaded, loaded\n"
        "others = [m for m in sys.modules if m.startswith('datadiet.') and not m.startswith('datadiet.scores')]\n"
        "assert not others, others\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
