import numpy as np
import pytest
import torch

from hope.data import TokenDataset, build_loader, derive_seed, worker_init_fn
from hope.data.loader import IGNORE_INDEX


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_shapes_and_shifted_labels(prepared_small):
    loader = build_loader(prepared_small.dir, "train", 6, 64, seed=3, return_source=True)
    names = loader.source_names
    streams = {name: prepared_small.tokens(name, "train") for name in names}
    shard_ends = {name: set(np.cumsum([s["tokens"] for s in prepared_small.index["sources"][name]["splits"]["train"]["shards"]]))
                  for name in names}
    for batch in _batches(loader, 40):
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == labels.shape == (6, 64) and ids.dtype == labels.dtype == torch.int64
        assert torch.equal(labels[:, :-1], ids[:, 1:])
        for row in range(6):
            name = names[int(batch["source"][row])]
            start = int(batch["sequence_index"][row]) * 64
            assert np.array_equal(ids[row].numpy(), streams[name][start:start + 64])
            if start + 64 in shard_ends[name]:
                assert labels[row, -1] == IGNORE_INDEX  # shard end: nothing to predict
            else:
                assert labels[row, -1] == streams[name][start + 64]
    # a different seq_len re-chunks the same shards
    other = next(build_loader(prepared_small.dir, "train", 2, 100, seed=3))
    assert other["input_ids"].shape == (2, 100) and torch.equal(other["labels"][:, :-1], other["input_ids"][:, 1:])


def test_deterministic_from_seed(prepared_small):
    a = _batches(build_loader(prepared_small.dir, "train", 4, 64, seed=11), 10)
    b = _batches(build_loader(prepared_small.dir, "train", 4, 64, seed=11), 10)
    c = _batches(build_loader(prepared_small.dir, "train", 4, 64, seed=12), 10)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c))
    assert derive_seed(11, 1, 0) == derive_seed(11, 1, 0) != derive_seed(11, 1, 1)


def test_ddp_ranks_disjoint_and_covering(prepared_small):
    count = prepared_small.index["sources"]["bible"]["splits"]["train"]["sequences"]
    world = 3
    per_rank = count // world
    seen = []
    for rank in range(world):
        loader = build_loader(prepared_small.dir, "train", per_rank, 64, seed=5, rank=rank, world_size=world,
                              weights={"bible": 1.0}, return_source=True)
        first_epoch = next(loader)["sequence_index"].tolist()
        assert len(set(first_epoch)) == per_rank  # no repeats inside one epoch
        seen.append(set(first_epoch))
        # next epoch: a new permutation, again without repeats
        second = next(loader)["sequence_index"].tolist()
        assert len(set(second)) == per_rank and second != first_epoch
    for i in range(world):
        for j in range(i + 1, world):
            assert not seen[i] & seen[j]
    union = set().union(*seen)
    assert len(union) == per_rank * world and union <= set(range(count))


def test_val_pass_covers_everything(prepared_small):
    total = sum(prepared_small.index["sources"][n]["splits"]["val"]["sequences"] for n in prepared_small.sources)
    got = []
    for rank in range(2):
        loader = build_loader(prepared_small.dir, "val", 5, 64, rank=rank, world_size=2, return_source=True)
        batches = list(loader)
        assert len(batches) == len(loader)
        got += [(int(s), int(i)) for b in batches for s, i in zip(b["source"], b["sequence_index"])]
    assert len(got) == len(set(got)) == (total // 2) * 2
    # the last sequence of each shard has an ignored last label; the others predict the next token
    loader = build_loader(prepared_small.dir, "val", 1000, 64, return_source=True)
    batch = next(loader)
    assert (batch["labels"][:, -1] == IGNORE_INDEX).sum() == sum(
        len(prepared_small.index["sources"][n]["splits"]["val"]["shards"]) for n in prepared_small.sources)


def test_mixture_weights_honoured(prepared_small):
    loader = build_loader(prepared_small.dir, "train", 500, 64, seed=2, weights={"plays": 0.8, "bible": 0.2},
                          return_source=True)
    plays = loader.source_names.index("plays")
    sources = torch.cat([next(loader)["source"] for _ in range(8)])
    share = (sources == plays).double().mean().item()
    # binomial std for n=4000, p=0.8 is 0.0063; 4 sigma
    assert abs(share - 0.8) < 0.026
    # manifest weights by default (0.75 / 0.25)
    default = build_loader(prepared_small.dir, "train", 500, 64, seed=2, return_source=True)
    sources = torch.cat([next(default)["source"] for _ in range(8)])
    assert abs((sources == default.source_names.index("plays")).double().mean().item() - 0.75) < 0.028
    with pytest.raises(ValueError, match="weights"):
        build_loader(prepared_small.dir, "train", 2, 64, weights={"nope": 1.0})
    with pytest.raises(ValueError, match="weights"):
        build_loader(prepared_small.dir, "train", 2, 64, weights={"plays": 0.0, "bible": 0.0})


def test_resume_continues_with_the_exact_next_batch(prepared_small, tmp_path):
    kwargs = dict(seed=7, rank=1, world_size=2)
    loader = build_loader(prepared_small.dir, "train", 16, 64, **kwargs)
    _batches(loader, 37)  # crosses epoch boundaries of the smaller source
    state = loader.state_dict()
    torch.save(state, tmp_path / "state.pt")
    expected = _batches(loader, 5)
    resumed = build_loader(prepared_small.dir, "train", 16, 64, start_position=torch.load(tmp_path / "state.pt",
                                                                                          weights_only=False), **kwargs)
    by_count = build_loader(prepared_small.dir, "train", 16, 64, start_position=37, **kwargs)
    for want in expected:
        for other in (resumed, by_count):
            got = next(other)
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    assert resumed.state_dict()["batches"] == 42
    val = build_loader(prepared_small.dir, "val", 3, 64)
    next(val)
    rest = [b["input_ids"] for b in val]
    val2 = build_loader(prepared_small.dir, "val", 3, 64, start_position=1)
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(rest, val2, strict=True))
    with pytest.raises(ValueError, match="world_size"):
        build_loader(prepared_small.dir, "train", 16, 64, seed=7, rank=0, world_size=1, start_position=state)


def test_dataloader_workers_split_the_stream(prepared_small):
    dataset = TokenDataset(prepared_small.dir, "val", 64, seed=4)
    reference = torch.stack([b["input_ids"][0] for b in build_loader(prepared_small.dir, "val", 1, 64, seed=4)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, worker_init_fn=worker_init_fn)
    rows = torch.stack([sample["input_ids"] for sample in loader])
    assert rows.shape == reference.shape
    # workers interleave; together they yield each sequence exactly once
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, reference.tolist()))


def test_bad_loader_arguments(prepared_small):
    with pytest.raises(ValueError, match="rank"):
        build_loader(prepared_small.dir, "train", 2, 64, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        build_loader(prepared_small.dir, "test", 2, 64)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(prepared_small.dir, "train", 0, 64)
    with pytest.raises(TypeError, match="start_position"):
        build_loader(prepared_small.dir, "train", 2, 64, start_position="3")
