"""A PNG of the DoReMi trajectory: domain weights and per-domain excess loss against the step."""

import json


def plot_trajectory(trajectory_path: str, output_path: str) -> str:
    """Two panels (weights, excess losses) from doremi_trajectory.jsonl; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megadoremi.utils.fs import atomic_output

    with open(trajectory_path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if not records:
        raise ValueError(f"{trajectory_path}: empty trajectory")
    steps = [r["step"] for r in records]
    names = list(records[0]["weights"])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in names:
        top.plot(steps, [r["weights"][name] for r in records], label=name)
        bottom.plot(steps, [r["excess_loss"][name] for r in records], label=name)
    top.set_ylabel("domain weight alpha_t")
    top.set_yscale("log")
    bottom.set_ylabel("excess loss lambda_t")
    bottom.set_xlabel("proxy step")
    top.legend(fontsize="small", ncol=2)
    top.set_title("DoReMi proxy: domain weights and excess losses")
    figure.tight_layout()
    with atomic_output(output_path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
    return output_path
