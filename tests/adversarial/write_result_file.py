"""Fakes results: writes a result.json next to the job file (where the harness keeps it) and
leaves. The file system outside its private /tmp is read-only, and the parent reads only its pipe.

expect: status no_result: without sending a result
"""
import json
import os


def generate(pipe, batch):
    job_path = open("/proc/self/cmdline", "rb").read().split(b"\0")[-2].decode()
    for name in ("result.json", "images/000.png"):
        try:
            with open(os.path.join(os.path.dirname(job_path), name), "w") as fh:
                fh.write(json.dumps({"status": "ok", "error": None, "images": [], "flops": {"total": 1.0}}))
        except OSError as exc:
            print("could not write", name, exc)
    os._exit(0)
