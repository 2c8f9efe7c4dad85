"""Learning-rate schedules and optimizers as TRL/transformers make them: our LR per step equals the HF
Trainer's (Trainer.create_scheduler, TrainingArguments.get_warmup_steps) for every schedule, warmup
starts from 0 and `constant` has none, the trainer logs those LRs and a resumed training continues the
schedule; the optimizers by name get the classes and arguments the HF Trainer gives them."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainingArguments

from data_contracts.config import ConfigError, LossConfig, TrainConfig, load_config
from data_contracts.config.train import SCHEDULER_KWARGS, SCHEDULERS
from dpo_engine.training import TrainingError, train
from dpo_engine.training.optim import make_optimizer, make_scheduler
from test_trainer import _load, _pairs, _ref
from tiny import tiny_model_dir

LR, STEPS = 1e-3, 12
CASES = [("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 1.0}), ("cosine_with_restarts", {"num_cycles": 3}),
         ("polynomial", {"power": 2.0, "lr_end": 1e-5}), ("constant", {}), ("constant_with_warmup", {}),
         ("inverse_sqrt", {}), ("inverse_sqrt", {"timescale": 5}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
         ("cosine_warmup_with_min_lr", {"min_lr": 1e-4, "warmup_lr_rate": 0.1}),
         ("warmup_stable_decay", {"num_decay_steps": 4, "min_lr_ratio": 0.05})]
WARMUPS = [{}, {"warmup_ratio": 0.2}, {"warmup_steps": 3}]


def _opt():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)


def _used_lrs(opt, sched, steps):
    """The learning rate each optimizer step used (set before the step, as the trainer logs it)."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _hf_lrs(name, kw, warmup, steps, tmp_path):
    """What the HF Trainer (so TRL) uses: its create_scheduler on its own TrainingArguments. transformers 5
    spells warmup_ratio as a warmup_steps below 1."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=LR, lr_scheduler_type=name,
                             lr_scheduler_kwargs=kw,
                             warmup_steps=warmup.get("warmup_steps", warmup.get("warmup_ratio", 0)))
    host = SimpleNamespace(args=args, lr_scheduler=None)
    opt = _opt()
    sched = Trainer.create_scheduler(host, steps, optimizer=opt)
    return _used_lrs(opt, sched, steps)


def test_the_scheduler_table_matches_transformers():
    """Every name is one of transformers' SchedulerType, and its extra arguments are its function's."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    for name, kwargs in SCHEDULER_KWARGS.items():
        params = set(inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters)
        assert set(kwargs) == params - {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}, name
    assert {c[0] for c in CASES} == set(SCHEDULERS)


@pytest.mark.parametrize("warmup", WARMUPS, ids=["no-warmup", "ratio", "steps"])
@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}{'-' + '-'.join(kw) if kw else ''}" for n, kw in CASES])
def test_lr_per_step_equals_the_hf_trainers(name, kw, warmup, tmp_path):
    cfg = TrainConfig(learning_rate=LR, lr_scheduler_type=name, lr_scheduler_kwargs=kw, **warmup)
    opt = _opt()
    ours = _used_lrs(opt, make_scheduler(opt, cfg, STEPS), STEPS)
    assert ours == pytest.approx(_hf_lrs(name, kw, warmup, STEPS, tmp_path), rel=1e-12, abs=0)


def test_warmup_starts_at_zero_and_constant_does_not_warm_up():
    """What differed before: warmup began at lr/(w+1), `constant` warmed up, and a ratio was rounded."""
    opt = _opt()
    linear = _used_lrs(opt, make_scheduler(opt, TrainConfig(learning_rate=LR, warmup_steps=4), 8), 8)
    assert linear[:5] == pytest.approx([0.0, LR / 4, LR / 2, 3 * LR / 4, LR])
    opt = _opt()
    const = _used_lrs(opt, make_scheduler(opt, TrainConfig(learning_rate=LR, lr_scheduler_type="constant",
                                                            warmup_ratio=0.5), 8), 8)
    assert const == [LR] * 8
    opt = _opt()  # ceil(0.1 * 32) = 4 warmup steps, as transformers (round would give 3)
    ratio = _used_lrs(opt, make_scheduler(opt, TrainConfig(learning_rate=LR, warmup_ratio=0.1), 32), 32)
    assert ratio[3] < LR and ratio[4] == pytest.approx(LR)


