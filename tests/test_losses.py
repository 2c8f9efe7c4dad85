import math

import torch

from dpo_engine.losses import dpo_loss, pair_metrics


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
