"""The training loop: one loop for every layout (ZeRO 0-3, pipeline stages, gradient accumulation) with two seams,
the loss objective (``megadoremi.train.objective``) and the data mixture (``megadoremi.data.mixing``).

Per optimizer step t: read this rank's micro-batches of step t from the training stream; ``objective.begin_step``;
forward, per-token losses, per-domain statistics, ``objective.loss``, backward (DeepSpeed steps at the last
micro-batch; with pipeline stages the engine runs the schedule and calls the objective on the last stage);
all-reduce the statistics; ``objective.end_step``; ``mixture.update(t, statistics)`` whose new weights the
stream draws step t + 1 with; log. Then evaluation, the stop-signal check and checkpoints (which hold the
objective's, the mixture's and the stream's state).
"""

import json
import os
import time

import torch
import torch.distributed as dist

from megadoremi.config import ConfigError, ExperimentConfig, save_config
from megadoremi.data.batches import TrainBatches
from megadoremi.data.blending import build_domain_eval_datasets, validation_set_summary
from megadoremi.data.mixing.outputs import TRAJECTORY_FILE as MIXING_TRAJECTORY_FILE
from megadoremi.data.mixing.outputs import write_mixing_outputs
from megadoremi.data.stream import build_train_stream
from megadoremi.distributed.engine import build_ds_config, build_engine
from megadoremi.distributed.env import DistributedEnv
from megadoremi.distributed.plan import BatchPlan
from megadoremi.distributed.stats import DomainStats, reduce_together
from megadoremi.distributed.watchdog import LauncherWatchdog, StopFlag
from megadoremi.model.gpt import token_losses
from megadoremi.train import checkpoint as ckpt
from megadoremi.train.build import build_mixture, build_model_config, build_objective, build_stream_spec
from megadoremi.train.evaluation import evaluate_domains
from megadoremi.train.export import export_model
from megadoremi.train.metrics import MetricsWriter, truncate_jsonl
from megadoremi.train.objective import PipelineLoss, pipeline_items
from megadoremi.train.health import DIVERGED_FILE, DivergenceGuard
from megadoremi.train.run_lock import lock_run_directory
from megadoremi.utils import jsonio
from megadoremi.utils.fs import atomic_output, remove_quietly
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)


