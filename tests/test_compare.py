"""The comparison's statistics on hand-made results: paired differences against the anchor, their standard error
and the verdict, steps to a target loss, and the refusal to compare runs evaluated on different samples."""

import math

import pytest

from megadoremi import compare

NAMES = ["web", "code"]


def result(web, code, curve=(), val_set_hash="h"):
    losses = {"web": web, "code": code}
    return {"val_loss": losses, "average": (web + code) / 2, "worst": max(web, code), "worst_domain": "web",
            "curve": list(curve), "val_set_hash": val_set_hash, "run_dir": "run"}


def test_paired_differences_by_hand():
    results = {"stratified": {1: result(3.0, 2.0), 2: result(3.2, 2.2), 3: result(3.1, 2.0)},
               "doremi": {1: result(2.9, 2.1), 2: result(3.0, 2.3), 3: result(3.1, 1.9)}}
    average = compare.paired(results, "doremi", "stratified", "average")
    # Per-seed differences of the averages: (5.0 - 5.0)/2 = 0, (5.3 - 5.4)/2 = -0.05, (5.0 - 5.1)/2 = -0.05.
    assert average["differences"] == pytest.approx([0.0, -0.05, -0.05])
    assert average["mean"] == pytest.approx(-0.1 / 3)
    std = math.sqrt(((1 / 30) ** 2 + 2 * (1 / 60) ** 2) / 2)
    assert average["std"] == pytest.approx(std) and average["se"] == pytest.approx(std / math.sqrt(3))
    web = compare.paired(results, "doremi", "stratified", "val_loss", domain="web")
    assert web["differences"] == pytest.approx([-0.1, -0.2, 0.0])


@pytest.mark.parametrize("differences, expected", [
    ([-0.01, 0.02, -0.005], "within noise"),  # mean inside two standard errors of zero
    ([-0.10, -0.11, -0.09], "better"),
    ([0.10, 0.11, 0.09], "worse"),
    ([-0.3], "within noise (one seed: no estimate of the noise)"),
    ([0.0, 0.0], "within noise"),
])
def test_verdict(differences, expected):
    assert compare.verdict(compare.difference_stats(differences)) == expected


def test_verdict_boundary_is_two_standard_errors():
    inside = compare.difference_stats([0.0, 0.3, 0.06])  # mean 0.12, se 0.0917: 1.3 se
    assert compare.verdict(inside) == "within noise"
    outside = compare.difference_stats([0.2, 0.22, 0.21])
    assert outside["mean"] > 2 * outside["se"] and compare.verdict(outside) == "worse"


def test_steps_to_reach_and_results_lines():
    assert compare.steps_to_reach([(10, 5.0), (20, 4.0), (30, 3.5)], 4.0) == 20
    assert compare.steps_to_reach([(10, 5.0)], 4.0) is None
    results = {"stratified": {1: result(3.0, 2.0, [(10, 3.0), (20, 2.5)])},
               "ado": {1: result(2.8, 2.1, [(10, 2.9), (20, 2.45)])}}
    lines = {line["method"]: line for line in compare.results_lines(results, "stratified")}
    assert lines["stratified"]["steps_to_anchor_final_average"] == 20
    assert lines["ado"]["steps_to_anchor_final_average"] == 20 and lines["ado"]["average"] == pytest.approx(2.45)


def test_runs_on_different_validation_samples_are_not_compared():
    same = {"stratified": {1: result(3.0, 2.0)}, "doremi": {1: result(2.9, 2.1)}}
    compare.check_same_validation(same)
    different = {"stratified": {1: result(3.0, 2.0)}, "doremi": {1: result(2.9, 2.1, val_set_hash="other")}}
    with pytest.raises(ValueError, match="different validation samples"):
        compare.check_same_validation(different)
    unknown = {"stratified": {1: result(3.0, 2.0, val_set_hash=None)}}
    with pytest.raises(ValueError, match="record none"):
        compare.check_same_validation(unknown)


def test_report_section_has_the_paired_table_and_the_spread():
    results = {"stratified": {1: result(3.0, 2.0), 2: result(3.2, 2.2)},
               "odm": {1: result(2.9, 2.1), 2: result(3.0, 2.3)}}
    weights = {"stratified": {"web": 0.5, "code": 0.5}, "odm": {"web": 0.4, "code": 0.6}}
    text = "\n".join(compare.render_comparison(results, "stratified", weights, NAMES))
    assert "| odm |" in text and "within noise" in text and "Per-domain paired differences" in text
    assert "Seed spread of the stratified run's average validation loss: std 0.1414 over 2 seed(s)" in text
    assert "| web | -0.1500 ± 0.0500 |" in text
