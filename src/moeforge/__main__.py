"""`python -m moeforge ...` (how torchrun starts each rank: `torchrun ... -m moeforge train ...`)."""

import sys

from .cli import main

sys.exit(main())
