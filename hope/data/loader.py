"""Streaming loader over prepared token shards: lazy memmaps, mixture weights, DDP sharding, exact resume.

    loader = build_loader(prepared_dir, "train", batch_size=8, seq_len=256, seed=0, rank=0, world_size=1)
    batch = next(loader)        # {"input_ids": LongTensor [B, T], "labels": LongTensor [B, T]}
    state = loader.state_dict() # data position; build_loader(..., start_position=state) continues exactly

Labels are the inputs shifted by one: ``labels[:, t] = input_ids[:, t + 1]``; the last position takes the
next token of the shard, or -100 (ignored) at a shard's end.

Train split (``loop=True``): an endless stream. Each sample first draws its source with probability
proportional to its weight (manifest weights, or ``weights`` here), then takes that source's next sequence in
a per-epoch permutation. The permutation of a source's epoch depends only on (seed, source, epoch) and is the
same on every rank; rank r takes positions r, r + W, ... of it, so ranks see disjoint sequences and together
cover the epoch (the last ``n mod W`` positions of each epoch are skipped so ranks stay in step).
Validation split (``loop=False``): one ordered pass over every sequence of the selected sources, rank r
taking sequences r, r + W, ... (truncated to the same count on every rank); the last batch may be smaller.

Random streams derive from the run seed with ``numpy.random.SeedSequence`` (``derive_seed``), so a run is
reproducible; ``TokenDataset`` + ``worker_init_fn`` serve torch ``DataLoader`` workers (worker w of N takes
every N-th sample of its rank, seeded from (seed, rank, worker)); the exact-resume path is ``TokenLoader``,
which reads in the training process (memmap reads cost microseconds per sequence).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hope.data.shards import SPLITS, open_shard, read_index, verify

IGNORE_INDEX = -100
_SOURCE_STREAM, _PERMUTATION_STREAM, _WORKER_STREAM = 1, 2, 3


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from the run seed and integer keys (rank, worker, source, epoch, ...)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def worker_init_fn(worker_id: int) -> None:
    """torch DataLoader hook: seed python/numpy/torch in each worker from the dataset's run seed and rank."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    seed, rank = (dataset.seed, dataset.rank) if isinstance(dataset, TokenDataset) else (torch.initial_seed(), 0)
    worker_seed = derive_seed(seed, _WORKER_STREAM, rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % (1 << 32))
    torch.manual_seed(worker_seed)


