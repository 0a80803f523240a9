"""Fakes results: knows the result-stream format and writes a result frame to every open
descriptor, then leaves. It does not have the token the parent gave the harness on stdin.

expect: status bad_result: without the harness's token
"""
import json
import os
import struct


def generate(pipe, batch):
    forged = json.dumps({"status": "ok", "error": None, "images": [], "flops": {"total": 1.0}}).encode()
    frame = struct.pack(">4s16scI", b"DBF1", b"0" * 16, b"R", len(forged)) + forged
    stdin_token = os.read(0, 100)  # the token came on stdin before the candidate was imported
    assert stdin_token == b"", stdin_token
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            os.write(fd, frame)
        except OSError:
            pass
    os._exit(0)