def test_schedule_arguments_are_checked_at_config_time():
    with pytest.raises(ConfigError, match=r"train.lr_scheduler_kwargs: power not taken by lr_scheduler_type=cosine"):
        load_config(None, {"train.lr_scheduler_type": "cosine", "train.lr_scheduler_kwargs": {"power": 2}})
    with pytest.raises(ConfigError, match="exactly one of min_lr or min_lr_rate"):
        load_config(None, {"train.lr_scheduler_type": "cosine_with_min_lr"})
    with pytest.raises(ConfigError, match="needs num_decay_steps"):
        load_config(None, {"train.lr_scheduler_type": "warmup_stable_decay"})
    with pytest.raises(ConfigError, match="train.lr_scheduler_type"):
        load_config(None, {"train.lr_scheduler_type": "reduce_lr_on_plateau"})
    with pytest.raises(ConfigError, match=r"lr_end=1e-07 .* must be below train.learning_rate=1e-08"):
        load_config(None, {"train.lr_scheduler_type": "polynomial", "train.learning_rate": 1e-8})
    # transformers' own refusal (here of an optimizer's lr below lr_end): one line naming the field
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-8)
    with pytest.raises(TrainingError, match=r"train.lr_scheduler_type=polynomial .*lr_end"):
        make_scheduler(opt, TrainConfig(lr_scheduler_type="polynomial"), 10)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def test_trainer_logs_the_hf_schedule_and_a_resumed_run_continues_it(tiny_dir, tmp_path):
    pairs = _pairs()
    ref = _ref(_load(tiny_dir), pairs)
    kw = dict(learning_rate=LR, max_steps=6, seed=1, per_device_train_batch_size=2, save_steps=2, warmup_steps=2,
              lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2})
    expected = _hf_lrs("cosine_with_restarts", {"num_cycles": 2}, {"warmup_steps": 2}, 6, tmp_path / "hf")

    def crash(step, metrics):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=TrainConfig(**kw), pad_id=0,
              out_dir=tmp_path / "crash", progress=crash)
    res = train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=TrainConfig(**kw), pad_id=0,
                out_dir=tmp_path / "crash")
    assert res.resumed_from == 4  # steps 1-4 logged before the crash, 5-6 after the resume
    assert [h["learning_rate"] for h in res.history] == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"])
def test_optimizers_by_name_are_the_hf_trainers(name, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", optim=name, learning_rate=LR,
                             adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.01)
    cls, hf_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    cfg = TrainConfig(optim=name, learning_rate=LR, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                      weight_decay=0.01)
    param = torch.nn.Parameter(torch.ones(4))
    opt = make_optimizer([param], cfg, "cpu")
    assert type(opt) is cls
    assert {k: opt.defaults[k] for k in hf_kwargs} == hf_kwargs  # lr, betas, eps, fused, Adafactor's fixed lr
    assert opt.defaults["weight_decay"] == 0.01  # the HF Trainer puts it in the parameter groups
    param.grad = torch.ones(4)
    opt.step()
    assert not torch.equal(param.detach(), torch.ones(4))


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_need_cuda(name):
    with pytest.raises(TrainingError, match=f"train.optim: {name} needs a CUDA device"):
        make_optimizer([torch.nn.Parameter(torch.ones(2))], TrainConfig(optim=name), "cpu")
    with pytest.raises(ConfigError, match="train.optim"):
        load_config(None, {"train.optim": "lion_8bit"})
