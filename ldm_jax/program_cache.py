"""Compiled sampling programs on disk under a key computed without tracing: a new process skips tracing and
lowering the txt2img / img2img / inpaint program as well as compiling it.

JAX's persistent compilation cache (`compile_cache.py`) keys a program by its lowered HLO, so every new process
still traces the whole program (text encoder, U-Net loop, decoder) and lowers it before that cache can answer:
SD 1.x, 2 CPU cores: trace 0.9-1.0 s + lower 0.4-0.5 s + key and executable load 1.05-1.15 s; from this cache the
executable loads in 0.86-1.03 s. Tracing holds the GIL, so it also slowed the weights loading beside it
(`warm_start.py`). The executable is stored with `jax.experimental.serialize_executable` under a key of:

- the request: the program's static arguments, and its arguments' tree, shapes, dtypes and shardings;
- the model: config, compute dtype, attention implementation;
- the code: the sources of the modules the program is built from (`PROGRAM_MODULES` and their submodules); the
  versions of Python, jax, jaxlib, flax and numpy; and the current values in those modules: every global and
  class attribute, functions by their bytecode, constants, defaults and closures, so a monkeypatched threshold or
  function (tests and `scripts/gpu_ab.py` patch them) gives another key, never a stale program;
- the platform: every `jax.config` value, the non-empty XLA_* / JAX_* / LDM_JAX_* / TF_* / TPU_* / LIBTPU* / CUDA_*
  environment variables, and the devices (platform, kind, id, platform version: CUDA and cuDNN on a GPU) of the
  mesh.

Not seen: edits of jax, flax or numpy that keep their version, and monkeypatches of those libraries. Only
single-process runs use it (a multi-host program is compiled as before). Off with LDM_JAX_NO_PROGRAM_CACHE=1, and
whenever the compilation cache is off. Entries are pickled executables in `<compilation cache>/ldm-jax-programs`
(as for JAX's own cache, only their user may write there); the newest `MAX_ENTRIES` are kept. Only executables
compiled in this process are written (`load_or_compile` says why); an unreadable entry, one whose payload does not
match its stored sha256, one whose program fails on its first run (`discard`), and one whose first run crashed a
process (a `<entry>.<pid>.unproven` marker of a process that is gone) is removed and the program compiled again.
Only a plain `StableDiffusion` uses the cache (`usable_for`): the key cannot see a subclass's methods.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import functools
import hashlib
import importlib
import os
import pickle
import pkgutil
import sys
import threading
import types

import jax
import numpy as np

FORMAT = 2  # 2: the payload's sha256 is stored with it
MAX_ENTRIES = 32
PROGRAM_MODULES = ("ldm_jax.conditioning", "ldm_jax.configs", "ldm_jax.models", "ldm_jax.parallel", "ldm_jax.pipelines",
                   "ldm_jax.samplers", "ldm_jax.schedules", "ldm_jax.stable_diffusion")
ENV_PREFIXES = ("XLA_", "JAX_", "LDM_JAX_", "TF_", "TPU_", "LIBTPU", "CUDA_")
_ENV_IGNORED = ("LDM_JAX_CACHE_DIR", "LDM_JAX_NO_PROGRAM_CACHE")  # where entries live, whether they are used
# functions of these packages are named, not hashed: their code is pinned by the versions in the key
_LIBRARIES = frozenset({"jax", "jaxlib", "flax", "numpy", "ml_dtypes", "optax", "orbax", "tqdm", "PIL", "einops",
                        "typing_extensions", "absl", "etils", "msgpack"}) | frozenset(sys.stdlib_module_names)
_MAX_DEPTH = 12
_CONFIG_IGNORED = ("jax_compilation_cache_dir",)  # where entries live: a cache moved elsewhere still answers


def directory() -> str | None:
    """Where entries go (None: the cache is off)."""
    base = jax.config.jax_compilation_cache_dir
    if not base or os.environ.get("LDM_JAX_NO_PROGRAM_CACHE") == "1" or jax.process_count() > 1:
        return None
    return os.path.join(base, "ldm-jax-programs")


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


def load(path: str):
    """The compiled program stored at `path`, or None (absent; unreadable, damaged, or it crashed a process on
    its first run there: then the entry is removed). A loaded program is marked unproven on disk until it runs."""
    from jax.experimental import serialize_executable

    if not os.path.isfile(path):
        return None
    if _crashed_before(path):
        _remove(path)
        return None
    try:
        with open(path, "rb") as fh:
            fmt, digest, payload, in_tree, out_tree = pickle.load(fh)
        if fmt != FORMAT or hashlib.sha256(payload).hexdigest() != digest:  # checked before XLA reads it
            raise ValueError("format or checksum")
        compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception:  # noqa: BLE001 - a truncated or foreign entry: compile instead, and drop it
        _remove(path)
        return None
    try:
        os.utime(path)  # most recently used: pruned last
        with open(_marker(path), "w") as fh:  # removed when it has run (`ran`): left by a crash, it condemns the entry
            fh.write(str(os.getpid()))
    except OSError:
        pass
    return compiled


def _marker(path: str, pid: int | None = None) -> str:
    return f"{path}.{os.getpid() if pid is None else pid}.unproven"


def _crashed_before(path: str) -> bool:
    """Whether a process that loaded the entry at `path` ended without finishing its first run (a crash: XLA
    aborts or segfaults on some damaged executables, before Python can remove the entry). Clears such markers."""
    crashed = False
    folder, name = os.path.split(path)
    try:
        markers = [e for e in os.scandir(folder) if e.name.startswith(name + ".") and e.name.endswith(".unproven")]
    except OSError:
        return False
    for m in markers:
        pid = m.name[len(name) + 1:-len(".unproven")]
        if pid.isdigit() and not _alive(int(pid)):
            crashed = True
            _remove(m.path)
    return crashed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def store(path: str, compiled) -> bool:
    """Write `compiled` to `path` (temporary file, then rename); False where it cannot be serialized or
    written (a read-only cache, a full disk): the program still runs, the next process compiles it again."""
    from jax.experimental import serialize_executable

    folder = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as fh:
            entry = (FORMAT, hashlib.sha256(payload).hexdigest(), payload, in_tree, out_tree)
            pickle.dump(entry, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - see the docstring
        _remove(tmp)
        return False
    except BaseException:  # Ctrl-C: no temporary file left behind
        _remove(tmp)
        raise
    _prune(folder)
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _prune(folder: str) -> None:
    """Keep the MAX_ENTRIES most recently used entries; drop temporary files a killed process left (an hour
    old) and the markers of entries that are gone."""
    import time

    try:
        files = list(os.scandir(folder))
        entries = sorted((e for e in files if e.name.endswith(".pkl")), key=lambda e: e.stat().st_mtime, reverse=True)
        stale = [e for e in files if e.name.endswith(".tmp") and e.stat().st_mtime < time.time() - 3600]
    except OSError:
        return
    for e in entries[MAX_ENTRIES:] + stale:
        _remove(e.path)
    kept = {e.name for e in entries[:MAX_ENTRIES]}
    for e in files:
        if e.name.endswith(".unproven") and e.name.split(".pkl.")[0] + ".pkl" not in kept:
            _remove(e.path)


def load_or_compile(sd, static: dict, args, mesh, lower_fn):
    """The program on disk, else `lower_fn().compile()` written to disk. `lower_fn` traces and lowers the
    program anew on every call (a new function object: JAX keeps compiled executables per lowered module in
    memory). Returns (compiled, status): "hit" (loaded), "stored" (compiled and written), "compiled" (compiled,
    not written: not serializable, or an unwritable directory) or "off".

    Only an executable compiled in this process is written. When JAX's persistent cache supplied it, the
    program is lowered and compiled once more with that cache off: re-serializing a deserialized executable
    loses code on XLA:CPU (jax 0.10.2: the stored program fails with "Function ..._fusion not found"), and
    whether other backends keep it all is unverified. That costs one more compile, once per program, where
    JAX's cache held it before this one did (e.g. after an upgrade)."""
    folder = directory()
    if folder is None or not usable_for(sd):
        return lower_fn().compile(), "off"
    path = os.path.join(folder, key(sd, static, args, mesh) + ".pkl")
    compiled = load(path)
    if compiled is not None:
        _unproven[id(compiled)] = (compiled, path)
        return compiled, "hit"
    compiled, from_jax_cache = _compile_noting_cache_hits(lower_fn())
    if from_jax_cache:
        compiled = _compile_without_jax_cache(lower_fn())
    return compiled, ("stored" if store(path, compiled) else "compiled")


