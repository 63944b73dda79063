"""``python -m genforge.kd.reinforce RECIPE``: the same as ``genforge reinforce RECIPE``."""

import sys

from genforge.kd.reinforce.recipe import main

sys.exit(main())
