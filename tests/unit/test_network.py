"""tasks/nn/network.py: a network by import path, resolved, built with the arguments its signature
takes, and checked before any worker starts; every failure one line naming what to fix."""

from __future__ import annotations

import textwrap
import uuid

import pytest
import torch
from torch import nn

from schemas.config import ModelConfig, PipelineConfig
from schemas.errors import ModelError
from tasks.nn.models import build_model
from tasks.nn.network import check_network, load_weights, network_of, read_weights

NETS = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.constant_(self.head.weight, 0.125)  # the network's own init, which init=none must keep

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def factory(num_classes, **kwargs):
    return TinyCNN(kwargs.pop("channels", 1), num_classes)


class NoBN(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class WrongHead(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(1)


class Raises(nn.Module):
    def __init__(self, num_classes: int, depth: int = 3):
        super().__init__()
        raise RuntimeError("depth must be even")


class FlatOnly(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x)


NOT_A_NETWORK = 3
'''


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A user's package outside the checkout, importable only through sys.path; its name is new
    each time, so no module cache carries over between tests."""
    name = f"userpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "nets.py").write_text(textwrap.dedent(NETS))
    (tmp_path / name / "broken.py").write_text("import not_installed_anywhere_xyz\n")
    (tmp_path / name / "bad.py").write_text("raise ValueError('configure me first')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _model(pkg, name, **kw):
    return ModelConfig(class_path=f"{pkg}.nets:{name}", **kw)


def _error(fn) -> str:
    with pytest.raises(ModelError) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_the_pipeline_passes_what_the_signature_names(pkg):
    net = network_of(_model(pkg, "TinyCNN", init_args={"width": 6}), (3, 8, 8), 5)
    assert net.class_path == f"{pkg}.nets:TinyCNN"
    assert net.init_args == {"width": 6, "in_channels": 3, "num_classes": 5}
    # A **kwargs factory (torchvision's style) gets num_classes only; the rest is init_args'.
    assert network_of(_model(pkg, "factory", init_args={"channels": 3}), (3, 8, 8), 5).init_args == {"channels": 3, "num_classes": 5}
    assert network_of(_model(pkg, "NoBN"), (64,), 10).init_args == {"in_features": 64, "num_classes": 10}


@pytest.mark.parametrize("path, words", [
    ("nonexistent_pkg_xyz.nets:Net", "no module named 'nonexistent_pkg_xyz'"),
    ("{pkg}.nope:Net", "no module named '{pkg}.nope'"),
    ("{pkg}.nets:TinyCnn", "has no attribute 'TinyCnn' (did you mean 'TinyCNN'?)"),
    ("{pkg}.nets:NOT_A_NETWORK", "is a int, not a class or function"),
    ("{pkg}.broken:Net", "importing '{pkg}.broken' failed: ModuleNotFoundError"),
    ("{pkg}.bad:Net", "importing '{pkg}.bad' raised ValueError: configure me first"),
])
def test_an_import_path_that_does_not_resolve_is_one_line(pkg, path, words):
    text = _error(lambda: network_of(ModelConfig(class_path=path.format(pkg=pkg)), (1, 8, 8), 10))
    assert words.format(pkg=pkg) in text and text.startswith("train.model.class_path=")


def test_init_args_that_do_not_fit_name_the_argument(pkg):
    text = _error(lambda: network_of(_model(pkg, "TinyCNN", init_args={"widht": 3}), (1, 8, 8), 10))
    assert "'widht'" in text and "train.model.init_args" in text
    text = _error(lambda: network_of(_model(pkg, "TinyCNN", init_args={"num_classes": 3}), (1, 8, 8), 10))
    assert "init_args.num_classes=3" in text and "10" in text


def test_a_constructor_that_raises_is_one_line(pkg):
    text = _error(lambda: build_model(_model(pkg, "Raises"), (1, 8, 8), 10))
    assert "raised RuntimeError: depth must be even" in text


def test_a_forward_of_the_wrong_shape_or_that_raises_is_one_line(pkg):
    say = []
    text = _error(lambda: check_network(_model(pkg, "WrongHead"), (1, 8, 8), 10, say.append))
    assert "returned (2, 72)" in text and "num_classes=10" in text
    text = _error(lambda: check_network(_model(pkg, "FlatOnly"), (1, 8, 8), 10, say.append))
    assert "a forward of a batch of shape (2, 1, 8, 8)" in text and "RuntimeError" in text
    assert say == []


def test_a_network_without_batchnorm_is_a_warning_not_an_error(pkg):
    said = []
    model = check_network(_model(pkg, "NoBN"), (64,), 10, said.append)
    assert isinstance(model, nn.Module)
    assert len(said) == 1 and said[0].startswith("warning:") and "no BatchNorm layer" in said[0]


def test_init_none_keeps_the_networks_own_weights_and_a_scheme_replaces_them(pkg):
    own = build_model(_model(pkg, "TinyCNN"), (1, 8, 8), 10)  # class_path: init defaults to none
    assert torch.all(own.head.weight == 0.125)
    kaiming = build_model(_model(pkg, "TinyCNN", init="kaiming"), (1, 8, 8), 10)
    assert not torch.all(kaiming.head.weight == 0.125)
    assert ModelConfig(kind="mlp").init_scheme == "kaiming"


def test_weights_load_from_a_state_dict_or_a_checkpoint_and_misfits_are_one_line(pkg, tmp_path):
    cfg = _model(pkg, "TinyCNN")
    src = build_model(cfg, (1, 8, 8), 10)
    with torch.no_grad():
        src.bn.running_mean.add_(3.0)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    torch.save({"version": "2", "model": src.state_dict()}, tmp_path / "ckpt.pt")
    for f in ("w.pt", "ckpt.pt"):
        dst = build_model(cfg, (1, 8, 8), 10)
        load_weights(dst, read_weights(str(tmp_path / f)), f)
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
    other = build_model(_model(pkg, "TinyCNN", init_args={"width": 5}), (1, 8, 8), 10)
    text = _error(lambda: load_weights(other, read_weights(str(tmp_path / "w.pt")), "w.pt"))
    assert "'conv.weight' is (4, 1, 3, 3) in the file but (5, 1, 3, 3) in the network" in text
    text = _error(lambda: load_weights(build_model(ModelConfig(kind="mlp"), (64,), 10), read_weights(str(tmp_path / "w.pt")), "w.pt"))
    assert "the file lacks tensor 'body.0.weight'" in text
    text = _error(lambda: read_weights(str(tmp_path / "missing.pt")))
    assert "train.model.weights=" in text and "missing.pt" in text
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "cannot read a state dict" in _error(lambda: read_weights(str(tmp_path / "junk.pt")))


@pytest.mark.parametrize("model, words", [
    ({"kind": "mlp", "class_path": "a.b:C"}, "both name a network"),
    ({"init_args": {"width": 3}}, "init_args is set without train.model.class_path"),
    ({"class_path": "torchvision.models.resnet18"}, "must be 'package.module:Name'"),
    ({"kind": "resnet", "depth": 21}, "6n+2"),
])
def test_the_config_refuses_contradictory_network_settings(model, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        PipelineConfig.model_validate({"train": {"model": model}})


def test_set_class_path_replaces_the_recipes_network_choice():
    from pipeline import recipes

    cfg = recipes.load("digits", ["train.model.class_path=pkg.nets:Net", 'train.model.init_args={"width": 3}'])
    assert cfg.train.model.kind is None and cfg.train.model.class_path == "pkg.nets:Net"
    assert cfg.train.model.init_args == {"width": 3}
    back = recipes.load("digits", ["train.model.kind=lenet"])
    assert back.train.model.kind == "lenet" and back.train.model.class_path is None
