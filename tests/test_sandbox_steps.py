"""The steps of `sandbox.run_job` and the protocol it speaks, each on its own, on data only (no
child process): the frame format both ends import (pytest_diffbench.frames), the child's `Channel`
writing into a real pipe that the parent's `_ResultStream` reads, the judgement of what a child
sent (`_collect_result`), the watchdog's decisions (`_charged_memory`, `_limit_reached`,
`_limit_status`), and the atomic writes (pytest_diffbench.atomic). The same steps with real
sandboxed children are in test_sandbox.py, test_landlock.py and test_warm_start.py.
"""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest

from pytest_diffbench import atomic, frames, sandbox
from pytest_diffbench.child import Channel
from pytest_diffbench.sandbox import SandboxLimits

TOKEN = bytes(range(16))


def png(width=4, height=4):
    """A valid RGB PNG, built without PIL."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + bytes(3 * width) for _ in range(height))
    return (sandbox.PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def mark(event, call, index):
    return frames.FRAME_MARK, json.dumps({"event": event, "call": call, "index": index}).encode()


def result_frame(**result):
    return frames.FRAME_RESULT, json.dumps({"status": "ok", "error": None, **result}).encode()


def stream_of(frames_at, token=TOKEN, max_bytes=1 << 20, max_images=None, max_pixels=sandbox.RESULT_MAX_PIXELS):
    """A `_ResultStream` fed `frames_at`: (arrival time, (kind, payload)) pairs, encoded for `token`."""
    results = sandbox._ResultStream(TOKEN, max_bytes, max_images, max_pixels)
    encode = frames.frame_encoder(token)
    for now, (kind, payload) in frames_at:
        results.add(encode(kind, payload), now)
    results.finish()
    return results


# -- the frame format ---------------------------------------------------------------------------


def test_frames_round_trip_through_the_decoder_byte_by_byte():
    encode = frames.frame_encoder(TOKEN)
    sent = [mark("ready", "first", 0), (frames.FRAME_IMAGE, frames.image_payload(3, png())), result_frame()]
    data = b"".join(encode(kind, payload) for kind, payload in sent)
    decoder = frames.FrameDecoder(TOKEN)
    received = []
    for i in range(len(data)):  # a pipe may cut the stream anywhere
        decoder.feed(data[i:i + 1])
        while (frame := decoder.next_frame()) is not None:
            received.append(frame)
    assert received == sent
    assert decoder.leftover_problem() is None
    assert frames.split_image_payload(received[1][1]) == (3, png())
    assert frames.split_image_payload(b"\1") is None


def test_the_decoder_refuses_another_token_at_the_first_header():
    forged = frames.frame_encoder(b"0" * 16)(*result_frame())
    decoder = frames.FrameDecoder(TOKEN)
    decoder.feed(forged[:frames.FRAME_HEADER.size])  # the payload has not even arrived
    with pytest.raises(frames.FrameError, match="without the harness's token"):
        decoder.next_frame()


@pytest.mark.parametrize("rest, problem", [
    (b"DBF1" + TOKEN[:8], "bytes without the harness's token"),  # too short to show its token
    (b"{not a frame", "bytes without the harness's token"),
    (b"DBF1" + b"0" * 16, "a frame without the harness's token"),
    (b"DBF1" + TOKEN + b"R", "a truncated frame"),
])
def test_what_is_left_at_the_end_of_the_stream(rest, problem):
    decoder = frames.FrameDecoder(TOKEN)
    decoder.feed(rest)
    assert decoder.next_frame() is None
    assert decoder.leftover_problem().startswith(problem)


def test_token_and_go_message_on_stdin():
    assert frames.parse_token_line(frames.token_line(TOKEN)) == TOKEN
    with pytest.raises(ValueError, match="no result-stream token"):
        frames.parse_token_line(b"abcd\n")
    message = frames.go_message({"seeds": [7, 8]})
    (length,) = frames.GO_HEADER.unpack_from(message)
    assert length == len(message) - frames.GO_HEADER.size
    assert frames.parse_go_body(message[frames.GO_HEADER.size:]) == {"seeds": [7, 8]}
    assert len(frames.new_token()) == frames.TOKEN_BYTES and frames.new_token() != frames.new_token()


def test_the_child_channel_speaks_what_the_parent_reads(tmp_path):
    """child.Channel on a real pipe, read by the parent's _ResultStream; the token is nowhere but in
    the channel's closure (not in an attribute a candidate could find, nor in a module)."""
    read_fd, write_fd = os.pipe()
    try:
        channel = Channel.from_job({"result_fd": write_fd}, stdin=io.BytesIO(frames.token_line(TOKEN)))
        channel.mark("start", "timed", 0)
        channel.image(0, png())
        channel.result({"status": "ok", "error": None, "images": ["000.png"], "value": float("nan")})
        os.close(write_fd)
        write_fd = None
        data = b""
        while chunk := os.read(read_fd, 1 << 16):
            data += chunk
    finally:
        os.close(read_fd)
        if write_fd is not None:
            os.close(write_fd)
    results = sandbox._ResultStream(TOKEN, 1 << 20, 1)
    results.add(data, 5.0)
    results.finish()
    assert results.error is None
    assert results.marks == [(5.0, {"event": "start", "call": "timed", "index": 0})]
    assert results.images == {0: png()}
    assert json.loads(results.result)["images"] == ["000.png"]
    import pytest_diffbench.child as child

    for namespace in (vars(channel), vars(child), vars(frames)):
        assert TOKEN not in namespace.values() and TOKEN.hex() not in namespace.values()


