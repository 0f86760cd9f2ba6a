"""Host transfers on the training step's path (issue 13: one device->host synchronisation per step, for logging).

On a GPU, ``tensor.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool / float / int / index(tensor)`` and
a ``.to`` / ``.copy_`` into host memory each wait for the device to finish. On CPU nothing waits, so the worker
below (one real training process: 1 rank, gloo, the real ``Trainer``) records every call of those methods made
during ``Trainer.step()``, after ``setup()`` and one warm-up step, whatever the tensor's device (``.to`` /
``.copy_`` only when the source is not on the host). Each call is charged to the innermost frame inside the
``megadoremi`` package (calls made by torch / DeepSpeed on our behalf are charged to the megadoremi caller).

The test compares the call sites per step with ALLOWLIST and fails on a new site or a higher count, naming
file:function:line and the stack. The domain-id range check and the per-domain counts the DoReMi objective needs
are made by the data layer from host data (``megadoremi.data.batches``), the global token counts come from the
stream with no collective, and every reader of the step's statistics reads one host copy.

Not seen from here: syncs inside C++ (``torch.nonzero``, ``masked_select``, ``bincount`` of a GPU tensor without
``minlength``), host->device copies of unpinned memory, ``torch.cuda.synchronize`` (the trainer calls it on
CUDA only), and what DeepSpeed's bf16 / fp16 optimizers do on a GPU (the CPU run trains in fp32).

Run by pytest, which starts ``python tests/train/test_host_sync.py CONFIG OUT_JSON`` (the worker below).
"""

import json
import os
import subprocess
import sys

NUM_WARMUP_STEPS = 1
NUM_COUNTED_STEPS = 3
WORKER_TIMEOUT_S = 120

# The three step paths: plain language modelling, the DoReMi proxy objective (live reference model) and an
# online mixture that moves from the first step.
CONFIGURATIONS = {
    "lm": [],
    "doremi": ["--doremi.enabled=true", "--doremi.reference_model={reference}"],
    "odm": ["--mixing.method=odm", "--mixing.odm.smoothing=0.5", "--mixing.warmup_steps=0"],
}

# "file:function" (file relative to the megadoremi package) -> (max calls per step in any configuration, why).
# Counts are calls, so ``x.cpu().numpy()`` is 2 (on a GPU only the .cpu() waits), at 2 micro-batches per step
# (grad_accum 2), so a per-micro-batch sync would show as 2 or more.
ALLOWLIST = {
    "distributed/stats.py:reduce_together": (
        2, "the one per-step transfer the step needs: after the one all-reduce of the step's per-domain statistics "
           "(the trainer's and the objective's step_stats packed together), .cpu().numpy() copies them to the "
           "host once (on a GPU only the .cpu() waits); the log record, the mixture policy and the DRO update "
           "read that copy"),
}

# Calls made inside a library on tensors that stay in host memory on a GPU too (innermost library frame -> why).
HOST_TENSORS = {
    "torch/optim/optimizer.py:_get_value": "torch.optim's per-parameter step counter: state['step'] is a CPU "
                                           "tensor unless capturable / fused, so its .item() never waits",
}


# --- the worker (a real training process) ------------------------------------------------------------------


