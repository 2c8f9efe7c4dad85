import math

import pytest
import torch

from data_contracts.config import ConfigError, LossConfig, load_config
from dpo_engine.modeling import dpo_loss, f_divergence, ld_weighted_logps, loss_from_config, pair_metrics, wpo_log_weight


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_sigmoid_is_ln2_when_policy_equals_reference():
    out = dpo_loss(t(-5.0, -7.0), t(-6.0, -3.0), t(-5.0, -7.0), t(-6.0, -3.0), beta=0.1)
    assert torch.allclose(out.losses, t(math.log(2), math.log(2)))


def test_sigmoid_golden():
    # c = -1 - -2 = 1, r = -3 - -1 = -2, delta = 3, beta 0.5 -> -log sigmoid(1.5)
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), beta=0.5)
    assert math.isclose(out.losses.item(), math.log1p(math.exp(-1.5)), rel_tol=1e-12)
    assert math.isclose(out.chosen_rewards.item(), 0.5) and math.isclose(out.rejected_rewards.item(), -1.0)


def test_cdpo_label_smoothing_golden():
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), beta=0.5, label_smoothing=0.2)
    want = 0.8 * math.log1p(math.exp(-1.5)) + 0.2 * math.log1p(math.exp(1.5))
    assert math.isclose(out.losses.item(), want, rel_tol=1e-12)


def test_hinge_and_ipo_golden():
    h = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), loss_type="hinge", beta=0.2)
    assert math.isclose(h.losses.item(), 1 - 0.2 * 3, rel_tol=1e-12)
    ipo = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), loss_type="ipo", beta=0.5,
                   chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]))
    assert math.isclose(ipo.losses.item(), (1 / 2 - (-2) / 4 - 1.0) ** 2, rel_tol=1e-12)


def test_metrics_use_trl_names_and_strict_accuracy():
    out = dpo_loss(t(-1.0, -2.0), t(-3.0, -2.0), t(-1.0, -2.0), t(-3.0, -2.0), beta=0.1)
    m = pair_metrics(out, t(-1.0, -2.0), t(-3.0, -2.0))
    assert m["rewards/accuracies"] == 0.0  # ties count as wrong
    assert set(m) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected"}
    assert m["logps/chosen"] == -1.5


# ---------------------------------------------------------------------------------- every loss type
# Shared pair: c = -1 - (-2) = 1, r = -3 - (-1) = -2, beta 0.5 -> beta*c = 0.5, beta*r = -1,
# beta*delta = 1.5; completion lengths Lc = 2, Lr = 4.


def ls(z):  # log sigmoid
    return -math.log1p(math.exp(-z))


def sig(z):
    return 1 / (1 + math.exp(-z))


def one(loss_type, **kw):
    kw.setdefault("beta", 0.5)
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), loss_type=loss_type,
                   chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]), **kw)
    return out.losses.item()


GOLDEN = {
    "sigmoid": ({}, -ls(1.5)),
    "hinge": ({"beta": 0.2}, 1 - 0.2 * 3),
    "ipo": ({}, (1 / 2 - (-2) / 4 - 1.0) ** 2),
    "exo_pair": ({"label_smoothing": 0.1},
                 sig(1.5) * (ls(1.5) - math.log(0.9)) + sig(-1.5) * (ls(-1.5) - math.log(0.1))),
    "nca_pair": ({}, -ls(0.5) - 0.5 * ls(-0.5) - 0.5 * ls(1.0)),
    "robust": ({"label_smoothing": 0.2}, (-0.8 * ls(1.5) + 0.2 * ls(-1.5)) / 0.6),
    "bco_pair": ({}, -ls(0.5) - ls(1.0)),
    "sppo_hard": ({}, (1 - 1) ** 2 + (-2 + 1) ** 2),
    "apo_zero": ({}, (1 - sig(0.5)) + sig(-1.0)),
    "apo_down": ({}, sig(0.5) + (1 - sig(1.5))),
    "discopop": ({}, (1 - sig(1.5 / 0.05)) * -ls(1.5) + sig(1.5 / 0.05) * math.exp(-1.5)),
    "sft": ({}, 1 / 2),  # -(-1) / 2 tokens
    "sigmoid_norm": ({}, -ls(0.5 * (1 / 2 - (-2) / 4))),
    "aot": ({}, -ls(0.5 * ((-1 - -3) - (-2 - -1)))),  # batch of one: sorting is the identity
    "aot_unpaired": ({}, -ls(1.5)),
    "simpo": ({"simpo_gamma": 0.2}, -ls(0.5 * (-1 / 2 - -3 / 4) - 0.2)),
}


