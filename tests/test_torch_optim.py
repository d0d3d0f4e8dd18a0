"""LearnedOptimizerTorch: the torch.optim drop-in of a learned optimizer."""

from __future__ import annotations

import copy
import io
import json
import math
import subprocess
import sys
import warnings
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

# the default design (fraction-of-training time features: needs total_steps) and the original one
LOPT = LearnedOptimizer(LOConfig(hidden_width=16, time_features="fraction"))
LEGACY = LearnedOptimizer(LOConfig(hidden_width=16, design="additive", time_features="absolute",
                                   step_scale="none"))
DESIGNS = {"default": LOPT, "legacy": LEGACY}
T = 20  # total_steps of the runs below


def theta_for(lopt=LOPT, seed=0, scale=10.0):
    """Weights with a non-negligible learned term (the default init is almost pure nominal Adam)."""
    theta = lopt.init_theta(seed)
    last = f"w{lopt.config.hidden_layers}"
    theta[last] = theta[last] * scale
    if "nominal_time_w" in theta:  # a learned schedule, so the time inputs matter
        theta["nominal_time_w"] = torch.linspace(-0.3, 0.3, theta["nominal_time_w"].numel())
    return theta


def lo_opt(params, lopt=LOPT, theta=None, **kw):
    """LearnedOptimizerTorch with total_steps=T where the design needs it (legacy: none given)."""
    if lopt.config.needs_total_steps:
        kw.setdefault("total_steps", T)
    return LearnedOptimizerTorch(params, lopt=lopt, theta=theta_for(lopt) if theta is None else theta, **kw)


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
@pytest.mark.parametrize("design", DESIGNS)
def test_lowers_training_loss(design):
    lopt = DESIGNS[design]
    model = make_model()
    data = dataset()
    # freshly initialised weights: nominal Adam (lr 1e-2) plus a small learned term
    opt = lo_opt(model.parameters(), lopt, lopt.init_theta(0), total_steps=100)
    losses = train(model, opt, 100, data)
    final = F.cross_entropy(model(data[0]), data[1]).item()
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert final < 0.8 * losses[0], (losses[0], final)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert opt.global_step == 100


@pytest.mark.parametrize("design", DESIGNS)
def test_matches_functional_learned_optimizer(design):
    """The drop-in is exactly the functional optimizer applied to the module's parameters (6 steps;
    the default design's run is T=4 steps long, so it also steps past T)."""
    lopt = DESIGNS[design]
    model = make_model(dtype=torch.float64)
    data = dataset(dtype=torch.float64)
    theta = {k: v.double() for k, v in theta_for(lopt).items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = lo_opt(model.parameters(), lopt, theta, total_steps=4)
    train(model, opt, 6, data)

    bound = lopt.bind(theta, total_steps=4)
    state = bound.init(params)
    x, y = data
    for _ in range(6):
        grads = torch.func.grad(lambda ps: F.cross_entropy(functional_call(model, ps, (x,)), y))(params)
        params, state = bound.update(grads, state, params)
    assert ("horizon" in state) == (design == "default")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], rtol=1e-12, atol=1e-14)
        assert opt.state[p]["m"].dtype == torch.float64
        torch.testing.assert_close(opt.state[p]["m"], state["m"][n], rtol=1e-12, atol=1e-14)
        assert ("horizon" in opt.state[p]) == (design == "default")


def test_closure_and_zero_grad():
    model = make_model()
    x, y = dataset()
    opt = lo_opt(model.parameters())

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


