"""Video I/O on tiny real videos written in a temp dir: every frame carries its index as 8 black or
white stripes (robust to lossy coding), above a colour gradient (to check crop and resize)."""

import os
import re
from fractions import Fraction

import av
import numpy as np
import pytest

from walkthrough.video import VideoError, VideoWriter, iter_frames, probe, read_frames

H, W, FPS, N = 48, 64, 30, 90  # 3 s


def pattern(i: int, h: int = H, w: int = W) -> np.ndarray:
    """Frame i: bits of i as 8 stripes (8 px wide) in the top 16 rows, a fixed gradient below."""
    frame = np.zeros((h, w, 3), np.uint8)
    for b in range(8):
        if i >> b & 1:
            frame[:16, b * 8:(b + 1) * 8] = 255
    frame[16:, :, 0] = 4 * np.arange(w)[None, :]
    frame[16:, :, 1] = 7 * np.arange(h - 16)[:, None]
    frame[16:, :, 2] = 128
    return frame


def index(frame: np.ndarray) -> int:
    """Read back the frame index written by `pattern` (full-size frames)."""
    return sum(1 << b for b in range(8) if frame[:16, b * 8:(b + 1) * 8].mean() > 128)


def write(path, n: int = N, fps=FPS, **kwargs):
    with VideoWriter(path, fps, **kwargs) as writer:
        for i in range(n):
            writer.write(pattern(i))
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.mark.parametrize("name, codec, pix_fmt, decoded_as, max_error", [
    ("clip.mp4", "libx264", "yuv420p", "h264", 4),
    ("clip.mkv", "libx264", "yuv420p", "h264", 4),
    ("clip.webm", "libvpx-vp9", "yuv420p", "vp9", 4),
    ("clip.mkv", "libsvtav1", "yuv420p", "av1", 4),
    ("clip.avi", "mpeg4", "yuv420p", "mpeg4", 4),
    ("clip.mov", "png", "rgb24", "png", 0),  # lossless, and decoded as rgb24: no conversion at all
])
def test_round_trip(tmp_path, name, codec, pix_fmt, decoded_as, max_error):
    path = write(tmp_path / name, codec=codec, pix_fmt=pix_fmt)
    info = probe(path)
    assert (info.width, info.height, info.codec) == (W, H, decoded_as)
    assert info.fps == pytest.approx(FPS) and info.duration == pytest.approx(N / FPS, abs=0.01)
    assert info.num_frames == N
    frames = list(iter_frames(path))
    times = np.array([t for t, _ in frames])
    np.testing.assert_allclose(times, np.arange(N) / FPS, atol=1e-3)  # mkv / webm round to 1 ms
    assert [index(f) for _, f in frames] == list(range(N))
    assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for _, f in frames)
    error = np.mean([np.abs(f.astype(int) - pattern(i)).mean() for i, (_, f) in enumerate(frames)])
    assert error <= max_error, f"round trip too far off: mean abs error {error:.2f}"


