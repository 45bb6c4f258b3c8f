"""A Python program computation: count a word in a file; the count is the exit code.

dispy runs a ``.py`` computation with the node's Python; the job's arguments are
``sys.argv[1:]`` and the node's values are environment variables.
"""

import os
import sys

path, word = sys.argv[1], sys.argv[2]
with open(path) as fd:  # a missing file raises: traceback on stderr, exit code 1
    words = fd.read().split()
count = words.count(word)
print("%s: %d" % (word, count))
print("node: %s" % os.environ["dispy_node_name"])  # noqa: SIM112
print("python: %d.%d" % sys.version_info[:2])
sys.exit(count)