# ---- total_steps -----------------------------------------------------------------------------
def test_total_steps_required_by_fraction_design():
    with pytest.raises(ValueError, match="total_steps"):
        LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT, theta=theta_for())
    for bad in (0, -3, 2.5, True, "100"):
        with pytest.raises(ValueError, match="total_steps"):
            LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT, theta=theta_for(), total_steps=bad)
    opt = LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT, theta=theta_for(), total_steps=100.0)
    assert opt.total_steps == 100 and isinstance(opt.total_steps, int)
    with pytest.raises(ValueError, match="total_steps"):
        opt.total_steps = None
    # the original design has no horizon: none needed, and one given is ignored
    legacy = LearnedOptimizerTorch(make_model().parameters(), lopt=LEGACY, theta=theta_for(LEGACY))
    assert legacy.total_steps is None
    m1, m2 = make_model(), make_model()
    train(m1, LearnedOptimizerTorch(m1.parameters(), lopt=LEGACY, theta=theta_for(LEGACY)), 3, dataset())
    train(m2, LearnedOptimizerTorch(m2.parameters(), lopt=LEGACY, theta=theta_for(LEGACY), total_steps=7), 3,
          dataset())
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_total_steps_reaches_the_update_and_past_it_keeps_working():
    data = dataset()
    runs = {}
    for total in (5, 1000):
        model = make_model()
        opt = lo_opt(model.parameters(), total_steps=total)
        losses = train(model, opt, 15, data)  # 3x past T=5: the time features saturate
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert float(opt.state[model[0].weight]["horizon"]) == total
        runs[total] = params_of(model)
    # the run length changes the steps (the optimizer sees t/T)
    assert not all(torch.equal(a, b) for a, b in zip(runs[5], runs[1000]))
    # changing it mid-run takes effect at the next step
    model = make_model()
    opt = lo_opt(model.parameters(), total_steps=5)
    train(model, opt, 2, data)
    opt.total_steps = 50
    train(model, opt, 1, data)
    assert float(opt.state[model[0].weight]["horizon"]) == 50


# ---- state dict ----------------------------------------------------------------------------
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype, design):
    lopt = DESIGNS[design]
    data = tuple(t.to(dtype) if t.is_floating_point() else t for t in dataset())
    model = make_model(dtype=dtype)
    unit = math.exp(float(theta_for(lopt)["nominal_log_lr"]))
    groups = [{"params": model[0].parameters(), "lr": 0.7 * unit, "weight_decay": 1e-3},
              {"params": model[2].parameters()}]
    opt = lo_opt(groups, lopt, total_steps=1001)  # 1001: not a bfloat16 number
    train(model, opt, 5, data)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    clone = copy.deepcopy(model)
    groups2 = [{"params": clone[0].parameters(), "lr": 123.0}, {"params": clone[2].parameters()}]
    opt2 = lo_opt(groups2, lopt, total_steps=7)
    opt2.load_state_dict(sd)
    assert opt2.global_step == 5
    assert opt2.param_groups[0]["lr"] == 0.7 * unit and opt2.param_groups[0]["weight_decay"] == 1e-3
    # the saved run length wins over the constructor's, as saved group hyperparameters do
    assert opt2.total_steps == (1001 if design == "default" else 7)  # the legacy design ignores it
    for p in clone.parameters():  # accumulators (and the horizon) stay fp32 even for bf16 parameters
        assert opt2.state[p]["v"].dtype == torch.float32
        if design == "default":
            assert opt2.state[p]["horizon"].dtype == torch.float32 and float(opt2.state[p]["horizon"]) == 1001

    train(model, opt, 5, data)
    train(clone, opt2, 5, data)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


def test_deepcopy_keeps_learned_optimizer():
    model = make_model()
    opt = lo_opt(model.parameters(), lr=3e-3)
    train(model, opt, 2, dataset())
    opt2 = copy.deepcopy(opt)
    assert opt2.lopt.config == LOPT.config and opt2.global_step == 2
    assert set(opt2.theta) == set(opt.theta)
    assert opt2.total_steps == T and opt2.learned_lr == opt.learned_lr
    assert opt2.param_groups[0]["lr"] == 3e-3


# ---- lr: absolute units, param groups, schedulers, weight decay ------------------------------
@pytest.mark.parametrize("design", DESIGNS)
def test_default_lr_is_the_learned_lr(design):
    lopt = DESIGNS[design]
    theta = theta_for(lopt)
    theta["nominal_log_lr"] = torch.tensor(math.log(3e-3))
    opt = lo_opt(make_model().parameters(), lopt, theta)
    assert not opt.lr_is_multiplier
    assert opt.learned_lr == pytest.approx(3e-3, rel=1e-6) and opt.param_groups[0]["lr"] == opt.learned_lr
    # a group given lr=None gets it too
    model = make_model()
    opt = lo_opt([{"params": model[0].parameters(), "lr": None}, {"params": model[2].parameters(), "lr": 1e-4}],
                 lopt, theta)
    assert opt.param_groups[0]["lr"] == opt.learned_lr and opt.param_groups[1]["lr"] == 1e-4


