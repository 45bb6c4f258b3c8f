"""Names a dispy computation finds on the node without importing anything.

dispy runs computations in the node's globals, so `os`, `time`, `socket`... are there
(dispy's examples use `os.getpid()` and `time.sleep()` without importing them), next to
dispy_node_name, dispy_node_ip_addr and dispy_job_path. This program imports none of
those modules at module level, so only the node can provide them.
"""
# ruff: noqa: F821

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    checks = {
        "os": lambda: os.getpid() > 0,
        "sys": lambda: sys.version_info[0] == 3,
        "time": lambda: time.time() > 0,
        "socket": lambda: bool(socket.gethostname()),
        "multiprocessing": lambda: multiprocessing.cpu_count() > 0,
        "threading": lambda: threading.current_thread() is not None,
        "subprocess": lambda: subprocess.PIPE == -1,
        "traceback": lambda: callable(traceback.format_exc),
        "marshal": lambda: marshal.loads(marshal.dumps(n)) == n,
        "tempfile": lambda: bool(tempfile.gettempdir()),
        "shutil": lambda: callable(shutil.copyfile),
        "glob": lambda: isinstance(glob.glob("*"), list),
        "pickle": lambda: pickle.loads(pickle.dumps(n)) == n,
        "io": lambda: io.StringIO("x").read() == "x",
        "signal": lambda: signal.SIGINT == 2,
        "platform": lambda: bool(platform.platform()),
        "copy": lambda: copy.copy([n]) == [n],
        "struct": lambda: struct.unpack("i", struct.pack("i", n)) == (n,),
        "hashlib": lambda: len(hashlib.sha1(b"x").hexdigest()) == 40,
        "re": lambda: re.match("a", "a") is not None,
        "errno": lambda: errno.ENOENT == 2,
    }
    missing = []
    for name, check in checks.items():
        try:
            if not check():
                missing.append(name + " (wrong)")
        except NameError:
            missing.append(name)
    cwd_is_job_path = os.path.realpath(os.getcwd()) == os.path.realpath(dispy_job_path)
    return (missing, dispy_node_name, dispy_node_ip_addr, cwd_is_job_path)


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    jobs = [cluster.submit(n) for n in range(2)]
    for job in jobs:
        job()
        if job.status != dispy.DispyJob.Finished:
            print("job %s failed: %s" % (job.id, job.exception))
            continue
        missing, name, ip_addr, cwd_is_job_path = job.result
        print("job %s: modules missing: %s" % (job.id, missing))
        print(
            "job %s: node %s at %s, cwd is dispy_job_path: %s"
            % (job.id, name, ip_addr, cwd_is_job_path)
        )
    cluster.close()
