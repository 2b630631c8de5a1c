"""The key of a stored sampling program (`program_cache.py`), computed without tracing. It covers:

- the request: the program's static arguments, and its arguments' tree, shapes, dtypes and shardings;
- the model: config, compute dtype, attention implementation;
- the code: the sources of the modules the program is built from (`PROGRAM_MODULES` and their submodules); the
  versions of Python, jax, jaxlib, flax and numpy; and the current values in those modules: every global and
  class attribute, functions by their bytecode, constants, defaults and closures, so a monkeypatched threshold or
  function (tests and `scripts/gpu_ab.py` patch them) gives another key, never a stale program;
- the platform: every `jax.config` value, the non-empty XLA_* / JAX_* / LDM_JAX_* / TF_* / TPU_* / LIBTPU* / CUDA_*
  environment variables, and the devices (platform, kind, id, platform version: CUDA and cuDNN on a GPU) of the
  mesh.

Not seen: edits of jax, flax or numpy that keep their version, and monkeypatches of those libraries.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib
import os
import pkgutil
import sys
import types

import jax
import numpy as np

FORMAT = 2  # 2: the payload's sha256 is stored with it
PROGRAM_MODULES = ("ldm_jax.conditioning", "ldm_jax.configs", "ldm_jax.models", "ldm_jax.parallel", "ldm_jax.pipelines",
                   "ldm_jax.samplers", "ldm_jax.schedules", "ldm_jax.stable_diffusion")
ENV_PREFIXES = ("XLA_", "JAX_", "LDM_JAX_", "TF_", "TPU_", "LIBTPU", "CUDA_")
_ENV_IGNORED = ("LDM_JAX_CACHE_DIR", "LDM_JAX_NO_PROGRAM_CACHE")  # where entries live, whether they are used
# functions of these packages are named, not hashed: their code is pinned by the versions in the key
_LIBRARIES = frozenset({"jax", "jaxlib", "flax", "numpy", "ml_dtypes", "optax", "orbax", "tqdm", "PIL", "einops",
                        "typing_extensions", "absl", "etils", "msgpack"}) | frozenset(sys.stdlib_module_names)
_MAX_DEPTH = 12
_CONFIG_IGNORED = ("jax_compilation_cache_dir",)  # where entries live: a cache moved elsewhere still answers



@functools.cache
def _sources_digest() -> str:
    """sha256 over (module name, source bytes) of the program modules, read once per process: a backstop for
    the fingerprint of their values. Other files (CLI, loading, training) do not change the programs, and an
    edit there must not cost a compile."""
    h = hashlib.sha256()
    for mod in _program_modules():
        h.update(mod.__name__.encode() + b"\0")
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _versions() -> tuple:
    import flax
    import jaxlib

    return (sys.version, jax.__version__, jaxlib.__version__, flax.__version__, np.__version__)


class _Fingerprint:
    """A stable text for a Python value (the same in every process that holds the same code and values). Objects
    of unknown types contribute their type's name only: their default repr holds a memory address."""

    def __init__(self):
        self.memo: dict[int, str] = {}
        self.keep: list = []  # memo keys are ids: keep the objects alive while the memo is in use

    def __call__(self, x, depth: int = 0) -> str:
        if x is None or isinstance(x, (bool, int, float, complex, str, bytes, enum.Enum)):
            return f"{type(x).__name__}:{x!r}"
        if depth > _MAX_DEPTH:
            return f"<deep {type(x).__qualname__}>"
        if id(x) in self.memo:
            return self.memo[id(x)]
        self.memo[id(x)] = f"<cycle {type(x).__qualname__}>"
        self.keep.append(x)
        out = self._describe(x, depth + 1)
        self.memo[id(x)] = out = hashlib.sha256(out.encode()).hexdigest()[:24] if len(out) > 64 else out
        return out

    def _describe(self, x, d) -> str:
        f = self
        if isinstance(x, (tuple, list, set, frozenset)):
            items = [f(v, d) for v in x]
            return f"{type(x).__name__}[{','.join(sorted(items) if isinstance(x, (set, frozenset)) else items)}]"
        if isinstance(x, dict):
            return "dict{" + ",".join(sorted(f"{f(k, d)}={f(v, d)}" for k, v in x.items())) + "}"
        if isinstance(x, types.ModuleType):
            return f"module:{x.__name__}"
        if isinstance(x, np.ndarray):
            return f"ndarray:{x.dtype}{x.shape}:{hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()}"
        if isinstance(x, (np.dtype, np.generic)):
            return f"np:{x!r}"
        if isinstance(x, types.CodeType):
            return f"code:{x.co_code.hex()}:{f(x.co_consts, d)}:{x.co_names}"
        if isinstance(x, (types.FunctionType, type)) and _is_library(x):
            return f"lib:{x.__module__}.{x.__qualname__}"
        if isinstance(x, types.FunctionType):
            cells = [f(c.cell_contents, d) if _cell_full(c) else "<empty>" for c in x.__closure__ or ()]
            return (f"fn:{x.__module__}.{x.__qualname__}:{f(x.__code__, d)}:{f(x.__defaults__, d)}:"
                    f"{f(x.__kwdefaults__, d)}:{cells}")
        if isinstance(x, type):
            attrs = {k: v for k, v in vars(x).items() if k not in ("__dict__", "__weakref__", "__doc__")}
            return f"class:{x.__module__}.{x.__qualname__}:{f([b for b in x.__bases__], d)}:{f(attrs, d)}"
        if isinstance(x, functools.partial):
            return f"partial:{f(x.func, d)}:{f(x.args, d)}:{f(x.keywords, d)}"
        if dataclasses.is_dataclass(x):
            fields = {fl.name: getattr(x, fl.name, None) for fl in dataclasses.fields(x)}
            return f"dc:{type(x).__qualname__}:{f(fields, d)}"
        inner = [f(getattr(x, a), d) for a in ("__wrapped__", "__func__", "fget", "func", "fun", "jvp", "fwd", "bwd")
                 if hasattr(x, a)]
        return f"obj:{type(x).__module__}.{type(x).__qualname__}:{inner}"


