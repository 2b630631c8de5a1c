import sys

from ldm_jax.cli.main import main

sys.exit(main())
