"""Float64 per-token oracles of the memory layers, written from the papers' equations with plain loops over
samples, heads and tokens. They share no code with hope/layers or hope_kernels: each takes a layer only to read its
parameters (as float64 leaves, so every parameter gradient can be compared) and recomputes the layer from scratch.

Titans = arXiv 2501.00663, NL = arXiv 2512.24695.
- ``titan_layer_oracle``: the Titans memory layer (Titans sec. 3.1-3.2, eq. 12-14; DGD: NL eq. 56-57, 88).
- ``hope_block_oracle``: a HOPE block, self-modifying Titans (NL eq. 83-94) + the CMS chain (NL eq. 70-71).
``chunk``: the inner gradients of token t are taken at the memory's state at the start of t's chunk (Titans
sec. 3.2, NL eq. 90); ``chunk=1`` is the per-token recurrence itself.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64
EPS = 1e-6


def params64(module) -> dict:
    """name -> float64 leaf copy of every parameter of ``module``."""
    return {n: p.detach().to(F64).clone().requires_grad_(True) for n, p in module.named_parameters()}


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + torch.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def l2n(x):
    return x / torch.clamp(torch.sqrt((x * x).sum()), min=EPS)


def rms(x, gain=None):
    y = x / torch.sqrt((x * x).mean() + EPS)
    return y if gain is None else y * gain


def causal_conv(w, x):
    """y_t[c] = sum_j w[c, 0, j] x_{t - (W-1) + j}[c], zeros before the start (x [T, C], w [C, 1, W])."""
    T, C = x.shape
    W = w.shape[-1]
    rows = []
    for t in range(T):
        acc = torch.zeros(C, dtype=x.dtype)
        for j in range(W):
            s = t - (W - 1) + j
            if s >= 0:
                acc = acc + w[:, 0, j] * x[s]
        rows.append(acc)
    return torch.stack(rows)


def mlp_mem(W1, W2, x):
    """M(x) = x + W1 gelu(W2 x) (Titans sec. 3.1 residual 2-layer memory)."""
    return x + W1 @ gelu(W2 @ x)


def inner_grads(Ws, read, k, v):
    """u = grad_W 0.5 ||M_W(k) - v||^2 at the given weights (Titans eq. 12), v a fixed target. The weights are
    cloned so the derivative is the inner one only; create_graph keeps the outer graph through the clone."""
    Wc = [w.clone() for w in Ws]
    err = read(*Wc, k) - v
    return torch.autograd.grad(0.5 * (err * err).sum(), Wc, create_graph=True)


def memory_step(Ws, Ss, us, k, lr, mom, decay, rule):
    """One token of the memory recurrence.
    titans (Titans eq. 13-14): S_t = mom S_{t-1} - lr u_t, W_t = (1 - decay) W_{t-1} + S_t.
    dgd (NL eq. 56-57, 88): the weight that reads k decays by ((1 - decay) I - lr k^ k^T) instead, k^ = k / ||k||."""
    Ss = [mom * S - lr * u for S, u in zip(Ss, us)]
    new = []
    for i, (W, S) in enumerate(zip(Ws, Ss)):
        if rule == "dgd" and i == len(Ws) - 1:  # the last weight reads k (linear: W; mlp: W2)
            kh = k / torch.clamp(torch.sqrt((k * k).sum()), min=EPS)
            W = (1 - decay) * W - lr * torch.outer(W @ kh, kh)
        else:
            W = (1 - decay) * W
        new.append(W + S)
    return new, Ss


def titan_layer_oracle(layer, x, chunk: int):
    """TitanMemory(x) from its parameters: returns (y [B, T, D] float64, params)."""
    P = params64(layer)
    B, T, D = x.shape
    H = layer.n_heads
    Dh = D // H
    x = x.to(F64)
    mlp = layer.memory == "mlp"
    read = mlp_mem if mlp else (lambda W, z: W @ z)
    out = torch.zeros(B, T, D, dtype=F64)
    for b in range(B):
        qkv = silu(causal_conv(P["conv.weight"], x[b] @ P["qkv.weight"].T))  # [T, 3D]
        g = sigmoid(x[b] @ P["gates.weight"].T + P["gates.bias"])  # [T, 3H]: lr, momentum, decay per head
        heads = []
        for h in range(H):
            Ws = [P["mem_w1"][h], P["mem_w2"][h]] if mlp else [P["mem_w"][h]]
            Ss = [torch.zeros_like(w) for w in Ws]
            Wc = Ws
            ys = []
            for t in range(T):
                if t % chunk == 0:
                    Wc = Ws  # chunk-start state: every gradient of this chunk is taken here
                q = l2n(qkv[t, h * Dh:(h + 1) * Dh])
                k = l2n(qkv[t, D + h * Dh:D + (h + 1) * Dh])
                v = qkv[t, 2 * D + h * Dh:2 * D + (h + 1) * Dh]
                lr, mom, decay = g[t, h], g[t, H + h], g[t, 2 * H + h]
                us = inner_grads(Wc, read, k, v)
                Ws, Ss = memory_step(Ws, Ss, us, k, lr, mom, decay, layer.rule)
                ys.append(rms(read(*Ws, q), P["out_norm.weight"]))  # y_t = M_t(q_t), then RMSNorm per head
            heads.append(torch.stack(ys))
        y = torch.cat(heads, -1)  # [T, D]
        out[b] = (y * silu(x[b] @ P["gate.weight"].T)) @ P["out.weight"].T
    return out, P


def selfmod_oracle(P, prefix, layer, x, gen_chunk: int, mem_chunk: int):
    """Self-modifying Titans (NL eq. 83-94) of one sample x [T, D] from the float64 parameters P."""
    T, D = x.shape
    H = layer.n_heads
    Dh = D // H
    names = list(layer.generators)  # stacking order of the generator heads: index = gi * H + h
    G = len(names)
    p = lambda n: P[prefix + n]  # noqa: E731
    xin = silu(causal_conv(p("conv.weight"), x @ p("inp.weight").T))  # [T, 3D]: x_q, x_k, x_v
    rule = layer.rule
    heads = []
    for h in range(H):
        xq = [xin[t, h * Dh:(h + 1) * Dh] for t in range(T)]
        xk = [xin[t, D + h * Dh:D + (h + 1) * Dh] for t in range(T)]
        xv = [xin[t, 2 * D + h * Dh:2 * D + (h + 1) * Dh] for t in range(T)]
        gen = {n: [p("gen_w1")[gi * H + h], p("gen_w2")[gi * H + h]] for gi, n in enumerate(names)}
        gen_S = {n: [torch.zeros_like(w) for w in gen[n]] for n in names}
        if layer.momentum:
            mom_gen, mom_mem = sigmoid(p("momentum_logit")[0, h]), sigmoid(p("momentum_logit")[1, h])
        else:
            mom_gen = mom_mem = torch.zeros((), dtype=F64)
        # generated per-token quantities (NL eq. 83, chunk-wise eq. 90: read with the chunk-start generators)
        ks, vs, qs, etas, alphas = [], [], [], [], []
        gen_c = gen
        for t in range(T):
            if t % gen_chunk == 0:
                gen_c = {n: list(w) for n, w in gen.items()}
            M = lambda n, z: mlp_mem(gen_c[n][0], gen_c[n][1], z)  # noqa: E731
            k = l2n(M("k", xk[t]))
            v = M("v", xv[t])
            if layer.normalize_v:
                v = l2n(v)
            eta = sigmoid((p("gate_readout")[0, h] * M("eta", xk[t])).sum() + p("gate_bias")[0, h])
            alpha = sigmoid((p("gate_readout")[1, h] * M("alpha", xk[t])).sum() + p("gate_bias")[1, h])
            q = l2n(M("q", xq[t])) if layer.adaptive_q else l2n(xq[t])
            ks.append(k), vs.append(v), qs.append(q), etas.append(eta), alphas.append(alpha)
            if not layer.selfmod:
                continue
            for n in names:  # every generator learns its self-generated target v^_n = M_n(v_t) (eq. 88-90)
                v_hat = M(n, v)
                us = inner_grads(gen_c[n], mlp_mem, k, v_hat)
                gen[n], gen_S[n] = memory_step(gen[n], gen_S[n], us, k, eta, mom_gen, alpha, rule)
        # M_mem over the same keys, values and gates; its gradients at its own chunk-start state
        Wm = [p("mem_w1")[h], p("mem_w2")[h]]
        Sm = [torch.zeros_like(w) for w in Wm]
        Wm_c = Wm
        os_ = []
        for t in range(T):
            if t % mem_chunk == 0:
                Wm_c = Wm
            before = mlp_mem(*Wm, qs[t])  # o_t = M_{t-1}(q_t) (eq. 83, 94)
            us = inner_grads(Wm_c, mlp_mem, ks[t], vs[t])
            Wm, Sm = memory_step(Wm, Sm, us, ks[t], etas[t], mom_mem, alphas[t], rule)
            o = before if layer.mem_readout == "before_update" else mlp_mem(*Wm, qs[t])
            os_.append(rms(o, p("out_norm.weight")))
        heads.append(torch.stack(os_))
    y = torch.cat(heads, -1)
    return (y * silu(x @ p("gate.weight").T)) @ p("out.weight").T


def cms_level(W1, W2, x):
    """f(x) = x + W2 gelu(W1 rmsnorm(x)) (NL eq. 70, parameter-free RMSNorm inside the level)."""
    return x + W2 @ gelu(W1 @ rms(x))


def hope_block_oracle(block, x, *, gen_chunk: int, mem_chunk: int, cms_weights=None):
    """HopeBlock(x) with static CMS levels: returns (y [B, T, D] float64, params). ``cms_weights(b, t, j, W1, W2)``
    may return the weights level j uses at token t of sample b (the continual CMS); default: the slow weights."""
    P = params64(block)
    B, T, D = x.shape
    x = x.to(F64)
    out = torch.zeros(B, T, D, dtype=F64)
    for b in range(B):
        xn = torch.stack([rms(x[b, t], P["norm1.weight"]) for t in range(T)])
        z = x[b] + selfmod_oracle(P, "titans.", block.titans, xn, gen_chunk, mem_chunk)
        for j in range(len(block.cms.levels)):
            W1, W2 = P[f"cms.levels.{j}.w1"], P[f"cms.levels.{j}.w2"]
            rows = []
            for t in range(T):
                w1, w2 = (W1, W2) if cms_weights is None else cms_weights(b, t, j, W1, W2)
                rows.append(cms_level(w1, w2, z[t]))
            z = torch.stack(rows)
        out[b] = z
    return out, P


def cms_continual_oracle(W1s, W2s, x, teach_x, teach_delta, *, period, lr, beta, fill=0, off=None, mom=None,
                         buf=None, start_grads=True):
    """One CMS level learning in context (NL eq. 70-71), token by token, for one sample.

    At every boundary (the open block reaching ``period`` tokens) the level fires momentum SGD on the block's
    tokens: g = grad_W sum_s <delta_s, f_W(x'_s)> (the errors at the level's output pulled back to its weights),
    m = beta m + g, W = W - lr m; token t reads y_t = f_W(x_t) with the weights current at t.
    ``start_grads=True``: every gradient at the weights the call starts with (chunk-parallel form); False: at the
    weights current at the boundary (sequential form). The update is a constant of the outer graph (first order):
    y_t depends on the slow weights W1s, W2s and on x_t only through the read.
    ``fill``, ``off``, ``mom``, ``buf``: a carried state (open block of ``fill`` (input, error) pairs, weight offsets
    and momenta). Returns (y [T, D], (off1, off2), (mom1, mom2), update count)."""
    E, D = W1s.shape
    off = off or (torch.zeros(E, D, dtype=F64), torch.zeros(D, E, dtype=F64))
    mom = mom or (torch.zeros(E, D, dtype=F64), torch.zeros(D, E, dtype=F64))
    block = list(buf or [])[:fill]
    start = (W1s.detach() + off[0], W2s.detach() + off[1])
    cur = list(start)
    m1, m2 = mom
    fired = 0
    ys = []

    def fire():
        nonlocal m1, m2, fired
        ref = start if start_grads else cur
        W1 = ref[0].clone().requires_grad_(True)
        W2 = ref[1].clone().requires_grad_(True)
        total = sum((d * cms_level(W1, W2, xs)).sum() for xs, d in block)
        g1, g2 = torch.autograd.grad(total, [W1, W2])
        m1, m2 = beta * m1 + g1, beta * m2 + g2
        cur[0], cur[1] = cur[0] - lr * m1, cur[1] - lr * m2
        fired += 1
        block.clear()

    for t in range(x.shape[0]):
        delta1, delta2 = cur[0] - start[0], cur[1] - start[1]  # in-context change, a constant of the outer graph
        ys.append(cms_level(W1s + off[0] + delta1, W2s + off[1] + delta2, x[t]))
        block.append((teach_x[t].detach(), teach_delta[t].detach()))
        if len(block) == period:
            fire()
    y = torch.stack(ys) if ys else x.new_zeros(0, D)
    return y, (cur[0] - W1s.detach(), cur[1] - W2s.detach()), (m1, m2), fired
