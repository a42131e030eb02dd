"""Triton backend of ``self_modifying_titans``: launchers of the four kernels (``kernels.py``) with chunk.py's tensor
lists, and the backend record. Two launches per pass: the generator pass and the memory pass (forward), the
memory pass then the generator pass (backward); the states travel between them in per-(b, h) packed working
copies ([G, 4, D E]: W1, W2, S1, S2 of each generator)."""
from __future__ import annotations

import math

import torch
import triton

from hope_kernels.backends import Backend, triton_runs_on
from hope_kernels.self_modifying_titans.chunk import OP, chunk_counts, supports_layer_call
from hope_kernels.self_modifying_titans.naive import NORM_EPS
from hope_kernels.self_modifying_titans.triton.kernels import (
    _gen_bwd_kernel,
    _gen_fwd_kernel,
    _mem_bwd_kernel,
    _mem_fwd_kernel,
    park_floats,
)

#: hidden units per state tile; warps per program; software-pipelining stages (1: none, whose prefetch buffers would
#: take shared memory beside every tile's); the products' precision: "ieee" exact fp32 as the reference computes
#: them, or "tf32x3" (three TF32 products per fp32 one, on tensor cores; its accuracy shows on a GPU only: the
#: interpreter computes fp32 whatever the setting)
TUNING = {"be": 32, "num_warps": 4, "num_stages": 1, "precision": "ieee"}
#: (largest generator chunk, largest M_mem chunk), as power-of-two tiles, per (head-dim tile, a backward follows).
#: Every launch compiled for sm_90 (bench/triton_resources.py, Triton 3.6 as on the GPU machine)
#: needs at most an H100's 227 KiB of shared memory. The memory pass's forward sets the M_mem caps (at D 128 it needs
#: 256 KiB at chunk 64); its backward reloads each chunk operand per product (kernels.py ``_operand``) and needs
#: 136 KiB at D 64, chunk 64 (336 KiB when the operands stayed in registers).
MAX_CHUNKS = {(64, False): (32, 64), (64, True): (32, 64), (128, False): (16, 32), (128, True): (16, 32)}
#: the largest head dim the kernels take (one [BT, BD] tile per token block): the largest tile above
MAX_D = max(tile for tile, _ in MAX_CHUNKS)


def _blocks(C: int, D: int, E: int) -> tuple[int, int, int, int]:
    BT = max(16, triton.next_power_of_2(C))
    return BT, max(16, triton.next_power_of_2(D)), max(16, min(TUNING["be"], triton.next_power_of_2(E))), \
        int(math.log2(BT))


def _launch_options() -> dict:
    return {"num_warps": TUNING["num_warps"], "num_stages": TUNING["num_stages"]}


def _precision() -> str:
    return TUNING["precision"]


def _pack(W1, W2, S1, S2, G: int) -> torch.Tensor:
    """[B, G H, ...] x 4 -> the kernels' working layout [B H, G, 4, D E] (a copy)."""
    B, GH = W1.shape[:2]
    H = GH // G
    parts = [x.reshape(B, G, H, -1) for x in (W1, W2, S1, S2)]
    return torch.stack(parts, dim=3).permute(0, 2, 1, 3, 4).reshape(B * H, G, 4, -1).contiguous()


def _unpack(work: torch.Tensor, B: int, H: int, G: int, D: int, E: int) -> list[torch.Tensor]:
    """The kernels' layout -> [B, G H, ...] x 4, each its own copy (the op's outputs may not alias each other, as
    views of one buffer would at B = H = G = 1)."""
    x = work.view(B, H, G, 4, D * E).permute(3, 0, 2, 1, 4)  # [4, B, G, H, D E]
    shapes = ((D, E), (E, D), (D, E), (E, D))
    return [x[i].clone(memory_format=torch.contiguous_format).view(B, G * H, *shapes[i]) for i in range(4)]


def _sizes(inputs, settings):
    xq = inputs[0]
    B, H, T, D = xq.shape
    G, E = inputs[3].shape[1] // H, inputs[3].shape[-1]
    counts = chunk_counts(T, settings.gen_chunk_size, settings.mem_chunk_size, settings.checkpoint_every)
    return (B, H, T, D, E, G, *counts)


