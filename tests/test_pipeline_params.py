"""params.yaml's keys: the shipped file passes, a typo in any section is named with the allowed keys."""

import pytest
import yaml
from pipeline_project import ROOT

from kprune.config import KPruneConfig
from pipeline.params import ParamsError, allowed_keys, check_params


def shipped() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_shipped_params_pass_and_name_every_key_of_the_library_config():
    params = shipped()
    check_params(params)
    assert set(params) == set(allowed_keys())
    assert set(params["prune"]) == set(KPruneConfig.__dataclass_fields__) | {"device"}


@pytest.mark.parametrize("section, key", [("prune", "flops_kep"), ("evaluate", "latency_batch_size"),
                                          ("data", "sample_token"), ("teacher", "epoch")])  # fmt: skip
def test_a_typo_is_named_with_the_allowed_keys(section, key):
    params = shipped()
    params[section][key] = 1
    with pytest.raises(
        ParamsError, match=rf"^params.yaml: unknown key {section}\.{key}; the keys of"
    ) as error:
        check_params(params)
    assert ", ".join(sorted(allowed_keys()[section])) in str(error.value)
    check_params(params, [name for name in allowed_keys() if name != section])  # other sections are fine


def test_an_unknown_or_missing_section_is_an_error():
    params = shipped()
    with pytest.raises(ParamsError, match="unknown section 'purne'"):
        check_params({**params, "purne": {}})
    del params["calibrate"]
    with pytest.raises(ParamsError, match="no section 'calibrate'"):
        check_params(params, ["calibrate"])
