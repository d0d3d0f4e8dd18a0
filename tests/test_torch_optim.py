"""LearnedOptimizerTorch: the torch.optim drop-in of a learned optimizer."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from optimizers import LearnedOptimizer, LearnedOptimizerTorch, LOConfig  # noqa: E402
from optimizers.checkpoint import CheckpointError, save_learned_optimizer  # noqa: E402

LOPT = LearnedOptimizer(LOConfig(hidden_width=16))


def theta_for(lopt=LOPT, seed=0, scale=10.0):
    """Weights with a non-negligible learned term (the default init is almost pure nominal Adam)."""
    theta = lopt.init_theta(seed)
    last = f"w{lopt.config.hidden_layers}"
    theta[last] = theta[last] * scale
    return theta


def make_model(seed=0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def dataset(n=256, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=dtype)
    teacher = torch.randn(10, 4, generator=g, dtype=dtype)
    return x, (x @ teacher).argmax(-1)


def train(model, opt, steps, data, sched=None):
    x, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- training ------------------------------------------------------------------------------
def test_lowers_training_loss():
    model = make_model()
    data = dataset()
    # freshly initialised weights: nominal Adam (lr 1e-3) plus a small learned term
    opt = LearnedOptimizerTorch(model.parameters(), lopt=LOPT, theta=LOPT.init_theta(0))
    losses = train(model, opt, 100, data)
    final = F.cross_entropy(model(data[0]), data[1]).item()
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert final < 0.8 * losses[0], (losses[0], final)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert opt.global_step == 100


def test_matches_functional_learned_optimizer():
    """The drop-in is exactly the functional optimizer applied to the module's parameters."""
    model = make_model(dtype=torch.float64)
    data = dataset(dtype=torch.float64)
    theta = {k: v.double() for k, v in theta_for().items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LearnedOptimizerTorch(model.parameters(), lopt=LOPT, theta=theta)
    train(model, opt, 6, data)

    bound = LOPT.bind(theta)
    state = bound.init(params)
    x, y = data
    for _ in range(6):
        grads = torch.func.grad(lambda ps: F.cross_entropy(functional_call(model, ps, (x,)), y))(params)
        params, state = bound.update(grads, state, params)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], rtol=1e-12, atol=1e-14)
        assert opt.state[p]["m"].dtype == torch.float64
        torch.testing.assert_close(opt.state[p]["m"], state["m"][n], rtol=1e-12, atol=1e-14)


def test_closure_and_zero_grad():
    model = make_model()
    x, y = dataset()
    opt = LearnedOptimizerTorch(model.parameters(), lopt=LOPT, theta=theta_for())

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.step() is None  # no gradients: a no-op that does not advance the step
    assert opt.global_step == 1


# ---- state dict ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype):
    data = tuple(t.to(dtype) if t.is_floating_point() else t for t in dataset())
    model = make_model(dtype=dtype)
    groups = [{"params": model[0].parameters(), "lr": 0.7, "weight_decay": 1e-3},
              {"params": model[2].parameters()}]
    opt = LearnedOptimizerTorch(groups, lopt=LOPT, theta=theta_for())
    train(model, opt, 5, data)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    clone = copy.deepcopy(model)
    groups2 = [{"params": clone[0].parameters(), "lr": 123.0}, {"params": clone[2].parameters()}]
    opt2 = LearnedOptimizerTorch(groups2, lopt=LOPT, theta=theta_for())
    opt2.load_state_dict(sd)
    assert opt2.global_step == 5
    assert opt2.param_groups[0]["lr"] == 0.7 and opt2.param_groups[0]["weight_decay"] == 1e-3
    for p in clone.parameters():  # accumulators stay fp32 even for bf16 parameters
        assert opt2.state[p]["v"].dtype == torch.float32

    train(model, opt, 5, data)
    train(clone, opt2, 5, data)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


def test_deepcopy_keeps_learned_optimizer():
    model = make_model()
    opt = LearnedOptimizerTorch(model.parameters(), lopt=LOPT, theta=theta_for())
    train(model, opt, 2, dataset())
    opt2 = copy.deepcopy(opt)
    assert opt2.lopt.config == LOPT.config and opt2.global_step == 2
    assert set(opt2.theta) == set(opt.theta)


