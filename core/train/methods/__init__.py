"""Self-supervised pretraining methods: `METHODS`, the one list, and `pretrain`, the method
named by `pretrain.method` run on the engine.

A method is one module in this folder. What the rest of skinclr needs of it, it declares:

    TITLE           how reports name it (and the fine-tunes that start from it)
    Settings        its config section, a MethodConfig: `simclr:` in a YAML file, `cfg.simclr` in code
    SPACE           its search-space ranges; a sweep adds them to search_spaces/pretrain.yaml's shared ones
    build(task)     the model, with a `backbone`; `loss(task, batch)` -> (loss, images);
                    optionally `after_step(task)` (momentum encoders, queues) and ONLINE_PARTS

The declarations load without torch (the hooks import it when they run), so a config naming a
method is checked at once. The registry gives the config schema its sections, the sweep its
space and the CLI its choices: adding a method is its module and one `METHODS.add` line below.
`pretrain` is a generator of per-epoch records (see skinclr/train/engine.py); it knows nothing
of MLflow or Ray. Every method's checkpoint holds its online `backbone`, which fine-tuning starts from.
"""
from __future__ import annotations

import dataclasses
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator

from skinclr.config_schema import METHOD_SECTIONS, Config, MethodConfig


@dataclass(frozen=True)
class Method:
    """A registered method: its name and the module that declares it."""
    name: str
    module: ModuleType

    @property
    def title(self) -> str:
        return self.module.TITLE

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return dict(self.module.SPACE)

    def __call__(self, cfg, inputs, distributed: bool = False):
        """The method's training task on the engine (this loads torch)."""
        from skinclr.train.methods.base import Pretraining

        return Pretraining(cfg, inputs, distributed, self.module)


class Registry(dict):
    """Method name -> Method; adding one gives every Config made afterwards its section."""

    def add(self, name: str, module: ModuleType | None = None) -> Method:
        """Register the module `skinclr.train.methods.<name>` (or the one given) as method `name`."""
        module = module or importlib.import_module(f"{__name__}.{name}")
        problems = _problems(name, module)
        if problems:
            raise ValueError(f"method {name!r} ({module.__name__}): {'; '.join(problems)}")
        self[name] = Method(name, module)
        METHOD_SECTIONS[name] = module.Settings
        return self[name]

    def remove(self, name: str) -> None:
        self.pop(name)
        METHOD_SECTIONS.pop(name)

    @contextmanager
    def temporary(self, name: str, module: ModuleType) -> Iterator[Method]:
        """A method registered for the duration of a block (a test's, a notebook's)."""
        try:
            yield self.add(name, module)
        finally:
            self.remove(name)


def _problems(name: str, module: ModuleType) -> list[str]:
    out = []
    if not name.isidentifier() or name in {f.name for f in dataclasses.fields(Config)} or name in METHOD_SECTIONS:
        out.append("its name must be an identifier that is not already a config section")
    if not isinstance(getattr(module, "TITLE", None), str):
        out.append("it declares no TITLE")
    settings = getattr(module, "Settings", None)
    if not (isinstance(settings, type) and issubclass(settings, MethodConfig) and dataclasses.is_dataclass(settings)):
        out.append("its Settings must be a dataclass subclassing MethodConfig")
    space = getattr(module, "SPACE", None)
    if not isinstance(space, dict) or any(not str(key).startswith(f"{name}.") for key in space):
        out.append(f"its SPACE must map keys of its own section ({name}.*) to ranges")
    out += [f"it has no {hook}(...) hook" for hook in ("build", "loss") if not callable(getattr(module, hook, None))]
    return out


METHODS = Registry()
METHODS.add("simclr")
METHODS.add("moco_v2")
METHODS.add("byol")


def pretrain(cfg, inputs, resume: dict[str, Any] | None = None, distributed: bool = False, progress: bool = False):
    """The configured method's epochs, as records (a generator)."""
    from skinclr.train.engine import run

    return run(METHODS[cfg.pretrain.method](cfg, inputs, distributed=distributed), cfg.train, resume=resume,
               progress=progress, image_size=cfg.data.image_size)
