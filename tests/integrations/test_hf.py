"""HOPE memory on a frozen Hugging Face causal LM: exact base logits at init, only memory trains and is saved,
the memory learns in context what the frozen base cannot, and our trainer runs it end to end."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import LlamaForCausalLM  # noqa: E402

from hope.integrations.hf import HFMemoryConfig, HopeMemoryLM, build_for_run, load_checkpoint, plan_memory_model  # noqa: E402

from .conftest import tiny_llama_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(n_heads=2, mem_chunk_size=8, gen_chunk_size=8, chunk_size=8, cms_periods=(8,), cms_hidden=64)


def _wrapped(memory=("selfmod", "cms"), layers=(0, -1), vocab=64, seed=0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(vocab))
    reference = copy.deepcopy(base)
    return HopeMemoryLM(base, HFMemoryConfig(hf="", memory_layers=layers, memory=memory, **SMALL)), reference


@pytest.mark.parametrize("memory", [("selfmod", "cms"), ("titans",), ("cms",), ("selfmod",)])
def test_zero_gate_gives_the_base_logits_exactly(memory):
    model, reference = _wrapped(memory)
    ids = torch.randint(0, 64, (3, 21))
    labels = torch.randint(0, 64, (3, 21))
    out = model(ids, labels=labels)
    with torch.no_grad():
        base_logits = reference(ids).logits
    assert torch.equal(out.logits, base_logits)
    assert torch.equal(out.loss, F.cross_entropy(base_logits.reshape(-1, 64), labels.reshape(-1)))
    with model.memory_disabled():
        assert torch.equal(model(ids).logits, base_logits)
    assert sorted(model.memory) == ["0", "1"]


def test_only_memory_parameters_train_and_are_saved(tmp_path):
    model, reference = _wrapped()
    assert all(not p.requires_grad for p in model.base.parameters())
    model.train()
    assert not model.base.training and model.memory.training  # the frozen base keeps its eval mode
    base_before = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    memory_before = {n: p.detach().clone() for n, p in model.memory.named_parameters()}
    opt = torch.optim.AdamW(model.memory_parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 24))
    for _ in range(3):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in model.base.named_parameters())
    assert all(p.grad is None for p in model.base.parameters())
    changed = {n for n, p in model.memory.named_parameters() if not torch.equal(p, memory_before[n])}
    assert "0.gate" in changed and "1.titans.out.weight" in changed and "1.cms.levels.0.w2" in changed
    assert len(changed) >= 0.8 * len(memory_before)
    # the state dict (what checkpoints hold) is the memory only; the base comes from its name and revision
    keys = set(model.state_dict())
    assert keys and all(k.startswith("memory.") for k in keys)
    assert keys == {f"memory.{n}" for n in memory_before} | {f"memory.{n}" for n, _ in model.memory.named_buffers()}
    model.save_memory(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "memory.json").read_text())
    assert meta["model_config"]["memory_layers"] == [0, -1]
    restored = HopeMemoryLM.load_memory(tmp_path / "mem", base=copy.deepcopy(reference))
    assert torch.equal(restored(ids).logits, model(ids).logits)
    twin = copy.deepcopy(model)  # a copy's hooks drive the copy's memory, not the original's
    with torch.no_grad():
        twin.memory["1"].gate.zero_()
        twin.memory["0"].gate.zero_()
    assert torch.equal(twin(ids).logits, reference(ids).logits)
    assert not torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({k: v for k, v in model.state_dict().items() if "gate" not in k})


@pytest.mark.parametrize("adaptive_q, margin", [(False, 0.05), (True, 0.12)], ids=["paper_q", "adaptive_q"])
def test_memory_learns_a_repeated_sequence_the_frozen_base_cannot(adaptive_q, margin):
    """Random token strings repeated once: the first half is unpredictable for any model (chance = ln V); the
    second half repeats it. The frozen random base stays at chance on both halves; trained memory (the
    self-modifying Titans block, learning in context) brings the second half below chance: with the paper's
    non-adaptive q (measured 1.97 vs 2.09 after 80 steps) and further with ``adaptive_q`` (1.83). The generator
    update bound (``gen_update_clip``) is on: without it these 80 steps at lr 1e-2 run a generator away (NaN at
    step 69 at this seed), which fp32 rounding decides between the layer's loop and its fused op."""
    torch.manual_seed(0)
    V, L = 8, 8
    base = LlamaForCausalLM(tiny_llama_config(V))
    reference = copy.deepcopy(base)
    model = HopeMemoryLM(base, HFMemoryConfig(hf="", memory_layers=(-1,), memory=("selfmod",), n_heads=2,
                                              mem_chunk_size=L // 2, gen_chunk_size=L // 2, rule="titans",
                                              adaptive_q=adaptive_q, gen_update_clip=0.1))
    gen = torch.Generator().manual_seed(1)

    def batch(size):
        half = torch.randint(0, V, (size, L), generator=gen)
        seq = torch.cat([half, half], 1)
        return seq[:, :-1], seq[:, 1:]

    def halves(logits, y):
        first = F.cross_entropy(logits[:, :L - 1].reshape(-1, V), y[:, :L - 1].reshape(-1)).item()
        second = F.cross_entropy(logits[:, L:].reshape(-1, V), y[:, L:].reshape(-1)).item()
        return first, second

    x_eval, y_eval = batch(128)
    with torch.no_grad():
        base_first, base_second = halves(reference(x_eval).logits, y_eval)
    opt = torch.optim.AdamW(model.memory_parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(80):
        x, y = batch(32)
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mem_first, mem_second = halves(model(x_eval).logits, y_eval)
    chance = math.log(V)
    assert base_second > chance - 0.02 and base_first > chance - 0.02  # the frozen base cannot
    assert abs(mem_first - base_first) < 0.05                          # nothing to learn in the first half
    assert mem_second < base_second - margin, (mem_second, base_second)  # the memory recalls the first half


def test_bad_configs_are_refused_with_their_key():
    with pytest.raises(ValueError, match="model.memory_layers"):
        HFMemoryConfig(hf="x", memory_layers=())
    with pytest.raises(ValueError, match="model.memory"):
        HFMemoryConfig(hf="x", memory_layers=(0,), memory=("selfmod", "titans"))
    with pytest.raises(ValueError, match="model.memory"):
        HFMemoryConfig(hf="x", memory_layers=(0,), memory=("attention",))
    with pytest.raises(ValueError, match="model.gen_update_clip"):
        HFMemoryConfig(hf="x", memory_layers=(0,), gen_update_clip=float("inf"))
    with pytest.raises(ValueError, match="model.mem_readout"):
        HFMemoryConfig(hf="x", memory_layers=(0,), mem_readout="later")
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\]"):
        HFMemoryConfig.from_dict({"hf": "x", "layers": [0]})
    with pytest.raises(ValueError, match="out of range"):
        _wrapped(layers=(2,))
    with pytest.raises(ValueError, match="names a layer twice"):
        _wrapped(layers=(1, -1))
    with pytest.raises(ValueError, match="labels must have the shape"):
        _wrapped()[0](torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 5, dtype=torch.long))
    model = {"hf": "x", "memory_layers": [0]}
    with pytest.raises(ValueError, match="tokenizer.hf=x"):
        build_for_run(model, {"path": "tokenizer.model", "vocab_size": 4096})
    with pytest.raises(ValueError, match="mode"):
        build_for_run(model, {"hf": "x", "vocab_size": 10}, mode="online")
    with pytest.raises(ValueError, match="dist.fsdp"):
        build_for_run(model, {"hf": "x", "vocab_size": 10}, fsdp=True)