# ---- param groups, lr, weight decay ----------------------------------------------------------
def test_param_groups_lr_multiplier():
    data = dataset()
    base = make_model()
    p0 = params_of(base)
    m_full, m_mixed = copy.deepcopy(base), copy.deepcopy(base)
    opt_full = LearnedOptimizerTorch(m_full.parameters(), lopt=LOPT, theta=theta_for())
    opt_mixed = LearnedOptimizerTorch(
        [{"params": m_mixed[0].parameters(), "lr": 0.0}, {"params": m_mixed[2].parameters(), "lr": 0.5}],
        lopt=LOPT, theta=theta_for(),
    )
    train(m_full, opt_full, 1, data)
    train(m_mixed, opt_mixed, 1, data)
    full, mixed = params_of(m_full), params_of(m_mixed)
    # lr=0: untouched, bit for bit (its accumulators still advance, as torch.optim.Adam(lr=0) does)
    for i in (0, 1):
        assert torch.equal(mixed[i], p0[i])
        assert opt_mixed.state[m_mixed[0].weight if i == 0 else m_mixed[0].bias]["m"].abs().sum() > 0
    # lr=0.5: half of the learned step
    for i in (2, 3):
        assert not torch.equal(full[i], p0[i])
        torch.testing.assert_close(mixed[i], p0[i] - 0.5 * (p0[i] - full[i]), rtol=0, atol=1e-7)


def test_weight_decay_is_decoupled():
    data = dataset()
    base = make_model()
    p0 = params_of(base)
    m0, m1 = copy.deepcopy(base), copy.deepcopy(base)
    train(m0, LearnedOptimizerTorch(m0.parameters(), lopt=LOPT, theta=theta_for()), 1, data)
    train(m1, LearnedOptimizerTorch(m1.parameters(), lopt=LOPT, theta=theta_for(), weight_decay=0.01), 1, data)
    for a, b, p in zip(params_of(m0), params_of(m1), p0):
        torch.testing.assert_close(b, a - 0.01 * p, rtol=0, atol=1e-7)


def test_lambda_lr_scheduler():
    data = dataset()
    model = make_model()
    opt = LearnedOptimizerTorch(model.parameters(), lopt=LOPT, theta=theta_for())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 3 else 0.0)
    train(model, opt, 3, data, sched)
    assert opt.param_groups[0]["lr"] == 0.0
    before = params_of(model)
    train(model, opt, 2, data, sched)
    for a, b in zip(before, params_of(model)):
        assert torch.equal(a, b)
    assert opt.global_step == 5

    # cosine annealing drives the multiplier smoothly to eta_min and training stays finite
    opt2 = LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT, theta=theta_for())
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=4)
    for _ in range(4):
        opt2.step()
        cos.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ---- parameters without gradients ----------------------------------------------------------
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.unused = nn.Parameter(torch.randn(5, 3))  # requires_grad, never used: .grad stays None
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, x):
        return self.net(x) + 0 * self.frozen.sum()


def test_params_without_grad_untouched_and_stateless():
    data = dataset()
    model = WithUnused()
    ref = copy.deepcopy(model.net)
    unused0, frozen0 = model.unused.detach().clone(), model.frozen.detach().clone()
    opt = LearnedOptimizerTorch(model.parameters(), lopt=LOPT, theta=theta_for())
    train(model, opt, 3, data)
    assert torch.equal(model.unused, unused0) and torch.equal(model.frozen, frozen0)
    assert model.unused not in opt.state and model.frozen not in opt.state
    # skipping them does not change what happens to the others
    train(ref, LearnedOptimizerTorch(ref.parameters(), lopt=LOPT, theta=theta_for()), 3, data)
    for a, b in zip(model.net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # a parameter that starts receiving gradients joins with fresh state; its step tracks the global one
    model.unused.grad = torch.ones_like(model.unused)
    opt.step()
    assert model.unused in opt.state and float(opt.state[model.unused]["step"]) == 4
    assert not torch.equal(model.unused, unused0)


def test_mixed_dtypes_bucket_like_separate_calls():
    torch.manual_seed(0)
    a32, a64 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(6, dtype=torch.float64))
    b32, b64 = nn.Parameter(a32.detach().clone()), nn.Parameter(a64.detach().clone())
    opt = LearnedOptimizerTorch([a32, a64], lopt=LOPT, theta=theta_for())
    o32 = LearnedOptimizerTorch([b32], lopt=LOPT, theta=theta_for())
    o64 = LearnedOptimizerTorch([b64], lopt=LOPT, theta=theta_for())
    for step in range(3):
        g32, g64 = torch.randn(4, 3), torch.randn(6, dtype=torch.float64)
        a32.grad, b32.grad, a64.grad, b64.grad = g32, g32.clone(), g64, g64.clone()
        opt.step()
        o32.step()
        o64.step()
    assert torch.equal(a32, b32) and torch.equal(a64, b64)
    assert opt.state[a64]["v"].dtype == torch.float64 and opt.state[a32]["v"].dtype == torch.float32


