"""The decorator that turns a step function into its KFP component.

``@step("trainer")`` is ``@dsl.component(base_image=images.image("trainer"),
install_kfp_package=False)`` with two additions that every component module needs:

* Inside a running step KFP sets ``_KFP_RUNTIME=true`` and its ``kfp.dsl`` then has no
  ``component`` decorator. A step's body imports its own module to call ``run``, so the
  module must import there too: at runtime the decorator returns the plain function.
* Annotations are resolved eagerly (``typing.get_type_hints``), so a module may use
  ``from __future__ import annotations`` and KFP still sees ``Input[Dataset]`` etc.

KFP copies the function's source (without decorators) into the step's command, so the
body must import what it uses; annotations may use the names of ``kfp.dsl``
(``Input``, ``Output``, ``Dataset``, ``Model``, ``Metrics``, ``HTML``, ``Markdown``, ...)
and ``typing``.
"""

import os
import typing

from components import images


def at_runtime() -> bool:
  """True inside a running KFP step (where only KFP's runtime symbols exist)."""
  return os.environ.get("_KFP_RUNTIME", "false") == "true"


def step(image_name: str):
  """Decorates a function as a lightweight component that runs in ``recml-<image_name>``."""

  def wrap(func):
    if at_runtime():
      return func
    from kfp import dsl  # pylint: disable=g-import-not-at-top
    func.__annotations__ = typing.get_type_hints(func, include_extras=True)
    return dsl.component(base_image=images.image(image_name), install_kfp_package=False)(func)

  return wrap
