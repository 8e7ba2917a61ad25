"""Attention zoo: Flax NNX models on Pallas attention kernels, and the platform that trains them.

`zoo.load(workdir)` restores a train.py run, `zoo.save_pretrained(model, folder)` writes a
portable artifact and `zoo.create_model(name, pretrained=...)` reads one or a checkpoint file
(zoo/pretrained.py). `zoo.capture_attention(model, *inputs)` returns what every attention layer
attends to (zoo/attention_maps.py); `zoo.preprocess(name, image)` prepares an image as the model's
card says (zoo/preprocessing.py).

`import zoo` loads the registry only; every submodule (`zoo.convert`, `zoo.generate`,
`zoo.weight_files`, `zoo.training`, the model files, ...) is also an attribute of the package,
imported the first time it is used, so `import zoo; zoo.convert.from_timm(...)` works and the
import itself stays fast.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from zoo import axes  # noqa: F401  (switches off flax eager sharding before any model is built)
from zoo.registry import (count_params, create_model, list_models, model_card,  # noqa: F401
                          register_model)

__all__ = ["create_model", "list_models", "model_card", "register_model", "count_params", "load",
           "save_pretrained", "capture_attention", "preprocess"]

_SUBMODULES = frozenset(info.name for info in _pkgutil.iter_modules(__path__))


# Functions of submodules offered at the top level, imported on first use.
_LAZY_FUNCTIONS = {"load": "zoo.pretrained", "save_pretrained": "zoo.pretrained",
                   "capture_attention": "zoo.attention_maps", "preprocess": "zoo.preprocessing"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"zoo.{name}")  # also binds zoo.<name> for next time
    if name in _LAZY_FUNCTIONS:
        return getattr(_importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_LAZY_FUNCTIONS))
