import pytest
import yaml

from almost_utils.config import ConfigError, load_config, parse_config
from conftest import ROOT, TINY


def raw():
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("name", ["tiny", "cpu"])
def test_shipped_recipes_load(name):
    cfg = load_config(ROOT / "data" / "configs" / f"{name}.yaml")
    assert cfg.run_name == name
    assert sum(len(r) for r in cfg.comparisons.rubric) >= 4


def test_tie_in_rubric_is_one_rank():
    cfg = parse_config(raw())
    assert [len(r) for r in cfg.comparisons.rubric] == [1, 1, 2, 1]
    assert cfg.comparisons.rubric[2][0].name == "small-hhh-3shot"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["comparisons"]["rubric"][1].update(shots="three"), r"comparisons\.rubric\[1\]\.shots: expected an integer"),
    (lambda d: d["comparisons"]["rubric"][0].update(model="huge"), r"comparisons\.rubric\[0\]\.model: unknown model 'huge'"),
    (lambda d: d["comparisons"]["rubric"][2][1].update(demos="nope"), r"comparisons\.rubric\[2\]\[1\]\.demos: unknown demonstration set"),
    (lambda d: d["queries"].update(top_p=1.5), r"queries\.top_p: must be in"),
    (lambda d: d["queries"].update(temprature=1.0), r"queries\.temprature: unknown field"),
    (lambda d: d.pop("seed"), r"seed: missing required field"),
    (lambda d: d.update(device="tpu"), r"device: must be one of"),
    (lambda d: d["sampling"].update(backend="jax"), r"sampling\.backend: must be one of"),
    (lambda d: d["queries"].update(model="small2"), r"queries\.model: unknown model"),
    (lambda d: d["queries"].update(seeds_file="data/nope.txt"), r"queries\.seeds_file: file not found"),
    (lambda d: d["reward_model"].update(eval_fraction=1.0), r"reward_model\.eval_fraction"),
    (lambda d: d["comparisons"].update(rubric=[{"model": "large", "demos": "hhh", "shots": 1}]), r"at least two"),
    (lambda d: d["comparisons"]["max_new_tokens"].pop("hhh"), r"max_new_tokens: no entry for demonstration set 'hhh'"),
    (lambda d: d["models"]["large"].pop("tiny"), r"models\.large\.tiny"),
])
def test_bad_recipes_name_the_field(mutate, message):
    data = raw()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_overrides_and_missing_file(tmp_path):
    cfg = load_config(TINY, {"queries.num_queries": 3, "output_dir": str(tmp_path)})
    assert cfg.queries.num_queries == 3
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_model_sources_fail_before_loading():
    from almost_utils.models import check_source
    with pytest.raises(ConfigError, match="unknown packaged model 'gpt5'"):
        check_source("packaged:gpt5", "models.x.source")
    with pytest.raises(ConfigError, match="neither a local folder nor a hub id"):
        check_source("./no/such/folder", "models.x.source")
    assert check_source("google/gemma-3-270m") == "hub"
    assert check_source("tiny:packaged:gemma-3-270m") == "tiny"