@pytest.mark.parametrize("design", DESIGNS)
def test_param_groups_lr_scales_the_learned_step(design):
    lopt = DESIGNS[design]
    data = dataset()
    base = make_model()
    p0 = params_of(base)
    m_full, m_mixed = copy.deepcopy(base), copy.deepcopy(base)
    opt_full = lo_opt(m_full.parameters(), lopt)
    unit = opt_full.learned_lr
    opt_mixed = lo_opt(
        [{"params": m_mixed[0].parameters(), "lr": 0.0}, {"params": m_mixed[2].parameters(), "lr": 0.5 * unit}],
        lopt,
    )
    train(m_full, opt_full, 1, data)
    train(m_mixed, opt_mixed, 1, data)
    full, mixed = params_of(m_full), params_of(m_mixed)
    # lr=0: untouched, bit for bit (its accumulators still advance, as torch.optim.Adam(lr=0) does)
    for i in (0, 1):
        assert torch.equal(mixed[i], p0[i])
        assert opt_mixed.state[m_mixed[0].weight if i == 0 else m_mixed[0].bias]["m"].abs().sum() > 0
    # lr = learned_lr / 2: half of the learned step
    for i in (2, 3):
        assert not torch.equal(full[i], p0[i])
        torch.testing.assert_close(mixed[i], p0[i] - 0.5 * (p0[i] - full[i]), rtol=0, atol=1e-7)


def test_adam_style_lr_gives_adam_sized_steps():
    """lr=1e-3 asks for Adam(lr=1e-3)-sized steps: the learned step times 1e-3 / learned_lr (0.1 here),
    not the learned step times 1e-3."""
    data = dataset()
    base = make_model()
    p0 = params_of(base)
    m_lo, m_default, m_adam = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    lopt_theta = LOPT.init_theta(0)  # learned lr 1e-2, almost pure nominal Adam
    opt = lo_opt(m_lo.parameters(), LOPT, lopt_theta, lr=1e-3)
    opt_default = lo_opt(m_default.parameters(), LOPT, lopt_theta)
    assert opt_default.learned_lr == pytest.approx(1e-2, rel=1e-6)
    train(m_lo, opt, 1, data)
    train(m_default, opt_default, 1, data)
    train(m_adam, torch.optim.Adam(m_adam.parameters(), lr=1e-3), 1, data)
    for a, d, p in zip(params_of(m_lo), params_of(m_default), p0):
        torch.testing.assert_close(p - a, (1e-3 / opt_default.learned_lr) * (p - d), rtol=1e-4, atol=1e-7)
    step_lo = sum((p - a).abs().sum() for a, p in zip(params_of(m_lo), p0))
    step_adam = sum((p - a).abs().sum() for a, p in zip(params_of(m_adam), p0))
    assert 0.2 < float(step_lo / step_adam) < 5.0, float(step_lo / step_adam)


def test_scheduler_scales_the_step_and_can_freeze():
    data = dataset()
    # LambdaLR(0.5) gives exactly the steps of lr = learned_lr / 2
    m_a, m_b = make_model(), make_model()
    opt_a = lo_opt(m_a.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 0.5)
    opt_b = lo_opt(m_b.parameters(), lr=0.5 * opt_a.learned_lr)
    train(m_a, opt_a, 3, data, sched)
    train(m_b, opt_b, 3, data)
    for a, b in zip(m_a.parameters(), m_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)

    model = make_model()
    opt = lo_opt(model.parameters(), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 3 else 0.0)
    train(model, opt, 3, data, sched)
    assert opt.param_groups[0]["lr"] == 0.0
    before = params_of(model)
    train(model, opt, 2, data, sched)  # lr = 0 freezes, weight decay included
    for a, b in zip(before, params_of(model)):
        assert torch.equal(a, b)
    assert opt.global_step == 5

    # cosine annealing drives the lr smoothly to eta_min and training stays finite
    opt2 = lo_opt(make_model().parameters())
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=4)
    for _ in range(4):
        opt2.step()
        cos.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("lr", [None, 1e-3])
def test_weight_decay_is_adamw_style(lr):
    """Each step shrinks parameters by the fraction lr * weight_decay, on top of the learned step."""
    data = dataset()
    base = make_model()
    p0 = params_of(base)
    m0, m1 = copy.deepcopy(base), copy.deepcopy(base)
    o0 = lo_opt(m0.parameters(), lr=lr)
    o1 = lo_opt(m1.parameters(), lr=lr, weight_decay=0.1)
    train(m0, o0, 1, data)
    train(m1, o1, 1, data)
    group_lr = o1.param_groups[0]["lr"]
    assert group_lr == (o1.learned_lr if lr is None else lr)
    for a, b, p in zip(params_of(m0), params_of(m1), p0):
        torch.testing.assert_close(b, a - group_lr * 0.1 * p, rtol=0, atol=1e-7)


