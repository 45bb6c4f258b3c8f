"""dest_path with cleanup=False, as dispy's documentation gives it for files that
several clusters use: what one cluster leaves in its dest_path on a node (the files
it sent, a cache its setup built) the next cluster given that dest_path finds there.
cleanup=True removes it, though not while another cluster still uses it.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")[:1]


def setup():  # executed on nodes: the cache is built once, for the later clusters
    global built
    import os

    built = not os.path.exists("cache.txt")
    if built:
        with open("words.txt") as fd, open("cache.txt", "w") as out:
            out.write(fd.read().upper())
    return 0


def compute(n):  # executed on nodes
    import os

    with open("cache.txt") as fd:
        word = fd.read().split()[n]
    return "%s, cache built by this cluster: %s, files: %s" % (
        word,
        built,
        sorted(os.listdir(".")),
    )


def lookup(n):  # executed on nodes
    try:
        with open("cache.txt") as fd:
            return fd.read().split()[n]
    except OSError as exc:
        return type(exc).__name__


if __name__ == "__main__":
    with open("words.txt", "w") as fd:
        fd.write("alpha beta gamma\n")
    for run in (1, 2):
        cluster = dispy.JobCluster(
            compute,
            nodes=NODES,
            depends=["words.txt"],
            setup=setup,
            dest_path="wordcache",
            cleanup=False,
        )
        print("run %d: %s" % (run, cluster.submit(run)()))
        cluster.close()
    first = dispy.JobCluster(lookup, nodes=NODES, dest_path="wordcache")
    second = dispy.JobCluster(lookup, nodes=NODES, dest_path="wordcache")
    print("two clusters at once: %s, %s" % (first.submit(0)(), second.submit(1)()))
    second.close()  # cleanup=True, but first still uses the directory
    print("after one closed: %s" % first.submit(2)())
    first.close()
    cluster = dispy.JobCluster(lookup, nodes=NODES, dest_path="wordcache")
    print("after both closed: %s" % cluster.submit(0)())
    cluster.close()
