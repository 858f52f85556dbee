"""`python -m training.exercises`: see the package docstring."""

import sys

from training.exercises.runner import main

sys.exit(main())
