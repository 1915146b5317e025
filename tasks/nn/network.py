"""The network of ``train.model``: a built-in by name or the user's by import path, resolved into a
``schemas.artifacts.Network`` (import path + every keyword argument), built, and checked.

The convention is Lightning CLI's ``class_path``/``init_args`` (``"package.module:Name"``: a class or
a function returning an ``nn.Module``). bnflow passes what it knows of the data -- ``num_classes``,
and ``in_channels``, ``in_features`` or ``input_shape`` where the signature names them (``num_classes``
also to a ``**kwargs``, as torchvision's model functions take it) -- and ``init_args`` the rest.
Networks take (N, C, H, W) float tensors for image data and (N, D) for tabular data.

``check_network`` is the pre-flight: every way a network can be wrong is a ``ModelError`` of one
line before any worker starts.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from schemas.artifacts import Network
from schemas.config import ModelConfig
from schemas.errors import ModelError

BUILTINS = {"mlp": "tasks.nn.models:MLP", "lenet": "tasks.nn.models:LeNet", "resnet": "tasks.nn.resnet:ResNet"}


def network_of(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> Network:
    """The network ``cfg`` names, for examples of ``input_shape`` and ``num_classes`` classes.

    Raises:
        ModelError: a CNN for tabular data; an import path that does not resolve; ``init_args`` that
            do not fit the signature or contradict the data.
    """
    shape = [int(d) for d in input_shape]
    bn = {"bn_eps": cfg.bn_eps, "bn_momentum": cfg.bn_momentum}
    name = cfg.network
    if name == "mlp":
        return Network(class_path=BUILTINS[name], init_args={"in_features": math.prod(shape), "num_classes": num_classes,
                                                             "hidden": list(cfg.hidden), **bn})
    if name in ("lenet", "resnet"):
        if len(shape) != 3:
            raise ModelError(f"train.model.kind={name} needs image data (C, H, W), but examples have shape {tuple(shape)}; "
                             "set data.image_shape or train.model.kind=mlp")
        if name == "lenet":
            return Network(class_path=BUILTINS[name], init_args={"input_shape": shape, "num_classes": num_classes, **bn})
        return Network(class_path=BUILTINS[name], init_args={"in_channels": shape[0], "num_classes": num_classes,
                                                             "depth": cfg.depth, "width": cfg.width, **bn})
    return Network(class_path=name, init_args=_arguments(name, resolve(name), dict(cfg.init_args), shape, num_classes))


def _arguments(class_path: str, fn: Callable, args: dict, shape: list[int], num_classes: int) -> dict:
    passed = {"num_classes": num_classes, "in_channels": shape[0], "in_features": math.prod(shape), "input_shape": shape}
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: pass the class count only
        return {"num_classes": num_classes, **args}
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in passed.items():
        if key in params or (key == "num_classes" and takes_kwargs):
            if key in args and args[key] != value:
                raise ModelError(f"train.model.init_args.{key}={args[key]!r}, but the data gives {value!r}; remove it "
                                 "from init_args (bnflow passes it)")
            args[key] = value
    try:
        sig.bind(**args)
    except TypeError as e:
        raise ModelError(f"train.model.init_args do not fit {class_path}{sig}: {e}; fix train.model.init_args") from None
    return args


def resolve(class_path: str) -> Callable:
    """The class or function ``'package.module:Name'`` names.

    Raises:
        ModelError: the module cannot be imported (or raised while importing) or lacks the name.
    """
    module_name, _, attr = class_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ModelError(f"train.model.class_path={class_path}: no module named '{e.name}'; install the package or "
                             "run from the directory that holds it (or add that directory to PYTHONPATH)") from None
        raise ModelError(f"train.model.class_path={class_path}: importing '{module_name}' failed: {_first_line(e)}; "
                         "install what it imports") from None
    except Exception as e:  # the user's module raised at import time
        raise ModelError(f"train.model.class_path={class_path}: importing '{module_name}' raised {_first_line(e)}; "
                         "fix the module") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            near = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ModelError(f"train.model.class_path={class_path}: '{module_name}' has no attribute '{attr}'{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"train.model.class_path={class_path}: {attr} is a {type(obj).__name__}, not a class or function")
    return obj


def construct(net: Network) -> nn.Module:
    """Build ``net`` (freshly initialized by its own code).

    Raises:
        ModelError: the constructor raised or returned something other than an ``nn.Module``.
    """
    fn = resolve(net.class_path)
    try:
        model = fn(**net.init_args)
    except Exception as e:
        raise ModelError(f"train.model: {net.class_path}(**{_short(net.init_args)}) raised {_first_line(e)}; "
                         "fix train.model.init_args or the network") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"train.model: {net.class_path}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_network(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: Optional[int],
                  say: Callable[[str], None]) -> nn.Module:
    """Build the network of ``cfg`` and run one training-mode forward of a dummy batch of two
    examples; returns the built network. ``num_classes`` may be None when the data does not tell it
    yet (then any (2, k) output passes). A network without a BatchNorm layer is a warning said
    through ``say``: the BN stages then change nothing.

    Raises:
        ModelError: one line naming what is wrong (see ``network_of``, ``construct``), a forward that
            raises or does not return (N, num_classes) logits, or a BatchNorm layer that cannot be
            synchronized or recalibrated exactly.
    """
    from tasks.nn.syncbn import check_bn_layers

    net = network_of(cfg, input_shape, num_classes or 2)
    model = construct(net)
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    model.train()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise ModelError(f"train.model: a forward of a batch of shape {tuple(x.shape)} through {cfg.network} raised "
                         f"{_first_line(e)}; the network must take (N, {', '.join(map(str, input_shape))}) inputs") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or (num_classes and out.shape[1] != num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"train.model: {cfg.network} returned {got} for a batch of 2; it must return (N, num_classes="
                         f"{num_classes or 'k'}) logits (bnflow passes num_classes where the signature takes it)")
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        say(f"warning: train.model: {cfg.network} has no BatchNorm layer; SyncBatchNorm and recalibration will change nothing")
    check_bn_layers(model, x)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _short(args: dict) -> str:
    text = repr(args)
    return text if len(text) <= 120 else text[:117] + "..."


def read_weights(uri: str) -> dict:
    """The state dict in the file at ``uri`` (a local path or a URI ``pyarrow.fs`` reads, such as
    ``s3://bucket/key``), read with ``weights_only=True``: a plain state dict, or a bnflow checkpoint
    (its ``model``).

    Raises:
        ModelError: the file is missing or unreadable, or holds no state dict.
    """
    import io
    import pickle

    import pyarrow.fs as pafs

    try:
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
            with fs.open_input_stream(path) as f:
                body = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
        else:
            body = torch.load(uri, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ModelError(f"train.model.weights={uri}: cannot read a state dict ({_first_line(e)}); give a file "
                         "written by torch.save(model.state_dict()) or a bnflow checkpoint") from None
    if isinstance(body, dict) and isinstance(body.get("model"), dict) and "version" in body:
        body = body["model"]  # a bnflow checkpoint (schemas.artifacts.CheckpointState)
    if not isinstance(body, dict) or not all(isinstance(v, torch.Tensor) for v in body.values()):
        raise ModelError(f"train.model.weights={uri}: the file holds a {type(body).__name__}, not a state dict of tensors")
    return body


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """Copy a warm start's tensors into ``model``: every tensor the network has, of the same shape.

    Raises:
        ModelError: a tensor missing from the file, one the network lacks, or a shape that differs.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        key, where = (missing[0], "the file lacks") if missing else (extra[0], "the network has no")
        raise ModelError(f"train.model.weights={source}: {where} tensor '{key}' ({len(missing)} missing, {len(extra)} "
                         "unexpected); the weights must come from the same network")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelError(f"train.model.weights={source}: '{k}' is {tuple(state[k].shape)} in the file but "
                             f"{tuple(v.shape)} in the network; the weights must come from the same network")
    model.load_state_dict(state)