@pytest.mark.parametrize("loss_type", sorted(GOLDEN))
def test_golden_per_loss(loss_type):
    kw, want = GOLDEN[loss_type]
    assert math.isclose(one(loss_type, **kw), want, rel_tol=1e-12, abs_tol=1e-15)


def test_discopop_tau_is_configurable():
    m = sig(1.5 / 1.0)
    assert math.isclose(one("discopop", discopop_tau=1.0), (1 - m) * -ls(1.5) + m * math.exp(-1.5),
                        rel_tol=1e-12)


def test_sft_is_batch_token_mean_replicated_per_pair():
    out = dpo_loss(t(-1.0, -5.0), t(-3.0, -3.0), t(-1.0, -5.0), t(-3.0, -3.0), loss_type="sft",
                   chosen_len=torch.tensor([2, 3]), rejected_len=torch.tensor([4, 4]))
    assert torch.allclose(out.losses, t(6 / 5, 6 / 5))


def test_label_smoothing_in_aot():
    want = 0.9 * -ls(1.5) + 0.1 * -ls(-1.5)
    assert math.isclose(one("aot_unpaired", label_smoothing=0.1), want, rel_tol=1e-12)


def test_aot_sorts_over_the_batch():
    # policy margins (pc - pr) = [3, -1, 2]; reference margins = [0, 5, 1]
    pc, pr = t(0.0, 0.0, 0.0), t(-3.0, 1.0, -2.0)
    rc, rr = t(0.0, 5.0, 1.0), t(0.0, 0.0, 0.0)
    out = dpo_loss(pc, pr, rc, rr, loss_type="aot", beta=1.0)
    d = [-1 - 0, 2 - 1, 3 - 5]  # sorted([3,-1,2]) - sorted([0,5,1])
    assert torch.allclose(out.losses, t(*[-ls(x) for x in d]))
    paired = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=1.0).losses.mean()
    assert not math.isclose(out.losses.mean().item(), paired.item())
    # aot_unpaired sorts c and r separately: c = [0, -5, -1], r = [-3, 1, -2]
    un = dpo_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=1.0)
    d = [-5 - -3, -1 - -2, 0 - 1]
    assert torch.allclose(un.losses, t(*[-ls(x) for x in d]))


def test_orpo_golden_and_rewards():
    lam = 0.1

    def log_odds(a):
        return a - math.log1p(-math.exp(a))

    out = dpo_loss(t(-1.0), t(-3.0), None, None, loss_type="orpo", beta=0.5, orpo_lambda=lam,
                   chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]))
    want = 1 / 2 - lam * ls(log_odds(-0.5) - log_odds(-0.75))
    assert math.isclose(out.losses.item(), want, rel_tol=1e-12)
    assert math.isclose(out.chosen_rewards.item(), 0.5 * -0.5)
    assert math.isclose(out.rejected_rewards.item(), 0.5 * -0.75)


def test_simpo_ignores_reference_and_rewards_are_length_normalised():
    a = dpo_loss(t(-1.0), t(-3.0), None, None, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                 chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]))
    b = dpo_loss(t(-1.0), t(-3.0), t(-50.0), t(7.0), loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                 chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]))
    assert math.isclose(a.losses.item(), -ls(2.0 * (-0.5 + 0.75) - 0.5), rel_tol=1e-12)
    assert a.losses.item() == b.losses.item()
    assert (a.chosen_rewards.item(), a.rejected_rewards.item()) == (-1.0, -1.5)


def test_missing_inputs_name_the_loss():
    with pytest.raises(ValueError, match="loss_type=bco_pair needs reference"):
        dpo_loss(t(-1.0), t(-3.0), None, None, loss_type="bco_pair")
    with pytest.raises(ValueError, match="loss_type=sigmoid_norm needs completion token counts"):
        dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), loss_type="sigmoid_norm")


# ---------------------------------------------------------------------------------- f-divergences

