import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import muon
from muon import QUINTIC, Muon, assign_owners, newton_schulz, ns_cost, split_muon_params, split_summary

SHAPES = [(48, 32), (32, 80), (40, 40), (24, 56), (64, 16)]  # tall, wide and square
SHARDED = SHAPES + [(5, 12), (1, 8)]  # over 2 ranks: an odd row count, and fewer rows than ranks (an empty shard)


def make_params(shapes=SHAPES, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def set_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)  # the same on every rank, as after DDP's all-reduce
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(p.device)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if isinstance(p, DTensor) else grad


def train(params, steps):
    """Two param groups (different lr) so the per-group settings are exercised too."""
    opt = Muon([{"params": params[:2], "lr": 0.03}, {"params": params[2:]}], lr=0.02, weight_decay=0.1)
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return opt


@pytest.mark.parametrize("scale", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ns_steps", [5, 2])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_matches_torch_muon(scale, nesterov, ns_steps, device):
    ours, theirs = make_params(device=device), make_params(device=device)
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1, nesterov=nesterov, scale=scale, ns_dtype=torch.bfloat16,
                    ns_steps=ns_steps)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=scale,
                                  ns_steps=ns_steps)
    steps = 5
    for step in range(steps):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt_ours.step()
        opt_theirs.step()
    for a, b, shape in zip(ours, theirs, SHAPES):
        # Both run Newton-Schulz in bf16 with the same operations (bit-identical on this machine). A different
        # matmul reduction order may flip a bf16 rounding of an update entry (|entry| < 2): one ulp, 2^-7, times
        # lr * scale, per step. A wrong momentum, scale or decay moves the parameters by O(lr * scale).
        lr_scale = 0.02 * muon.update_scale(shape, scale)
        torch.testing.assert_close(a, b, rtol=0, atol=steps * lr_scale * 2**-7)


def test_the_defaults_are_prxs():
    """What train.py builds without naming them: momentum 0.95, Nesterov, the update scaled to AdamW's RMS
    (REFERENCE.md, PRX's Muon), as torch's Muon with those."""
    ours, theirs = make_params(), make_params()
    opt_ours = Muon(ours, lr=0.02, ns_dtype=torch.bfloat16)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True,
                                  adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            set_grads(params, step)
            opt.step()
    for a, b, shape in zip(ours, theirs, SHAPES):  # the tolerance of test_matches_torch_muon
        torch.testing.assert_close(a, b, rtol=0, atol=3 * 0.02 * muon.update_scale(shape, "match_rms_adamw") * 2**-7)


