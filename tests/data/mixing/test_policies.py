"""Mixture policies: static weights, schedule files (every bad input named), the step at which a schedule's weights
take effect, and the checkpoint check that the schedule did not change."""

import json

import numpy as np
import pytest

from megadoremi.config import DataConfig, MixingConfig
from megadoremi.data.mixing import ScheduledMixture, StaticMixture, build_mixture_policy, load_schedule

NAMES = ["web", "code", "math"]
DOMAINS = {name: f"/no/dataset/{name}" for name in NAMES}  # static and schedule policies read no data


def schedule_file(tmp_path, content, name="schedule.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_static_policy_keeps_its_weights():
    policy = build_mixture_policy(MixingConfig(), DataConfig(domains=DOMAINS))
    assert isinstance(policy, StaticMixture) and not policy.dynamic
    np.testing.assert_array_equal(policy.initial_weights, np.full(3, 1 / 3))
    assert policy.update(0, None) is None and policy.update(10**6, None) is None
    weighted = build_mixture_policy(MixingConfig(), DataConfig(domains=DOMAINS, weights={"web": 2, "code": 1, "math": 1}))
    np.testing.assert_allclose(weighted.initial_weights, [0.5, 0.25, 0.25])
    assert weighted.describe() == {"method": "static", "weights": [0.5, 0.25, 0.25]}


def test_schedule_changes_weights_at_the_listed_steps(tmp_path):
    path = schedule_file(tmp_path, {"0": {"web": 1, "code": 1, "math": 2}, "5": {"web": 0, "code": 1, "math": 3},
                                    "12": {"web": 1, "code": 0, "math": 0}})
    policy = build_mixture_policy(MixingConfig(method="schedule", schedule=path), DataConfig(domains=DOMAINS))
    assert isinstance(policy, ScheduledMixture) and policy.dynamic
    np.testing.assert_allclose(policy.initial_weights, [0.25, 0.25, 0.5])
    # update(t) runs after step t and returns the weights of step t + 1, or None when they do not change.
    changes = {step: policy.update(step, None) for step in range(20)}
    assert [step for step, weights in changes.items() if weights is not None] == [4, 11]
    np.testing.assert_allclose(changes[4], [0.0, 0.25, 0.75])
    np.testing.assert_allclose(changes[11], [1.0, 0.0, 0.0])
    for step, first in ((0, 0), (4, 0), (5, 5), (11, 5), (12, 12), (10**9, 12)):
        np.testing.assert_array_equal(policy.weights_at(step), policy.schedule[first])


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ([0.5, 0.5], "expected a JSON object"),
    ({}, "expected a JSON object"),
    ({"10": {"web": 1, "code": 1, "math": 1}}, "weights of step 0"),
    ({"0": {"web": 1, "code": 1, "math": 1}, "ten": {"web": 1, "code": 1, "math": 1}}, "key 'ten' is not a step"),
    ({"0": {"web": 1, "code": 1, "math": 1}, "-5": {"web": 1, "code": 1, "math": 1}}, "key '-5' is not a step"),
    ({"0": {"web": 1, "code": 1}}, "step 0: .*math"),
    ({"0": {"web": 1, "code": 1, "math": 1, "books": 1}}, "step 0: .*books"),
    ({"0": {"web": 1, "code": 1, "math": 1}, "3": {"web": -1, "code": 1, "math": 1}}, "step 3: .*web"),
    ({"0": {"web": 0, "code": 0, "math": 0}}, "step 0: .*zero"),
])
def test_bad_schedules_name_the_file_and_entry(tmp_path, content, match):
    path = schedule_file(tmp_path, content)
    with pytest.raises(ValueError, match=match) as error:
        load_schedule(path, NAMES)
    assert path in str(error.value)


def test_missing_schedule_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_schedule(str(tmp_path / "nope.json"), NAMES)


def test_resuming_with_another_schedule_is_refused(tmp_path):
    first = schedule_file(tmp_path, {"0": {"web": 1, "code": 1, "math": 1}, "4": {"web": 1, "code": 0, "math": 0}})
    policy = ScheduledMixture(NAMES, load_schedule(first, NAMES), first)
    saved = policy.state_dict()
    ScheduledMixture(NAMES, load_schedule(first, NAMES), first).load_state_dict(saved)  # the same schedule: fine
    changed = schedule_file(tmp_path, {"0": {"web": 1, "code": 1, "math": 1}, "5": {"web": 1, "code": 0, "math": 0}},
                            "changed.json")
    with pytest.raises(ValueError, match="differs from the one the checkpoint"):
        ScheduledMixture(NAMES, load_schedule(changed, NAMES), changed).load_state_dict(saved)
    with pytest.raises(ValueError, match="mixing method 'schedule'"):
        StaticMixture(NAMES, np.full(3, 1 / 3)).load_state_dict(saved)
