"""The update node_update.py runs on each node: here it only takes a moment and
says when it ran."""

import random
import sys
import time

time.sleep(random.uniform(0.5, 1.0))
print(time.asctime())
sys.exit(0)