def test_dry_run_counts_base_and_memory(tiny_hf_folder):
    model = {"hf": str(tiny_hf_folder), "memory_layers": [1], **{k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in SMALL.items()}}
    _, vocab, total, trainable = plan_memory_model(model)
    built = HopeMemoryLM.from_pretrained(HFMemoryConfig.from_dict(model))
    assert (vocab, total, trainable) == (300, built.num_parameters(), built.num_parameters(trainable_only=True))
    assert plan_memory_model({**model, "hf": "no-such-org/no-such-model"})[2] is None  # not cached: no download


def test_trainer_trains_memory_on_a_frozen_hf_model(tiny_hf_folder, tmp_path):
    """Our trainer with ``model: {hf: <folder>, memory_layers: [...]}``, data tokenised by the base's own
    tokenizer: the checkpoint holds only memory weights plus the base's name and revision, and reloads."""
    import yaml
    from safetensors import safe_open

    from hope.train import Trainer, load_config

    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "hf_text", "out_dir": str(tmp_path / "prepared"), "seq_len": 32, "val_fraction": 0.1,
        "tokenizer": {"hf": str(tiny_hf_folder)},
        "sources": [{"name": "docs", "kind": "text", "paths": [str(REPO / "README.md"), str(REPO / "docs" / "*.md")],
                     "record": "line"}]}))
    model = {"hf": str(tiny_hf_folder), "memory_layers": [1], "memory": ["selfmod", "cms"], "n_heads": 2,
             "mem_chunk_size": 16, "gen_chunk_size": 8, "cms_periods": [8], "cms_hidden": 64}
    cfg = load_config(None, [f"name=hf", f"run_dir={tmp_path / 'run'}", "steps=3", "batch_size=2", "seq_len=32",
                             "eval_every=3", "eval_batches=1", "ckpt_every=3", "device=cpu", "log.wandb=disabled",
                             "log.progress=false", "log.plot=false", "optim.outer.lr=1e-2",
                             f"data.manifest={manifest}", f"model={json.dumps(model)}"])
    trainer = Trainer(cfg)
    base_before = {n: p.detach().clone() for n, p in trainer.model.base.named_parameters()}
    summary = trainer.train()
    assert summary["step"] == 3 and math.isfinite(summary["val_loss"])
    assert all(torch.equal(p, base_before[n]) for n, p in trainer.model.base.named_parameters())
    step_dir = tmp_path / "run" / "checkpoints" / "step_3"
    with safe_open(str(step_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("memory.1.") for k in keys)
    state = json.loads((step_dir / "state.json").read_text())
    assert state["model_config"]["hf"] == str(tiny_hf_folder) and "revision" in state["model_config"]
    assert state["tokenizer"]["path"].endswith("tokenizer_hf")
    reloaded, _ = load_checkpoint(tmp_path / "run")
    ids = torch.randint(0, 300, (1, 20))
    trainer.model.eval()
    assert torch.equal(reloaded(ids).logits, trainer.model(ids).logits)


def test_prepared_hf_tokenizer_is_verified(tiny_hf_folder, tmp_path):
    from hope.data import prepare, verify
    from hope.data.tokenizer import HFTokenizer, TokenizerChecksumError

    manifest = {"name": "t", "out_dir": str(tmp_path / "p"), "seq_len": 16, "val_fraction": 0.1,
                "tokenizer": {"hf": str(tiny_hf_folder)},
                "sources": [{"name": "readme", "kind": "text", "paths": [str(REPO / "README.md")], "record": "line"}]}
    prepared = prepare(__import__("hope.data.prepare", fromlist=["Manifest"]).Manifest.from_dict(manifest),
                       progress=False)
    tok = prepared.load_tokenizer()
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300 and prepared.index["tokenizer"]["hf"]
    first = prepared.tokens("readme")
    eos = int((first == tok.eos_id).nonzero()[0][0])
    assert tok.decode(first[:eos]) == next(line for line in (REPO / "README.md").read_text().splitlines() if line.strip())
    again = prepare(__import__("hope.data.prepare", fromlist=["Manifest"]).Manifest.from_dict(manifest), progress=False)
    assert again.tokenizer_sha256 == prepared.tokenizer_sha256  # same tokenizer files: same sha256, shards kept
    (prepared.tokenizer_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerChecksumError, match="tokenizer_hf"):
        verify(prepared.dir)
