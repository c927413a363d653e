import sys

from g2is_jax.cli import main

sys.exit(main())