# -- collecting the result ----------------------------------------------------------------------


def test_an_honest_stream_gives_the_result_with_the_parents_figures_and_images(tmp_path):
    results = stream_of([
        (1.0, mark("ready", "first", 0)),
        (1.5, mark("start", "first", 0)), (2.5, mark("end", "first", 0)),
        (3.0, mark("start", "timed", 0)), (5.0, mark("end", "timed", 0)),
        (5.1, (frames.FRAME_IMAGE, frames.image_payload(0, png()))),
        (5.2, result_frame(images=["000.png"], timing={"calls_s": [1.9]})),
    ], max_images=1)
    status, detail, result = sandbox._collect_result(results, 0, False, str(tmp_path / "out"))
    assert (status, detail) == ("ok", "")
    assert result["status"] == "ok"
    timing = result["timing"]
    assert timing["parent_calls_s"] == [2.0]
    assert timing["parent_first_call_s"] == 1.0
    assert timing["parent_phase_s"] == pytest.approx(4.2)  # the ready mark (go) to the result
    assert (tmp_path / "out" / "000.png").read_bytes() == png()


def test_a_folder_the_parent_cannot_write_is_the_harnesss_error_not_the_candidates(tmp_path):
    # the candidate's part of collecting (its document, its images' names) is checked first; a
    # failure to write the checked images (here a file where the folder goes) is the parent's own
    blocked = tmp_path / "out"
    blocked.write_text("not a folder")
    results = stream_of([
        (3.0, mark("start", "timed", 0)), (5.0, mark("end", "timed", 0)),
        (5.1, (frames.FRAME_IMAGE, frames.image_payload(0, png()))),
        (5.2, result_frame(images=["000.png"], timing={"calls_s": [1.9]})),
    ], max_images=1)
    with pytest.raises(OSError):
        sandbox._collect_result(results, 0, False, str(blocked))


def test_a_timer_that_under_reports_makes_an_integrity_error():
    results = stream_of([
        (3.0, mark("start", "timed", 0)), (5.0, mark("end", "timed", 0)),
        (5.2, result_frame(images=[], timing={"calls_s": [0.1]})),
    ])
    status, _, result = sandbox._collect_result(results, 0, False, None)
    assert status == "ok"  # the stream was fine: the verdict is the candidate's error
    assert result["status"] == "error" and result["error"]["type"] == "IntegrityError"
    assert "its timer was tampered with" in result["error"]["message"]