class _SourceSequences:
    """The sequences of one source/split: global index -> token slice, reading shards lazily."""

    def __init__(self, prepared_dir: Path, shards: list[dict], dtype: np.dtype, seq_len: int):
        self.prepared_dir = prepared_dir
        self.shards = shards
        self.dtype = dtype
        self.seq_len = seq_len
        self.per_shard = np.array([int(s["tokens"]) // seq_len for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.per_shard)]).astype(np.int64)
        self.count = int(self.starts[-1])
        self._maps: dict[int, np.memmap] = {}

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """Tokens of sequence ``index`` plus the next one when the shard has it; returns (tokens, label_of_last)."""
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        if shard not in self._maps:
            self._maps[shard] = open_shard(self.prepared_dir, self.shards[shard], self.dtype)
        data = self._maps[shard]
        offset = (index - int(self.starts[shard])) * self.seq_len
        window = np.asarray(data[offset: offset + self.seq_len + 1], dtype=np.int64)
        last_label = int(window[self.seq_len]) if window.size > self.seq_len else IGNORE_INDEX
        return window[: self.seq_len], last_label


class TokenLoader:
    """Batches from a prepared folder for one rank; an iterator with ``state_dict``/``load_state_dict``."""

    def __init__(self, prepared_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, weights: dict[str, float] | None = None,
                 start_position: int | dict | None = None, loop: bool | None = None, verify_data: bool = False,
                 tokenizer_sha256: str | None = None, return_source: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.prepared_dir = Path(prepared_dir)
        index = verify(self.prepared_dir, tokenizer_sha256) if verify_data or tokenizer_sha256 else \
            read_index(self.prepared_dir)
        self.index = index
        self.seq_len = int(seq_len or index["seq_len"])
        if self.seq_len < 1:
            raise ValueError(f"seq_len: expected an int >= 1, got {seq_len!r}")
        self.split, self.batch_size, self.seed = split, batch_size, int(seed)
        self.rank, self.world_size = rank, world_size
        self.loop = split == "train" if loop is None else bool(loop)
        self.return_source = return_source

        available = index["sources"]
        if weights is None:
            weights = {name: float(src["weight"]) for name, src in available.items()}
        if not isinstance(weights, dict):
            raise TypeError(f"weights: expected a dict source -> weight, got {type(weights).__name__}")
        unknown = set(weights) - set(available)
        if unknown:
            raise ValueError(f"weights: unknown sources {sorted(unknown)}; prepared sources are {sorted(available)}")
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"weights[{name!r}]: expected a number >= 0, got {w!r}")
        dtype = np.dtype(index["dtype"])
        self.source_names = [name for name in available if weights.get(name, 0.0) > 0]
        if not self.source_names:
            raise ValueError(f"weights: at least one source needs weight > 0, got {weights}")
        self.sources = {name: _SourceSequences(self.prepared_dir, available[name]["splits"][split]["shards"], dtype,
                                               self.seq_len) for name in self.source_names}
        for name, src in self.sources.items():
            if src.count < world_size:
                raise ValueError(f"source {name!r} has {src.count} {split} sequences of length {self.seq_len}, "
                                 f"fewer than world_size={world_size}; give it weight 0 or prepare more data")
        total = sum(weights[n] for n in self.source_names)
        self.probabilities = np.array([weights[n] / total for n in self.source_names], dtype=np.float64)
        self.cumulative = np.cumsum(self.probabilities)
        self.cumulative[-1] = 1.0
        self._reset()
        if start_position is not None:
            if isinstance(start_position, dict):
                self.load_state_dict(start_position)
            elif isinstance(start_position, int) and not isinstance(start_position, bool) and start_position >= 0:
                self.skip(start_position)
            else:
                raise TypeError(f"start_position: expected a state_dict or a batch count >= 0, got {start_position!r}")

    # --- position --------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.batches = 0
        self._rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, _SOURCE_STREAM, self.rank)))
        self._epoch = {name: 0 for name in self.source_names}
        self._cursor = {name: 0 for name in self.source_names}
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}
        self._position = 0  # val: next position in this rank's ordered list

    def state_dict(self) -> dict:
        return {"split": self.split, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "sources": list(self.source_names),
                "batches": self.batches, "rng": self._rng.bit_generator.state,
                "epoch": dict(self._epoch), "cursor": dict(self._cursor), "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seed", "world_size", "seq_len", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state_dict[{key!r}]={state.get(key)!r} does not match this loader's "
                                 f"{key}={getattr(self, key)!r}")
        if list(state["sources"]) != self.source_names:
            raise ValueError(f"state_dict['sources']={state['sources']} does not match this loader's sources "
                             f"{self.source_names} (weights changed?)")
        if state.get("rank") != self.rank:
            raise ValueError(f"state_dict['rank']={state.get('rank')} does not match this loader's rank={self.rank}")
        self.batches = int(state["batches"])
        self._rng.bit_generator.state = state["rng"]
        self._epoch = {k: int(v) for k, v in state["epoch"].items()}
        self._cursor = {k: int(v) for k, v in state["cursor"].items()}
        self._position = int(state["position"])
        self._perm_cache = {}

    def skip(self, n_batches: int) -> None:
        """Advance by ``n_batches`` without reading tokens (same position as consuming them)."""
        for _ in range(n_batches):
            if self._next_indices() is None:
                break
            self.batches += 1

    # --- sampling ---------------------------------------------------------------------------------------
    def _rank_order(self, name: str, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(name)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        count = self.sources[name].count
        source_key = self.source_names.index(name)
        permutation = np.random.Generator(np.random.PCG64(
            derive_seed(self.seed, _PERMUTATION_STREAM, source_key, epoch))).permutation(count)
        per_rank = count // self.world_size
        order = permutation[self.rank::self.world_size][:per_rank]
        self._perm_cache[name] = (epoch, order)
        return order

    def _val_order(self) -> list[tuple[int, int]]:
        if not hasattr(self, "_val_list"):
            items = [(s, i) for s, name in enumerate(self.source_names) for i in range(self.sources[name].count)]
            per_rank = len(items) // self.world_size
            self._val_list = items[self.rank::self.world_size][:per_rank]
        return self._val_list

    def _next_indices(self) -> list[tuple[int, int]] | None:
        """(source position, sequence index) for the next batch, advancing the position; None at the end."""
        if not self.loop:
            order = self._val_order()
            if self._position >= len(order):
                return None
            picked = order[self._position: self._position + self.batch_size]
            self._position += len(picked)
            return picked
        draws = self._rng.random(self.batch_size)
        picked = []
        for u in draws:
            s = int(np.searchsorted(self.cumulative, u, side="right"))
            s = min(s, len(self.source_names) - 1)
            name = self.source_names[s]
            order = self._rank_order(name, self._epoch[name])
            picked.append((s, int(order[self._cursor[name]])))
            self._cursor[name] += 1
            if self._cursor[name] >= len(order):
                self._epoch[name] += 1
                self._cursor[name] = 0
        return picked

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        picked = self._next_indices()
        if picked is None:
            raise StopIteration
        self.batches += 1
        inputs = np.empty((len(picked), self.seq_len), dtype=np.int64)
        labels = np.empty((len(picked), self.seq_len), dtype=np.int64)
        for row, (s, i) in enumerate(picked):
            tokens, last = self.sources[self.source_names[s]].read(i)
            inputs[row] = tokens
            labels[row, :-1] = tokens[1:]
            labels[row, -1] = last
        batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}
        if self.return_source:
            batch["source"] = torch.tensor([s for s, _ in picked], dtype=torch.int64)
            batch["sequence_index"] = torch.tensor([i for _, i in picked], dtype=torch.int64)
        return batch

    def __len__(self) -> int:
        if self.loop:
            raise TypeError("the train loader is endless (loop=True); it has no length")
        return -(-len(self._val_order()) // self.batch_size)


class TokenDataset(torch.utils.data.IterableDataset):
    """Per-sample view of a rank's stream for torch ``DataLoader`` workers (use ``worker_init_fn``).

    Worker w of N yields samples w, w + N, ... of the rank's stream, so workers never repeat each other.
    Yields {"input_ids": [T], "labels": [T]}; batch with the DataLoader's ``batch_size``.
    """

    def __init__(self, prepared_dir: str | os.PathLike, split: str, seq_len: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, weights: dict[str, float] | None = None, loop: bool | None = None):
        super().__init__()
        self.kwargs = dict(prepared_dir=prepared_dir, split=split, seq_len=seq_len, seed=seed, rank=rank,
                           world_size=world_size, weights=weights, loop=loop)
        self.seed, self.rank = int(seed), rank
        TokenLoader(batch_size=1, **self.kwargs)  # validate arguments now, in the main process

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        loader = TokenLoader(batch_size=1, **self.kwargs)
        number = 0
        while True:
            if number % workers != worker:
                loader.skip(1)  # another worker's sample: advance the position without reading tokens
                if not loader.loop and loader._position >= len(loader._val_order()):
                    return
            else:
                try:
                    batch = next(loader)
                except StopIteration:
                    return
                yield {"input_ids": batch["input_ids"][0], "labels": batch["labels"][0]}
            number += 1


def build_loader(prepared_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, weights: dict[str, float] | None = None,
                 start_position: int | dict | None = None, **kwargs) -> TokenLoader:
    """A ``TokenLoader`` (see module docstring); ``start_position`` is a ``state_dict()`` or a batch count."""
    return TokenLoader(prepared_dir, split, batch_size, seq_len, seed, rank, world_size, weights=weights,
                       start_position=start_position, **kwargs)


__all__ = ["TokenLoader", "TokenDataset", "build_loader", "derive_seed", "worker_init_fn", "IGNORE_INDEX"]
