"""Compiled sampling programs on disk under a key computed without tracing: a new process skips tracing and
lowering the txt2img / img2img / inpaint program as well as compiling it.

JAX's persistent compilation cache (`compile_cache.py`) keys a program by its lowered HLO, so every new process
still traces the whole program (text encoder, U-Net loop, decoder) and lowers it before that cache can answer: SD
1.x, 2 CPU cores: trace 0.9-1.0 s + lower 0.4-0.5 s + key and executable load 1.05-1.15 s; from this cache the
executable loads in 0.86-1.03 s. Tracing holds the GIL, so it also slowed the weights loading beside it
(`warm_start.py`). The executable is stored with `jax.experimental.serialize_executable` under a key built without
tracing (`program_key.key`: the request, the model, the code and the platform). Only single-process runs use it (a
multi-host program is compiled as before). Off with LDM_JAX_NO_PROGRAM_CACHE=1, and whenever the compilation cache
is off. Entries are pickled executables in `<compilation cache>/ldm-jax-programs` (as for JAX's own cache, only
their user may write there); the newest `MAX_ENTRIES` are kept. Only executables compiled in this process are
written (`load_or_compile` says why); an unreadable entry, one whose payload does not match its stored sha256, one
whose program fails on its first run (`discard`), and one whose first run crashed a process (a
`<entry>.<pid>.unproven` marker of a process that is gone) is removed and the program compiled again. Only a plain
`StableDiffusion` uses the cache (`usable_for`): the key cannot see a subclass's methods.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import pickle
import threading

import jax

from ldm_jax.program_key import FORMAT, key, usable_for

MAX_ENTRIES = 32


def directory() -> str | None:
    """Where entries go (None: the cache is off)."""
    base = jax.config.jax_compilation_cache_dir
    if not base or os.environ.get("LDM_JAX_NO_PROGRAM_CACHE") == "1" or jax.process_count() > 1:
        return None
    return os.path.join(base, "ldm-jax-programs")


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