def test_f_divergence_transforms():
    x = t(0.7)
    assert math.isclose(f_divergence(x, "reverse_kl").item(), 0.7)
    assert math.isclose(f_divergence(x, "forward_kl").item(), 1 - math.exp(-0.7), rel_tol=1e-12)
    assert math.isclose(f_divergence(x, "js_divergence").item(), math.log(2) + ls(0.7), rel_tol=1e-12)
    assert math.isclose(f_divergence(x, "alpha_divergence", 0.5).item(),
                        (math.exp(-0.5 * 0.7) - 1) / -0.5, rel_tol=1e-12)
    assert math.isclose(f_divergence(x, "alpha_divergence", 1.0).item(), 0.7)
    # (alpha-1)x clamped at 80 (fp32) and 11 (fp16): finite where exp would overflow
    big = f_divergence(torch.tensor([-1000.0]), "forward_kl")
    assert math.isclose(big.item(), 1 - math.exp(80), rel_tol=1e-6)
    half = f_divergence(torch.tensor([-100.0], dtype=torch.float16), "alpha_divergence", 0.0)
    assert torch.isfinite(half).all() and math.isclose(half.item(), 1 - math.exp(11), rel_tol=1e-3)


def test_f_divergence_applies_to_scores_but_not_to_raw_losses():
    js = one("sigmoid", f_divergence_type="js_divergence")
    fc, fr = math.log(2) + ls(1.0), math.log(2) + ls(-2.0)
    assert math.isclose(js, -ls(0.5 * (fc - fr)), rel_tol=1e-12)
    fk = one("ipo", f_divergence_type="forward_kl")
    assert math.isclose(fk, ((1 - math.exp(-1)) / 2 - (1 - math.exp(2)) / 4 - 1.0) ** 2, rel_tol=1e-12)
    assert one("bco_pair", f_divergence_type="js_divergence") == one("bco_pair")


# ---------------------------------------------------------------------------------- combinations

def test_mpo_combination_with_weights():
    pc, pr, rc, rr = t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -4.5), t(-1.0, -2.5)
    lc, lr = torch.tensor([2, 3]), torch.tensor([4, 1])
    beta = 0.5
    cs, rs = [1.0, 0.5], [-2.0, 0.5]
    sigm = sum(-ls(beta * (c - r)) for c, r in zip(cs, rs)) / 2
    bco = sum(-ls(beta * c) - ls(-beta * r) for c, r in zip(cs, rs)) / 2
    sft = 5 / 5
    want = 0.8 * sigm + 0.2 * bco + 1.0 * sft
    out = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                   beta=beta, chosen_len=lc, rejected_len=lr)
    assert math.isclose(out.losses.mean().item(), want, rel_tol=1e-12)
    assert torch.allclose(out.chosen_rewards, t(0.5, 0.25))
    cfg = load_config(None, {"loss.loss_type": ["sigmoid", "bco_pair", "sft"],
                             "loss.loss_weights": [0.8, 0.2, 1.0], "loss.beta": 0.5}).loss
    via_cfg = loss_from_config(cfg, pc, pr, rc, rr, chosen_len=lc, rejected_len=lr)
    assert torch.equal(via_cfg.losses, out.losses)


def test_rpo_equals_sigmoid_plus_weighted_sft():
    a = one(["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    assert math.isclose(a, -ls(1.5) + 0.3 * 0.5, rel_tol=1e-12)


# ---------------------------------------------------------------------------------- WPO and LD-DPO

def test_wpo_weighting():
    pc = t(-1.0).requires_grad_()
    out = dpo_loss(pc, t(-3.0), t(-2.0), t(-1.0), beta=0.5, use_weighting=True,
                   chosen_log_weight=t(-0.2).requires_grad_(), rejected_log_weight=t(-0.3))
    assert math.isclose(out.losses.item(), -ls(1.5) * math.exp(-0.5), rel_tol=1e-12)
    out.losses.sum().backward()
    assert math.isclose(pc.grad.item(), -0.5 * sig(-1.5) * math.exp(-0.5), rel_tol=1e-12)
    with pytest.raises(ValueError, match="use_weighting"):
        dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), use_weighting=True)


