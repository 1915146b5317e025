"""Pure parts of the train stage: schedules, optimizers, initialization, models, shards, progress."""

import math

import pytest
import torch

from schemas.config import (AdadeltaConfig, AdagradConfig, AdamConfig, ModelConfig, RMSpropConfig, LRScheduleConfig,
                            SGDConfig)
from tasks.nn.models import build_model
from tasks.train_loop import build_optimizer, build_scheduler


def _reference_factor(cfg: LRScheduleConfig, epoch: int, epochs: int, base_lr: float) -> float:
    """The closed-form schedule bnflow used before torch's schedulers (0-based epoch)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e, span = epoch - cfg.warmup_epochs, max(1, epochs - cfg.warmup_epochs)
    if cfg.kind == "step":
        return cfg.gamma ** (e // cfg.step_size)
    if cfg.kind == "exponential":
        return cfg.gamma ** e
    if cfg.kind == "cosine":
        floor = cfg.min_lr / base_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(e, span) / span))
    return 1.0


def _lrs(cfg: LRScheduleConfig, epochs: int, base_lr: float = 0.1) -> list[float]:
    model = build_model(ModelConfig(kind="mlp", hidden=(4,)), (3,), 2)
    opt = build_optimizer(SGDConfig(lr=base_lr), model)
    sched = build_scheduler(cfg, opt, epochs)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("cfg", [
    LRScheduleConfig(kind="step", step_size=2, gamma=0.5), LRScheduleConfig(kind="exponential", gamma=0.9),
    LRScheduleConfig(kind="cosine", min_lr=0.01), LRScheduleConfig(kind="cosine"), LRScheduleConfig(kind="constant"),
    LRScheduleConfig(kind="constant", warmup_epochs=3), LRScheduleConfig(kind="cosine", warmup_epochs=2, min_lr=0.001),
    LRScheduleConfig(kind="step", step_size=3, gamma=0.1, warmup_epochs=1),
])
def test_torch_schedulers_keep_the_learning_rate_of_every_epoch(cfg):
    epochs = 9
    expect = [0.1 * _reference_factor(cfg, e, epochs, 0.1) for e in range(epochs)]
    assert _lrs(cfg, epochs) == pytest.approx(expect, rel=1e-12, abs=1e-15)


def test_cosine_last_epoch_still_learns_and_warmup_ramps():
    lrs = _lrs(LRScheduleConfig(kind="cosine", min_lr=0.01), 5)
    assert lrs[0] == 0.1 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0.01
    assert _lrs(LRScheduleConfig(kind="constant", warmup_epochs=3), 5) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


@pytest.mark.parametrize("cfg, cls, check", [
    (SGDConfig(lr=0.01, momentum=0.8, nesterov=True, weight_decay=1e-4), torch.optim.SGD,
     lambda g: g["momentum"] == 0.8 and g["nesterov"]),
    (AdamConfig(name="adam", weight_decay=1e-4), torch.optim.Adam,
     lambda g: g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["lr"] == 1e-3),
    (RMSpropConfig(name="rmsprop", weight_decay=1e-4), torch.optim.RMSprop, lambda g: g["alpha"] == 0.99 and g["momentum"] == 0),
    (AdagradConfig(name="adagrad", weight_decay=1e-4), torch.optim.Adagrad, lambda g: g["lr"] == 1e-2),
    (AdadeltaConfig(name="adadelta", weight_decay=1e-4), torch.optim.Adadelta, lambda g: g["rho"] == 0.9),
])
def test_optimizers_and_weight_decay_groups(cfg, cls, check):
    model = build_model(ModelConfig(kind="mlp", hidden=(8,)), (4,), 3)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert check(decay)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


@pytest.mark.parametrize("init, var", [("lecun", lambda fi, fo: 1 / fi), ("kaiming", lambda fi, fo: 2 / fi),
                                       ("xavier", lambda fi, fo: 2 / (fi + fo))])
def test_init_variance(init, var):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=(512,), init=init), (400,), 10)
    w = model.body[0].weight.detach()
    assert float(w.var()) == pytest.approx(var(400, 512), rel=0.05)


def test_models_produce_logits_and_have_no_redundant_bias():
    lenet = build_model(ModelConfig(kind="lenet"), (1, 28, 28), 10)
    assert lenet(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    small = build_model(ModelConfig(kind="lenet"), (1, 8, 8), 10)
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    layers = list(lenet.features) + list(lenet.classifier)
    for layer, nxt in zip(layers, layers[1:]):
        if isinstance(nxt, torch.nn.modules.batchnorm._BatchNorm):
            assert layer.bias is None


def test_resnet_is_6n_plus_2_layers_deep_and_takes_any_image_side():
    """The built-in resnet: depth counts conv/linear weight layers outside the shortcuts (He et al. 2016),
    3 stages of n blocks, widths w, 2w, 4w; works on 1-channel 28x28 and 3-channel 32x32 images."""
    for depth, shape in ((20, (1, 28, 28)), (32, (3, 32, 32))):
        net = build_model(ModelConfig(kind="resnet", depth=depth, width=8), shape, 7)
        assert net(torch.randn(2, *shape)).shape == (2, 7)
        main = [m for name, m in net.named_modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and "shortcut" not in name]
        assert len(main) == depth
        assert [b.conv2.out_channels for b in net.blocks][:: (depth - 2) // 6] == [8, 16, 32]


def test_progress_watch_hands_each_new_epoch_to_on_epoch_once(tmp_path, capsys, monkeypatch):
    """The driver logs epochs as rank 0's epochs file shows them: each epoch after the one the
    attempt resumed from, once, even when the file is read many times or a restarted worker group
    goes back to an earlier epoch."""
    import json

    from tasks.console import Console
    from tasks.train_progress import EPOCHS_FILE, ProgressWatch

    monkeypatch.setenv("BNFLOW_PROGRESS", "0")  # a log, where each epoch has its line
    path = tmp_path / EPOCHS_FILE
    calls = []

    def on_epoch(epoch, metrics):
        calls.append((epoch, metrics))

    def write(resumed_after, epochs):
        history = [{"epoch": e, "train_loss": 1.0 / e} for e in range(1, epochs + 1)]
        path.write_text(json.dumps({"resumed_after": resumed_after, "history": history, "clock": {"marks": {}, "spans": {}}}))

    console = Console()
    with console.progress("train", total=None) as bar:
        watch = ProgressWatch(tmp_path, 6, bar, console, on_epoch)
        watch()  # no file yet
        write(resumed_after=1, epochs=1)  # resumed after epoch 1: already logged by the earlier attempt
        watch()
        write(resumed_after=1, epochs=3)
        watch()
        watch()
        write(resumed_after=2, epochs=4)  # a worker group restarted from epoch 2's checkpoint
        watch()
    assert calls == [(2, {"train_loss": 0.5}), (3, {"train_loss": 1 / 3}), (4, {"train_loss": 0.25})]
    out = capsys.readouterr().out
    assert [line.split()[3] for line in out.splitlines() if " train epoch " in line] == ["2/6", "3/6", "4/6"]
    assert out.count("resuming after epoch") == 2  # the resumed attempt, then the restarted group


def test_the_step_loop_writes_progress_at_most_once_a_second_and_never_the_history(tmp_path, monkeypatch):
    """Regression: rank 0 rewrote the whole history as JSON to shared storage twice a second from
    inside the step loop. Now a step writes a few dozen bytes at most once per ``every_s``; the
    history goes once per epoch."""
    import json

    from tasks.train_loop import Clock
    from tasks.train_progress import EPOCHS_FILE, PROGRESS_FILE, ProgressWriter

    now = [100.0]
    monkeypatch.setattr("tasks.train_progress.time.monotonic", lambda: now[0])
    history = [{"epoch": e, "train_loss": 0.1} for e in range(1, 51)]
    writer = ProgressWriter(tmp_path, steps=1000, history=history, clock=Clock(), every_s=1.0)
    writes = []
    for step in range(1, 1001):  # 1000 steps over 5 seconds of the loop's clock
        now[0] += 0.005
        writer.step(51, step)
        body = json.loads((tmp_path / PROGRESS_FILE).read_text())
        if body["step"] == step:
            writes.append(step)
    assert 5 <= len(writes) <= 6  # once a second, not per step
    assert set(json.loads((tmp_path / PROGRESS_FILE).read_text())) == {"epoch", "step", "steps"}
    assert not (tmp_path / EPOCHS_FILE).exists()  # the history is not written by steps
    writer.epoch_done(51)
    assert json.loads((tmp_path / EPOCHS_FILE).read_text())["history"] == history


def test_peak_rss_is_the_process_own_not_its_parents():
    """A process forked from a large one and exec'd inherits the parent's ``ru_maxrss``: a Ray
    worker or a benchmark child would report the peak of whoever started it. ``peak_rss_bytes``
    reads the process's own high-water mark."""
    import subprocess
    import sys

    import numpy as np

    from tests.conftest import ROOT

    big = np.ones(400 * 2**20 // 8)  # 400 MB held by this process while the child runs
    code = ("import resource; from tasks.train_progress import peak_rss_bytes; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_rss_bytes())")
    inherited, own = map(int, subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                             check=True).stdout.split())
    assert big.sum() > 0 and inherited > 400 * 2**20 > 5 * own