# ---- construction and checkpoints ----------------------------------------------------------
def test_from_checkpoint(tmp_path):
    theta = theta_for(seed=7)
    save_learned_optimizer(tmp_path / "lo", LOPT, theta, generation=3)
    data = dataset()
    m1, m2 = make_model(), make_model()
    opt1 = LearnedOptimizerTorch.from_checkpoint(m1.parameters(), tmp_path / "lo", lr=0.9)
    opt2 = LearnedOptimizerTorch(m2.parameters(), lopt=LOPT, theta=theta, lr=0.9)
    assert opt1.lopt.config == LOPT.config and opt1.checkpoint_meta["generation"] == 3
    train(m1, opt1, 3, data)
    train(m2, opt2, 3, data)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_corrupted_checkpoint_raises(tmp_path):
    save_learned_optimizer(tmp_path / "lo", LOPT, theta_for())
    (tensors,) = list((tmp_path / "lo").glob("tensors-*.safetensors"))
    blob = bytearray(tensors.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError):
        LearnedOptimizerTorch.from_checkpoint(make_model().parameters(), tmp_path / "lo")
    with pytest.raises(CheckpointError):
        LearnedOptimizerTorch.from_checkpoint(make_model().parameters(), tmp_path / "missing")


def test_constructor_validation():
    params = make_model().parameters()
    with pytest.raises(ValueError, match="theta"):
        LearnedOptimizerTorch(params, lopt=LOPT)
    bad = theta_for()
    bad.pop("w0")
    with pytest.raises(ValueError, match="theta"):
        LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT, theta=bad)
    with pytest.raises(ValueError, match="shape"):
        LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT, theta=LearnedOptimizer().init_theta(0))
    with pytest.raises(ValueError, match="lr"):
        LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT, theta=theta_for(), lr=-1.0)
    # an LOConfig is accepted in place of the architecture
    opt = LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT.config, theta=theta_for())
    assert isinstance(opt.lopt, LearnedOptimizer)


def test_import_is_light():
    code = ("import sys, optimizers, optimizers.higher_interop; "
            "bad = [m for m in ('higher', 'wandb') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "triton"])
def test_cuda_params_with_cpu_theta_and_state_dict_round_trip(kernels):
    import os

    if kernels:  # the compiled kernels; under the interpreter (tests/test_kernels.py) they would run in Python
        import kernels as kernels_pkg

        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not kernels_pkg.triton_available():
            pytest.skip("needs compiled triton (run this file on its own)")
    data = tuple(t.cuda() for t in dataset())
    model = make_model().cuda()
    opt = LearnedOptimizerTorch(model.parameters(), lopt=LOPT, theta=theta_for(),  # theta stays on CPU
                                kernels=kernels, kernel_precision="ieee")
    train(model, opt, 3, data)
    assert all(opt.state[p]["m"].device == p.device for p in model.parameters())
    ref_model = make_model()
    ref_opt = LearnedOptimizerTorch(ref_model.parameters(), lopt=LOPT, theta=theta_for())
    train(ref_model, ref_opt, 3, tuple(t.cpu() for t in data))
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    clone = copy.deepcopy(model)
    opt2 = LearnedOptimizerTorch(clone.parameters(), lopt=LOPT, theta=theta_for(), kernels=kernels,
                                 kernel_precision="ieee")
    opt2.load_state_dict(opt.state_dict())
    train(model, opt, 2, data)
    train(clone, opt2, 2, data)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
