"""``python -m cai_helpers`` (what ``make run`` calls): run the main job's notebooks."""

import sys

from cai_helpers.pipeline import main

sys.exit(main())
