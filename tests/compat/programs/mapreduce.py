"""dispy's documented MapReduce example (word frequencies), after its idea: two
clusters open at once in one program, a mapper per document and reducers over parts
of the mapped words, the reduced counts merged at the client."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")
DOCS = ["doc%d.txt" % i for i in range(4)]


def mapper(doc):  # executed on nodes: the document came with depends
    words = []
    with open(doc) as fd:
        for line in fd:
            words.extend((word.lower(), 1) for word in line.split() if word.isalpha())
    return words


def reducer(words):  # executed on nodes: (word, count) pairs to a dict
    counts = {}
    for word, count in words:
        counts[word] = counts.get(word, 0) + count
    return counts


if __name__ == "__main__":
    for i, doc in enumerate(DOCS):  # the documents (dispy's lived on the nodes)
        with open(doc, "w") as fd:
            fd.write(("red green blue " * (i + 1) + "Gold\n") * 10)
    map_cluster = dispy.JobCluster(mapper, nodes=NODES, depends=DOCS, reentrant=True)
    reduce_cluster = dispy.JobCluster(reducer, nodes=NODES, reentrant=True)
    map_jobs = [map_cluster.submit(doc) for doc in DOCS]
    reduce_jobs = []
    for map_job in map_jobs:
        words = map_job()
        if not words:
            print("map failed: %s" % map_job.exception)
            continue
        for n in range(0, len(words), 25):  # a simple partition
            reduce_jobs.append(reduce_cluster.submit(words[n : n + 25]))
    totals = {}
    for reduce_job in reduce_jobs:
        counts = reduce_job()
        if not counts:
            print("reduce failed: %s" % reduce_job.exception)
            continue
        for word, count in counts.items():
            totals[word] = totals.get(word, 0) + count
    for word in sorted(totals, key=lambda w: (-totals[w], w)):
        print(word, totals[word])
    print("reduce jobs: %d" % len(reduce_jobs))
    map_cluster.close()
    reduce_cluster.print_status()
    reduce_cluster.close()