def test_newton_schulz_iterates_in_the_dtype_it_is_given():
    G = torch.randn(3, 8, 24, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        assert newton_schulz(G, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=(
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")))])
def test_newton_schulz_runs_in_the_devices_dtype_by_default(device, dtype):
    default, explicit = make_params(device=device), make_params(device=device)
    for params, kw in ((default, {}), (explicit, {"ns_dtype": dtype})):
        set_grads(params, 0)
        Muon(params, **kw).step()
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))


def test_newton_schulz_in_fp32_on_the_cpu():
    # the CPU default is fp32 (bf16 matmuls are emulated there); CUDA's is bf16 (test_matches_torch_muon)
    runs = {}
    for dtype in (None, torch.float32, torch.bfloat16):
        params = make_params()
        opt = Muon(params, lr=0.02, ns_dtype=dtype)
        set_grads(params, 0)
        opt.step()
        runs[dtype] = params
    assert all(torch.equal(a, b) for a, b in zip(runs[None], runs[torch.float32]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[None], runs[torch.bfloat16]))


def quintic(x):
    a, b, c = QUINTIC
    return a * x + b * x**3 + c * x**5


def svd_case(shape, s, seed=0):
    """A matrix U diag(s) V^T of the given singular values s (float64) with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    m = min(shape)
    U = torch.linalg.qr(torch.randn(shape[0], m, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(shape[1], m, dtype=torch.float64, generator=g))[0]
    return U, V, (U * s) @ V.T


def expected_singular_values(s, steps=5):
    """Closed form: the iteration acts on each singular value alone, O = U p(s / ||s||) V^T, p = quintic applied
    `steps` times."""
    expected = s / s.norm()
    for _ in range(steps):
        expected = quintic(expected)
    return expected


# bf16: 15 matmuls on O(1) values (unit roundoff 2^-8); the quintic contracts towards its band, so errors stay a few
# ulps (measured <= 0.01); 0.03 still fails for a wrong coefficient, step count or transpose. fp32 (the CPU's): the
# Gram form for every shape here but the square one, to fp32's accuracy.
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.03), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96), (120, 200)])
def test_newton_schulz_singular_values(shape, dtype, atol):
    s = 0.05 + 0.95 * torch.rand(min(shape), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    U, V, G = svd_case(shape, s)
    O = newton_schulz(G.float(), dtype=dtype).double()
    torch.testing.assert_close(U.T @ O @ V, torch.diag(expected_singular_values(s)), rtol=0, atol=atol)
    sv = torch.linalg.svdvals(O)
    assert 0.5 <= sv.min() and sv.max() <= 1.5  # the band the quintic is designed for (measured 0.68..1.14)


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tall_matrix_is_the_transpose_of_its_wide_iteration(plain, dtype):
    """A tall matrix iterates from the right (X^T X, the small Gram matrix) without transposing memory: the result is
    the wide iteration on G^T, transposed (the same products, up to the order of a sum's terms)."""
    G = torch.randn(3, 200, 48, generator=torch.Generator().manual_seed(2))
    tall = newton_schulz(G, steps=3, dtype=dtype, plain=plain)
    assert tall.is_contiguous()
    torch.testing.assert_close(tall, newton_schulz(G.mT.contiguous(), steps=3, dtype=dtype, plain=plain).mT,
                               rtol=0, atol=1e-5 if dtype == torch.float32 else 2**-7)


@pytest.mark.parametrize("cols", [64, 80, 96, 97, 128, 256])
def test_fp32_newton_schulz_takes_the_form_with_fewer_flops(cols):
    """s steps on a wide (m, n) matrix: the plain iteration costs 4s m^2 n + 2s m^3 FLOPs, the Gram form
    4 m^2 n + (8s - 6) m^3: fewer where n > 1.5 m, whatever s. Counted on the products newton_schulz runs."""
    from torch.utils.flop_counter import FlopCounterMode
    m = 64

    def flops(**kw):
        with FlopCounterMode(display=False) as counter:
            newton_schulz(torch.randn(m, cols), steps=3, dtype=torch.float32, **kw)
        return counter.get_total_flops()

    plain, gram = 12 * m ** 2 * cols + 6 * m ** 3, 4 * m ** 2 * cols + 18 * m ** 3
    assert flops(plain=True) == plain and flops() == min(plain, gram)
    assert (flops() < plain) == (cols > 1.5 * m)


@pytest.mark.parametrize("shape", [(48, 200), (200, 48)])
def test_gram_form_is_the_iteration_also_for_tiny_singular_values(shape):
    # Gradients span many scales: singular values from 1 down to 1e-6. The Gram form iterates on X X^T, whose small
    # eigenvalues (s^2, down to 1e-12) fp32 cannot resolve, and rounding there grows with each step: measured 2e-4
    # at most (the plain iteration's ~1e-5; bf16's on CUDA 1e-2), while a wrong coefficient or step is off by > 0.01.
    s = torch.logspace(0, -6, min(shape), dtype=torch.float64)
    U, V, G = svd_case(shape, s)
    X = G.float()
    O = muon.gram_newton_schulz((X / X.norm())[None], 5, tall=shape[0] > shape[1])[0].double()  # a stack of one
    torch.testing.assert_close(U.T @ O @ V, torch.diag(expected_singular_values(s)), rtol=0, atol=5e-4)
    assert torch.equal(O.float(), newton_schulz(G.float(), dtype=torch.float32, eps=0))  # fp32 takes this form
    plain = newton_schulz(G.float(), dtype=torch.float32, eps=0, plain=True).double()  # bench.py's baseline
    torch.testing.assert_close(U.T @ plain @ V, torch.diag(expected_singular_values(s)), rtol=0, atol=1e-4)


def test_weight_decay_is_decoupled():
    p = nn.Parameter(torch.randn(8, 12))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        p.grad = torch.zeros_like(p)  # zero update: only the decay p <- (1 - lr wd) p acts
        opt.step()
    torch.testing.assert_close(p.detach(), start * 0.95**3, rtol=1e-6, atol=0)


def test_a_rank_one_gradient_steps_by_the_closed_form():
    """A rank-1 gradient u v^T has one singular value, 1 after the Frobenius normalisation, so 5 Newton-Schulz steps
    give f^5(1) u v^T / (|u| |v|), f(s) = a s + b s^3 + c s^5; momentum and Nesterov keep its direction. Each step is
    then p <- (1 - lr wd) p - lr 0.2 sqrt(max(m, n)) f^5(1) u v^T / (|u| |v|): the decay first, on the weights
    before the update (AdamW's and torch.optim.Muon's order)."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(8, 1, generator=g, dtype=torch.float64), torch.randn(1, 12, generator=g, dtype=torch.float64)
    a, b, c = 3.4445, -4.7750, 2.0315  # Keller Jordan's quintic
    s = 1.0
    for _ in range(5):
        s = a * s + b * s ** 3 + c * s ** 5
    lr, wd = 0.1, 2.0
    direction = s * (u @ v) / (u.norm() * v.norm())
    p = nn.Parameter(torch.randn(8, 12, generator=g))
    expected = p.detach().double().clone()
    opt = Muon([p], lr=lr, weight_decay=wd, ns_dtype=torch.float32)
    for step in range(3):
        p.grad = ((step + 1) * u @ v).float()  # the scale changes, the direction does not
        opt.step()
        expected = (1 - lr * wd) * expected - lr * 0.2 * 12 ** 0.5 * direction
    torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-5)


def test_state_dict_round_trip(tmp_path):
    params = make_params()
    opt = train(params, 3)
    resumed = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Muon([{"params": resumed[:2], "lr": 0.03}, {"params": resumed[2:]}], lr=0.02, weight_decay=0.1)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")  # through a file: in memory the buffers would be shared
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for step in range(3, 6):
        set_grads(params, step)
        set_grads(resumed, step)
        opt.step()
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_assign_owners_balanced():
    from model import PRX
    with torch.device("meta"):
        shapes = [p.shape for p in split_muon_params(PRX.from_preset("small"))[0]]
    costs = [ns_cost(s) for s in shapes]
    owners = assign_owners(costs, 8)
    assert owners == assign_owners(costs, 8) and set(owners) == set(range(8))  # deterministic, every rank works
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(8)]
    assert max(loads) <= sum(costs) / 8 + max(costs)  # greedy largest-first bound
    assert assign_owners([1, 2, 3, 4], 2) == [0, 1, 1, 0]  # 4 and 1 | 3 and 2: loads 5, 5 (smallest first: 4, 6)
    assert max(loads) <= 1.02 * sum(costs) / 8  # `small`'s 112 matrices split exactly in 8
    # skewed costs: taking matrices in turn would give rank 0 every large one (load 400 against 103 here)
    skewed = assign_owners([100, 1, 1, 1] * 4, 4)
    assert sorted(sum(c for c, o in zip([100, 1, 1, 1] * 4, skewed) if o == r) for r in range(4)) == [103] * 4


def distributed_worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    calls = []
    orthogonalise = muon.newton_schulz
    muon.newton_schulz = lambda G, *a: calls.append(G.shape) or orthogonalise(G, *a)  # count this rank's share
    params = make_params()
    opt = train(params, 10)
    result = {"params": [p.detach() for p in params], "state": opt.state_dict(), "calls": len(calls)}
    lone = make_params(SHAPES[:1])  # fewer matrices than ranks: rank 1 owns none and sends only padding
    train(lone, 2)
    # FSDP2's layout: each parameter a DTensor holding this rank's rows (Shard(0)), as fully_shard makes them
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in make_params(SHARDED)]
    calls.clear()
    sharded_opt = train(sharded, 10)
    result["sharded"] = {"params": [p.full_tensor() for p in sharded], "calls": len(calls),
                         "rows": [p.to_local().shape[0] for p in sharded],
                         "momentum": [sharded_opt.state[p]["momentum_buffer"].full_tensor() for p in sharded]}
    # layouts Muon refuses before any collective: shards beside a plain tensor, and shards over fewer ranks than the
    # world (the inner dimension of a (world, 1) mesh: each rank alone, as hybrid sharding's replicas)
    alone = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicas", "shards"))["shards"]
    result["refusals"] = []
    for params in ([sharded[0], nn.Parameter(torch.ones(4, 4))],
                   [nn.Parameter(distribute_tensor(torch.ones(4, 4), alone, [Shard(0)]))]):
        set_grads(params, 0)
        try:
            Muon(params).step()
        except ValueError as e:
            result["refusals"].append(str(e))
    idle = nn.Parameter(torch.ones(4, 4))  # no gradient on any rank: a step with nothing to share out
    Muon([idle]).step()
    torch.save(result | {"lone": lone[0].detach(), "idle": idle.detach()}, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What distributed_worker saved on each of 2 gloo processes: one launch for the replicated and sharded checks."""
    tmp, world_size = tmp_path_factory.mktemp("muon"), 2
    mp.spawn(distributed_worker, args=(world_size, str(tmp / "init"), str(tmp / "out")), nprocs=world_size)
    return [torch.load(tmp / f"out.{r}", weights_only=True) for r in range(world_size)]


def test_distributed_matches_single_process(two_ranks):
    single, lone = make_params(), make_params(SHAPES[:1])
    single_opt = train(single, 10)
    train(lone, 2)
    world_size, results = 2, two_ranks
    owners = assign_owners([ns_cost(s) for s in SHAPES], world_size)
    for rank, result in enumerate(results):
        assert result["calls"] == 10 * owners.count(rank) < 10 * len(SHAPES)  # each rank only did its share
        for a, b in zip(result["params"] + [result["lone"]], single + lone):
            assert (a - b).abs().max() <= 1e-6
        assert torch.equal(result["idle"], torch.ones(4, 4))
    # Rank 0's checkpoint is the single-process one: momentum is kept for every matrix on every rank.
    for i, state in single_opt.state_dict()["state"].items():
        assert torch.equal(results[0]["state"]["state"][i]["momentum_buffer"], state["momentum_buffer"])


def test_sharded_matches_single_process(two_ranks):
    """FSDP2's DTensor shards: each owner gathers, orthogonalises and scatters back the rows; the parameters and
    momenta equal one process's."""
    single = make_params(SHARDED)
    single_opt = train(single, 10)
    world_size, results = 2, [result["sharded"] for result in two_ranks]
    owners = assign_owners([ns_cost(s) for s in SHARDED], world_size)
    assert [r["rows"][-2:] for r in results] == [[3, 1], [2, 0]]  # torch.chunk's split: rank 1 holds no row of (1, 8)
    for rank, result in enumerate(results):
        assert result["calls"] == 10 * owners.count(rank) < 10 * len(SHARDED)
        for a, b, m, p in zip(result["params"], single, result["momentum"], single_opt.param_groups[0]["params"] +
                              single_opt.param_groups[1]["params"]):
            assert torch.equal(a, b) and torch.equal(m, single_opt.state[p]["momentum_buffer"])


def test_layouts_it_cannot_share_out_are_refused(two_ranks):
    for result in two_ranks:
        assert len(result["refusals"]) == 2
        assert all("DTensors sharded by rows (Shard(0)) over all ranks" in r for r in result["refusals"])


class StandIn(nn.Module):
    """PRX's naming: embeddings and final layer outside `blocks`, block weights, biases and norms inside."""

    def __init__(self):
        super().__init__()
        self.img_in = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(8, 8), "norm": nn.LayerNorm(8)}) for _ in range(2))
        self.final_layer = nn.Linear(8, 4)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)


