"""FSDP2 (``dist.fsdp=true``) on 2 CPU processes with gloo: sharded training, checkpoints in the unsharded format,
resume and rollback under FSDP, and the config-time refusals.

Also the torchrun worker: ``python -m torch.distributed.run ... tests/train/test_fsdp.py [--nan-params=..] <config>
<out> [k=v ...]``
trains the real Trainer and writes what each rank saw to ``<out>/rank<r>.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _worker(argv: list[str]) -> None:
    from torch.distributed.tensor import DTensor

    from hope.train import load_config
    from tests.train.faults import FaultyTrainer, parse_fault_args

    faults, argv = parse_fault_args(argv)
    config, out = argv[0], Path(argv[1])
    cfg = load_config(config, argv[2:])
    trainer = FaultyTrainer(cfg, **faults)
    params = dict(trainer.model.named_parameters())
    embed = params["embed.weight"]
    seen = {"backend": trainer.info.backend, "world_size": trainer.info.world_size,
            "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
            "embed_placements": [repr(pl) for pl in embed.placements] if isinstance(embed, DTensor) else None,
            "embed_local_rows": int(embed.to_local().shape[0]) if isinstance(embed, DTensor) else None,
            "embed_rows": int(embed.shape[0])}
    summary = trainer.train()  # tears the process group down at the end
    (out / f"rank{trainer.info.rank}.json").write_text(json.dumps({**seen, "summary": summary}))


if __name__ == "__main__":
    _worker(sys.argv[1:])
    sys.exit(0)


import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hope.train import Trainer, load_config  # noqa: E402
from hope.train.checkpoint import load_train_state  # noqa: E402
from hope.train.logging import read_log  # noqa: E402
from tests.train.conftest import REPO, tiny_overrides  # noqa: E402

SMOKE = REPO / "hope" / "configs" / "smoke.yaml"
WORKER = Path(__file__).resolve()


def _torchrun(out: Path, args: list[str], faults: tuple = ()) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           *faults, str(SMOKE), str(out), *args]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _events(run_dir, event: str) -> list[dict]:
    return [r for r in read_log(Path(run_dir) / "log.jsonl") if r["event"] == event]


def test_fsdp_config_refusals_name_the_key(tmp_path, prepared_corpus):
    with pytest.raises(ValueError, match=r"^dist\.fsdp: mode=online with model\.teach_signal=exact"):
        load_config(SMOKE, ["dist.fsdp=true", "mode=online", "model={preset: smoke-hope, teach_signal: exact}"])
    # the shared teach signal is fine (configs/smoke.yaml itself now asks for exact)
    load_config(SMOKE, ["dist.fsdp=true", "mode=online", "model={preset: smoke-hope, teach_signal: shared}"])
    with pytest.raises(ValueError, match=r"^dist\.fsdp: needs several processes"):
        Trainer(load_config(SMOKE, tiny_overrides(tmp_path / "one", **{"dist.fsdp": "true"})))


@pytest.mark.distributed
def test_fsdp_two_cpu_processes_match_ddp_and_resume(tmp_path, prepared_corpus):
    """2 steps under FSDP, then a new FSDP job resumes from that checkpoint, rolls back to it once (its first
    attempt has NaN weights: a bad step) and trains to step 4. Losses and the step-4 weights match a replicated
    (DDP) run of 4 steps, and FSDP's checkpoint files have the replicated run's format."""
    common = dict(ckpt_every=2, eval_every=2, threads=1)
    ranks = _torchrun(tmp_path / "o1", tiny_overrides(tmp_path / "fsdp", steps=2, **common, **{"dist.fsdp": "true"}))
    for r in ranks:
        assert r["backend"] == "gloo" and r["world_size"] == 2 and r["all_dtensor"]
        assert r["embed_placements"] == ["Shard(dim=0)"] and r["embed_local_rows"] * 2 == r["embed_rows"]
    _torchrun(tmp_path / "o2", tiny_overrides(tmp_path / "fsdp", steps=4, resume="auto", **common,
                                              **{"dist.fsdp": "true", "guard.max_bad_steps": 1}),
              faults=("--nan-params=0",))
    _torchrun(tmp_path / "o3", tiny_overrides(tmp_path / "ddp", steps=4, **common))

    skipped = _events(tmp_path / "fsdp", "skipped")
    assert len(skipped) == 1 and skipped[0]["reason"] == "nonfinite_loss" and skipped[0]["bad_ranks"] == [0, 1]
    assert [r["step"] for r in _events(tmp_path / "fsdp", "rollback")] == [2]
    fsdp, ddp = _events(tmp_path / "fsdp", "train"), _events(tmp_path / "ddp", "train")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [1, 2, 3, 4]
    for a, b in zip(fsdp, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["grad_norm_outer"] == pytest.approx(b["grad_norm_outer"], rel=1e-4)
    val = [r["val_loss"] for r in _events(tmp_path / "fsdp", "eval")]
    assert val == pytest.approx([r["val_loss"] for r in _events(tmp_path / "ddp", "eval")], rel=1e-5)

    step_f, step_d = tmp_path / "fsdp" / "checkpoints" / "step_4", tmp_path / "ddp" / "checkpoints" / "step_4"
    assert sorted(os.listdir(step_f)) == sorted(os.listdir(step_d))
    wf, wd = load_file(step_f / "model.safetensors"), load_file(step_d / "model.safetensors")
    assert list(wf) == list(wd)
    for name in wd:
        assert wf[name].dtype == wd[name].dtype and wf[name].shape == wd[name].shape, name
        torch.testing.assert_close(wf[name], wd[name], rtol=1e-4, atol=1e-5, msg=name)
    sf, sd = (load_train_state(p) for p in (step_f, step_d))
    for of, od in zip(sf["optimizers"], sd["optimizers"], strict=True):
        assert of["param_groups"] == od["param_groups"] and of["state"].keys() == od["state"].keys()
        for i, state in od["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(of["state"][i][key], value, rtol=1e-3, atol=1e-6)