# programs read from disk that have not run yet: id -> (program, entry path)
_unproven: dict[int, tuple] = {}


def ran(compiled) -> None:
    """`compiled` ran and its result was read: a program from disk is proven."""
    entry = _unproven.pop(id(compiled), None)
    if entry is not None:
        _remove(_marker(entry[1]))


def interrupted(compiled) -> None:
    """The first run of `compiled` was interrupted (Ctrl-C), not crashed: keep its entry for the next process."""
    entry = _unproven.get(id(compiled))
    if entry is not None:
        _remove(_marker(entry[1]))


def release_all() -> None:
    """This process is stopping (an exit, a Ctrl-C) with programs loaded but not yet run: they did not crash it,
    so their entries stay usable (see `load`). Runs at exit; the CLI calls it before its `os._exit`."""
    for _, path in list(_unproven.values()):
        _remove(_marker(path))


atexit.register(release_all)


def discard(compiled) -> bool:
    """If `compiled` came from disk and never ran, remove its entry (it failed on its first run: a broken or
    incompatible executable; the caller compiles again) and return True; else False (a real error)."""
    entry = _unproven.pop(id(compiled), None)
    if entry is not None:
        _remove(entry[1])
        _remove(_marker(entry[1]))
    return entry is not None


_local = threading.local()
_listening = False


def _count_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":  # recorded on the compiling thread
        _local.hits = getattr(_local, "hits", 0) + 1


def _compile_noting_cache_hits(lowered):
    """(lowered.compile(), whether JAX's persistent cache supplied the executable)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count_cache_hit)
        _listening = True
    before = getattr(_local, "hits", 0)
    compiled = lowered.compile()
    return compiled, getattr(_local, "hits", 0) > before


def _compile_without_jax_cache(lowered):
    """Compile with JAX's persistent cache off for this one compile (process-wide: another thread compiling
    meanwhile would miss it too), then back on as it was."""
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()
