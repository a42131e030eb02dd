"""The trainer: one loop for the CPU smoke run and multi-GPU runs (``python -m hope.train <config>``).

Read top to bottom: setup (distributed, seed, run folder and its lock, data, model, optimizers, resume) -> the
loop (step, rollback, eval, checkpoint, log) -> one step (schedules, forward, guard, backward, gradient
averaging, per-level clipping, outer step). The step delegates to small components: the divergence guard
(guard.py) and checkpointing (checkpointer.py; the files: checkpoint.py); the run folder and its lock are
run_folder.py. What a run promises and how
each promise is tested: docs/runs.md.

Data parallelism is replicated (gradients all-reduced by ``distributed.average_gradients``) or, with
``dist.fsdp=true``, FSDP2 (``fully_shard`` per block, then the root; checkpoints gathered to the same
unsharded files as the replicated path).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

from hope.models.base import LanguageModel
from hope.optim import build_optimizers, lr_at, memory_parameter_names, teach_scale_at
from hope.train import checkpoint as ckpt
from hope.train import distributed as D
from hope.train.checkpointer import Checkpointer, set_rng_state
from hope.train.config import TrainConfig, check_fsdp
from hope.train.errors import RunError
from hope.train.guard import DivergenceGuard, Verdict
from hope.train.logging import RunLogger
from hope.train.run_folder import RunFolder, RunLock, open_run_folder
from hope_kernels._checks import NonFiniteError, value_checks_off


# ----------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def data_fingerprint(prepared) -> str:
    """sha256 of what the loader's stream depends on: each source's content, tokenisation and weight."""
    sources = {name: {"fingerprint": src["fingerprint"], "weight": src["weight"]}
               for name, src in prepared.index["sources"].items()}
    return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()


def maybe_compile(model, enabled: bool) -> bool:
    """``model.compile()`` in place when ``enabled``; False (one warning) when torch.compile is unavailable."""
    if not enabled:
        return False
    try:
        model.compile()
    except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
        warnings.warn(f"compile: torch.compile unavailable ({type(e).__name__}: {e}); running eager", stacklevel=2)
        return False
    return True


class Trainer:
    def __init__(self, cfg: TrainConfig):
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
        self.folder = self._open_run_folder()
        self.run_dir = self.folder.path
        try:
            self._setup()
        except BaseException:
            self._release_folder()
            raise

    def _open_run_folder(self) -> RunFolder:
        """Rank 0 picks, locks and checks the folder; every rank gets its path and the checkpoint to resume from."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        folder, error = None, None
        if self.info.is_main:
            try:
                folder = open_run_folder(self.cfg, stamp)
            except Exception as e:  # noqa: BLE001 - every rank raises it (from_main), none waits
                error = e
        shared = None if folder is None else (folder.path, folder.resume_from, folder.skipped)
        path, resume_from, skipped = D.from_main(shared, error, self.info)
        if folder is None:  # another rank: the folder without its lock
            folder = RunFolder(path, None, resume_from, skipped)
        D.barrier(self.info)
        return folder

    def _setup(self) -> None:
        from hope.data import prepare
        from hope.models import build_model, model_config_for

        cfg = self.cfg
        # data: the manifest is prepared idempotently (rank 0 first, the others then only verify)
        if self.info.is_main:
            self.prepared = prepare(cfg.data.manifest, list(cfg.data.overrides), progress=False)
        D.barrier(self.info)
        if not self.info.is_main:
            self.prepared = prepare(cfg.data.manifest, list(cfg.data.overrides), progress=False)
        tok_vocab = int(self.prepared.index["tokenizer"]["vocab_size"])

        if "hf" in cfg.model:  # a frozen Hugging Face LM with HOPE memory blocks: only they train and are saved
            from hope.integrations.hf import build_for_run

            self.model_config, model = build_for_run(cfg.model, self.prepared.index["tokenizer"], fsdp=self.fsdp,
                                                     mode=cfg.mode)
            self.model = model.to(self.device)
        else:
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
        self.guard = DivergenceGuard(cfg.guard, self.info)
        self.checkpointer = Checkpointer(self.run_dir, self.model, self.optimizers, self.info, self.fsdp,
                                         cfg.keep_checkpoints)
        self.step, self.tokens_seen, self.best_val = 0, 0, float("inf")
        self.train_loader = self._train_loader(None)

        log_records = 0  # a fresh run keeps no records of an earlier life of its folder
        start = self.folder.resume_from
        if start is not None:
            log_records = self.restore(start)
            if start.parent.parent.resolve() != self.run_dir.resolve():
                log_records = None  # another run's checkpoint: this folder's log is not its log
        self._compile = "unchecked" if maybe_compile(self.model, cfg.compile) else "off"
        if self.info.is_main:
            from hope.train.run_tokenizer import copy_tokenizer_into_run  # eval finds it beside the checkpoints
            copy_tokenizer_into_run(self.run_dir, self.prepared.tokenizer_path, self.prepared.tokenizer_sha256)
            resolved = cfg.to_dict()
            resolved["model_resolved"] = self.model_config.to_dict()
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.logger = RunLogger(self.run_dir, cfg, cfg.steps, self.step, enabled=self.info.is_main,
                                keep_records=log_records)
        if start is not None:
            self._announce_resume(start)

    def _announce_resume(self, start: Path) -> None:
        """A ``resume`` log record and one line on stderr: which checkpoint, and why newer ones were skipped."""
        skipped = self.folder.skipped
        self.logger.log({"event": "resume", "step": self.step, "checkpoint": start.name, "path": str(start),
                         "skipped": skipped})
        if self.info.is_main:
            print(f"[hope.train] resume from {start} (step {self.step})" +
                  "".join(f"; skipped {k}: {v}" for k, v in skipped.items()), file=sys.stderr)

    def _release_folder(self) -> None:
        if self.folder.lock is not None:
            self.folder.lock.release()

    # --------------------------------------------------------------------------------- data / resume
    def _train_loader(self, position):
        c = self.cfg
        return self.prepared.build_loader("train", c.batch_size, c.seq_len, seed=c.seed, rank=self.info.rank,
                                          world_size=self.info.world_size, weights=c.data.weights,
                                          start_position=position)

    def _check_same_data(self, step_dir: Path, meta: dict) -> None:
        """Refuse a checkpoint trained on another tokenizer or other data than this run's prepared data."""
        recorded = meta.get("tokenizer", {}).get("sha256")
        if recorded and recorded != self.prepared.tokenizer_sha256:
            raise RunError(f"resume: checkpoint {step_dir} was trained with tokenizer sha256 {recorded} "
                           f"({meta['tokenizer'].get('path')}), the prepared data has tokenizer sha256 "
                           f"{self.prepared.tokenizer_sha256} ({self.prepared.tokenizer_path}); resume with the "
                           "checkpoint's data manifest (data.manifest, data.overrides)")
        recorded = meta.get("data", {}).get("fingerprint")
        now = data_fingerprint(self.prepared)
        if recorded and recorded != now:
            raise RunError(f"resume: checkpoint {step_dir} was trained on data fingerprint {recorded} "
                           f"({meta['data'].get('dir')}), the prepared data {self.prepared.dir} has fingerprint {now} "
                           "(its sources, tokenisation or weights differ); resume with the checkpoint's data manifest")

    def restore(self, step_dir: Path) -> int | None:
        """Weights, optimizer moments, RNG, data position, guard: exact continuation.
        Collective. Returns the number of log records the run had written at that checkpoint."""
        step_dir = Path(step_dir)
        self._check_same_data(step_dir, json.loads((step_dir / "state.json").read_text()))
        state, data_position, rng = self.checkpointer.load(step_dir)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val = state.get("best_val", float("inf"))
        self.guard.load_state_dict(state.get("guard", {}))
        self.train_loader = self._train_loader(data_position)
        set_rng_state(rng)
        return state.get("log_records")

    def save(self, val_loss: float | None) -> Path:
        """Collective: a checkpoint of the current step (``best`` too when ``val_loss`` is the lowest yet)."""
        best = val_loss is not None and val_loss <= self.best_val
        if best:
            self.best_val = val_loss
        train_state = {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                       "guard": self.guard.state_dict(), "log_records": self.logger.records if self.info.is_main else 0}
        metadata = {"tokens_seen": self.tokens_seen, "model_config": self.model_config.to_dict(),
                    "tokenizer": {"path": str(self.prepared.tokenizer_path), "sha256": self.prepared.tokenizer_sha256},
                    "data_dir": str(self.prepared.dir),
                    "data": {"dir": str(self.prepared.dir), "manifest": self.prepared.index.get("manifest"),
                             "fingerprint": data_fingerprint(self.prepared)},
                    "config": self.cfg.to_dict(), "val_loss": val_loss, "world_size": self.info.world_size}
        path = self.checkpointer.save(self.step, train_state, self.train_loader.state_dict(), metadata)
        if best and self.info.is_main:
            ckpt.mark_best(self.run_dir, self.step)
        self.guard.checkpoint_written()
        return path

    def roll_back(self) -> None:
        """Back to the newest checkpoint that verifies, or DivergenceError when the guard's budget is spent."""
        target = self.checkpointer.newest()
        self.guard.check_rollback(self.step, target)
        from_step = self.step
        self.restore(target)
        self.logger.log({"event": "rollback", "step": self.step, "from_step": from_step, "checkpoint": str(target)})

    # ----------------------------------------------------------------------------------------- steps
    def autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _eager_if_compile_failed(self):
        """After a failed compiled forward every forward runs the model's eager code (torch.compiler stance)."""
        return torch.compiler.set_stance("force_eager") if self._compile == "failed" else contextlib.nullcontext()

    def forward(self, batch: dict, teach_scale: float):
        """Loss and telemetry of one batch in the configured mode."""
        from hope.models.online import online_forward

        x = batch["input_ids"].to(self.device)
        y = batch["labels"].to(self.device)
        with self.autocast(), self._eager_if_compile_failed():
            if self.cfg.mode == "online":
                res = online_forward(self.model, x, y, segment_len=self.cfg.segment_len, teach_scale=teach_scale)
                return res.loss, dict(res.metrics), None
            out = self.model(x, labels=y, **self._teach_kwargs(teach_scale))
            return out.loss, dict(out.metrics), out

    def _teach_kwargs(self, teach_scale: float) -> dict:
        # our models scale the CMS levels' in-context teach signal; a wrapped Hugging Face base has no such input
        return {"teach_scale": teach_scale} if isinstance(self.model, LanguageModel) else {}

    def _forward_or_eager(self, batch: dict, teach_scale: float):
        """``forward``; when the first compiled forward fails (for any reason but non-finite values): one warning,
        and this and every later forward run eagerly."""
        if self._compile != "unchecked":
            return self.forward(batch, teach_scale)
        try:
            res = self.forward(batch, teach_scale)
        except NonFiniteError:
            raise
        except Exception as e:  # noqa: BLE001 - a failing compiled graph falls back to eager once
            warnings.warn(f"compile: compiled forward failed ({type(e).__name__}: {e}); running eager", stacklevel=4)
            self._compile = "failed"
            return self.forward(batch, teach_scale)
        self._compile = "compiled"
        return res

    def _forward_checked(self, batch: dict, teach_scale: float):
        """``(loss, metrics, out, None)``, or ``(None, {}, None, error)`` when a value check met non-finite values
        (NonFiniteError: a bad step for the guard).

        Under FSDP the forward is collective (each block all-gathers its weights), so a rank cannot leave it
        half-way while the others go on: hope_kernels' raising value checks are off there and non-finite values
        reach the loss, which the guard checks on every rank."""
        checks = value_checks_off() if self.fsdp else contextlib.nullcontext()
        try:
            with checks:
                return (*self._forward_or_eager(batch, teach_scale), None)
        except NonFiniteError as e:
            if self.fsdp:  # a half-run forward may leave units unsharded
                D.reshard(self.model)
            return None, {}, None, f"{type(e).__name__}: {e}"

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

    def _skip(self, verdict: Verdict, **record) -> dict:
        """A skipped step's record: ``reason`` (the first bad rank's), its ``detail``, the bad ranks."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.guard.reject(verdict)
        out = {"skipped": True, "reason": verdict.reason, "loss": verdict.loss, **record}
        if verdict.detail:
            out["detail"] = verdict.detail
        if self.info.enabled:
            out["bad_ranks"] = list(verdict.ranks)
        return out

    def train_step(self, batch: dict) -> dict:
        """One outer step; a record with ``skipped`` (and ``reason``) when the divergence guard skipped it.
        Every rank skips together."""
        c = self.cfg
        lr_mult = lr_at(self.step, c.steps, c.optim.outer.warmup_steps, c.optim.outer.min_lr_ratio)
        teach = teach_scale_at(self.step, c.steps, c.optim.teach.scale, c.optim.teach.warmup_steps,
                               c.optim.teach.decay_to)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
        loss, metrics, out, error = self._forward_checked(batch, teach)
        teach_norm = float(metrics.get("teach_signal_norm", 0.0))
        verdict, mean_loss = self.guard.decide(loss, teach_norm, error)
        if verdict is not None:
            return self._skip(verdict, teach_signal_norm=teach_norm)

        loss.backward()
        if not self.fsdp:  # FSDP reduce-scatters (and averages) the gradients in the backward
            D.average_gradients(self.model, self.info)
        record = self.clip()
        if not all(math.isfinite(v) for v in record.values()):  # inf/NaN gradients: skip, never step on them
            # the norms are of the averaged gradients: the same on every rank, no agreement needed
            return self._skip(self.guard.every_rank("nonfinite_grad_norm", mean_loss), teach_signal_norm=teach_norm,
                              **record)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.guard.accept(mean_loss)
        record.update({"loss": mean_loss, "lr": c.optim.outer.lr * lr_mult, "teach_scale": teach,
                       "teach_signal_norm": teach_norm})
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
            with self.autocast(), self._eager_if_compile_failed():
                out = self.model(batch["input_ids"].to(self.device), labels=batch["labels"].to(self.device),
                                 **self._teach_kwargs(teach))
            total += float(out.loss)
            count += 1
        if self.fsdp:  # no backward follows to reshard the units that keep their weights after forward
            D.reshard(self.model)
        self.model.train()
        return D.mean_scalar(total / max(1, count), self.info)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Train to ``cfg.steps``; the run folder stays locked until this returns or raises."""
        if self.info.is_main and not (self.folder.lock and self.folder.lock.held):
            self.folder.lock = RunLock.acquire(self.run_dir)
        try:
            return self._loop()
        finally:
            self._release_folder()

    def _loop(self) -> dict:
        c = self.cfg
        self.model.train()
        val_loss = None
        if self.step == 0 and c.ckpt_every and c.guard.max_rollbacks:
            self.save(None)  # a step-0 checkpoint gives the divergence guard something to roll back to
        t0, tokens_at_t0 = time.perf_counter(), self.tokens_seen
        while self.step < c.steps:
            t_step = time.perf_counter()
            batch = next(self.train_loader)
            record = self.train_step(batch)
            if record.get("skipped"):
                self.logger.log({**record, "event": "skipped", "step": self.step, "bad_in_row": self.guard.bad_in_row})
                if self.guard.wants_rollback:
                    self.roll_back()
                continue
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