def _is_library(x) -> bool:
    return (getattr(x, "__module__", None) or "").split(".")[0] in _LIBRARIES


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _program_modules() -> list[types.ModuleType]:
    """The modules in PROGRAM_MODULES and every submodule of theirs, imported: the same set in every process."""
    mods = []
    for name in PROGRAM_MODULES:
        mod = importlib.import_module(name)
        mods.append(mod)
        if hasattr(mod, "__path__"):
            mods += [importlib.import_module(m.name) for m in pkgutil.walk_packages(mod.__path__, name + ".")]
    return sorted(mods, key=lambda m: m.__name__)


def code_state() -> str:
    """The fingerprint of the program modules' current globals (functions, classes, constants)."""
    fp = _Fingerprint()
    parts = []
    for mod in _program_modules():
        values = {k: v for k, v in list(vars(mod).items()) if not (k.startswith("__") and k.endswith("__"))}
        parts.append(f"{mod.__name__}={fp(values)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _sharding(s) -> str:
    if isinstance(s, jax.sharding.NamedSharding):
        return f"named:{dict(s.mesh.shape)}:{s.spec}"
    return f"{type(s).__name__}:{sorted(d.id for d in s.device_set)}"


def _platform(mesh) -> tuple:
    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith(ENV_PREFIXES) and v and k not in _ENV_IGNORED)
    # platform_version: the CUDA / cuDNN / driver versions on a GPU (JAX's own cache key has it too)
    devices = [(d.platform, d.device_kind, d.id, d.client.platform_version) for d in mesh.devices.flat]
    config = {k: v for k, v in jax.config.values.items() if k not in _CONFIG_IGNORED}  # thread-local values too
    return env, devices, _host_cpu(), _Fingerprint()(config)


@functools.cache
def _host_cpu() -> str:
    """The machine and its CPU's feature flags: XLA:CPU compiles for the host's features, so a cache shared with
    another CPU (a network home directory) must not hand it code it cannot run."""
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}:{platform.processor()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def usable_for(sd) -> bool:
    """Whether a program of `sd` may be stored and looked up: only a plain `StableDiffusion` whose attributes are
    its fields and cached properties. A subclass, or an instance with a method replaced, computes something the
    key does not see (it would store its program under the plain model's key, or be handed the plain one)."""
    from ldm_jax.stable_diffusion import StableDiffusion

    allowed = {f.name for f in dataclasses.fields(StableDiffusion)}
    allowed |= {k for k, v in vars(StableDiffusion).items() if isinstance(v, functools.cached_property)}
    return type(sd) is StableDiffusion and set(vars(sd)) <= allowed


def key(sd, static: dict, args, mesh) -> str:
    """The entry's name: sha256 of everything above (see the module docstring)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    avals = [(tuple(x.shape), str(x.dtype), _sharding(x.sharding)) for x in leaves]
    model = (repr(sd.config), str(np.dtype(sd.dtype)), sd.attention_impl)
    parts = (FORMAT, _versions(), _sources_digest(), code_state(), _platform(mesh), model,
             sorted(static.items()), str(tree), avals)
    return hashlib.sha256(repr(parts).encode()).hexdigest()
