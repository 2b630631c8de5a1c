"""Run by tests/test_train_resume.py in a subprocess (so XLA_FLAGS / jax.distributed apply before jax starts):
`python -m tests.train_worker ARGS...` runs `ldm-jax train ARGS...` with the tests' fp32 settings.

LDM_JAX_TEST_HANG_FINALIZE=STEP: when orbax is about to finalize checkpoint STEP (every file written into the
temporary `STEP.orbax-checkpoint-tmp-*` directory, not yet renamed), print `FINALIZING STEP` and hang, so that the
test can SIGKILL the process in the middle of a save. Multi-host settings come from LDM_JAX_COORDINATOR /
LDM_JAX_NUM_PROCESSES / LDM_JAX_PROCESS_ID.
"""

import os
import sys
import time


def _hang_in_finalize(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get().name.startswith(f"{step}.orbax-checkpoint-tmp"):
            print(f"FINALIZING {step} {self.get()}", flush=True)
            time.sleep(600)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv: list[str]) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py: same programs, same cache
    if os.environ.get("LDM_JAX_TEST_HANG_FINALIZE"):
        _hang_in_finalize(int(os.environ["LDM_JAX_TEST_HANG_FINALIZE"]))
    from ldm_jax.cli.main import main as cli

    return cli(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ------------------------------------------------------------------ shared by tests/test_train*.py (no jax here)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (250, 250, 250), "black": (5, 5, 5), "purple": (140, 30, 160), "cyan": (30, 210, 210)}

# One program for every test (tiny preset, 16x16, global batch 8, fp32): it compiles once and the persistent
# compilation cache serves the other runs and the subprocesses. Adam's eps is 1e-5 rather than 1e-8: the first Adam
# update is lr * g / (|g| + eps), which turns rounding-level differences (~1e-8 absolute: torch vs XLA, or another
# summation order on 8 devices) of near-zero gradient elements into parameter differences of up to lr; eps bounds
# that amplification by lr * 1e-8 / eps (with eps 1e-8, one step against torch differs by 1.2e-4 relative).
COMMON = ["--preset", "tiny", "--resolution", "16", "--batch-size", "8", "--lr", "1e-3", "--lr-schedule", "constant",
          "--adam-eps", "1e-5", "--clip", "10", "--caption-dropout", "0.25", "--ema-decay", "0.99", "--seed", "0",
          "--precision", "fp32", "--no-progress", "--export", "none"]


def make_dataset(root) -> str:
    """8 solid-colour squares with captions; the cyan one is 12x12 (smaller than 16: upscaled with a warning)."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", (12, 12) if name == "cyan" else (16, 16), colour).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} square")
    return str(root)


def step_gradients(config, optim, step_cfg, params, batch, frozen, mesh):
    """(gradients, loss) of one compiled train step from `params` (key of seed 0), read back from Adam's first moment:
    mu = (1 - b1) g after one update, unclipped (optax scaled g by clip / |g| when |g| was above the clip)."""
    import jax
    import numpy as np
    import optax

    from ldm_jax import parallel
    from ldm_jax.train.state import init_state
    from ldm_jax.train.step import jitted_train_step, key_data

    state = init_state(parallel.replicate(params, mesh), optim, parallel.replicated(mesh))
    new, m = jitted_train_step(config, optim, step_cfg, mesh)(state, batch, parallel.replicate(key_data(0), mesh),
                                                              frozen)
    unclip = max(1.0, float(m["grad_norm"]) / optim.clip) if optim.clip else 1.0
    mu = optax.tree_utils.tree_get(new.opt_state, "mu")
    return jax.tree_util.tree_map(lambda x: np.asarray(x) * unclip / (1 - optim.b1), mu), float(m["loss"])