def test_design_without_nominal_lr_uses_a_multiplier():
    lopt = LearnedOptimizer(LOConfig(hidden_width=8, design="additive", nominal="none",
                                     time_features="absolute", step_scale="none"))
    theta = lopt.init_theta(0)
    data = dataset()
    base = make_model()
    p0 = params_of(base)
    m1, m_half = copy.deepcopy(base), copy.deepcopy(base)
    opt = LearnedOptimizerTorch(m1.parameters(), lopt=lopt, theta=theta)
    assert opt.lr_is_multiplier and opt.learned_lr is None and opt.param_groups[0]["lr"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_half = LearnedOptimizerTorch(m_half.parameters(), lopt=lopt, theta=theta, lr=0.5)
    train(m1, opt, 1, data)
    train(m_half, opt_half, 1, data)
    for a, h, p in zip(params_of(m1), params_of(m_half), p0):
        torch.testing.assert_close(h, p - 0.5 * (p - a), rtol=0, atol=1e-7)
    with pytest.warns(UserWarning, match="multiplier"):
        LearnedOptimizerTorch(make_model().parameters(), lopt=lopt, theta=theta, lr=1e-3)


# ---- parameters without gradients ----------------------------------------------------------
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.unused = nn.Parameter(torch.randn(5, 3))  # requires_grad, never used: .grad stays None
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, x):
        return self.net(x) + 0 * self.frozen.sum()


@pytest.mark.parametrize("design", DESIGNS)
def test_params_without_grad_untouched_and_stateless(design):
    lopt = DESIGNS[design]
    data = dataset()
    model = WithUnused()
    ref = copy.deepcopy(model.net)
    unused0, frozen0 = model.unused.detach().clone(), model.frozen.detach().clone()
    opt = lo_opt(model.parameters(), lopt)
    train(model, opt, 3, data)
    assert torch.equal(model.unused, unused0) and torch.equal(model.frozen, frozen0)
    assert model.unused not in opt.state and model.frozen not in opt.state
    # skipping them does not change what happens to the others
    train(ref, lo_opt(ref.parameters(), lopt), 3, data)
    for a, b in zip(model.net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # a parameter that starts receiving gradients joins with fresh state; its step tracks the global one
    model.unused.grad = torch.ones_like(model.unused)
    opt.step()
    assert model.unused in opt.state and float(opt.state[model.unused]["step"]) == 4
    if design == "default":
        assert float(opt.state[model.unused]["horizon"]) == T
    assert not torch.equal(model.unused, unused0)


@pytest.mark.parametrize("design", DESIGNS)
def test_mixed_dtypes_bucket_like_separate_calls(design):
    lopt = DESIGNS[design]
    torch.manual_seed(0)
    a32, a64 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(6, dtype=torch.float64))
    b32, b64 = nn.Parameter(a32.detach().clone()), nn.Parameter(a64.detach().clone())
    opt = lo_opt([a32, a64], lopt)
    o32 = lo_opt([b32], lopt)
    o64 = lo_opt([b64], lopt)
    for step in range(3):
        g32, g64 = torch.randn(4, 3), torch.randn(6, dtype=torch.float64)
        a32.grad, b32.grad, a64.grad, b64.grad = g32, g32.clone(), g64, g64.clone()
        opt.step()
        o32.step()
        o64.step()
    assert torch.equal(a32, b32) and torch.equal(a64, b64)
    assert opt.state[a64]["v"].dtype == torch.float64 and opt.state[a32]["v"].dtype == torch.float32


# ---- construction and checkpoints ----------------------------------------------------------
@pytest.mark.parametrize("design", DESIGNS)
def test_from_checkpoint(tmp_path, design):
    lopt = DESIGNS[design]
    theta = theta_for(lopt, seed=7)
    save_learned_optimizer(tmp_path / "lo", lopt, theta, generation=3)
    data = dataset()
    m1, m2 = make_model(), make_model()
    kw = {"total_steps": T} if design == "default" else {}
    opt1 = LearnedOptimizerTorch.from_checkpoint(m1.parameters(), tmp_path / "lo", lr=2e-3, **kw)
    opt2 = LearnedOptimizerTorch(m2.parameters(), lopt=lopt, theta=theta, lr=2e-3, **kw)
    assert opt1.lopt.config == lopt.config and opt1.checkpoint_meta["generation"] == 3
    train(m1, opt1, 3, data)
    train(m2, opt2, 3, data)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    if design == "default":
        with pytest.raises(ValueError, match="total_steps"):
            LearnedOptimizerTorch.from_checkpoint(make_model().parameters(), tmp_path / "lo")


