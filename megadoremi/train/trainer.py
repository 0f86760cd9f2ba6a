"""The training loop: DeepSpeed engine (ZeRO 0-3, or pipeline stages with ZeRO 0/1), per-domain losses,
evaluation, atomic checkpoints and exact resume, signal-triggered checkpoint-and-exit."""

import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist

from megadoremi.config import ConfigError, ExperimentConfig, save_config
from megadoremi.distributed.env import DistributedEnv
from megadoremi.model.gpt import GPT, token_losses
from megadoremi.model.presets import gpt_config_from_preset
from megadoremi.train import checkpoint as ckpt
from megadoremi.train.data import TrainBatches, eval_micro_batches
from megadoremi.train.metrics import MetricsWriter, truncate_jsonl
from megadoremi.train.plan import BatchPlan, build_ds_config, lr_at
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)


class DomainLossStats:
    """Per-domain sums of token losses and token counts (two length-k vectors), reduced with SUM."""

    def __init__(self, num_domains: int, device):
        self.num_domains, self.device = num_domains, device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)

    def add(self, losses: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """losses (batch, seq), domain_ids (batch,)."""
        domain_ids = domain_ids.to(self.device)
        self.sums.index_add_(0, domain_ids, losses.detach().to(torch.float64).sum(dim=1).to(self.device))
        self.counts.index_add_(0, domain_ids, torch.full_like(domain_ids, losses.shape[1], dtype=torch.float64))

    def reduced(self, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.cat([self.sums, self.counts])
        if dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return packed[: self.num_domains].cpu(), packed[self.num_domains:].cpu()


class _StopFlag:
    """Set by SIGUSR1 / SIGTERM (Slurm's warning before a time limit or preemption)."""

    def __init__(self):
        self.raised = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.raised = signal.Signals(signum).name


class Trainer:
    """Builds data, model and engine from an ExperimentConfig and runs the loop on every rank."""

    def __init__(self, config: ExperimentConfig, env: DistributedEnv, plan: BatchPlan):
        self.config, self.env, self.plan = config, env, plan
        self.rank = env.rank
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.run_dir = config.run_dir
        self.checkpoint_dir = os.path.join(self.run_dir, "checkpoints")
        self.pipeline = config.parallel.pipeline_stages > 1
        self.ds_config = build_ds_config(config, plan, self.cuda)
        self.stop_flag = _StopFlag()

    # --- set-up ------------------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _vocab_size(self) -> int:
        model = self.config.model
        if model.vocab_size is not None:
            return model.vocab_size
        if self.config.data.tokenizer_model:
            from megadoremi.data.tokenizer import Tokenizer

            return Tokenizer(self.config.data.tokenizer_model).vocab_size
        raise ConfigError("model.vocab_size or data.tokenizer_model is required to size the embedding")

    def build_model_config(self):
        model = self.config.model
        overrides = {k: v for k, v in (("mlp", model.mlp), ("norm", model.norm),
                                       ("tied_embeddings", model.tied_embeddings)) if v is not None}
        return gpt_config_from_preset(model.preset, self._vocab_size(), self.config.train.seq_length, **overrides)

    def build_data(self) -> None:
        from megadoremi.data.blending import build_blended_dataset, build_domain_eval_datasets, load_domain_weights

        data, train = self.config.data, self.config.train
        self.domain_names = list(data.domains)
        weights = load_domain_weights(data.weights, self.domain_names) if data.weights is not None else \
            [1.0 / len(self.domain_names)] * len(self.domain_names)
        self.domain_weights = [float(w) for w in weights]
        num_samples = train.steps * self.plan.global_batch_size
        self.train_dataset = build_blended_dataset(
            dict(data.domains), self.domain_weights, num_samples, seq_length=train.seq_length, seed=train.seed,
            split=data.split, split_index=0, cache_dir=data.cache_dir,
        )
        self.eval_datasets = build_domain_eval_datasets(
            dict(data.domains), seq_length=train.seq_length, seed=train.seed, split=data.split, split_index=1,
            cache_dir=data.cache_dir, max_samples_per_domain=self.config.eval.max_samples_per_domain,
        )

    def _param_groups(self, module: torch.nn.Module) -> list[dict]:
        decay, no_decay = [], []
        for param in module.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def build_engine(self) -> None:
        import deepspeed

        self.model_config = self.build_model_config()
        seed = self.config.train.seed
        torch.manual_seed(seed)
        checkpointing = self.config.model.activation_checkpointing
        self.loss_stats = DomainLossStats(len(self.domain_names), self.device)
        if self.pipeline:
            from megadoremi.model.pipeline import build_pipeline_model

            model = build_pipeline_model(self.model_config, self.config.parallel.pipeline_stages,
                                         self._pipeline_loss, seed=seed,
                                         activation_checkpoint_interval=1 if checkpointing else 0)
        else:
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config,
                                     enabled=self.config.parallel.zero_stage == 3):
                model = GPT(self.model_config, seed=seed, activation_checkpointing=checkpointing)
        config = self.config

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, config) / config.train.lr)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=self._param_groups(model), config=self.ds_config, lr_scheduler=schedule,
        )
        if not self.pipeline and self.plan.data_parallel_size == 1 and self.config.parallel.zero_stage == 0:
            # One replica: DeepSpeed would still flatten, "all-reduce" and unflatten every gradient each step.
            self.engine.enable_backward_allreduce = False
        if self.pipeline:
            self.dp_rank = self.engine.grid.get_data_parallel_rank()
            self.dp_group = self.engine.grid.get_data_parallel_group()
        else:
            self.dp_rank, self.dp_group = self.rank, None
        self.num_parameters = self.model_config.num_parameters()

    def _pipeline_loss(self, logits: torch.Tensor, labels) -> torch.Tensor:
        """Loss on the last pipeline stage: labels = (targets (batch, seq), domain_ids (batch,)), plus the
        reference losses for a DoReMi proxy's training micro-batches."""
        if len(labels) == 3:
            return self.dro.pipeline_loss(logits, labels)
        targets, domain_ids = labels
        losses = token_losses(logits, targets)
        self.loss_stats.add(losses, domain_ids)
        return losses.mean()

    # --- steps -------------------------------------------------------------------------------------------

    def _pipeline_items(self, micro_batches: list[dict]):
        for batch in micro_batches:
            tokens = batch["tokens"]
            yield tokens[:, :-1].contiguous(), (tokens[:, 1:].contiguous(), batch["domain_ids"])

    def _pipeline_reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Only last stages hold statistics (zeros elsewhere): a world-wide SUM gives the global totals.
        return self.loss_stats.reduced(group=None)

    def train_step(self, step: int) -> None:
        micro_batches = self.batches.micro_batches(step)
        self.loss_stats.reset()
        if self.dro is not None:
            if self.pipeline:
                self.dro.pipeline_train_step(micro_batches)
            else:
                self.dro.train_step(micro_batches)
            return
        if self.pipeline:
            self.engine.train_batch(data_iter=self._pipeline_items(micro_batches))
            return
        for batch in micro_batches:
            tokens = batch["tokens"].to(self.device)
            logits = self.engine(tokens[:, :-1])  # (batch, seq, vocab)
            losses = token_losses(logits, tokens[:, 1:])  # (batch, seq)
            self.engine.backward(losses.mean())
            self.engine.step()
            self.loss_stats.add(losses, batch["domain_ids"])

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Per-domain validation loss and perplexity, averaged over every validation token of every rank."""
        self.engine.eval()
        stats = DomainLossStats(len(self.domain_names), self.device)
        multiple = self.plan.grad_accum if self.pipeline else 1
        for domain_id, name in enumerate(self.domain_names):
            dataset = self.eval_datasets.get(name)
            if dataset is None:
                continue
            batches = eval_micro_batches(dataset, domain_id, self.plan, self.dp_rank,
                                         self.config.eval.max_samples_per_domain, multiple,
                                         batch_size=None if self.pipeline else
                                         self.config.eval.batch_size or self.plan.micro_batch_size)
            if self.pipeline:
                saved, self.loss_stats = self.loss_stats, stats
                try:
                    for start in range(0, len(batches), multiple):
                        self.engine.eval_batch(iter(list(self._pipeline_items(batches[start:start + multiple]))))
                finally:
                    self.loss_stats = saved
            else:
                for batch in batches:
                    tokens = batch["tokens"].to(self.device)
                    losses = token_losses(self.engine(tokens[:, :-1]), tokens[:, 1:])
                    if not batch.get("padding"):
                        stats.add(losses, batch["domain_ids"])
        sums, counts = stats.reduced(group=None if self.pipeline else self.dp_group)
        self.engine.train()
        per_domain = {name: float(sums[d] / counts[d]) for d, name in enumerate(self.domain_names) if counts[d] > 0}
        record = {"step": step, "val_loss": per_domain,
                  "val_ppl": {name: math.exp(min(loss, 50.0)) for name, loss in per_domain.items()}}
        if per_domain:
            record["val_loss_avg"] = sum(per_domain.values()) / len(per_domain)
            record["val_loss_worst"] = max(per_domain.values())
        self.metrics.eval(record)
        if per_domain:
            logger.info("eval step %d | avg %.4f | worst %.4f | %s", step, record["val_loss_avg"],
                        record["val_loss_worst"], " ".join(f"{k} {v:.3f}" for k, v in per_domain.items()))
        return record

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_flag.raised else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def trainer_state(self, step: int) -> dict:
        state = {"step": step, "samples_consumed": step * self.plan.global_batch_size,
                 "global_batch_size": self.plan.global_batch_size, "domain_names": self.domain_names}
        if self.dro is not None:
            state["doremi"] = self.dro.state_dict()
        return state

    def save(self, step: int) -> None:
        ckpt.save_checkpoint(self.engine, self.checkpoint_dir, step, self.trainer_state(step), self.rank,
                             self.config.checkpoint.keep_last, self._barrier)

    # --- the run ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(self.config, os.path.join(self.run_dir, "config.yaml"))
            with atomic_output(os.path.join(self.run_dir, "ds_config.json"), "w") as handle:
                json.dump({**self.ds_config, "megadoremi_batch_plan": self.plan.to_dict()}, handle, indent=2)
        self._barrier()
        self.build_data()
        self.build_engine()
        self.dro = None
        if self.config.doremi.enabled:
            from megadoremi.doremi.proxy import DROHook

            self.dro = DROHook(self)
        self.batches = TrainBatches(self.train_dataset, self.plan, self.dp_rank)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank == 0)
        self.start_step = 0
        resume_from = ckpt.resolve_resume(self.config.checkpoint.resume, self.checkpoint_dir)
        if resume_from:
            state = ckpt.load_checkpoint(self.engine, resume_from, self.rank)
            if state["global_batch_size"] != self.plan.global_batch_size:
                raise ConfigError(
                    f"{resume_from}: checkpoint was written with global batch {state['global_batch_size']}, "
                    f"this run has {self.plan.global_batch_size}; the data position would not match"
                )
            self.start_step = state["step"]
            if self.dro is not None:
                self.dro.load_state_dict(state["doremi"])
            if self.rank == 0:
                for name in ("metrics.jsonl", "eval.jsonl", "doremi_trajectory.jsonl"):
                    truncate_jsonl(os.path.join(self.run_dir, name), self.start_step)
        logger.info(
            "model %s: %.1fM parameters | world %d = %d pipeline x %d data-parallel | global batch %d x %d tokens"
            " | ZeRO %d | %s", self.config.model.preset, self.num_parameters / 1e6, self.plan.world_size,
            self.plan.pipeline_stages, self.plan.data_parallel_size, self.plan.global_batch_size,
            self.plan.seq_length, self.config.parallel.zero_stage, "bf16" if self.ds_config["bf16"]["enabled"] else "fp32",
        )

    def run(self) -> dict:
        """Train to ``train.steps`` (or until a stop signal); returns a summary."""
        # Install the handlers first: a SIGUSR1 during set-up is then acted on after the first step.
        self.stop_flag.install()
        self.setup()
        config = self.config
        steps = config.train.steps
        summary = {"status": "running", "start_step": self.start_step}
        step = self.start_step
        while step < steps:
            lr = self.engine.get_lr()[0]
            started = time.perf_counter()
            self.train_step(step)
            sums, counts = self._pipeline_reduced() if self.pipeline else self.loss_stats.reduced(self.dp_group)
            elapsed = time.perf_counter() - started
            step += 1
            if self.dro is not None:
                self.dro.append_trajectory()
            loss = float(sums.sum() / counts.sum())
            if step % config.train.log_interval == 0 or step == steps:
                self._log_step(step, loss, lr, elapsed, sums, counts)
            if config.eval.interval and step % config.eval.interval == 0 and step < steps:
                self.evaluate(step)
            stop = self._stop_requested()
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
            summary.update(status="completed", step=step)
            summary["eval"] = self.evaluate(step)
            summary["final_loss"] = loss if steps > self.start_step else None
            if self.dro is not None:
                summary["domain_weights"] = self.dro.write_outputs()
            if self.config.checkpoint.export_model:
                from megadoremi.train.export import export_model

                export_model(self.engine, self.model_config, self.run_dir, self.rank, self.pipeline,
                             self.config.parallel.zero_stage)
        if self.rank == 0 and summary["status"] == "completed":
            with atomic_output(os.path.join(self.run_dir, "final.json"), "w") as handle:
                json.dump(summary, handle, indent=1)
        self.metrics.close()
        return summary

    def _log_step(self, step, loss, lr, elapsed, sums, counts) -> None:
        tokens_per_second = self.plan.tokens_per_step / max(elapsed, 1e-9)
        per_domain = {name: float(sums[d] / counts[d]) for d, name in enumerate(self.domain_names) if counts[d] > 0}
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_second": tokens_per_second,
                  "step_time_s": elapsed, "domain_loss": per_domain,
                  "samples": step * self.plan.global_batch_size}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.dro is not None:
            record.update(self.dro.metrics())
        self.metrics.train(record)
        logger.info("step %d/%d | loss %.4f | lr %.3e | %.0f tokens/s%s", step, self.config.train.steps, loss, lr,
                    tokens_per_second, f" | grad norm {float(grad_norm):.3f}" if grad_norm is not None else "")
