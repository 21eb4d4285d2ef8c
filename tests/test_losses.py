"""Known answers for every loss and update: each stage's loss on stand-in models with closed-form outputs, at fixed
t and noise, equals the value computed by hand from the SPEC's equations (or exactly 0 for a perfect model); the
EMA and LeanAdamW updates equal their textbook forms. A flipped sign, a skipped step, a dropped CFG or a missing
bias correction changes these numbers, so each of those bugs fails here."""
import types

import pytest
import torch
import torch.nn as nn

import ar_teacher
import causal_cd
import dmd
import model as M
import wan_scale as WS
import ode_init


def c0(ctx):
    """The scalar a stand-in reads from the text: ctx[:, 0, 0] broadcast to a video (B, 1, 1, 1, 1)."""
    return ctx[:, 0, 0].reshape(-1, 1, 1, 1, 1)


class StandIn(nn.Module):
    """v = a x_t + b c0(ctx) + c clean: closed form, with one trainable weight `a`. Records every call; with
    `needs_clean` it insists on the teacher-forcing path (clean context and frames_per_block given)."""

    def __init__(self, a, b=0.0, c=0.0, needs_clean=False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b, self.c, self.needs_clean, self.calls = b, c, needs_clean, []

    def forward(self, x, t, ctx, *, clean=None, frames_per_block=None, **kw):
        self.calls.append(dict(x=x.detach().clone(), t=torch.as_tensor(t).clone(), clean=clean, fpb=frames_per_block))
        if self.needs_clean:
            assert clean is not None and frames_per_block is not None, "teacher-forcing path expected"
        v = self.a * x + self.b * c0(ctx)
        return v + self.c * clean if clean is not None else v


class Oracle(nn.Module):
    """Returns a fixed velocity, whatever the input: the perfect model for a loss whose target is known."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x, t, ctx, **kw):
        return self.v


def sig(t):
    """s = t / 1000 as a (B, F, 1, 1, 1) or (B, 1, 1, 1, 1) tensor."""
    s = torch.as_tensor(t, dtype=torch.float32) / 1000
    while s.dim() < 5:
        s = s.unsqueeze(-1)
    return s


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bell_by_hand(t, shift):
    """SPEC stage 1: w(t) ∝ exp(-2 ((t - 500)/1000)^2) - min over the 1000-grid, normalised to mean 1 there."""
    grid = M.timestep_grid(1000, shift).double()
    y = torch.exp(-2 * ((grid - 500) / 1000) ** 2)
    w = torch.exp(-2 * ((torch.as_tensor(t).double() - 500) / 1000) ** 2) - y.min()
    return (w / (y - y.min()).mean()).float()


# --- stage 0/1: flow matching ---------------------------------------------------------------------------------

T_FM = torch.tensor([[1000.0, 500.0, 250.0], [937.5, 96.2, 40.0]])  # (B, F): per-frame t, one at pure noise


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    """Target is v = eps - x0: a model returning exactly that has loss 0, weighted or not."""
    x0, eps = rand(2, 3, 3, 4, 4, seed=1), rand(2, 3, 3, 4, 4, seed=2)
    for weighted in (False, True):
        loss = ar_teacher.flow_matching_loss(Oracle(eps - x0), x0, rand(2, 2, 32), T_FM, eps, 5.0, weighted)
        assert loss.item() == 0.0
    loss = ar_teacher.flow_matching_loss(Oracle(x0 - eps), x0, rand(2, 2, 32), T_FM, eps, 5.0, False)
    assert loss.item() > 1.0  # the flipped target is far from it


@pytest.mark.parametrize("weighted", [False, True])
def test_flow_matching_loss_uniform_and_bell_by_hand(weighted):
    """v = 0.5 x_t + 0.3 c0: loss = mean_{b,f} w(t_bf) mean_{c,h,w} (v - (eps - x0))^2 with x_t = (1-s) x0 + s eps,
    w = 1 (uniform) or the bell (0 at t = 1000); the model sees exactly that x_t and t."""
    x0, eps, ctx = rand(2, 3, 3, 4, 4, seed=1), rand(2, 3, 3, 4, 4, seed=2), rand(2, 2, 32, seed=3)
    m = StandIn(0.5, b=0.3)
    loss = ar_teacher.flow_matching_loss(m, x0, ctx, T_FM, eps, 5.0, weighted)
    s = sig(T_FM)
    x_t = (1 - s) * x0 + s * eps
    per_frame = (0.5 * x_t + 0.3 * c0(ctx) - (eps - x0)).pow(2).mean(dim=(2, 3, 4))  # (B, F)
    w = bell_by_hand(T_FM, 5.0) if weighted else torch.ones_like(T_FM)
    if weighted:
        assert w[0, 0] == 0 and (w[0, 1:] > 1).all()  # the bell: nothing at pure noise, > 1 mid-way
    assert torch.allclose(loss, (w * per_frame).mean(), rtol=1e-5, atol=0)
    assert torch.allclose(m.calls[0]["x"], x_t, atol=1e-6) and torch.equal(m.calls[0]["t"], T_FM)


# --- stage 2a: causal ODE regression (the AR teacher's case) --------------------------------------------------

def test_ode_regression_loss_ar_by_hand():
    """--teacher ar: one k ~ U{0..3} per sample (drawn first from the generator), input states[k] at t_k =
    warped_steps(4)[k] with the ground-truth clean context, loss = MSE(x_t - s v, endpoint)."""
    B, nF, shift = 4, 3, 5.0
    states, x0_gt, ctx = rand(B, 5, nF, 3, 4, 4, seed=4), rand(B, nF, 3, 4, 4, seed=5), rand(B, 2, 32, seed=6)
    m = StandIn(0.7, b=0.2, c=-0.4, needs_clean=True)
    loss = ode_init.ode_regression_loss(m, (states, x0_gt), ctx, "ar", 1, shift, torch.Generator().manual_seed(9))
    k = torch.randint(0, 4, (B, 1), generator=torch.Generator().manual_seed(9))[:, 0]  # (B,)
    t = torch.tensor(M.warped_steps(4, shift))[k][:, None].expand(B, nF)  # same t for all frames of a sample
    x_in = states[torch.arange(B), k]  # (B, F, C, H, W)
    x0_hat = x_in - sig(t) * (0.7 * x_in + 0.2 * c0(ctx) - 0.4 * x0_gt)
    assert torch.allclose(loss, (x0_hat - states[:, -1]).pow(2).mean(), rtol=1e-5, atol=0)
    assert torch.equal(m.calls[0]["clean"], x0_gt) and m.calls[0]["fpb"] == 1
    assert torch.equal(m.calls[0]["t"], t) and len(set(k.tolist())) > 1  # the draw really varies per sample


@pytest.mark.parametrize("kind", ["ar", "bidirectional"])
def test_pair_loss_by_hand_every_stored_point_in_turn(kind):
    """pair_loss (the memorisation check): every frame at stored point k for k = 0..3 in turn, no draw; the MSE of
    x_t - s v against the endpoint, averaged over k and the first n pairs (n = 3 of 5, in batches of 2); the AR
    student with the ground-truth clean context, the bidirectional one without."""
    B, nF, shift, n = 5, 3, 5.0, 3
    states, x0_gt, ctx = rand(B, 5, nF, 3, 4, 4, seed=4), rand(B, nF, 3, 4, 4, seed=5), rand(B, 2, 32, seed=6)
    m = StandIn(0.7, b=0.2, c=-0.4, needs_clean=kind == "ar")
    m.cfg = types.SimpleNamespace(shift=shift)
    loss = ode_init.pair_loss(m, dict(states=states, x0=x0_gt, text=ctx, actions=None), kind, 1, n=n, batch=2)
    want = 0.0
    for k, t_k in enumerate(M.warped_steps(4, shift)):
        x_in = states[:n, k]
        v = 0.7 * x_in + 0.2 * c0(ctx[:n]) + (-0.4 * x0_gt[:n] if kind == "ar" else 0.0)
        want += (x_in - t_k / 1000 * v - states[:n, -1]).pow(2).mean().item() / 4
    assert loss == pytest.approx(want, rel=1e-5)
    assert len(m.calls) == 8 and {len(c["x"]) for c in m.calls} == {2, 1}  # 4 points x batches of 2 + 1 pairs
    assert all((c["clean"] is not None) == (kind == "ar") and c["fpb"] == 1 for c in m.calls)
    assert [float(c["t"][0, 0]) for c in m.calls[::2]] == pytest.approx(M.warped_steps(4, shift))


# --- stage 2b: causal consistency distillation -------------------------------------------------------------------

def test_cd_loss_by_hand():
    """CF++ Alg. 1 with stand-ins: n ~ U{0..46} then eps from the generator; x_t' = x_t - (s - s') v_cfg with
    v_cfg = v_u + w (v_c - v_u); f_target = x0_hat(EMA, x_t', t'); f_theta = x0_hat(student, x_t, t); loss = MSE.
    Every network gets the ground-truth clean context; only the student gets a gradient."""
    B, nF, w = 2, 2, 3.0
    x0, ctx = rand(B, nF, 3, 4, 4, seed=10), rand(B, 2, 32, seed=11)
    null = torch.zeros_like(ctx)
    grid = M.timestep_grid(48, 5.0)
    teacher = StandIn(0.9, b=0.5, c=0.3, needs_clean=True).requires_grad_(False)
    ema = StandIn(0.4, b=-0.2, c=0.6, needs_clean=True).requires_grad_(False)
    student = StandIn(0.8, b=0.1, c=-0.5, needs_clean=True)
    loss = causal_cd.cd_loss(student, ema, teacher, x0, ctx, null, grid, w, 1, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    n = int(torch.randint(0, 47, (1,), generator=g))
    eps = torch.randn(x0.shape, generator=g)
    t, t_next = float(grid[n]), float(grid[n + 1])
    s, s_next = t / 1000, t_next / 1000
    x_t = (1 - s) * x0 + s * eps
    v_cfg = 0.9 * x_t + w * 0.5 * c0(ctx) + 0.3 * x0  # the uncond branch has c0 = 0
    x_next = x_t - (s - s_next) * v_cfg
    f_target = x_next - s_next * (0.4 * x_next - 0.2 * c0(ctx) + 0.6 * x0)
    f_theta = x_t - s * (0.8 * x_t + 0.1 * c0(ctx) - 0.5 * x0)
    assert torch.allclose(loss, (f_theta - f_target).pow(2).mean(), rtol=1e-5, atol=0)
    assert loss.item() > 1e-3  # not a comparison of two zeros
    # who saw what: the teacher at t (batch 2B: cond | uncond), the EMA at t', the student at t
    assert torch.allclose(teacher.calls[0]["t"], torch.full((2 * B, nF), t))
    assert torch.allclose(ema.calls[0]["t"], torch.full((B, nF), t_next))
    assert torch.allclose(ema.calls[0]["x"], x_next, atol=1e-6)
    assert torch.allclose(student.calls[0]["t"], torch.full((B, nF), t))
    assert torch.equal(student.calls[0]["clean"], x0) and torch.equal(ema.calls[0]["clean"], x0)
    loss.backward()
    assert student.a.grad is not None and ema.a.grad is None and teacher.a.grad is None


# --- stage 3: DMD -------------------------------------------------------------------------------------------------

def test_dmd_generator_loss_by_hand():
    """x_t = (1-s) x + s eps (one t per clip); x0_fake from the critic (no CFG), x0_real from the real score with
    CFG w; g = (x0_fake - x0_real) / mean|x - x0_real| per clip; loss = 0.5 mean g^2, |g| = mean |g|, and
    d loss / dx = g / numel."""
    B, w = 2, 4.0
    x, ctx = rand(B, 3, 3, 4, 4, seed=12), rand(B, 2, 32, seed=13)
    null, eps = torch.zeros_like(ctx), rand(B, 3, 3, 4, 4, seed=14)
    t = torch.tensor([300.0, 700.0])
    real, critic = StandIn(0.6, b=0.8), StandIn(-0.3, b=0.2)
    x_grad = x.clone().requires_grad_(True)
    loss, g_abs = dmd.dmd_loss(x_grad, real, critic, ctx, null, w, t, eps)
    s = sig(t)
    x_t = (1 - s) * x + s * eps
    x0_fake = x_t - s * (-0.3 * x_t + 0.2 * c0(ctx))
    x0_real = x_t - s * (0.6 * x_t + w * 0.8 * c0(ctx))
    g = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert abs(loss.item() - 0.5 * g.pow(2).mean().item()) < 1e-6 * max(1.0, loss.item())
    assert abs(g_abs - g.abs().mean().item()) < 1e-5
    loss.backward()  # and the gradient that reaches the rollout is g / numel: it points along +g
    assert torch.allclose(x_grad.grad, g / x.numel(), rtol=1e-4, atol=1e-10)


def test_dmd_critic_loss_by_hand_and_zero_for_the_exact_velocity():
    """The critic's flow matching on generator samples x: target eps - x, so loss = mean (v - (eps - x))^2."""
    x, eps, ctx = rand(2, 3, 3, 4, 4, seed=15), rand(2, 3, 3, 4, 4, seed=16), rand(2, 2, 32, seed=17)
    t = torch.tensor([120.0, 860.0])
    assert dmd.critic_loss(Oracle(eps - x), x, ctx, t, eps).item() == 0.0
    critic = StandIn(0.5, b=0.3)
    loss = dmd.critic_loss(critic, x, ctx, t, eps)
    s = sig(t)
    x_t = (1 - s) * x + s * eps
    assert torch.allclose(loss, (0.5 * x_t + 0.3 * c0(ctx) - (eps - x)).pow(2).mean(), rtol=1e-5, atol=0)
    assert torch.allclose(critic.calls[0]["x"], x_t, atol=1e-6)


