import pytest

from fedmarket.config import config_from_dict, load_config
from fedmarket.errors import ConfigError
from fedmarket.methods import get_method


def test_defaults_validate():
    cfg = config_from_dict({})
    assert cfg.train.rounds > 0 and cfg.eval.candidates == 99


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"lrr": 1}}, "train.'lrr'"),
        ({"bogus": 1}, "'bogus'"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"rounds": "ten"}}, "train.rounds"),
        ({"train": {"client_fraction": 1.5}}, "train.client_fraction"),
        ({"model": {"name": "bert"}}, "model.name"),
        ({"model": {"hidden": []}}, "model.hidden"),
        ({"eval": {"select": "best"}}, "eval.select"),
        ({"eval": {"ks": [0]}}, "eval.ks"),
        ({"seeds": []}, "seeds"),
        ({"dataset": {"markets": "de"}}, "dataset.markets"),
        ({"progress": "yes"}, "progress"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert key in str(info.value)


def test_method_options_are_validated():
    with pytest.raises(ConfigError, match="method.options"):
        get_method("fedprox").parse_options({"mu": -1})
    with pytest.raises(ConfigError, match="unknown config key method.options.'m'"):
        get_method("fedprox").parse_options({"m": 1})
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("fedsomething")


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  rounds: 0\n")
    with pytest.raises(ConfigError, match=r"x.yaml: train.rounds"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        get_method(cfg.method.name).parse_options(cfg.method.options)


def test_configs_that_say_they_train_to_a_plateau_set_patience():
    """A config whose comments promise training to the validation plateau must switch early stopping on
    (train.patience > 0); otherwise `train.rounds`, documented as a cap, silently becomes the budget."""
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    promised = [p for p in configs if "validation plateau" in p.read_text()]
    assert promised  # the FeCoSR configs, at least
    without = [p.name for p in promised if load_config(p).train.patience <= 0]
    assert not without, f"these configs promise a plateau but set no train.patience: {without}"