def _l2n_bwd(x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d x of y = x / max(||x||, eps) (rows), from y and dy."""
    n = x.norm(dim=-1, keepdim=True)
    inner = (dy - y * (y * dy).sum(-1, keepdim=True)) / n.clamp_min(NORM_EPS)
    return torch.where(n > NORM_EPS, inner, dy / NORM_EPS)


class TritonKernel:
    @staticmethod
    def fwd(inputs, settings):
        xq, xk, xv, gW1, gW2, gS1, gS2, mW1, mW2, mS1, mS2, readout, bias, mom = inputs
        B, H, T, D, E, G, NCg, NCm, NK = _sizes(inputs, settings)
        dev, f32 = xq.device, torch.float32
        gen = _pack(gW1, gW2, gS1, gS2, G)
        mem = _pack(mW1, mW2, mS1, mS2, 1)
        new = torch.empty(B * H, 4, D * E, device=dev, dtype=f32)
        kvq = torch.empty(B, H, T, 3, D, device=dev, dtype=f32)
        gates = torch.empty(B, H, T, 2, device=dev, dtype=f32)
        gen_scale = torch.empty(B, H, NCg, G, device=dev, dtype=f32)
        mem_scale = torch.empty(B, H, NCm, device=dev, dtype=f32)
        gen_ckpt = torch.empty(B, H, NK, G, 4, D * E, device=dev, dtype=f32)
        mem_ckpt = torch.empty(B, H, NCm, 4, D * E, device=dev, dtype=f32)
        y = torch.empty(B, H, T, D, device=dev, dtype=f32)
        # checkpoint_every 0 (none wanted): the kernel stores chunk 0's state alone, into a scratch it drops
        every, ckpt = (settings.checkpoint_every, gen_ckpt) if NK else (NCg, gen_ckpt.new_empty(B, H, 1, G, 4, D * E))
        BT, BD, BE, LOG2 = _blocks(settings.gen_chunk_size, D, E)
        _gen_fwd_kernel[(B * H,)](
            xq, xk, xv, gen, new, readout, bias, mom, kvq, gates, gen_scale, ckpt,
            T, H, D, E, settings.gen_chunk_size, NCg, max(NK, 1), every, settings.gen_update_clip,
            BT=BT, BD=BD, BE=BE, LOG2_BT=LOG2, G=G, DGD=settings.dgd, NORM_V=settings.normalize_v,
            CLIP=settings.gen_update_clip > 0, PRECISION=_precision(), **_launch_options())
        BT, BD, BE, LOG2 = _blocks(settings.mem_chunk_size, D, E)
        _mem_fwd_kernel[(B * H,)](
            kvq, gates, mem, new, mom, y, mem_scale, mem_ckpt, T, H, D, E, settings.mem_chunk_size, NCm,
            settings.mem_update_clip, BT=BT, BD=BD, BE=BE, LOG2_BT=LOG2, DGD=settings.dgd,
            BEFORE=settings.readout_before, CLIP=settings.mem_update_clip > 0, PRECISION=_precision(),
            **_launch_options())
        store = torch.empty(B, H, 0, device=dev, dtype=f32)  # no chunk store: the backward recomputes on chip
        return [y, *_unpack(gen, B, H, G, D, E), *_unpack(mem, B, H, 1, D, E), kvq, gates, gen_scale, mem_scale,
                gen_ckpt, mem_ckpt, store]

    @staticmethod
    def store_floats(settings, T, D, E, G) -> int:
        return 0

    @staticmethod
    def bwd(grads, inputs, saved, settings, q_only=False):
        xq, xk, xv, gW1, gW2, gS1, gS2, mW1, mW2, mS1, mS2, readout, bias, mom = inputs
        kvq, gates, gen_ckpt, mem_ckpt, _store = saved
        dy, dgW1, dgW2, dgS1, dgS2, dmW1, dmW2, dmS1, dmS2 = grads
        B, H, T, D, E, G, NCg, NCm, NK = _sizes(inputs, settings)
        dev, f32 = xq.device, torch.float32
        dmem = _pack(dmW1, dmW2, dmS1, dmS2, 1)
        dgen = _pack(dgW1, dgW2, dgS1, dgS2, G)
        dn = torch.empty(B * H, 4, D * E, device=dev, dtype=f32)
        BT, BD, BE, LOG2 = _blocks(settings.mem_chunk_size, D, E)
        park = torch.empty(B * H, park_floats(BT, BD), device=dev, dtype=f32)
        dkvq = torch.empty(B, H, T, 3, D, device=dev, dtype=f32)
        dgates = torch.empty(B, H, T, 2, device=dev, dtype=f32)
        dmom_mem = torch.empty(B * H, device=dev, dtype=f32)
        _mem_bwd_kernel[(B * H,)](
            kvq, gates, mem_ckpt, dmem, dn, park, mom, dy, dkvq, dgates, dmom_mem, T, H, D, E,
            settings.mem_chunk_size, NCm, settings.mem_update_clip, BT=BT, BD=BD, BE=BE, LOG2_BT=LOG2,
            DGD=settings.dgd, BEFORE=settings.readout_before, CLIP=settings.mem_update_clip > 0, PARK=True,
            PRECISION=_precision(), **_launch_options())
        if q_only:  # q = l2n(xq) reaches only M_mem's reads: no generator pass
            return [_l2n_bwd(xq, kvq[..., 2, :], dkvq[..., 2, :]), *(torch.zeros_like(x) for x in inputs[1:])]
        work = torch.empty(B * H, G, 4, D * E, device=dev, dtype=f32)
        seg = torch.empty(B * H, settings.checkpoint_every, G, 4, D * E, device=dev, dtype=f32)
        new = torch.empty(B * H, 4, D * E, device=dev, dtype=f32)
        dxq, dxk, dxv = (torch.empty(B, H, T, D, device=dev, dtype=f32) for _ in range(3))
        dparams = torch.empty(B * H, 2 * D + 3, device=dev, dtype=f32)
        BT, BD, BE, LOG2 = _blocks(settings.gen_chunk_size, D, E)
        _gen_bwd_kernel[(B * H,)](
            xq, xk, xv, gen_ckpt, work, seg, new, dgen, dn, readout, bias, mom, dkvq, dgates, dxq, dxk, dxv, dparams,
            T, H, D, E, settings.gen_chunk_size, NCg, NK, settings.checkpoint_every, settings.gen_update_clip,
            BT=BT, BD=BD, BE=BE, LOG2_BT=LOG2, G=G, DGD=settings.dgd, NORM_V=settings.normalize_v,
            CLIP=settings.gen_update_clip > 0, PRECISION=_precision(), **_launch_options())
        p = dparams.view(B, H, 2 * D + 3).sum(0)  # [H, 2 D + 3]
        d_readout = torch.stack([p[:, :D], p[:, D:2 * D]])
        d_bias = p[:, 2 * D:2 * D + 2].t().contiguous()
        d_mom = torch.stack([p[:, 2 * D + 2], dmom_mem.view(B, H).sum(0)])
        return [dxq, dxk, dxv, *_unpack(dgen, B, H, G, D, E), *_unpack(dmem, B, H, 1, D, E), d_readout, d_bias, d_mom]


def supports(call) -> tuple[bool, str]:
    ok, why = supports_layer_call(call)
    if not ok:
        return ok, why
    if call.D > MAX_D:
        return False, f"takes head dim D <= {MAX_D}, got {call.D}"
    tile = max(64, triton.next_power_of_2(call.D))
    when = " when a backward follows" if call.backward else ""
    for name, cap in zip(("gen_chunk_size", "mem_chunk_size"), MAX_CHUNKS[(tile, call.backward)]):
        if triton.next_power_of_2(getattr(call, name)) > cap:
            return False, (f"takes {name} <= {cap} at D={call.D}{when} (a larger chunk's kernels need more shared "
                           f"memory than an H100 has), got {getattr(call, name)}")
    return True, ""


BACKEND = Backend(OP, "triton", priority=20, kernel=TritonKernel, runs_on=triton_runs_on, supports=supports,
                  env="HOPE_USE_TRITON")
