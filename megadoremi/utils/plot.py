"""A PNG of a per-step weights trajectory (DoReMi's alpha_t, an online mixing policy's sampling weights) with a
second per-domain quantity below (DoReMi's excess loss, the training loss the mixing policy saw)."""

import json


def plot_trajectory(trajectory_path: str, output_path: str, lower_key: str = "excess_loss",
                    upper_label: str = "domain weight alpha_t", lower_label: str = "excess loss lambda_t",
                    title: str = "DoReMi proxy: domain weights and excess losses") -> str:
    """Two panels from a JSONL of ``{"step", "weights": {domain: w}, lower_key: {domain: value}}`` lines; returns
    the PNG path (written atomically). Needs matplotlib."""
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
        lower = [(step, r[lower_key][name]) for step, r in zip(steps, records) if name in r.get(lower_key, {})]
        bottom.plot([s for s, _ in lower], [v for _, v in lower], label=name)
    top.set_ylabel(upper_label)
    top.set_yscale("log")
    bottom.set_ylabel(lower_label)
    bottom.set_xlabel("step")
    top.legend(fontsize="small", ncol=2)
    top.set_title(title)
    figure.tight_layout()
    with atomic_output(output_path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
    return output_path
