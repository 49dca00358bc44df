"""JAX's persistent compilation cache, as `recml train` and `recml serve` use it.

A process that turns it on (:func:`use`) writes every executable it compiles to a
folder and reads it back instead of compiling the same computation again: a resumed or
repeated training run, or a restarted server, skips its compilations (JAX keys each
entry on the computation, the compile options, the backend and JAX's version, so a
changed model or JAX never reads a stale one). The folder holds executables that JAX
runs: only its owner should be able to write to it.
"""

from __future__ import annotations

import os
import sys

HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax.monitoring, one per executable read
# Every executable is written, however fast it compiled and however small it is (JAX's
# defaults skip those under 1 s).
_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0,
             "jax_persistent_cache_min_entry_size_bytes": -1}


def default_root() -> str:
  """``$XDG_CACHE_HOME/recml/compile``, by default ``~/.cache/recml/compile``."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "recml", "compile")


def use(directory: str | None) -> None:
  """JAX's persistent compilation cache in ``directory`` (created), every executable
  cached, for this process and the processes it starts afterwards (through JAX's own
  ``JAX_*`` environment variables); ``None``: no cache.

  Raises:
    OSError: the folder cannot be created.
  """
  settings = {"jax_compilation_cache_dir": directory, **_SETTINGS}
  if directory is not None:
    os.makedirs(directory, exist_ok=True)
  for name, value in settings.items():
    if value is None:
      os.environ.pop(name.upper(), None)
    else:
      os.environ[name.upper()] = str(value)
  if "jax" in sys.modules:  # already imported: its settings are read, set them too
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import compilation_cache  # pylint: disable=g-import-not-at-top
    for name, value in settings.items():
      jax.config.update(name, value)
    # JAX decides once per process whether to use its cache: decide again
    compilation_cache.compilation_cache.reset_cache()


def turn_on(directory: str | None, prog: str, what: str) -> str | None:
  """:func:`use` of ``directory`` (``None``: no cache), for a command-line tool: a folder
  that cannot be made is a warning on stderr (``prog: warning: no compile cache (every
  WHAT compiles at each start)``) and no cache. Returns the folder in use, or None."""
  try:
    use(directory)
  except OSError as e:
    print(f"{prog}: warning: no compile cache (every {what} compiles at each start): {e}",
          file=sys.stderr, flush=True)
    use(None)
    return None
  return directory


def entries(directory: str) -> int:
  """How many executables ``directory`` holds (0 when it does not exist)."""
  if not os.path.isdir(directory):
    return 0
  return sum(1 for name in os.listdir(directory) if name.endswith("-cache"))