def test_critic_fit_is_zero_for_the_base_and_the_loss_ratio_otherwise():
    """critic_fit = mean over t of (critic's flow-matching loss / base's loss on the same noised clips) - 1:
    exactly 0 for a critic equal to the base (DMD's start), and by hand for a stand-in (fixed noise per t from the
    seed)."""
    x, ctx = rand(2, 3, 3, 4, 4, seed=18), rand(2, 2, 32, seed=19)
    base = StandIn(0.4, b=0.5)
    assert dmd.critic_fit(StandIn(0.4, b=0.5), base, x, ctx) == 0.0
    ts = (100.0, 700.0)
    critic = StandIn(-0.2, b=0.1)
    got = dmd.critic_fit(critic, base, x, ctx, ts=ts, seed=3)
    g, want = torch.Generator().manual_seed(3), []
    for t in ts:
        eps = torch.randn(x.shape, generator=g)
        s = t / 1000
        x_t = (1 - s) * x + s * eps
        loss = lambda a, b: (a * x_t + b * c0(ctx) - (eps - x)).pow(2).mean()
        want.append((loss(-0.2, 0.1) / loss(0.4, 0.5)).item() - 1)
    assert abs(got - sum(want) / 2) < 1e-6


# --- updates --------------------------------------------------------------------------------------------------------

