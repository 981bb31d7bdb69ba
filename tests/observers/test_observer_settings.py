"""An activation observer's settings in a plan: parsed from recipes, round-tripped, used, refused when bad."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from lowbit.errors import InputError
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.spec import ActivationQuant

RECIPE = """
skip: []
rules:
  - pattern: "*"
    weight: int8
    act: {spec: int8-tensor, dynamic: false, observer: {name: percentile, percentile: %s}}
"""


def test_settings_parse_round_trip_and_name_the_activation():
    plan = QuantPlan.from_dict(yaml.safe_load(RECIPE % "99.5"))
    act = plan.rules[0].act
    assert act.observer == "percentile" and act.observer_settings == (("percentile", 99.5),)
    assert "static-percentile-percentile99.5" in act.name
    assert QuantPlan.from_dict(yaml.safe_load(yaml.safe_dump(plan.to_dict()))) == plan
    plain = ActivationQuant("int8-tensor", dynamic=False, observer="percentile")
    assert plain.to_dict()["observer"] == "percentile"  # no settings: the plain name, as before


def test_the_setting_changes_the_calibrated_range():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 40.0  # one outlier: the 99.9th percentile of |x| ignores it less than the 90th

    def hi(p: str) -> float:
        model = nn.Sequential(nn.Linear(16, 4))
        quantize(model, QuantPlan.from_dict(yaml.safe_load(RECIPE % p)), x, progress=False)
        return float(model[0].act_hi)

    assert hi("90") < hi("99.9") < 40.0


@pytest.mark.parametrize("observer, match", [
    ({"name": "percentile", "percentile": 20}, "rule '\\*': activation observer: .*percentile must be in"),
    ({"name": "percentile", "q": 99}, "has no setting"),
])
def test_bad_settings_are_refused_before_any_data_is_read(observer, match):
    plan = QuantPlan.from_dict({"skip": [], "rules": [{"pattern": "*", "weight": "int8",
                                "act": {"spec": "int8-tensor", "dynamic": False, "observer": observer}}]})
    with pytest.raises(InputError, match=match):
        quantize(nn.Sequential(nn.Linear(4, 4)), plan, data=iter(()), progress=False)


def test_settings_need_numbers_and_static_ranges():
    with pytest.raises(InputError, match="map names to numbers"):
        ActivationQuant("int8-tensor", dynamic=False, observer={"name": "percentile", "percentile": "high"})
    with pytest.raises(InputError, match="apply to static ranges"):
        ActivationQuant("int8-tensor", dynamic=True, observer={"name": "percentile", "percentile": 99.0})
