"""What a run with a dynamic mixture leaves behind: the average sampling weights as ``mixing_weights.json`` (a
static mixture for another run), its Megatron ``--data-path`` line and a plot of the trajectory."""

import json
import os

from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

TRAJECTORY_FILE = "mixing_trajectory.jsonl"
WEIGHTS_FILE = "mixing_weights.json"
DATA_PATH_FILE = "mixing_data_path.txt"
PLOT_FILE = "mixing_weights.png"


def average_weights(trajectory_path: str) -> dict[str, float]:
    """The mean over steps of the sampling weights in ``mixing_trajectory.jsonl``, normalised."""
    with open(trajectory_path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if not records:
        raise ValueError(f"{trajectory_path}: no steps")
    names = list(records[0]["weights"])
    sums = {name: sum(record["weights"][name] for record in records) for name in names}
    total = sum(sums.values())
    return {name: value / total for name, value in sums.items()}


def write_mixing_outputs(run_dir: str, domain_prefixes: dict[str, str]) -> dict[str, float]:
    """Write ``mixing_weights.json``, ``mixing_data_path.txt`` and ``mixing_weights.png`` from the run's
    trajectory; returns the average weights."""
    average = average_weights(os.path.join(run_dir, TRAJECTORY_FILE))
    with atomic_output(os.path.join(run_dir, WEIGHTS_FILE), "w") as handle:
        json.dump(average, handle, indent=1)
    data_path = " ".join(f"{average[name]:.6g} {prefix}" for name, prefix in domain_prefixes.items())
    with atomic_output(os.path.join(run_dir, DATA_PATH_FILE), "w") as handle:
        handle.write(data_path + "\n")
    try:
        from megadoremi.utils.plot import plot_trajectory

        plot_trajectory(os.path.join(run_dir, TRAJECTORY_FILE), os.path.join(run_dir, PLOT_FILE),
                        lower_key="domain_loss", upper_label="sampling weight",
                        lower_label="training loss the policy saw", title="online data mixing: sampling weights")
    except ImportError as error:
        logger.warning("no plot (%s); the trajectory is in %s", error, TRAJECTORY_FILE)
    logger.info("average sampling weights: %s", " ".join(f"{name} {w:.4f}" for name, w in average.items()))
    return average
