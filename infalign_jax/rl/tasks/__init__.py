"""The tasks the CTRL run loop trains on, by name: an explicit registry.

| name                         | module         | what                                          |
|------------------------------|----------------|-----------------------------------------------|
| exact                        | tasks.exact    | enumerable task, exact KL / win rates / pi*    |
| helpfulness, harmlessness    | tasks.real     | SmolLM2-135M-Instruct with an offline judge    |

A builder is named as "module:function" and imported only when that task is built (the real tasks
load transformers and the judges); nothing registers itself by being imported. `register_task`
adds one explicitly (tests use it for poisoned variants).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from infalign_jax.rl.tasks.base import ReferenceConfig, RLTask, replicate_params

__all__ = ["ReferenceConfig", "RLTask", "build_task", "known_tasks", "register_task", "replicate_params"]

_BUILDERS: dict[str, str | Callable[[Any], RLTask]] = {
    "exact": "infalign_jax.rl.tasks.exact:rl_task",
    "helpfulness": "infalign_jax.rl.tasks.real:rl_task",
    "harmlessness": "infalign_jax.rl.tasks.real:rl_task",
}


def known_tasks() -> tuple[str, ...]:
    return tuple(sorted(_BUILDERS))


def build_task(task_section: Any) -> RLTask:
    """The `RLTask` of `config.task` (its `name` picks the builder)."""
    name = task_section.name
    if name not in _BUILDERS:
        raise ValueError(f"config.task.name: unknown task {name!r}; known: {', '.join(known_tasks())}")
    builder = _BUILDERS[name]
    if isinstance(builder, str):
        module, function = builder.split(":")
        builder = getattr(importlib.import_module(module), function)
    return builder(task_section)


def register_task(name: str, builder: Callable[[Any], RLTask]) -> None:
    """Adds a task builder under `name`."""
    _BUILDERS[name] = builder
