"""The trainer: one loop for the CPU smoke run and multi-GPU runs (``python -m hope.train <config>``).

Read top to bottom: setup (distributed, seed, data, model, optimizers, resume) -> step loop (schedules,
forward in ``online`` or ``parallel`` mode, divergence guard, backward, gradient averaging, per-level
clipping, outer step, inner updates) -> eval / checkpoint / log.

Data parallelism is replicated (gradients all-reduced by ``distributed.average_gradients``) or, with
``dist.fsdp=true``, FSDP2 (``fully_shard`` per block, then the root; checkpoints gathered to the same
unsharded files as the replicated path).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

from hope.optim import build_optimizers, lr_at, memory_parameter_names, teach_scale_at
from hope.train import checkpoint as ckpt
from hope.train import distributed as D
from hope.train.config import TrainConfig, check_fsdp
from hope.train.logging import RunLogger
from hope_kernels._checks import value_checks_off

# test hook: comma-separated 0-based step attempts (calls of train_step, skipped ones included) whose loss is
# replaced by NaN, to exercise the divergence guard
NAN_STEPS_ENV = "HOPE_TEST_NAN_STEPS"
# test hook: comma-separated step attempts before whose forward every parameter is multiplied by NaN (the model
# has gone bad: the forward's gate checks raise "... contains NaN", and every later step is bad too until the
# guard rolls back to the last checkpoint)
NAN_PARAMS_ENV = "HOPE_TEST_NAN_PARAM_STEPS"
# test hook: comma-separated ranks the two hooks above act on (unset: every rank)
NAN_RANKS_ENV = "HOPE_TEST_NAN_RANKS"

# a value check's message about NaN / inf values, e.g. hope_kernels check_range's "lr contains NaN; expected
# values in [0.0, 1.0]" or check_float's "lr must not be NaN" (words, so "info" or "inference" do not match)
_NONFINITE_MESSAGE = re.compile(r"\bnan\b|\binf(inity)?\b|non-?finite|not finite", re.IGNORECASE)


def nonfinite_forward_error(exc: BaseException) -> str | None:
    """The message of ``exc`` when it reports non-finite values met in the forward (a diverged model: the
    divergence guard skips the step), else None (a programming error: the caller re-raises). Only ValueError,
    RuntimeError and FloatingPointError whose message names NaN / inf / non-finite values count; TypeErrors and
    shape, device or range errors about finite values never do."""
    if isinstance(exc, (ValueError, RuntimeError, FloatingPointError)) and _NONFINITE_MESSAGE.search(str(exc)):
        return f"{type(exc).__name__}: {exc}"
    return None


def _int_set(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


class _StateDictView:
    """What ``checkpoint.save_checkpoint`` needs of a model (``state_dict()``), for an FSDP model's gathered
    full state dict: the safetensors file is then the one the unsharded model writes."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return dict(self._state)


# ----------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_run_dir(cfg: TrainConfig, info: D.DistInfo) -> Path:
    previous = sorted(Path(cfg.out_dir).glob(f"{cfg.name}-*")) if cfg.resume == "auto" and not cfg.run_dir else []
    previous = [p for p in previous if ckpt.find_latest(p) is not None]
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    elif previous:  # resume=auto without run_dir: the newest run of this name that has a checkpoint
        run_dir = previous[-1]
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.out_dir) / f"{cfg.name}-{stamp}"
        if info.enabled:  # every rank must agree on the folder: rank 0's timestamp wins
            import torch.distributed as dist

            obj = [str(run_dir)]
            dist.broadcast_object_list(obj, src=0)
            run_dir = Path(obj[0])
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    return run_dir


def maybe_compile(model, enabled: bool):
    if not enabled:
        return model
    try:
        model.compile()
    except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
        warnings.warn(f"compile: torch.compile unavailable ({type(e).__name__}: {e}); running eager", stacklevel=2)
    return model