def test_the_attributes_judged_are_the_ones_sent_when_read_and_a_rewrite_after_is_an_integrity_error():
    """Red team round 18: the candidate's timed call walked the frames up to the child's runner and
    rewrote the attributes stage 1 judges after they were read (a record left out, a gate set to
    None), undoing every in-process check. The child now sends them as soon as they are read
    (frames.FRAME_ATTRIBUTES); the parent judges that copy, and a result whose copy differs, or that
    carries attributes never sent so, is the candidate's integrity error. A second attributes frame
    (one the candidate sent itself) rejects the stream."""
    read = {"methods": {"tgate": {"gate_step": 5}}, "deepcache_full_calls": {"calls": 4, "full": [0, 2]}}
    sent = (frames.FRAME_ATTRIBUTES, json.dumps(read).encode())
    honest = sandbox._collect_result(stream_of([(1.0, sent), (2.0, result_frame(attributes=read))]), 0, False, None)
    assert honest[0] == "ok" and honest[2]["status"] == "ok" and honest[2]["attributes"] == read
    rewritten = {"methods": {"tgate": {"gate_step": None}}}
    status, _, result = sandbox._collect_result(stream_of([(1.0, sent), (2.0, result_frame(attributes=rewritten))]),
                                                0, False, None)
    assert status == "ok" and result["status"] == "error" and result["error"]["type"] == "IntegrityError"
    assert "changed after the harness read them" in result["error"]["message"]
    assert result["attributes"] == read  # the copy read, whatever the result says
    unsent = sandbox._collect_result(stream_of([(2.0, result_frame(attributes=read))]), 0, False, None)[2]
    assert unsent["status"] == "error" and "were not sent when they were read" in unsent["error"]["message"]
    assert sandbox._collect_result(stream_of([(2.0, result_frame())]), 0, False, None)[2]["status"] == "ok"
    twice = sandbox._collect_result(stream_of([(1.0, sent), (1.5, sent), (2.0, result_frame(attributes=read))]),
                                    0, False, None)
    assert twice[:2] == ("bad_result", "result stream rejected: a second attributes frame")
    # red team round 19 edited the live observation during the call, so that the attributes read after
    # it credited a T-GATE whose scheduler was replaced: what the hooks found during the call is sent
    # then (frames.FRAME_FINDINGS), and those methods are not applied whatever the attributes say
    found = (frames.FRAME_FINDINGS, json.dumps({"tgate": "tgate_scheduler replaced in its module"}).encode())
    status, _, result = sandbox._collect_result(
        stream_of([(0.5, found), (1.0, sent), (2.0, result_frame(attributes=read))]), 0, False, None)
    assert status == "ok" and result["status"] == "ok" and "tgate" not in result["attributes"]["methods"]
    assert "tgate_scheduler replaced in its module" in result["attributes"]["unverified_methods"]["tgate"]
    failed = (frames.FRAME_FINDINGS, json.dumps({"*": "the method snapshot failed"}).encode())
    result = sandbox._collect_result(stream_of([(0.5, failed), (1.0, sent), (2.0, result_frame(attributes=read))]),
                                     0, False, None)[2]
    assert result["attributes"]["methods"] == {} and set(result["attributes"]["unverified_methods"]) == {"tgate"}
    odd = (frames.FRAME_FINDINGS, b"[1]")
    assert sandbox._collect_result(stream_of([(0.5, odd), (2.0, result_frame())]), 0, False, None)[0] == "bad_result"


@pytest.mark.parametrize("frames_at, bounds, detail", [
    ([(0, result_frame())], {"token": b"1" * 16}, "result stream rejected: a frame without the harness's token"),
    ([(0, (frames.FRAME_IMAGE, frames.image_payload(2, png())))], {"max_images": 2},
     "result stream rejected: image 2: the job asks for 2 images"),
    ([(0, (frames.FRAME_IMAGE, frames.image_payload(0, png(64, 64))))], {"max_pixels": 1000},
     "result stream rejected: image 0: a PNG of 64x64 pixels, more than the 1000"),
    ([(0, (frames.FRAME_IMAGE, frames.image_payload(0, b"GIF89a")))], {}, "result stream rejected: an image frame that is not a PNG"),
    ([(0, result_frame()), (1, mark("end", "timed", 0))], {}, "result stream rejected: frames after the result"),
    ([(0, (b"X", b""))], {}, "result stream rejected: unknown frame kind"),
    ([(0, (frames.FRAME_RESULT, b"[1, 2]"))], {}, "unreadable result: result is not a harness result document"),
    ([(0, result_frame(images=["000.png"]))], {}, "unreadable result: the result names images"),
])
def test_a_bad_stream_is_a_bad_result(tmp_path, frames_at, bounds, detail):
    results = stream_of(frames_at, **bounds)
    status, got, result = sandbox._collect_result(results, 0, False, str(tmp_path / "out"))
    assert (status, result) == ("bad_result", None)
    assert got.startswith(detail), got
    assert not (tmp_path / "out").exists()


def test_a_stream_over_its_bound_is_an_output_limit():
    results = stream_of([(0, (frames.FRAME_IMAGE, frames.image_payload(0, png() + bytes(4096))))], max_bytes=4096)
    assert "larger than" in results.error and results.images == {}
    assert sandbox._limit_reached(1, 0, 0, SandboxLimits(), results.error) == "output"
    assert sandbox._collect_result(results, 0, False, None)[0] == "bad_result"


