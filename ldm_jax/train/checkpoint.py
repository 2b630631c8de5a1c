"""Training checkpoints: an `orbax.checkpoint.CheckpointManager` over RUN_DIR/checkpoints.

Each step directory `checkpoints/<step>/` holds two items:

    state/   the TrainState as a tree (StandardSave): step, U-Net params, EMA params, optimiser state
    meta/    JSON: format, step, seed, data position/epoch, model config, optimiser/step/run settings, base model

Saves are asynchronous (the step loop continues while tensorstore writes) and atomic: orbax writes
`<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only after everything is written (and a commit marker),
so a process killed mid-save leaves the previous checkpoint as the latest loadable one; leftover temporary
directories are removed (synchronously) the next time `Checkpoints` opens the directory. Only the last `keep`
checkpoints stay (`LatestN`); older ones are deleted after a newer one is complete. A failed write (disk full,
permissions) becomes a `UserError` that names the step and the previous, intact checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any

import jax

from ldm_jax.errors import UserError

FORMAT = "ldm-jax-train"
FORMAT_VERSION = 1
MODEL_KEYS = ("unet", "vae", "text")  # config sections that must match to resume
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's name for a step directory being written


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _os_error(e: BaseException) -> OSError | None:
    """The OSError that caused `e` (searching the cause/context chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _is_disk_full(e: BaseException) -> bool:
    os_err = _os_error(e)
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


class Checkpoints:
    """Save / restore TrainStates and their metadata in `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True, lazy: bool = False):
        """lazy: a directory that does not exist yet is created by the first `save` (until then there are no
        checkpoints), so that opening one to look never leaves an empty directory behind."""
        self.directory = os.path.abspath(os.fspath(directory))
        if keep < 1:
            raise UserError(f"--keep must be >= 1, got {keep}")
        self._keep, self._async = keep, async_save
        self._manager = None
        self._pending: int | None = None  # step being written asynchronously
        self._reported = False  # a failed save was reported: closing must not raise it again
        if not lazy or os.path.isdir(self.directory):
            self._open()

    def _open(self) -> None:
        ocp = _ocp()
        self._remove_partial()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(self._keep), create=True,
            enable_async_checkpointing=self._async)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        except OSError as e:
            raise UserError(f"cannot open the checkpoint directory {self.directory}: {e.strerror or e}") from e

    def _remove_partial(self, step: int | None = None) -> None:
        """Delete unfinished `<step>.orbax-checkpoint-tmp*` directories (of one step, or all), on process 0 only,
        synchronously (orbax's own clean-up runs in the background)."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            head, sep, _ = name.partition(TMP_MARK)
            if sep and head.isdigit() and (step is None or int(head) == step):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # ------------------------------------------------------------------------------------------- queries

    def latest_step(self) -> int | None:
        return self._manager.latest_step() if self._manager is not None else None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps()) if self._manager is not None else []

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {self.directory}")
        ocp = _ocp()
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    # ------------------------------------------------------------------------------------------- saving

    def save(self, step: int, state_tree: dict, meta: dict) -> None:
        """Start writing checkpoint `step` (returns before the arrays are on disk; `wait()` to finish)."""
        ocp = _ocp()
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "step": int(step)}
        if self._manager is None:
            self._open()
        self.wait()
        previous = self.latest_step()
        try:
            self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree),
                                                                  meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 - becomes a UserError when it is an I/O failure
            self._failed(e, int(step), previous)
        self._pending = int(step)

    def wait(self) -> None:
        """Block until the pending save (if any) is complete; I/O failures become a UserError."""
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            step, self._pending = self._pending, None
            self._failed(e, step, self._previous_of(step))
        self._pending = None

    def _previous_of(self, step: int | None) -> int | None:
        done = [s for s in self.all_steps() if step is None or s < step]
        return done[-1] if done else None

    def _failed(self, e: BaseException, step: int | None, previous: int | None) -> None:
        self._reported = True
        if step is not None:
            self._remove_partial(step)  # the failed step's partial directory, never a finished checkpoint
        intact = (f"the previous checkpoint (step {previous}) is intact" if previous is not None
                  else "no earlier checkpoint exists")
        if _is_disk_full(e):
            raise UserError(f"disk full while saving checkpoint step {step} to {self.directory}; {intact}") from e
        os_err = _os_error(e)
        if os_err is not None:
            raise UserError(f"cannot save checkpoint step {step} to {self.directory}: "
                            f"{os_err.strerror or os_err}; {intact}") from e
        raise e

    # ------------------------------------------------------------------------------------------- restoring

    def restore(self, abstract_tree: dict | None, step: int | None = None) -> tuple[dict, dict]:
        """(state tree, meta) of `step` (default: the latest). `abstract_tree` gives shapes, dtypes and shardings
        (None: the stored tree as it is, for inspection)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint to resume from in {self.directory}")
        ocp = _ocp()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree),
                                                                      meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError, OSError) as e:
            detail = (str(e).splitlines() or [""])[0][:300]
            raise UserError(f"cannot restore checkpoint step {step} from {self.directory}: "
                            f"{type(e).__name__}: {detail}") from e
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        if self._manager is None:
            return
        try:
            self.wait()
        except Exception:  # noqa: BLE001
            if not self._reported:
                raise
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - orbax re-raises the failure it already reported
                if not self._reported:
                    raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_same_model(meta: dict, config_dict: dict[str, Any], where: str) -> None:
    """Refuse to resume a run whose checkpoint holds a different architecture than the model given now."""
    if meta.get("format") != FORMAT:
        raise UserError(f"{where}: not an ldm-jax training checkpoint")
    saved = meta.get("config") or {}
    config_dict = json.loads(json.dumps(config_dict))  # tuples -> lists, as stored
    diffs = [k for k in MODEL_KEYS if saved.get(k) != config_dict.get(k)]
    if diffs:
        def describe(d):
            u = d.get("unet") or {}
            return (f"{d.get('name', '?')} (U-Net channels {u.get('channels')}, "
                    f"multipliers {u.get('channel_multipliers')})")

        raise UserError(f"{where}: the checkpoint was trained with a different model size: {describe(saved)} vs "
                        f"{describe(config_dict)} now (differs in {', '.join(diffs)}); use the same --checkpoint/"
                        "--preset as the original run, or a new --out directory")
