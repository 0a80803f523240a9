"""The steps of `sandbox.run_job` and the protocol it speaks, each on its own, on data only (no
child process): the frame format both ends import (pytest_diffbench.frames), the child's
`Channel` writing into a real pipe that the parent's `_ResultStream` reads, and the atomic writes
of records (pytest_diffbench.atomic). The same steps with real sandboxed children are in
test_sandbox.py, test_landlock.py and test_warm_start.py.
"""

import io
import json
import os
import struct
import zlib

import pytest

from pytest_diffbench import atomic, frames, sandbox
from pytest_diffbench.child import Channel

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