class Trainer:
    """Builds data, model, engine, objective and mixture from an ExperimentConfig and runs the loop on every rank."""

    def __init__(self, config: ExperimentConfig, env: DistributedEnv, plan: BatchPlan):
        self.config, self.env, self.plan = config, env, plan
        self.rank = env.rank
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.run_dir = config.run_dir
        self.checkpoint_dir = os.path.join(self.run_dir, "checkpoints")
        self.ds_config = build_ds_config(config.train, config.parallel, plan, cuda)
        self.stop_flag = StopFlag()
        self.next_step = 0  # the optimizer step ``step()`` trains next
        self.run_lock = None
        self.divergence = DivergenceGuard(config.train.divergence_patience, self.run_dir, self.rank)
        self.last_checkpoint = None

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # --- set-up ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Run directory, data, engine, objective, mixture, metrics; resume from a checkpoint if there is one."""
        config = self.config
        self.run_lock = lock_run_directory(self.run_dir, self.rank)
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            remove_quietly(os.path.join(self.run_dir, DIVERGED_FILE))
            save_config(config, os.path.join(self.run_dir, "config.yaml"))
            with atomic_output(os.path.join(self.run_dir, "ds_config.json"), "w") as handle:
                json.dump({**self.ds_config, "megadoremi_batch_plan": self.plan.to_dict()}, handle, indent=2)
        self._barrier()
        # Verified (and its layout checked) before anything is built: a damaged checkpoint fails fast.
        self.resume_from = ckpt.choose_checkpoint(config.checkpoint.resume, self.checkpoint_dir, self.rank,
                                                  self.plan.world_size, config.checkpoint.verify, self.layout)
        self.mixture = build_mixture(config, self.rank, self.device)
        self.stream_spec = build_stream_spec(config, self.plan, self.mixture)
        self.domain_names = self.stream_spec.domain_names
        self.stream = build_train_stream(self.stream_spec)
        self.eval_datasets = build_domain_eval_datasets(
            dict(config.data.domains), seq_length=config.train.seq_length, seed=config.eval.seed,
            split=config.data.split, split_index=1, cache_dir=config.data.cache_dir,
            max_samples_per_domain=config.eval.max_samples_per_domain)
        self.validation_samples, self.validation_hash = validation_set_summary(
            self.eval_datasets, config.eval.max_samples_per_domain)
        self.model_config = build_model_config(config)
        self.pipeline_loss = PipelineLoss() if self.plan.pipeline_parallel else None
        self.trained = build_engine(self.model_config, self.plan, self.ds_config, config.train, config.parallel,
                                    self.rank, config.model.activation_checkpointing, self.pipeline_loss)
        self.engine = self.trained.engine
        self.objective = build_objective(config, self.model_config, self.stream_spec, self.trained, self.plan,
                                         self.device)
        self.stats = DomainStats(len(self.domain_names), self.device)
        self.batches = TrainBatches(self.stream, self.plan, self.trained.data_parallel_rank)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank == 0)
        if self.resume_from:
            self._resume(self.resume_from)
        if self.rank == 0:  # a resumed run rewrites the steps after its checkpoint; a fresh one starts the files
            for name in ("metrics.jsonl", "eval.jsonl", self.objective.log_name, self.mixing_log_name):
                if name:
                    truncate_jsonl(os.path.join(self.run_dir, name), self.next_step)
        logger.info(
            "model %s: %.1fM parameters | world %d = %d pipeline x %d data-parallel | global batch %d x %d tokens"
            " | ZeRO %d | %s | mixing %s | objective %s", config.model.preset,
            self.model_config.num_parameters() / 1e6, self.plan.world_size, self.plan.pipeline_stages,
            self.plan.data_parallel_size, self.plan.global_batch_size, self.plan.seq_length,
            config.parallel.zero_stage, "bf16" if self.trained.bf16 else "fp32", self.mixture.method,
            self.objective.name)

    @property
    def layout(self) -> dict:
        return {"world_size": self.plan.world_size, "zero_stage": self.config.parallel.zero_stage,
                "pipeline_stages": self.plan.pipeline_stages, "data_parallel_size": self.plan.data_parallel_size}

    def _resume(self, path: str) -> None:
        state = ckpt.load_checkpoint(self.engine, path, self.rank)
        self.last_checkpoint = path
        if state["global_batch_size"] != self.plan.global_batch_size:
            raise ConfigError(
                f"{path}: checkpoint was written with global batch {state['global_batch_size']}, "
                f"this run has {self.plan.global_batch_size}; the data position would not match")
        self.next_step = state["step"]
        saved = ckpt.objective_state(state)
        if saved["name"] != self.objective.name:
            raise ConfigError(f"{path}: checkpoint holds the state of objective {saved['name']!r}, this run "
                              f"trains with {self.objective.name!r} (doremi.enabled changed?)")
        try:
            self.objective.load_state_dict(saved["state"])
            mixing = state.get("mixing", {"policy": {"method": "static"}, "stream": {"kind": "blend"}})
            self.mixture.load_state_dict(mixing["policy"])
            self.stream.load_state_dict(mixing["stream"], self.next_step)
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from None

    @property
    def mixing_log_name(self) -> str | None:
        return MIXING_TRAJECTORY_FILE if self.mixture.dynamic else None

    # --- one optimizer step ------------------------------------------------------------------------------

    def step(self) -> dict:
        """Train optimizer step ``next_step`` (collective); returns its metrics record (``loss``, ``lr``, ...)."""
        step = self.next_step
        lr = self.engine.get_lr()[0]
        started = time.perf_counter()
        micro_batches = self.batches.micro_batches(step)
        self.stats.reset()
        self.objective.begin_step(micro_batches)
        if self.plan.pipeline_parallel:
            self.pipeline_loss.train(self.stats, self.objective, micro_batches)
            self.engine.train_batch(data_iter=pipeline_items(micro_batches))
        else:
            for batch in micro_batches:
                tokens = batch["tokens"].to(self.device)
                losses = token_losses(self.engine(tokens[:, :-1]), tokens[:, 1:])  # (batch, seq)
                self.stats.add(losses, batch["domain_ids"])
                self.engine.backward(self.objective.loss(losses, batch))
                self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        trained = time.perf_counter()
        group = None if self.plan.pipeline_parallel else self.trained.data_parallel_group
        reduced, *extra = reduce_together([self.stats, *self.objective.step_stats], group, self.trained.is_last_stage)
        objective_metrics = self.objective.end_step(*extra)
        weights_used = self.stream.weights if self.mixture.dynamic else None
        new_weights = self.mixture.update(step, reduced)
        if new_weights is not None:
            self.stream.set_weights(new_weights)
        updated = time.perf_counter()
        elapsed = updated - started
        self.next_step = step + 1
        record = {"step": step + 1, "loss": reduced.mean(), "lr": lr,
                  "tokens_per_second": self.plan.tokens_per_step / max(elapsed, 1e-9), "step_time_s": elapsed,
                  "domain_loss": reduced.domain_means(self.domain_names),
                  "domain_samples": reduced.domain_samples(self.domain_names),
                  "samples": (step + 1) * self.plan.global_batch_size, **objective_metrics}
        if weights_used is not None:
            record["mixing_weights"] = dict(zip(self.domain_names, map(float, weights_used)))
        self._log(record)
        # Where the step's time went (tools/bench_train.py reports it).
        self.last_step_seconds = {"train": trained - started, "reduce_update": updated - trained,
                                  "log": time.perf_counter() - updated}
        return record

    def _append(self, name: str, line: dict) -> None:
        with open(os.path.join(self.run_dir, name), "a") as handle:
            handle.write(jsonio.dumps(line) + "\n")

    def _log(self, record: dict) -> None:
        if self.rank == 0 and self.objective.log_name:
            self._append(self.objective.log_name, self.objective.log_record())
        if self.rank == 0 and self.mixing_log_name:  # the weights of the step, the losses the policy saw
            self._append(self.mixing_log_name, {"step": record["step"], "weights": record["mixing_weights"],
                                                "domain_loss": record["domain_loss"], **self.mixture.log_record()})
        step, steps = record["step"], self.config.train.steps
        if step % self.config.train.log_interval and step != steps:
            return
        grad_norm = self.last_grad_norm
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.metrics.train(record)
        logger.info("step %d/%d | loss %.4f | lr %.3e | %.0f tokens/s%s", step, steps, record["loss"], record["lr"],
                    record["tokens_per_second"], f" | grad norm {float(grad_norm):.3f}" if grad_norm is not None else "")

    def evaluate(self, step: int) -> dict:
        """Per-domain validation loss (collective); appended to eval.jsonl and logged."""
        config = self.config
        record = evaluate_domains(self.trained, self.eval_datasets, self.domain_names, self.plan,
                                  config.eval.max_samples_per_domain, config.eval.batch_size, self.device,
                                  self.pipeline_loss, step)
        record.update(val_samples=self.validation_samples, val_set_hash=self.validation_hash)
        self.metrics.eval(record)
        if record["val_loss"]:
            logger.info("eval step %d | avg %.4f | worst %.4f | %s", step, record["val_loss_avg"],
                        record["val_loss_worst"], " ".join(f"{k} {v:.3f}" for k, v in record["val_loss"].items()))
        return record

    def stop_requested(self, nonfinite: bool = False) -> tuple[bool, bool]:
        """(whether any rank received SIGUSR1 / SIGTERM or lost its launcher, whether any rank saw a non-finite
        loss or gradient norm): one all-reduce (collective)."""
        flags = torch.tensor([1.0 if self.stop_flag.raised else 0.0, float(nonfinite)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        return stop > 0, bad > 0

    def save(self, step: int) -> None:
        state = {"step": step, "samples_consumed": step * self.plan.global_batch_size,
                 "global_batch_size": self.plan.global_batch_size, "domain_names": self.domain_names,
                 "objective": {"name": self.objective.name, "state": self.objective.state_dict()},
                 "mixing": {"policy": self.mixture.state_dict(), "stream": self.stream.state_dict()}}
        state.update(layout=self.layout, model_config=dict(vars(self.model_config)))  # exporters need no tokenizer
        self.last_checkpoint = ckpt.save_checkpoint(
            self.engine, self.checkpoint_dir, step, state, self.rank, self.plan.world_size,
            self.config.checkpoint.keep_last, self._barrier, hashing=self.config.checkpoint.verify)

    # --- the run ---------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to ``train.steps`` (or until a stop signal); returns a summary."""
        # Install the handlers first: a SIGUSR1 during set-up is then acted on after the first step.
        self.stop_flag.install()
        LauncherWatchdog(self.stop_flag.request).start()
        try:
            self.setup()
            return self._train()
        finally:
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            if self.run_lock is not None:
                self.run_lock.release()

    def _train(self) -> dict:
        config, steps = self.config, self.config.train.steps
        summary = {"status": "running", "start_step": self.next_step}
        record = None
        while self.next_step < steps:
            record = self.step()
            step = self.next_step
            stop, nonfinite = self.stop_requested(
                self.divergence.nonfinite(record, self.last_grad_norm, self.engine.was_step_applied()))
            if self.divergence.observe(nonfinite, record, self.last_grad_norm, self.last_checkpoint, step == steps):
                if stop:  # nothing non-finite is checkpointed: a requeued run resumes from the last good one
                    summary.update(status="stopped", step=step, signal=self.stop_flag.raised)
                    break
                continue
            if config.eval.interval and step % config.eval.interval == 0 and step < steps:
                self.evaluate(step)
            exit_now = bool(config.train.exit_interval and step % config.train.exit_interval == 0 and step < steps)
            if (config.checkpoint.interval and step % config.checkpoint.interval == 0) or stop or exit_now \
                    or step == steps:
                self.save(step)
            if stop or exit_now:
                reason = f"received {self.stop_flag.raised or 'a stop signal'}" if stop else "train.exit_interval"
                logger.warning("%s: checkpointed at step %d and stopping", reason, step)
                summary.update(status="stopped", step=step, signal=self.stop_flag.raised)
                break
        else:
            summary.update(status="completed", step=self.next_step)
            summary["eval"] = self.evaluate(self.next_step)
            summary["final_loss"] = record["loss"] if record is not None else None
            summary.update(self.objective.finish(self.run_dir, write=self.rank == 0))
            if self.mixture.dynamic and self.rank == 0:
                summary["mixing_weights"] = write_mixing_outputs(self.run_dir, self.stream_spec.domains)
            if config.checkpoint.export_model:
                export_model(self.trained, self.run_dir, self.rank)
        if self.rank == 0 and summary["status"] == "completed":
            with atomic_output(os.path.join(self.run_dir, "final.json"), "w") as handle:
                jsonio.dump(summary, handle, indent=1)
        return summary
