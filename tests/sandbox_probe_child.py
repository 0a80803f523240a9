"""A stand-in for pytest_diffbench.child used by test_sandbox: does what job["action"] says.

It is run through the real sandbox (real subprocess, real limits); only the harness side of the
child is replaced, so that each sandbox guarantee can be tested without loading torch.
"""

import json
import os
import socket
import sys
import time

job = json.load(open(sys.argv[1]))
action = job["action"]
result = {"status": "ok", "env": dict(os.environ), "cwd": os.getcwd()}

if action == "sleep":
    # a grandchild that would outlive us if the process group were not killed
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    with open(job["pid_file"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(600)
elif action == "memory":
    hog = []
    while True:
        hog.append(bytearray(50 << 20))
        for i in range(0, len(hog[-1]), 4096):
            hog[-1][i] = 1
        time.sleep(0.02)
elif action == "segfault":
    import ctypes

    ctypes.string_at(0)
elif action == "exit_silently":
    os._exit(0)
elif action == "garbage":
    open(job["result_path"], "w").write("{not json")
    sys.exit(0)
elif action == "network":
    try:
        socket.create_connection(("127.0.0.1", job["port"]), timeout=2).close()
        result["connected"] = True
    except OSError as exc:
        result["connected"] = False
        result["error"] = str(exc)
elif action == "flood":
    for _ in range(2000):
        print("x" * 1000)
    sys.stderr.write("the end\n")

tmp = job["result_path"] + ".tmp"
with open(tmp, "w") as fh:
    json.dump(result, fh)
os.replace(tmp, job["result_path"])
