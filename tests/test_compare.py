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


def write_run(root, name, curve):
    """A finished run directory with a hand-made eval.jsonl and final.json (average loss = both domains')."""
    import json
    import os

    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as handle:
        for step, average in curve:
            handle.write(json.dumps({"step": step, "val_loss": {"web": average, "code": average},
                                     "val_loss_avg": average, "val_loss_worst": average}) + "\n")
    final = {"val_loss": {"web": curve[-1][1], "code": curve[-1][1]}, "val_loss_avg": curve[-1][1],
             "val_loss_worst": curve[-1][1], "val_set_hash": "h", "val_samples": {"web": 8, "code": 8}}
    with open(os.path.join(run_dir, "final.json"), "w") as handle:
        json.dump({"eval": final}, handle)
    return compare.run_result(run_dir)


def test_speedup_from_hand_made_eval_files(tmp_path):
    baseline = write_run(tmp_path, "baseline", [(0, 6.0), (100, 4.0), (200, 3.5), (300, 3.2), (400, 3.0)])
    doremi = write_run(tmp_path, "doremi", [(0, 6.0), (100, 3.8), (200, 3.2), (300, 2.9), (400, 2.8)])
    figure = compare.speedup(doremi["curve"], baseline["curve"])
    # 3.0 is crossed between step 200 (3.2) and 300 (2.9): 200 + 100 * 0.2 / 0.3 = 266.7; 400 / 266.7 = 1.5.
    assert figure["step"] == pytest.approx(200 + 100 * 0.2 / 0.3) and figure["speedup"] == pytest.approx(1.5)
    assert figure["interpolated"] and not figure["upper_bound"] and figure["target"] == 3.0
    sentence = compare.describe_speedup(figure)
    assert "step 267 (interpolated linearly between evaluations): **1.50x fewer steps**" in sentence
    # Exactly on an evaluation: no interpolation needed.
    exact = compare.speedup([(0, 6.0), (100, 3.0), (200, 2.0)], baseline["curve"])
    assert exact["step"] == 100 and exact["speedup"] == 4.0 and not exact["interpolated"]
    # Never reached: said so.
    worse = write_run(tmp_path, "worse", [(0, 6.0), (200, 3.4), (400, 3.1)])
    missed = compare.speedup(worse["curve"], baseline["curve"])
    assert missed["step"] is None and missed["speedup"] is None
    assert compare.describe_speedup(missed).endswith("not reached.")
    # Already below at the first evaluation: only a bound.
    bound = compare.speedup([(50, 2.9), (400, 2.0)], baseline["curve"])
    assert bound["upper_bound"] and bound["speedup"] == 8.0 and "at least" in compare.describe_speedup(bound)
    # In the report, and per (method, seed) in results.jsonl.
    from types import SimpleNamespace

    results = {"stratified": {1: baseline}, "doremi": {1: doremi}}
    args = SimpleNamespace(preset="tiny", main_preset=None, steps=400, nproc=2, seq_length=128,
                           reference_weights="uniform", seeds=1, seed=1)
    rounds = [{"round": 1, "alpha_ref": {"web": 0.5, "code": 0.5}, "alpha_bar": {"web": 0.4, "code": 0.6},
               "max_change": 0.1, "weights_file": str(tmp_path / "w.json")}]
    evaluation = {"baseline": baseline["val_loss"], "doremi": doremi["val_loss"]}
    report = compare.render_report(NAMES, rounds, {"web": 0.5, "code": 0.5}, evaluation, args, results=results)
    assert "## Speed-up" in report and "evaluated at steps 0, 100, 200, ..., 400" in report
    assert "**1.50x fewer steps**" in report
    lines = {line["method"]: line for line in compare.results_lines(results, "stratified")}
    assert lines["doremi"]["speedup_over_anchor"] == pytest.approx(1.5)
    assert lines["stratified"]["speedup_over_anchor"] == 1.0