def test_checkpoint_without_design_fields_loads_as_legacy(tmp_path):
    """A config saved before the design fields existed is the original design: no total_steps needed."""
    save_learned_optimizer(tmp_path / "lo", LEGACY, theta_for(LEGACY))
    record_path = tmp_path / "lo" / "checkpoint.json"
    record = json.loads(record_path.read_text())
    for key in ("design", "time_features", "step_scale", "time_fractions", "rms_ref", "rms_floor",
                "scale_power", "controller_bound", "mix_init"):
        record["meta"]["lo_config"].pop(key, None)
    record.pop("meta_sha256")  # such old records were written before the metadata was hashed
    record_path.write_text(json.dumps(record))
    opt = LearnedOptimizerTorch.from_checkpoint(make_model().parameters(), tmp_path / "lo")
    assert opt.lopt.config == LEGACY.config and opt.total_steps is None


def test_corrupted_checkpoint_raises(tmp_path):
    save_learned_optimizer(tmp_path / "lo", LOPT, theta_for())
    (tensors,) = list((tmp_path / "lo").glob("tensors-*.safetensors"))
    blob = bytearray(tensors.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError):
        LearnedOptimizerTorch.from_checkpoint(make_model().parameters(), tmp_path / "lo", total_steps=T)
    with pytest.raises(CheckpointError):
        LearnedOptimizerTorch.from_checkpoint(make_model().parameters(), tmp_path / "missing", total_steps=T)
    bad = theta_for()
    bad["w0"][0, 0] = float("nan")
    save_learned_optimizer(tmp_path / "nan", LOPT, bad)
    with pytest.raises(CheckpointError, match="non-finite"):
        LearnedOptimizerTorch.from_checkpoint(make_model().parameters(), tmp_path / "nan", total_steps=T)


def test_constructor_validation():
    params = make_model().parameters()
    with pytest.raises(ValueError, match="theta"):
        LearnedOptimizerTorch(params, lopt=LOPT, total_steps=T)
    bad = theta_for()
    bad.pop("w0")
    with pytest.raises(ValueError, match="theta"):
        lo_opt(make_model().parameters(), theta=bad)
    with pytest.raises(ValueError, match="shape"):
        lo_opt(make_model().parameters(), theta=LearnedOptimizer().init_theta(0))
    for bad_lr in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            lo_opt(make_model().parameters(), lr=bad_lr)
    with pytest.raises(ValueError, match="lr"):
        lo_opt([{"params": make_model().parameters(), "lr": -1e-3}])
    with pytest.raises(ValueError, match="weight_decay"):
        lo_opt(make_model().parameters(), weight_decay=-0.1)
    # an LOConfig is accepted in place of the architecture
    opt = LearnedOptimizerTorch(make_model().parameters(), lopt=LOPT.config, theta=theta_for(), total_steps=T)
    assert isinstance(opt.lopt, LearnedOptimizer)


def test_import_is_light():
    code = ("import sys, optimizers, optimizers.higher_interop, optimizers.pretrained; "
            "bad = [m for m in ('higher', 'wandb') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "triton"])
def test_cuda_params_with_cpu_theta_and_state_dict_round_trip(kernels, design):
    lopt = DESIGNS[design]
    if kernels:  # the compiled kernels; under the interpreter (tests/test_kernels.py) they would run in Python
        import kernels as kernels_pkg

        if not kernels_pkg.triton_available() or kernels_pkg.triton_interpreted():
            pytest.skip("needs compiled triton (run this file on its own)")
    data = tuple(t.cuda() for t in dataset())
    model = make_model().cuda()
    opt = lo_opt(model.parameters(), lopt, kernels=kernels, kernel_precision="ieee")  # theta stays on CPU
    train(model, opt, 3, data)
    assert all(opt.state[p]["m"].device == p.device for p in model.parameters())
    ref_model = make_model()
    ref_opt = lo_opt(ref_model.parameters(), lopt)
    train(ref_model, ref_opt, 3, tuple(t.cpu() for t in data))
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    clone = copy.deepcopy(model)
    opt2 = lo_opt(clone.parameters(), lopt, kernels=kernels, kernel_precision="ieee")
    opt2.load_state_dict(opt.state_dict())
    train(model, opt, 2, data)
    train(clone, opt2, 2, data)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