@pytest.mark.parametrize("returncode, wrapped, status, detail", [
    (-9, False, "crashed", "child died from SIGKILL without a result (exit status -9)"),
    (139, True, "crashed", "child died from SIGSEGV without a result (exit status 139)"),
    (139, False, "no_result", "child exited with code 139 without sending a result"),  # a forked run's own code
    (0, True, "no_result", "child exited with code 0 without sending a result"),
])
def test_a_child_without_a_result(returncode, wrapped, status, detail):
    results = stream_of([(0, mark("ready", "first", 0))])
    assert sandbox._collect_result(results, returncode, wrapped, None) == (status, detail, None)


# -- the watchdog's decisions -------------------------------------------------------------------

PAGE = 4096
MiB = 1 << 20


def table_of(rss_mib: dict[int, int]) -> dict:
    """A `_proc_table` shape: pid -> (ppid, pgrp, rss pages, state, CPU ticks)."""
    return {pid: (1, 1, mib * MiB // PAGE, "S", 0) for pid, mib in rss_mib.items()}


class PssOf:
    """PSS per pid (bytes), recording which pids were asked for."""

    def __init__(self, pss_mib: dict[int, int]):
        self.pss, self.asked = pss_mib, []

    def __call__(self, pid, rss_pages, page):
        self.asked.append(pid)
        return self.pss[pid] * MiB


def test_memory_under_the_limit_is_charged_by_rss_without_reading_pss():
    pss = PssOf({})
    table = table_of({10: 300, 11: 200, 99: 5000})
    assert sandbox._charged_memory(table, [10, 11], PAGE, 1024 * MiB, 0, pss=pss) == 500 * MiB
    assert pss.asked == []


def test_memory_over_the_limit_by_rss_is_charged_by_pss():
    pss = PssOf({10: 400, 11: 300})  # forks sharing pages: RSS counts them twice
    table = table_of({10: 600, 11: 600})
    assert sandbox._charged_memory(table, [10, 11], PAGE, 1024 * MiB, 0, pss=pss) == 700 * MiB
    assert sorted(pss.asked) == [10, 11]
    # files in the scratch space count towards the limit: 100 MiB more RSS no longer fits
    assert sandbox._charged_memory(table_of({10: 950}), [10], PAGE, 1024 * MiB, 100 * MiB,
                                   pss=PssOf({10: 900})) == 900 * MiB


def test_a_forked_run_is_charged_beyond_the_zygote():
    table = table_of({10: 700, 20: 600})  # 20: the zygote
    pss = PssOf({10: 500, 20: 300})
    # by RSS: the run's 700 MiB minus the 600 MiB resident in the zygote when the run started
    assert sandbox._charged_memory(table, [10], PAGE, 1024 * MiB, 0, inherited=600 * MiB, inherited_pss=350 * MiB,
                                   zygote_pid=20, pss=pss) == 100 * MiB
    assert pss.asked == []
    # over the limit by RSS: PSS of the run and the zygote, minus the zygote's share at the start
    over = table_of({10: 1700, 20: 600})
    assert sandbox._charged_memory(over, [10], PAGE, 1024 * MiB, 0, inherited=600 * MiB, inherited_pss=350 * MiB,
                                   zygote_pid=20, pss=PssOf({10: 1200, 20: 300})) == 1150 * MiB


def test_a_forked_run_cannot_hide_memory_by_dropping_what_it_inherited():
    # the run unmapped (or paged out) the 600 MiB it shared with the zygote and allocated 1100 MiB
    # of its own: RSS minus the zygote's is 500 MiB, under the 1024 MiB limit, but the run holds
    # more than the limit; its whole RSS is over it, so the charge is exact
    table = table_of({10: 1100, 20: 600})
    pss = PssOf({10: 1100, 20: 600})  # nothing shared any more: each holds its own pages in full
    charged = sandbox._charged_memory(table, [10], PAGE, 1024 * MiB, 0, inherited=600 * MiB,
                                      inherited_pss=600 * MiB, zygote_pid=20, pss=pss)
    assert charged == 1100 * MiB > 1024 * MiB
    assert sorted(pss.asked) == [10, 20]
    # an honest run of the same size that kept its inherited pages: the same charge
    shared = sandbox._charged_memory(table_of({10: 1700, 20: 600}), [10], PAGE, 1024 * MiB, 0,
                                     inherited=600 * MiB, inherited_pss=600 * MiB, zygote_pid=20,
                                     pss=PssOf({10: 300 + 1100, 20: 300}))
    assert shared == 1100 * MiB


def test_a_forked_run_ending_between_the_reads_is_not_charged_the_zygote():
    """The run's and the zygote's PSS are two reads: a run that ends between them must not be
    charged its half of the shared pages and then the zygote's whole (the run gone). The zygote is
    read first, so the ending run reads 0. (Seen for real: an honest 32 MiB run charged 227 MiB
    under load, test_landlock.py's memfd test.)"""
    class EndsAfterFirstRead:
        def __init__(self):
            self.asked = []

        def __call__(self, pid, rss_pages, page):
            self.asked.append(pid)
            gone = 10 in self.asked[:-1] or (pid == 10 and len(self.asked) > 1)
            if pid == 20:  # the zygote: 442 MiB alone, 224 while it shares with the run
                return (442 if 10 in self.asked[:-1] else 224) * MiB
            return 0 if gone else 227 * MiB  # the run: its half of the shared pages, 0 once ended
    table = table_of({10: 452, 20: 752})
    pss = EndsAfterFirstRead()
    charged = sandbox._charged_memory(table, [10], PAGE, 256 * MiB, 32 * MiB, inherited=752 * MiB,
                                      inherited_pss=442 * MiB, zygote_pid=20, pss=pss)
    assert pss.asked[0] == 20 and charged + 32 * MiB <= 256 * MiB


def test_the_first_limit_broken_is_the_one_reported():
    limits = SandboxLimits(memory_mb=1024, max_processes=8)
    stream_error = "result stream larger than 1 MiB (the bound for this job's images)"
    assert sandbox._limit_reached(9, 2048 * MiB, 0, limits, stream_error) == "processes"
    assert sandbox._limit_reached(8, 1000 * MiB, 25 * MiB, limits, stream_error) == "memory"
    assert sandbox._limit_reached(8, 1024 * MiB, 0, limits, stream_error) == "output"
    assert sandbox._limit_reached(8, 1024 * MiB, 0, limits, "unreadable timing mark") is None
    assert sandbox._limit_reached(8, 1 << 40, 0, SandboxLimits(memory_mb=None), None) is None


def test_limit_statuses_in_their_order():
    limits = SandboxLimits(timeout_s=30, memory_mb=512, max_processes=8)
    assert sandbox._limit_status(True, "memory", limits) == ("timeout", "killed after 30 s wall-clock limit")
    assert sandbox._limit_status(False, "memory", limits, " (processes 600 MiB)") == (
        "memory", "killed above the 512 MiB memory limit (processes 600 MiB)")
    assert sandbox._limit_status(False, "processes", limits) == (
        "processes", "killed with more than 8 processes (fork bomb?)")
    assert sandbox._limit_status(False, "output", limits) is None  # the stream's own error says it
    assert sandbox._limit_status(False, None, limits) is None


# -- atomic writes --------------------------------------------------------------------------------


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "new" / "result.json"
    atomic.write_json_atomic(path, {"a": 1}, indent=1)
    assert json.loads(path.read_text()) == {"a": 1}
    atomic.write_atomic(path, "é\n", fsync=True)
    assert path.read_bytes() == "é\n".encode()
    assert os.listdir(path.parent) == ["result.json"]
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())


def test_write_atomic_uses_the_given_replace_and_cleans_up_when_it_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    calls = []

    def failing_replace(src, dst):
        calls.append((os.path.dirname(src), dst))
        raise OSError("no rename")

    with pytest.raises(OSError, match="no rename"):
        atomic.write_atomic(path, b"new", replace=failing_replace)
    assert calls == [(str(tmp_path), str(path))]  # the temporary file was in the same folder
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_process_that_has_exited_holds_no_memory():
    # the watchdog reads the process table, then each process's PSS: a run that ends in between
    # must not be charged its table RSS (which counts the pages it shared with its zygote)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a zombie until reaped: no memory map left
        with open(f"/proc/{proc.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert sandbox._memory_bytes(proc.pid, 100_000, PAGE) == 0
    proc.wait()
    assert sandbox._memory_bytes(proc.pid, 100_000, PAGE) == 0  # reaped: /proc/PID is gone
    assert sandbox._memory_bytes(os.getpid(), 1, PAGE) > PAGE  # a live process: its PSS, not the 1-page RSS given


def test_a_forked_run_is_charged_its_anonymous_and_shared_memory_pages():
    # what a run and its zygote hold between them, without their share of library pages (which
    # moves with how many other processes map the same files)
    import mmap

    before = sandbox._private_memory_bytes(os.getpid(), 1, PAGE)
    assert 0 < before < sandbox._memory_bytes(os.getpid(), 1, PAGE)  # this process maps libraries
    shared = mmap.mmap(-1, 64 * MiB)  # anonymous shared memory (shmem), touched
    shared.write(b"x" * (64 * MiB))
    try:
        assert sandbox._private_memory_bytes(os.getpid(), 1, PAGE) - before >= 60 * MiB
    finally:
        shared.close()