def _uncompile(model) -> None:
    model._compiled_call_impl = None


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from hope.data import prepare
        from hope.models import build_model, model_config_for

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.info = D.setup(cfg.device, cfg.dist.backend)
        self.fsdp = cfg.dist.fsdp
        if self.fsdp and not self.info.enabled:
            raise ValueError("dist.fsdp: needs several processes (torchrun --nproc_per_node=N, N > 1); "
                             "use dist.fsdp=false for a single process")
        self.device = self.info.device
        seed_everything(cfg.seed)

        # data: the manifest is prepared idempotently (rank 0 first, the others then only verify)
        if self.info.is_main:
            self.prepared = prepare(cfg.data.manifest, list(cfg.data.overrides), progress=False)
        D.barrier(self.info)
        if not self.info.is_main:
            self.prepared = prepare(cfg.data.manifest, list(cfg.data.overrides), progress=False)
        tok_vocab = int(self.prepared.index["tokenizer"]["vocab_size"])

        self.model_config = model_config_for(cfg.model, tok_vocab, seq_len=cfg.seq_len)
        check_fsdp(cfg, self.model_config.teach_signal)
        self.model = build_model(self.model_config).to(self.device)
        if self.fsdp:  # before the optimizers: they must hold the sharded parameters
            # online mode: the CMS levels read their blocks' slow weights between the segment forwards (outside
            # FSDP's hooks), so the blocks keep them gathered from forward to backward (weights unsharded during
            # the step; gradients and optimizer states stay sharded)
            D.fully_shard_model(self.model, self.info, reshard_after_forward=cfg.mode != "online")
        self.memory_names = memory_parameter_names(self.model)
        self.optimizers = build_optimizers(self.model, cfg.optim.outer, self.device)
        self.run_dir = make_run_dir(cfg, self.info)
        self.step, self.tokens_seen, self.best_val = 0, 0, float("inf")
        self.train_loader = self._train_loader(None)

        start = self._resume_source()
        if start is not None:
            self.restore(start)
        self.model = maybe_compile(self.model, cfg.compile)
        self._compile_checked = not cfg.compile
        if self.info.is_main:
            resolved = cfg.to_dict()
            resolved["model_resolved"] = self.model_config.to_dict()
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.logger = RunLogger(self.run_dir, cfg, cfg.steps, self.step, enabled=self.info.is_main)

    # --------------------------------------------------------------------------------- data / resume
    def _train_loader(self, position):
        c = self.cfg
        return self.prepared.build_loader("train", c.batch_size, c.seq_len, seed=c.seed, rank=self.info.rank,
                                          world_size=self.info.world_size, weights=c.data.weights,
                                          start_position=position)

    def _resume_source(self) -> Path | None:
        r = self.cfg.resume
        if r == "none":
            return None
        if r == "auto":
            return ckpt.find_latest(self.run_dir)  # None: a fresh run
        return ckpt.resolve_step_dir(r)

    def restore(self, step_dir: Path) -> None:
        """Weights, optimizer moments, RNG, data position: exact continuation.
        Under FSDP collective: every rank reads the full files and keeps its shards."""
        state = ckpt.load_train_state(step_dir)
        if self.fsdp:
            from safetensors.torch import load_file

            D.load_full_model_state_dict(self.model, load_file(str(Path(step_dir) / "model.safetensors")))
            for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
                D.load_full_optimizer_state_dict(self.model, opt, sd)
        else:
            ckpt.load_weights(self.model, step_dir, device=self.device)
            for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(sd)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val = state.get("best_val", float("inf"))
        self.train_loader = self._train_loader(state["data"][self.info.rank])
        set_rng_state(state["rng"][self.info.rank])

    def save(self, val_loss: float | None) -> Path:
        """Collective (every rank contributes its data position and RNG); rank 0 writes."""
        data_state, rng = self.train_loader.state_dict(), rng_state()
        if self.info.enabled:
            import torch.distributed as dist

            gathered = [None] * self.info.world_size
            dist.all_gather_object(gathered, (data_state, rng))
            datas, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        else:
            datas, rngs = [data_state], [rng]
        path = self.run_dir / "checkpoints" / f"step_{self.step}"
        if self.fsdp:  # collective: the full (unsharded) weights and optimizer states, on rank 0's CPU
            weights = _StateDictView(D.full_model_state_dict(self.model))
            optimizers = [D.full_optimizer_state_dict(self.model, o) for o in self.optimizers]
        else:
            weights, optimizers = self.model, None
        if self.info.is_main:
            if optimizers is None:
                optimizers = [o.state_dict() for o in self.optimizers]
            train_state = {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                           "optimizers": optimizers, "data": datas, "rng": rngs,
                           "fast_state": None}  # each batch starts a fresh stream: no fast state between steps
            state_json = {"tokens_seen": self.tokens_seen, "model_config": self.model_config.to_dict(),
                          "tokenizer": {"path": str(self.prepared.tokenizer_path),
                                        "sha256": self.prepared.tokenizer_sha256},
                          "data_dir": str(self.prepared.dir), "config": self.cfg.to_dict(), "val_loss": val_loss,
                          "world_size": self.info.world_size}
            path = ckpt.save_checkpoint(self.run_dir, self.step, weights, train_state, state_json,
                                        keep=self.cfg.keep_checkpoints)
            if val_loss is not None and val_loss <= self.best_val:
                self.best_val = val_loss
                ckpt.mark_best(self.run_dir, self.step)
        D.barrier(self.info)
        return path

    # ----------------------------------------------------------------------------------------- steps
    def autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: dict, teach_scale: float):
        """Loss and telemetry of one batch in the configured mode."""
        from hope.models.online import online_forward

        x = batch["input_ids"].to(self.device)
        y = batch["labels"].to(self.device)
        with self.autocast():
            if self.cfg.mode == "online":
                res = online_forward(self.model, x, y, segment_len=self.cfg.segment_len, teach_scale=teach_scale)
                return res.loss, dict(res.metrics), None
            out = self.model(x, labels=y, teach_scale=teach_scale)
            return out.loss, dict(out.metrics), out

    def _forward_guarded(self, batch: dict, teach_scale: float):
        """``forward`` with the compile fallback; ``(loss, metrics, out, None)``, or ``(None, {}, None, detail)``
        when the forward stopped on non-finite values (``nonfinite_forward_error``): a bad step for the guard.

        Under FSDP the forward is collective (each block all-gathers its weights), so a rank cannot leave it
        half-way while the others go on: hope_kernels' raising value checks are off there and non-finite values
        reach the loss, which every rank checks after the forward."""
        checks = value_checks_off() if self.fsdp else contextlib.nullcontext()
        try:
            with checks:
                try:
                    res = self.forward(batch, teach_scale)
                except Exception as e:  # noqa: BLE001 - a failing compiled graph falls back to eager once
                    if self._compile_checked or nonfinite_forward_error(e) is not None:
                        raise
                    warnings.warn(f"compile: compiled forward failed ({type(e).__name__}: {e}); running eager",
                                  stacklevel=3)
                    _uncompile(self.model)
                    res = self.forward(batch, teach_scale)
        except (ValueError, RuntimeError, FloatingPointError) as e:
            detail = nonfinite_forward_error(e)
            if detail is None:
                raise
            if self.fsdp:  # a half-run forward may leave units unsharded
                D.reshard(self.model)
            return None, {}, None, detail
        self._compile_checked = True
        return (*res, None)

    @torch.no_grad()
    def _poison_parameters(self) -> None:
        for p in self.model.parameters():
            p.mul_(float("nan"))

    def clip(self) -> dict:
        """Per-level gradient clipping: memory/CMS parameters and the other slow weights separately."""
        mem, outer = [], []
        for n, p in self.model.named_parameters():
            if p.grad is not None:
                (mem if n in self.memory_names else outer).append(p)
        norms = {}
        for key, params, limit in (("grad_norm_outer", outer, self.cfg.optim.clip_outer),
                                   ("grad_norm_memory", mem, self.cfg.optim.clip_memory)):
            if not params:
                continue
            max_norm = limit if limit > 0 else float("inf")
            norms[key] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return norms

    def _skip(self, bad: list, **record) -> dict:
        """A skipped step's record: ``reason`` (the first bad rank's), its ``detail``, the bad ranks."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        reason, detail = bad[0][1]
        out = {"skipped": True, "reason": reason, **record}
        if detail:
            out["detail"] = detail
        if self.info.enabled:
            out["bad_ranks"] = [r for r, _ in bad]
        return out

    def train_step(self, batch: dict, hooks: dict) -> dict:
        """One outer step; a record with ``skipped`` (and ``reason``) when the divergence guard skipped it:
        the forward stopped on non-finite values, the loss or teach-signal norm is non-finite (or the latter
        above ``guard.max_teach_norm``), or the clipped gradient norm is non-finite. Every rank skips together."""
        c = self.cfg
        lr_mult = lr_at(self.step, c.steps, c.optim.outer.warmup_steps, c.optim.outer.min_lr_ratio)
        teach = teach_scale_at(self.step, c.steps, c.optim.teach.scale, c.optim.teach.warmup_steps,
                               c.optim.teach.decay_to)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
        hooked = hooks["ranks"] is None or self.info.rank in hooks["ranks"]
        if hooked and self._attempts in hooks["nan_params"]:
            self._poison_parameters()
        loss, metrics, out, detail = self._forward_guarded(batch, teach)
        if hooked and loss is not None and self._attempts in hooks["nan_loss"]:
            loss = loss * float("nan")
        self._attempts += 1
        teach_norm = float(metrics.get("teach_signal_norm", 0.0))
        if detail is not None:
            reason = ("nonfinite_forward", detail)
        elif not torch.isfinite(loss.detach()).item():
            reason = ("nonfinite_loss", None)
        elif not np.isfinite(teach_norm):
            reason = ("nonfinite_teach_signal_norm", None)
        elif teach_norm > c.guard.max_teach_norm:
            reason = ("teach_signal_norm_above_max", None)
        else:
            reason = None
        bad = D.bad_ranks(reason, self.info)
        if bad:
            return self._skip(bad, loss=float("nan") if loss is None else float(loss.detach()),
                              teach_signal_norm=teach_norm)

        loss.backward()
        if not self.fsdp:  # FSDP reduce-scatters (and averages) the gradients in the backward
            D.average_gradients(self.model, self.info)
        record = self.clip()
        if not all(np.isfinite(v) for v in record.values()):  # inf/NaN gradients: skip, never step on them
            # the norms are of the averaged gradients: the same on every rank, no agreement needed
            every = [(r, ("nonfinite_grad_norm", None)) for r in range(self.info.world_size)]
            return self._skip(every, loss=float(loss.detach()),
                              teach_signal_norm=teach_norm, **record)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        record.update({"loss": D.mean_scalar(float(loss.detach()), self.info), "lr": c.optim.outer.lr * lr_mult,
                       "teach_scale": teach, "teach_signal_norm": teach_norm})
        for k, v in metrics.items():
            if k not in record and isinstance(v, (int, float)):
                record[k] = float(v)
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first ``eval_batches`` batches (the same batches every time)."""
        c = self.cfg
        teach = teach_scale_at(self.step, c.steps, c.optim.teach.scale, c.optim.teach.warmup_steps, c.optim.teach.decay_to)
        self.model.eval()
        val = self.prepared.build_loader("val", c.batch_size, c.seq_len, seed=c.seed, rank=self.info.rank,
                                         world_size=self.info.world_size)
        total, count = 0.0, 0
        for i, batch in enumerate(val):
            if i >= c.eval_batches:
                break
            with self.autocast():
                out = self.model(batch["input_ids"].to(self.device), labels=batch["labels"].to(self.device),
                                 teach_scale=teach)
            total += float(out.loss)
            count += 1
        if self.fsdp:  # no backward follows to reshard the units that keep their weights after forward
            D.reshard(self.model)
        self.model.train()
        return D.mean_scalar(total / max(1, count), self.info)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        c = self.cfg
        hooks = {"nan_loss": _int_set(NAN_STEPS_ENV), "nan_params": _int_set(NAN_PARAMS_ENV),
                 "ranks": _int_set(NAN_RANKS_ENV) if os.environ.get(NAN_RANKS_ENV, "").strip() else None}
        self.model.train()
        bad_in_row, val_loss, self._attempts = 0, None, 0
        if self.step == 0 and c.ckpt_every and c.guard.max_bad_steps:
            self.save(None)  # a step-0 checkpoint gives the divergence guard something to roll back to
        t0, tokens_at_t0 = time.perf_counter(), self.tokens_seen
        while self.step < c.steps:
            t_step = time.perf_counter()
            batch = next(self.train_loader)
            record = self.train_step(batch, hooks)
            if record.get("skipped"):
                bad_in_row += 1
                self.logger.log({**record, "event": "skipped", "step": self.step, "bad_in_row": bad_in_row})
                if c.guard.max_bad_steps and bad_in_row >= c.guard.max_bad_steps:
                    last = ckpt.find_latest(self.run_dir)
                    if last is None:
                        raise RuntimeError(f"divergence: {bad_in_row} bad steps in a row and no checkpoint")
                    from_step = self.step
                    self.restore(last)
                    self.logger.log({"event": "rollback", "step": self.step, "from_step": from_step,
                                     "checkpoint": str(last)})
                    bad_in_row = 0
                continue
            bad_in_row = 0
            self.step += 1
            n_tokens = int(batch["input_ids"].numel()) * self.info.world_size
            self.tokens_seen += n_tokens
            elapsed = time.perf_counter() - t0
            record.update({"event": "train", "step": self.step, "tokens_seen": self.tokens_seen,
                           "step_time_s": time.perf_counter() - t_step, "elapsed_s": elapsed,
                           "tokens_per_s": (self.tokens_seen - tokens_at_t0) / max(elapsed, 1e-9)})
            if self.device.type == "cuda":  # peak since the start of the run, for throughput/memory reports
                record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.step % c.log.every == 0 or self.step == c.steps:
                self.logger.log(record)
            self.logger.progress(self.step, record["loss"], record["tokens_per_s"])
            is_last = self.step == c.steps
            if (c.eval_every and self.step % c.eval_every == 0) or is_last:
                val_loss = self.evaluate()
                self.logger.log({"event": "eval", "step": self.step, "val_loss": val_loss})
            if (c.ckpt_every and self.step % c.ckpt_every == 0) or is_last:
                self.save(val_loss if (c.eval_every and self.step % c.eval_every == 0) or is_last else None)
        self.logger.close()
        summary = {"run_dir": str(self.run_dir), "step": self.step, "tokens_seen": self.tokens_seen,
                   "val_loss": val_loss}
        D.teardown(self.info)
        return summary


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training for ``cfg``; returns ``{run_dir, step, tokens_seen, val_loss}``."""
    return Trainer(cfg).train()