def test_split_muon_params():
    model = StandIn()
    muon_params, adamw_params = split_muon_params(model)
    assert [p is model.blocks[i]["proj"].weight for i, p in enumerate(muon_params)] == [True, True]
    assert len(adamw_params) == 2 + 2 * 3 + 2  # img_in, per block proj bias + norm weight and bias, final_layer
    assert split_summary(muon_params, adamw_params) == \
        "optimizer split: muon 2 tensors, 128 parameters | adamw 10 tensors, 124 parameters"
    model.blocks[0]["conv"] = nn.Conv1d(8, 8, 3)  # a kernel inside a block is 3D: AdamW's
    muon_params, adamw_params = split_muon_params(model)
    assert len(muon_params) == 2 and any(p is model.blocks[0]["conv"].weight for p in adamw_params)
    # under a wrapper (DDP's module., compile's _orig_mod.) the same split; `blocks` is a name, not a part of one
    wrapper = nn.Module()
    wrapper.module, wrapper.final_blocks_proj = model, nn.Linear(8, 8)
    wrapped_muon, wrapped_adamw = split_muon_params(wrapper)
    assert wrapped_muon == muon_params and wrapped_adamw == adamw_params + list(wrapper.final_blocks_proj.parameters())


def test_split_prx_tiny():
    from model import PRX
    model = PRX.from_preset("tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    muon_params, adamw_params = split_muon_params(model)
    assert len(muon_params) + len(adamw_params) == len(names)
    assert len(muon_params) == 7 * model.cfg.depth  # qkv, txt_kv, to_out, gate, up, down, modulation
    assert all(names[id(p)].startswith("blocks.") and p.ndim == 2 for p in muon_params)
    adamw_names = {names[id(p)] for p in adamw_params}
    assert {"img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight",
            "blocks.0.attention.norm_q.weight", "blocks.0.modulation.lin.bias"} <= adamw_names
    Muon(muon_params)  # every Muon tensor is 2D


def test_bad_input():
    with pytest.raises(ValueError, match="2D"):
        Muon([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="scale"):
        Muon(make_params(), scale="spectral")
    with pytest.raises(ValueError, match="momentum"):
        Muon(make_params(), momentum=1.0)
    for bad in (dict(lr=-0.01), dict(ns_steps=0), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError, match="need lr >= 0"):
            Muon(make_params(), **bad)


def test_a_parameter_without_a_gradient_is_left_alone():
    params = make_params()
    set_grads(params, 0)
    frozen = params[1].detach().clone()
    params[1].grad = None
    opt = Muon(params, lr=0.02)
    opt.step()
    assert torch.equal(params[1], frozen) and params[1] not in opt.state
    assert not torch.equal(params[0], make_params()[0])  # the others step


def test_ns_cost_counts_the_newton_schulz_flops():
    """What assign_owners balances: s^2 l for an (m, n) matrix, s = min, l = max; plain Newton-Schulz costs
    steps (4 s^2 l + 2 s^3) FLOPs, between 4 and 6 times that per step whatever the aspect."""
    from torch.utils.flop_counter import FlopCounterMode
    for shape in [(16, 1024), (1024, 16), (128, 128), (48, 200)]:
        with FlopCounterMode(display=False) as counter:
            newton_schulz(torch.randn(shape), steps=1, dtype=torch.float32, plain=True)
        assert 4 * ns_cost(shape) <= counter.get_total_flops() <= 6 * ns_cost(shape)


def test_each_groups_eps_is_used():
    """Matrices of one shape in groups of different eps are not stacked into one call with the first's eps."""
    together = make_params([(48, 32)] * 2)
    opt = Muon([{"params": together[:1]}, {"params": together[1:], "eps": 100.0}], lr=0.02)
    alone = [nn.Parameter(p.detach().clone()) for p in together]
    singles = [Muon([alone[0]], lr=0.02), Muon([alone[1]], lr=0.02, eps=100.0)]
    for params in (together, alone):
        set_grads(params, 0)
        params[1].grad = params[0].grad.clone()  # the same gradient: only eps differs
    opt.step()
    for single in singles:
        single.step()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    start = make_params([(48, 32)] * 2)
    assert ((together[0] - start[0]) - (together[1] - start[1])).abs().max() > 1e-3  # eps 100 changes the update


@pytest.mark.parametrize("shape", [(24, 56), (56, 24), (40, 40)])  # wide (Gram form in fp32), tall, square
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_of_matrices_is_each_matrix_orthogonalised_alone(shape, dtype):
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(4, *shape, generator=g) * torch.tensor([1.0, 1e-3, 10.0, 1.0])[:, None, None]
    together = newton_schulz(stack, steps=3, dtype=dtype)
    assert together.shape == stack.shape
    for G, O in zip(stack, together):  # each scaled by its own norm: the stack's scales do not mix
        torch.testing.assert_close(O, newton_schulz(G, steps=3, dtype=dtype), rtol=0, atol=1e-6 if dtype ==
                                   torch.float32 else 2**-7)


def test_muon_stacks_the_matrices_of_one_shape_and_settings(monkeypatch):
    """One Newton-Schulz call per (shape, steps) -- the blocks' matrices repeat -- with the result of stepping each
    matrix on its own."""
    shapes, calls = [(48, 32), (32, 80), (48, 32), (32, 80), (48, 32), (48, 32)], []  # the last: other steps
    orthogonalise = muon.newton_schulz
    monkeypatch.setattr(muon, "newton_schulz", lambda G, *a: calls.append(tuple(G.shape)) or orthogonalise(G, *a))
    together = make_params(shapes)
    opt = Muon([{"params": together[:5]}, {"params": together[5:], "ns_steps": 3}], lr=0.02, weight_decay=0.1)
    alone = [nn.Parameter(p.detach().clone()) for p in together]
    singles = [Muon([p], lr=0.02, weight_decay=0.1, ns_steps=5 if i < 5 else 3) for i, p in enumerate(alone)]
    for step in range(3):
        set_grads(together, step)
        set_grads(alone, step)
        opt.step()
        for single in singles:
            single.step()
    assert sorted(calls[:3]) == [(1, 48, 32), (2, 32, 80), (3, 48, 32)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