@pytest.mark.parametrize("name, codec, pix_fmt", [
    ("clip.mp4", "libx264", "yuv420p"),
    ("clip.webm", "libvpx-vp9", "yuv420p"),  # timestamps rounded to 1 ms
    ("clip.mov", "png", "rgb24"),  # frames need no conversion: repeats must still be copies
])
def test_resampling_picks_latest_frame_at_or_before(tmp_path, name, codec, pix_fmt):
    path = write(tmp_path / name, codec=codec, pix_fmt=pix_fmt)
    down = list(iter_frames(path, fps=15))
    assert [index(f) for _, f in down] == list(range(0, N, 2))
    up = list(iter_frames(path, fps=60))
    assert [index(f) for _, f in up] == [k // 2 for k in range(2 * N)]  # each frame twice
    np.testing.assert_allclose([t for t, _ in up], np.arange(2 * N) / 60)
    up[2][1][:] = 0  # a repeated frame is its own array: writing one leaves its twin alone
    assert index(up[3][1]) == 1


def test_variable_frame_rate(tmp_path):
    path = tmp_path / "vfr.mkv"
    gaps_ms = [33, 50, 17, 100, 33, 250, 16, 34, 120, 40] * 3
    times_ms = np.concatenate([[0], np.cumsum(gaps_ms)])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(pattern(i), format="rgb24")
            frame.pts, frame.time_base = int(ms), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    native = list(iter_frames(path))
    np.testing.assert_allclose([t for t, _ in native], times_ms / 1000)
    assert [index(f) for _, f in native] == list(range(len(times_ms)))
    resampled = list(iter_frames(path, fps=20))
    assert len(resampled) >= times_ms[-1] // 50 + 1  # every 50 ms up to the last frame
    for t, frame in resampled:
        latest = np.searchsorted(times_ms / 1000, t + 1e-9, side="right") - 1
        assert index(frame) == latest, f"output at {t:.3f}s"


def test_start_and_end_select_a_time_range(mp4):
    frames = list(iter_frames(mp4, start=1.2, end=1.5))  # seeks to a keyframe before 1.2 s
    assert [index(f) for _, f in frames] == list(range(36, 45))
    assert frames[0][0] == pytest.approx(1.2)
    assert [index(f) for _, f in iter_frames(mp4, fps=10, start=2.55)] == [76, 79, 82, 85, 88]


def test_crop_then_resize(mp4):
    x, y, w, h = 8, 0, 48, 32  # stripes 1..6 and the top of the gradient
    frames = list(iter_frames(mp4, crop=(x, y, w, h), size=(h // 2, w // 2)))
    assert frames[0][1].shape == (h // 2, w // 2, 3)

    def expected(i, dx):  # crop in numpy, then average 2x2 blocks
        c = pattern(i)[y:y + h, x + dx:x + dx + w].astype(float)
        return c.reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))

    def error(dx):
        return np.mean([np.abs(f - expected(i, dx)).mean() for i, (_, f) in enumerate(frames)])

    assert error(0) < 5 < error(2), "crop lands elsewhere than (x, y)"
    assert list(iter_frames(mp4, size=(24, 32)))[0][1].shape == (24, 32, 3)
    with pytest.raises(VideoError, match="crop.*does not fit"):
        next(iter_frames(mp4, crop=(40, 0, 32, 16)))


def test_resize_averages_pixels(tmp_path):
    path = tmp_path / "checker.mov"  # lossless, so the pixels are exactly a 1-px checkerboard
    checker = (np.indices((H, W)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2)
    with VideoWriter(path, FPS, codec="png", pix_fmt="rgb24") as writer:
        writer.write(checker)
    for crop in (None, (2, 2, W - 4, H - 4)):
        _, frame = next(iter_frames(path, size=(H // 4, W // 4), crop=crop))
        assert np.abs(frame.astype(int) - 127.5).max() <= 2, f"aliased with {crop=}"


def test_read_frames_matches_streaming(mp4):
    native = list(iter_frames(mp4, size=(24, 32)))
    times = np.array([t for t, _ in native])
    rng = np.random.default_rng(0)
    for start, fps in zip(rng.uniform(0, 2.4, 8), [30, 15, 10, 24] * 2):
        window = read_frames(mp4, start, 8, fps, size=(24, 32))
        assert window.shape == (8, 24, 32, 3) and window.dtype == np.uint8
        for k in range(8):
            source = np.searchsorted(times, start + k / fps + 1e-9, side="right") - 1
            np.testing.assert_array_equal(window[k], native[source][1], f"{start=} {fps=} {k=}")


def test_read_frames_past_the_end(mp4):
    with pytest.raises(VideoError, match=r"clip\.mp4: only 5 of 8 frames"):
        read_frames(mp4, 2.85, 8, 30)


def test_writer_rate_is_exact_and_keyframes_follow_gop(tmp_path):
    path = write(tmp_path / "ntsc.mp4", fps=29.97, gop=10)
    assert probe(path).fps == pytest.approx(30000 / 1001, rel=1e-9)
    np.testing.assert_allclose([t for t, _ in iter_frames(path)], np.arange(N) * 1001 / 30000,
                               atol=1e-9)
    with av.open(str(path)) as container:
        keyframes = [i for i, p in enumerate(container.demux(video=0)) if p.is_keyframe]
    assert keyframes[0] == 0 and max(np.diff(keyframes + [N])) <= 10


def test_writer_pads_odd_sizes(tmp_path):
    path = tmp_path / "odd.mp4"
    odd = pattern(5, 47, 63)
    with VideoWriter(path, FPS) as writer:
        for _ in range(3):
            writer.write(odd)
    frame = next(iter_frames(path))[1]
    assert frame.shape == (48, 64, 3)  # padded to even by repeating the last row and column
    assert np.abs(frame[:47, :63].astype(int) - odd).mean() < 4
    assert np.abs(frame[47, :63].astype(int) - odd[46]).mean() < 4


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "out.mp4"
    with VideoWriter(path, FPS) as writer:
        writer.write(pattern(0))
        assert not path.exists()  # a run killed now leaves nothing at `path`
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    path.unlink()
    with pytest.raises(KeyError):
        with VideoWriter(path, FPS) as writer:
            writer.write(pattern(0))
            raise KeyError("crash mid-video")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(VideoError, match="no frames"):
        with VideoWriter(path, FPS):
            pass
    with pytest.raises(VideoError, match=r"out\.mp4: frame 1 is \(24, 32, 3\)"):
        with VideoWriter(path, FPS) as writer:
            writer.write(pattern(0))
            writer.write(np.zeros((24, 32, 3), np.uint8))
    with pytest.raises(VideoError, match=r"out\.xyz: cannot write"):
        VideoWriter(tmp_path / "out.xyz", FPS)
    assert list(tmp_path.iterdir()) == []


# --- broken files -------------------------------------------------------------------------------


def audio_file(path, codec: str, rate: int, cover_art: bool = False):
    """A short silent audio file; with `cover_art`, a picture FFmpeg lists as a video stream."""
    with av.open(str(path), "w") as out:
        audio = out.add_stream(codec, rate=rate)
        if cover_art:
            cover = out.add_stream("png")
            cover.width, cover.height, cover.pix_fmt = 16, 16, "rgb24"
            cover.disposition = av.stream.Disposition.attached_pic
            picture = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            picture.pts = 0
            out.mux(cover.encode(picture))
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, i * 1152
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))


@pytest.mark.parametrize("case, problem", [
    ("missing.mp4", "no such file"),
    ("empty.mp4", "empty file"),
    ("notes.mp4", "cannot open as video"),
    ("speech.mka", "no video stream"),
    ("half.mp4", "cannot open as video"),  # mp4 index ('moov') at the end: cut off
])
def test_unreadable_files_raise_with_the_file_name(tmp_path, mp4, case, problem):
    path = tmp_path / case
    if case == "empty.mp4":
        path.touch()
    elif case == "notes.mp4":
        path.write_text("not a video\n" * 100)
    elif case == "speech.mka":
        audio_file(path, "pcm_s16le", 16000)
    elif case == "half.mp4":
        path.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    for read in (probe, lambda p: next(iter_frames(p)), lambda p: read_frames(p, 0, 1, 30)):
        with pytest.raises(VideoError, match=rf"{re.escape(case)}: {problem}"):
            read(path)


def test_cover_art_is_not_a_video(tmp_path):
    path = tmp_path / "song.mp3"
    audio_file(path, "libmp3lame", 44100, cover_art=True)
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1  # FFmpeg does list it
    with pytest.raises(VideoError, match=r"song\.mp3: no video stream"):
        probe(path)


@pytest.mark.parametrize("name, damage, problem", [
    ("cut.mkv", "truncate", r"video data stops at 1\.\d+s but the file declares 3\.000s"),
    ("cut.mp4", "truncate", r"video data stops at 1\.\d+s but the file declares 3\.000s"),
    ("garbled.mp4", "overwrite", r"corrupt video data after 1\.\d+s"),
], ids=["truncated-mkv", "truncated-mp4", "garbled-mp4"])
def test_damage_mid_stream_is_an_error_not_a_short_video(tmp_path, name, damage, problem):
    whole = tmp_path / f"whole{name[-4:]}"
    # mp4 with its index first ("faststart"), so cutting the end leaves it openable; random frames
    # spread the bytes evenly over time.
    with av.open(str(whole), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(N):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (H, W, 3), np.uint8), "rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    assert len(list(iter_frames(whole))) == N
    data = bytearray(whole.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2: len(data) // 2 + 2000] = rng.integers(0, 256, 2000, np.uint8).tobytes()
    path = tmp_path / name
    path.write_bytes(data)
    assert probe(path).duration == pytest.approx(3.0, abs=0.01)  # the header is intact
    with pytest.raises(VideoError, match=rf"{re.escape(name)}: {problem}"):
        list(iter_frames(path))


def test_probe_without_declared_duration(tmp_path):
    path = tmp_path / "live.mkv"  # a live-written mkv has no duration in its header
    with av.open(str(path), "w", options={"live": "1"}) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(N):
            frame = av.VideoFrame.from_ndarray(pattern(i), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with av.open(str(path)) as container:
        assert container.duration is None
    info = probe(path)
    assert info.duration == pytest.approx(N / FPS, abs=0.01) and info.num_frames == N