def test_ema_update_is_decay_times_ema_plus_rest_times_model():
    """ema <- decay ema + (1 - decay) model: from 0 towards a constant 1, n updates give 1 - decay^n."""
    ema, model = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p, q in zip(ema.parameters(), model.parameters()):
            p.zero_(), q.fill_(1.0)
    M.ema_update(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in ema.parameters())
    M.ema_update(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 1 - 0.9 ** 2)) for p in ema.parameters())
    assert all(torch.equal(q, torch.ones_like(q)) for q in model.parameters())  # the model is untouched


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.0, 0.999)])
def test_lean_adamw_equals_torch_adamw_with_momentum_and_weight_decay(betas):
    """Where the factored second moment is exact (vectors; matrices whose squared gradients are rank one in every
    step), three LeanAdamW steps equal three torch AdamW steps: bias-corrected moments, decoupled weight decay."""
    a, b = rand(6, seed=18).abs() + 0.5, rand(5, seed=19).abs() + 0.5
    sign = torch.where(rand(6, 5, seed=20) > 0, 1.0, -1.0)
    grads_mat = [c * a[:, None] * b[None] * sign for c in (1.0, -0.3, 2.0)]  # g^2 = c^2 a^2 b^2: rank one
    grads_vec = [rand(7, seed=21 + i) for i in range(3)]
    init_mat, init_vec = rand(6, 5, seed=30), rand(7, seed=31)
    params = {}
    for name, cls in (("lean", WS.LeanAdamW), ("torch", torch.optim.AdamW)):
        pm, pv = nn.Parameter(init_mat.clone()), nn.Parameter(init_vec.clone())
        opt = cls([pm, pv], lr=0.05, betas=betas, eps=1e-8, weight_decay=0.1)
        for gm, gv in zip(grads_mat, grads_vec):
            pm.grad, pv.grad = gm.clone(), gv.clone()
            opt.step()
        params[name] = (pm.detach(), pv.detach())
    for lean, ref in zip(params["lean"], params["torch"]):
        assert torch.allclose(lean, ref, rtol=0, atol=1e-6), (lean - ref).abs().max()
    assert (params["torch"][1] - init_vec).abs().mean() > 0.05  # the steps are large enough to see a wrong bias correction or decay