def _worker(config_path: str, out_path: str) -> None:
    """Train each configuration for warm-up + counted steps in this process; write the call sites as JSON."""
    import threading
    import traceback

    import torch

    import megadoremi
    from megadoremi.config import load_config
    from megadoremi.distributed.env import discover_environment, init_distributed
    from megadoremi.distributed.plan import resolve_batch_plan
    from megadoremi.model.gpt import GPT
    from megadoremi.model.io import write_model_file
    from megadoremi.train.build import build_model_config
    from megadoremi.train.trainer import Trainer

    package_dir = os.path.dirname(os.path.abspath(megadoremi.__file__)) + os.sep
    this_file = os.path.abspath(__file__)
    state = threading.local()
    calls = []  # one dict per recorded call while counting
    counting = {"step": None}

    def host_device(value) -> bool:
        device = value if isinstance(value, torch.device) else None
        if isinstance(value, str):
            device = torch.device(value)
        return device is not None and device.type == "cpu"

    def to_host(args, kwargs) -> bool:
        """Whether a ``Tensor.to(...)`` call names the CPU as its target."""
        target = kwargs.get("device")
        if target is None and args and isinstance(args[0], (str, torch.device)):
            target = args[0]
        if target is None and args and isinstance(args[0], torch.Tensor):
            target = args[0].device
        try:
            return host_device(target)
        except RuntimeError:  # a dtype string such as "float64" is not a device
            return False

    def library_frame(frame) -> str:
        """``torch/optim/optimizer.py:_get_value`` for a frame inside an installed package."""
        path = frame.filename.replace(os.sep, "/")
        return f"{path.split('site-packages/')[-1]}:{frame.name}"

    def record(method: str) -> None:
        stack = [frame for frame in traceback.extract_stack()[:-2] if os.path.abspath(frame.filename) != this_file]
        ours = [frame for frame in stack if os.path.abspath(frame.filename).startswith(package_dir)]
        site = ours[-1] if ours else None
        calls.append({
            "step": counting["step"], "method": method,
            "site": f"{os.path.relpath(site.filename, package_dir)}:{site.name}" if site else "<outside megadoremi>",
            "line": site.lineno if site else 0,
            "direct": bool(stack) and stack[-1] is site,  # False: made inside torch / DeepSpeed for our frame
            "via": library_frame(stack[-1]) if stack and stack[-1] is not site else None,
            "stack": [f"{frame.filename}:{frame.lineno} {frame.name}" for frame in stack[-12:]],
        })

    def wrap(name: str, counts) -> None:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if counting["step"] is not None and not getattr(state, "inside", False):
                state.inside = True
                try:
                    if counts(self, args, kwargs):
                        record(name)
                finally:
                    state.inside = False
            return original(self, *args, **kwargs)

        wrapper.__name__ = name
        setattr(torch.Tensor, name, wrapper)

    # On a GPU these always wait for the device; on CPU count every call (they are the calls that would wait).
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        wrap(name, lambda tensor, args, kwargs: True)
    # These wait only when they copy from the device into host memory.
    wrap("to", lambda tensor, args, kwargs: tensor.device.type != "cpu" and to_host(args, kwargs))
    wrap("copy_", lambda tensor, args, kwargs: bool(args) and isinstance(args[0], torch.Tensor)
         and args[0].device.type != "cpu" and tensor.device.type == "cpu")

    env = discover_environment()
    init_distributed(env)
    run_root = os.path.dirname(out_path)
    base = load_config(config_path)
    plan = resolve_batch_plan(base.train, base.parallel, env.world_size)
    # A reference model of the proxy's shape (its weights do not change which calls the step makes).
    reference = os.path.join(run_root, "reference", "model.pt")
    os.makedirs(os.path.dirname(reference), exist_ok=True)
    model_config = build_model_config(base)
    write_model_file({k: v.detach().float() for k, v in GPT(model_config, seed=1).state_dict().items()},
                     model_config, reference)
    result = {}
    for name, overrides in CONFIGURATIONS.items():
        overrides = [item.format(reference=reference) for item in overrides]
        config = load_config(config_path, [f"--run_dir={os.path.join(run_root, 'run-' + name)}", *overrides])
        trainer = Trainer(config, env, plan)
        trainer.setup()
        for _ in range(NUM_WARMUP_STEPS):
            trainer.step()
        del calls[:]
        for step in range(NUM_COUNTED_STEPS):
            counting["step"] = step
            try:
                trainer.step()
            finally:
                counting["step"] = None
        result[name] = {"calls": list(calls), "objective": trainer.objective.name, "mixing": trainer.mixture.method}
        trainer.metrics.close()
        trainer.run_lock.release()
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    torch.distributed.destroy_process_group()


# --- the test ------------------------------------------------------------------------------------------------


def per_step_counts(calls: list[dict]) -> dict:
    """{site: the largest number of calls it made in one counted step}."""
    counts = {}
    for call in calls:
        if call["via"] in HOST_TENSORS:
            continue
        counts.setdefault(call["site"], [0] * NUM_COUNTED_STEPS)[call["step"]] += 1
    return {site: max(steps) for site, steps in counts.items()}


def violations(calls: list[dict], allowlist: dict) -> list[str]:
    """One message per call site that is not allowed, or that exceeds its allowed calls per step."""
    messages = []
    for site, count in sorted(per_step_counts(calls).items()):
        allowed = allowlist.get(site, (0, None))[0]
        if count <= allowed:
            continue
        examples = [call for call in calls if call["site"] == site and call["via"] not in HOST_TENSORS]
        lines = sorted({f"{site}:{call['line']} ({call['method']}"
                        f"{'' if call['direct'] else ' inside ' + str(call['via'])})" for call in examples})
        what = "not in ALLOWLIST" if site not in allowlist else f"allowed {allowed} per step"
        messages.append(f"{site}: {count} host transfer(s) per step, {what}\n    " + "\n    ".join(lines)
                        + "\n  stack of the first:\n    " + "\n    ".join(examples[0]["stack"]))
    return messages


def test_step_host_transfers_are_allowlisted(tiny_corpus, tmp_path):
    from tests.helpers.launch import REPO_ROOT, clean_env, write_config

    config = write_config(str(tmp_path / "config.yaml"), tiny_corpus,
                          train={"steps": NUM_WARMUP_STEPS + NUM_COUNTED_STEPS, "micro_batch_size": 2,
                                 "grad_accum": 2, "seq_length": 16, "lr": 3e-3, "min_lr": 3e-4,
                                 "warmup_fraction": 0.0, "seed": 7})
    out = str(tmp_path / "host_sync.json")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), config, out], cwd=REPO_ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert result.returncode == 0, f"worker failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    with open(out) as handle:
        observed = json.load(handle)
    assert set(observed) == set(CONFIGURATIONS)
    assert observed["doremi"]["objective"] != observed["lm"]["objective"] and observed["odm"]["mixing"] == "odm"
    # The one per-step transfer is seen on every path (so the wrapping works).
    for name, run in observed.items():
        assert per_step_counts(run["calls"]).get("distributed/stats.py:reduce_together", 0) >= 1, name
    messages = [f"[{name}] {message}" for name, run in observed.items()
                for message in violations(run["calls"], ALLOWLIST)]
    assert not messages, "new host-device synchronisation in Trainer.step:\n" + "\n".join(messages)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