def test_wpo_log_weight_helper():
    logps = t(-1.0, -2.0, 0.0).reshape(1, 3)
    log_p2 = t(-0.5, -1.0, 9.0).reshape(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    w = wpo_log_weight(logps.requires_grad_(), log_p2, mask)
    assert math.isclose(w.item(), ((-1 + 0.5) + (-2 + 1)) / 2) and not w.requires_grad


def test_ld_weighted_logps_helper():
    # chosen: 3 completion tokens (right-padded); rejected: 2 (left-padded, one prompt position)
    tc = t(-1.0, -2.0, -3.0, 0.0).reshape(1, 4)
    tr = t(-9.0, -4.0, -5.0).reshape(1, 3)
    mc, mr = torch.tensor([[1, 1, 1, 0]]), torch.tensor([[0, 1, 1]])
    c, r = ld_weighted_logps(tc, tr, mc, mr, alpha=0.5)
    assert (c.item(), r.item()) == (-1 - 2 + 0.5 * -3, -9.0)
    c1, _ = ld_weighted_logps(tc, tr, mc, mr, alpha=1.0)
    c0, _ = ld_weighted_logps(tc, tr, mc, mr, alpha=0.0)
    assert (c1.item(), c0.item()) == (-6.0, -3.0)


def test_ld_alpha_requires_weighted_inputs():
    cfg = load_config(None, {"loss.ld_alpha": 0.5}).loss
    with pytest.raises(ValueError, match="ld_alpha"):
        loss_from_config(cfg, t(-1.0), t(-3.0), t(-2.0), t(-1.0))
    out = loss_from_config(cfg, t(-1.0), t(-3.0), t(-2.0), t(-1.0), ld_weighted=True)
    assert math.isclose(out.losses.item(), -ls(0.1 * 3), rel_tol=1e-12)


# ---------------------------------------------------------------------------------- configuration

def test_config_defaults_follow_trl():
    cfg = LossConfig()
    assert (cfg.loss_types, cfg.beta, cfg.label_smoothing, cfg.f_divergence_type, cfg.discopop_tau) == \
        (["sigmoid"], 0.1, 0.0, "reverse_kl", 0.05)
    assert cfg.weights == [1.0] and cfg.use_weighting is False and cfg.ld_alpha is None
    assert load_config(None, ["loss.loss_type=[sigmoid, sft]"]).loss.loss_types == ["sigmoid", "sft"]


@pytest.mark.parametrize("overrides, field", [
    ({"loss.loss_type": "exo_pair"}, "loss.label_smoothing"),
    ({"loss.loss_type": "aot", "loss.use_weighting": True}, "loss.use_weighting"),
    ({"loss.loss_type": ["sigmoid", "aot_unpaired"], "loss.use_weighting": True}, "loss.use_weighting"),
    ({"loss.loss_type": "robust", "loss.label_smoothing": 0.5}, "loss.label_smoothing"),
    ({"loss.loss_type": ["sigmoid", "sft"], "loss.loss_weights": [1.0]}, "loss.loss_weights"),
    ({"loss.loss_type": ["sigmoid", "sft"], "loss.loss_weights": [1.0, -1.0]}, "loss.loss_weights"),
    ({"loss.loss_type": "dpo"}, "loss.loss_type"),
    ({"loss.loss_type": ["sigmoid", "sigmoid"]}, "loss.loss_type"),
    ({"loss.loss_type": []}, "loss.loss_type"),
    ({"loss.ld_alpha": 1.5}, "loss.ld_alpha"),
    ({"loss.ld_alpha": -0.1}, "loss.ld_alpha"),
    ({"loss.f_divergence_type": "alpha_divergence", "loss.f_alpha_divergence_coef": 2.0},
     "loss.f_alpha_divergence_coef"),
    ({"loss.f_divergence_type": "chi2"}, "loss.f_divergence_type"),
    ({"loss.loss_type": "bco_pair", "loss.f_divergence_type": "js_divergence"}, "loss.f_divergence_type"),
    ({"loss.loss_type": "hinge", "loss.label_smoothing": 0.1}, "loss.label_smoothing"),
    ({"loss.loss_type": "ipo", "loss.label_smoothing": 0.1}, "loss.label_smoothing"),
    ({"loss.discopop_tau": 0.0}, "loss.discopop_tau"),
])
def test_invalid_combinations_fail_at_config_time(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_valid_combinations_load():
    load_config(None, {"loss.loss_type": "exo_pair", "loss.label_smoothing": 0.001})
    load_config(None, {"loss.loss_type": "exo_pair", "loss.label_smoothing": 0.6})
    load_config(None, {"loss.loss_type": ["sigmoid", "bco_pair", "sft"], "loss.loss_weights": [0.8, 0.2, 1]})
    load_config(None, {"loss.loss_type": "sigmoid", "loss.f_divergence_type": "alpha_divergence",
                       "loss.f_alpha_divergence_coef": 0.3, "loss.use_weighting": True, "loss.ld_alpha": 0.0})
