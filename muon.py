"""
Muon for PRX: momentum, then Newton-Schulz orthogonalisation of each 2D weight matrix inside the transformer blocks;
AdamW for everything else. Under DDP each rank orthogonalises a disjoint share of the matrices and the results are
all-gathered (every rank's parameters identical; one process's within 1e-6, tested on CPU); under FSDP2 (train.py
--fsdp) each owner gathers its matrices' full gradients and scatters back the row shards (the scheme of muon_fsdp2,
used by PRX). Sources: Keller Jordan,
"Muon: An optimizer for hidden layers in neural networks" (2024); Liu et al. (Moonshot), "Muon is Scalable for LLM
Training" (2025; RMS matching, so Muon reuses AdamW's lr and weight decay). PRX (Photoroom, parts 2 and 3): Muon on
`blocks`' 2D weights, lr 1e-4, momentum 0.95, Nesterov, 5 steps, RMS matching, no weight decay; Adam elsewhere.

    python bench.py muon    # optimizer step time on the `small` preset's block matrices vs torch.optim.Muon
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

QUINTIC = (3.4445, -4.7750, 2.0315)  # Keller Jordan's: steep slope at 0 (3.4), S' still ends in ~[0.7, 1.2]


def newton_schulz(G, steps=5, eps=1e-7, dtype=torch.bfloat16, plain=False):
    """U S V^T -> about U S' V^T with S' in ~[0.7, 1.2]: `steps` quintic iterations in `dtype` on G / ||G||_F; in fp32
    or wider the Gram form where it takes fewer FLOPs, unless `plain` (bench.py's baseline). G is one (m, n) matrix
    or a stack (k, m, n) of them, each orthogonalised on its own. A tall matrix is multiplied from the right (X^T X
    is then the small side), which is the wide iteration on X^T without transposing any memory: transposed operands
    cost a copy inside every batched product."""
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (k, m, n)
    tall = X.size(1) > X.size(2)
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)  # ||X||_F >= spectral norm: every sv in [0, 1]
    if not plain and dtype.itemsize >= 4 and 2 * max(X.shape[1:]) > 3 * min(X.shape[1:]):
        X = gram_newton_schulz(X, steps, tall)
    else:
        a, b, c = QUINTIC
        for _ in range(steps):
            A = X.mT @ X if tall else X @ X.mT  # (k, s, s), s = min(m, n)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)  # a X + X B or B X
    return X.reshape(G.shape)


def gram_newton_schulz(X, steps, tall=False):
    """The same iterations on the (s, s) Gram matrices of a stack (k, m, n), s = min(m, n): Gram Newton-Schulz (Tri
    Dao's group, 2026, tridao.me/blog/2026/gram-newton-schulz). For a wide X each step is X <- Q X with
    Q = a + b A + c A^2 a polynomial of A = X X^T, so X_k = P_k X_0 with P_k = Q_k ... Q_1, and
    A_{k+1} = Q_k A_k Q_k = A_k Q_k^2 (polynomials of one matrix commute); a tall X is the transpose: A = X^T X,
    X_k = X_0 P_k. 4 s^2 l + 34 s^3 FLOPs for 5 steps against 20 s^2 l + 10 s^3 (l = max(m, n)): fewer where
    l > 1.5 s. In fp32 only: rounding in A's small eigenvalues grows with each step, which fp32 absorbs and half
    precision does not (the blog restarts the iteration midway there; not done here)."""
    a, b, c = QUINTIC
    A, P = (X.mT @ X if tall else X @ X.mT), None  # (k, s, s)
    for k in range(steps):
        Q = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        Q.diagonal(dim1=1, dim2=2).add_(a)
        P = Q if P is None else Q @ P
        if k < steps - 1:
            A = A @ Q @ Q
    return X @ P if tall else P @ X


def update_scale(shape, mode):
    rows, cols = shape
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))  # Moonshot: update RMS 0.2, like AdamW's
    return max(1, rows / cols) ** 0.5  # Keller Jordan's original


def assign_owners(costs, world_size):
    """Greedy balancing (largest first, to the least loaded rank); deterministic, so every rank agrees."""
    load, owners = [0] * world_size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):  # stable: ties keep parameter order
        owners[i] = min(range(world_size), key=load.__getitem__)
        load[owners[i]] += costs[i]
    return owners


def ns_cost(shape):
    return shape[0] * shape[1] * min(shape)  # Newton-Schulz FLOPs grow as rows * cols * min(rows, cols)


def all_gather_updates(updates, owners, params, rank, world_size, dtype):
    """Each rank sends its orthogonalised matrices as one flat buffer, padded to the largest share."""
    shares = [sum(p.numel() for p, o in zip(params, owners) if o == r) for r in range(world_size)]
    padding = torch.zeros(max(shares) - shares[rank], dtype=dtype, device=params[0].device)
    send = torch.cat([u.flatten() for u in updates if u is not None] + [padding])
    received = [torch.empty_like(send) for _ in range(world_size)]
    dist.all_gather(received, send)
    offsets, gathered = [0] * world_size, []
    for p, r in zip(params, owners):
        gathered.append(received[r][offsets[r]:offsets[r] + p.numel()].view(p.shape))
        offsets[r] += p.numel()
    return gathered


def local(t):
    """The part of a tensor this rank holds: a DTensor's shard (a view: writing to it writes the parameter), else
    the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_size(rows, world_size):
    return -(-rows // world_size)  # Shard(0) splits as torch.chunk: ceil(rows / world) rows a rank, the last short


def gather_to_owners(grads, owners, rank, world_size, dtype):
    """Row shards of each matrix -> the full matrix in `dtype` (what newton_schulz iterates in) on its owner, None on
    the other ranks. One gather per matrix, all in flight at once; shards are padded to equal size for the
    collective."""
    received, works = [], []
    for g, owner in zip(grads, owners):
        shard = local(g).to(dtype).contiguous()
        send = F.pad(shard, (0, 0, 0, shard_size(g.shape[0], world_size) - shard.shape[0]))
        recv = [torch.empty_like(send) for _ in range(world_size)] if owner == rank else None
        works.append(dist.gather(send, recv, dst=owner, async_op=True))
        received.append(recv)
    for work in works:
        work.wait()
    return [torch.cat(r)[:g.shape[0]] if r is not None else None for r, g in zip(received, grads)]


def scatter_shards(updates, owners, params, rank, world_size, dtype):
    """Each owner sends every rank the rows of its orthogonalised matrices that rank keeps -> this rank's shards."""
    received, works = [], []
    for u, owner, p in zip(updates, owners, params):
        size = shard_size(p.shape[0], world_size)
        recv = torch.empty(size, p.shape[1], dtype=dtype, device=local(p).device)
        # rows split off a padded (new, contiguous) tensor: contiguous, as the collective sends their memory
        send = list(F.pad(u, (0, 0, 0, size * world_size - u.shape[0])).split(size)) if owner == rank else None
        works.append(dist.scatter(recv, send, src=owner, async_op=True))
        received.append(recv)
    for work in works:
        work.wait()
    return [r[:local(p).shape[0]] for r, p in zip(received, params)]


class Muon(torch.optim.Optimizer):
    """Muon for 2D weights: single process, DDP (gradients already averaged, parameters replicated) or FSDP2
    (parameters and gradients DTensors sharded by rows, Shard(0), over all ranks).

    Under DDP every rank keeps the momentum of every matrix (cheap elementwise work), so the state is replicated and
    rank 0's state_dict resumes exactly under any world size; under FSDP2 each rank keeps the rows of its shards, and
    train.py gathers them into that same full state dict. Only the Newton-Schulz iterations are shared out."""

    def __init__(self, params, lr=1e-4, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5, eps=1e-7,
                 scale="match_rms_adamw", ns_dtype=None):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, ns_steps >= 1; got lr={lr}, "
                             f"weight_decay={weight_decay}, momentum={momentum}, ns_steps={ns_steps}")
        if scale not in ("match_rms_adamw", "original"):
            raise ValueError(f"scale must be 'match_rms_adamw' or 'original', got {scale!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        eps=eps, scale=scale)
        super().__init__(params, defaults)
        # Newton-Schulz in bf16 by default on CUDA (tensor cores; Keller Jordan's choice), in fp32 on the CPU, where
        # bf16 is emulated with AVX2 alone; train.py passes bf16 with --precision bf16 (fast with AMX or AVX512-BF16)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2D weight matrices only, got a parameter of shape "
                                     f"{tuple(p.shape)}; give it to AdamW (split_muon_params does this)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        params = [p for p, _ in work]
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        sharded = check_sharding(params, world_size)
        owners = assign_owners([ns_cost(p.shape) for p in params], world_size)
        grads = [self.momentum_step(p, group, sharded or owner == rank) for (p, group), owner in zip(work, owners)]
        dtype = self.ns_dtype or (torch.bfloat16 if params and local(params[0]).is_cuda else torch.float32)
        if sharded and distributed:
            grads = gather_to_owners(grads, owners, rank, world_size, dtype)
        updates = orthogonalise(grads, [group for _, group in work], dtype)
        if distributed and work:
            updates = (scatter_shards if sharded else all_gather_updates)(updates, owners, params, rank, world_size,
                                                                          dtype)
        for (p, group), update in zip(work, updates):
            if group["weight_decay"]:
                local(p).mul_(1 - group["lr"] * group["weight_decay"])  # decoupled (AdamW), not scaled by the shape
            local(p).add_(update, alpha=-group["lr"] * update_scale(p.shape, group["scale"]))
        return loss

    def momentum_step(self, p, group, needed):
        """Update p's momentum -> what Newton-Schulz orthogonalises (Nesterov: the gradient pulled towards the
        momentum), or None where this rank does not need it."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)  # EMA form of momentum (Keller Jordan; torch.optim.Muon)
        if not needed:
            return None
        return p.grad.lerp(buf, mu) if group["nesterov"] else buf


def orthogonalise(grads, groups, dtype):
    """Newton-Schulz of each matrix this rank needs (None: not needed), the matrices of one shape and settings
    stacked into one batched call: the per-call overhead is paid once a shape, not once a matrix."""
    updates, stacks = [None] * len(grads), {}
    for i, (g, group) in enumerate(zip(grads, groups)):
        if g is not None:
            stacks.setdefault((tuple(g.shape), group["ns_steps"], group["eps"]), []).append(i)
    for (shape, steps, eps), members in stacks.items():
        stacked = torch.empty(len(members), *shape, dtype=dtype, device=grads[members[0]].device)
        for row, i in zip(stacked, members):
            row.copy_(local(grads[i]))  # stacked and cast in one pass
        stacked = newton_schulz(stacked, steps, eps, dtype)
        for i, update in zip(members, stacked.unbind(0)):
            updates[i] = update
    return updates


def check_sharding(params, world_size):
    """-> whether the parameters are FSDP2's shards: all or none, sharded by rows over all ranks."""
    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded) and not all(s and p.placements == (Shard(0),) and p.device_mesh.size() == world_size
                                for p, s in zip(params, sharded)):
        raise ValueError("Muon takes plain tensors, or DTensors sharded by rows (Shard(0)) over all ranks as "
                         "FSDP2's fully_shard makes them, not a mix or another layout")
    return any(sharded)


def split_muon_params(model):
    """(muon_params, adamw_params): 2D weights inside `blocks` -> Muon; embeddings, final layer, norms, biases,
    auxiliary heads -> AdamW (PRX's split). Frozen parameters are left out."""
    muon_params, adamw_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            in_blocks = "blocks" in name.split(".")  # also under wrappers: module.blocks.0..., _orig_mod.blocks.0...
            (muon_params if in_blocks and p.ndim == 2 else adamw_params).append(p)
    return muon_params, adamw_params


def split_summary(muon_params, adamw_params):
    groups = {"muon": muon_params, "adamw": adamw_params}
    return "optimizer split: " + " | ".join(f"{name} {len(params)} tensors, {sum(p.numel() for p in params):,} "
                                            f"parameters" for name, params in groups.items())
