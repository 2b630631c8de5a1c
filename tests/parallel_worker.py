"""Run by tests/test_parallel.py in a subprocess (so XLA_FLAGS / jax.distributed apply before jax starts):
sample n images and save this process's rows. Usage: python -m tests.parallel_worker CKPT N OUT.npz [multi-host
settings come from LDM_JAX_COORDINATOR / LDM_JAX_NUM_PROCESSES / LDM_JAX_PROCESS_ID]."""

import sys

import numpy as np


def main(ckpt: str, n: int, out: str) -> None:
    from ldm_jax import parallel

    parallel.init_distributed()
    import jax

    import ldm_jax

    model = ldm_jax.load(ckpt)
    prompts = [f"a shape number {i}" for i in range(n)]
    kw = dict(steps=4, height=16, width=16, seed=3, sampler="euler_a", guidance_scale=5.0)
    images = ldm_jax.txt2img(model, prompts, **kw)
    latents = ldm_jax.txt2img(model, prompts, output="latents", **kw)
    plan = parallel.plan_batch(n)
    idx = np.array([i for i in plan.local_indices if i < n])
    np.savez(out, images=images, latents=latents, indices=idx, devices=jax.device_count(),
             processes=jax.process_count())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
