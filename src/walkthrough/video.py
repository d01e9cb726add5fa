"""Video I/O on PyAV: probe, streaming decode with timestamp resampling, random-access windows, and
an atomic H.264 (or VP9 / AV1) writer.

Time is in seconds from the stream's first frame (the first frame is at 0.0), whatever the
container's own start time. Resampling to a fixed ``fps`` goes by timestamps, so variable frame
rate video works: output ``k`` has time ``start + k / fps`` and shows the latest source frame whose
time is at or before it (frames are duplicated or dropped as needed), until the video's end, which
is the last frame's time plus its duration.

Frames come out as (H, W, 3) uint8 RGB. Crop, resize and colour conversion run inside libswscale
(and libavfilter for the crop) in one pass per frame; only frames actually returned are converted.
Decoding is streamed: memory does not grow with video length.

Every failure with a file (missing, empty, not a video, corrupt or truncated data) raises
``VideoError`` whose message starts with the file's path.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".ts", ".mts", ".mpg", ".mpeg",
    ".wmv", ".3gp", ".ogv",
)

# A stream may end a little before the duration its container declares (rounded durations, edit
# lists); anything shorter than this is a truncated file that FFmpeg read without complaint.
TRUNCATION_SLACK_S = 0.5

# Encoders where `crf` means constant quality; "b=0" turns off the default bitrate cap (libvpx
# would otherwise run constrained quality at 256 kb/s).
_CRF_CODECS = ("libx264", "libx265", "libvpx-vp9", "libsvtav1", "libaom-av1")


class VideoError(RuntimeError):
    """A video that cannot be read or written; the message names the file and the problem."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` reads from a video's headers."""

    path: Path
    width: int
    height: int
    fps: float  # average frame rate (the stream's own guess; the video may be variable rate)
    duration: float  # seconds
    num_frames: int  # the container's count, else an estimate from duration * fps
    codec: str


# --- reading ------------------------------------------------------------------------------------

# Before av 19, a title or tag that is not UTF-8 made av.open raise unless told to ignore it;
# av 19 (Python >= 3.12 only) removed the option.
_OPEN_OPTIONS = {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}


def _open(path: Path) -> tuple[av.container.InputContainer, av.VideoStream]:
    """Open ``path`` and pick its video stream, or raise VideoError saying why not."""
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(str(path), **_OPEN_OPTIONS)
    except av.FFmpegError as e:  # not a media file, or its index (e.g. mp4 'moov') is missing
        raise VideoError(f"{path}: cannot open as video ({e})") from None
    # Cover art in audio files shows up as a one-picture "video" stream: it does not count.
    streams = [s for s in container.streams.video
               if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        container.close()
        raise VideoError(f"{path}: no video stream")
    return container, streams[0]


def _declared_duration(container: av.container.InputContainer,
                       stream: av.VideoStream) -> float | None:
    """The video's duration as the file states it, or None when it does not say."""
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base  # the container's figure covers all its streams
    return None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, frame rate, duration and codec (decodes nothing)."""
    path = Path(path)
    container, stream = _open(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration = _declared_duration(container, stream)
        if duration is None:  # e.g. a live-recorded mkv: read the packet timestamps (no decoding)
            start, tb = stream.start_time or 0, float(stream.time_base)
            last = max((p.pts + (p.duration or 0) for p in container.demux(stream)
                        if p.pts is not None), default=start)
            duration = (last - start) * tb
        return VideoInfo(
            path=path,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=fps,
            duration=duration,
            num_frames=stream.frames or round(duration * fps),
            codec=stream.codec_context.codec.canonical_name,  # "av1", not the decoder "libdav1d"
        )


def _decoded(path: Path, container: av.container.InputContainer,
             stream: av.VideoStream) -> Iterator[tuple[float, av.VideoFrame | None]]:
    """Decode from the container's current position: (time_s, frame), then one (end_s, None).

    ``end_s`` is the last frame's time plus its duration. FFmpeg errors become VideoError with the
    time reached; so does a stream that stops well short of its declared duration.
    """
    tb = float(stream.time_base)
    origin = stream.start_time or 0
    frame_s = 1.0 / float(stream.average_rate or stream.guessed_rate or 30)
    t, end = 0.0, 0.0
    try:
        for frame in container.decode(stream):
            # A frame without a timestamp (rare, broken muxers) follows the previous one.
            t = (frame.pts - origin) * tb if frame.pts is not None else end
            end = t + (frame.duration * tb if frame.duration else frame_s)
            yield t, frame
    except av.FFmpegError as e:
        raise VideoError(f"{path}: corrupt video data after {t:.3f}s ({e})") from None
    declared = _declared_duration(container, stream)
    if declared is not None and end < declared - TRUNCATION_SLACK_S:
        raise VideoError(f"{path}: video data stops at {end:.3f}s but the file declares "
                         f"{declared:.3f}s (truncated?)")
    yield end, None


class _ToRGB:
    """Decoded frame -> (H, W, 3) uint8 RGB, resize and colour conversion in one swscale pass.

    Without a crop, one reused swscale context does it. With a crop, a libavfilter graph
    (crop -> scale -> rgb24) does, built from the first frame and rebuilt if the source's size or
    pixel format changes mid-stream; it costs ~10 us more per frame, hence not used otherwise.
    """

    def __init__(self, path: Path, size: tuple[int, int] | None,
                 crop: tuple[int, int, int, int] | None):
        self.path, self.size, self.crop = path, size, crop
        self.scaler = VideoReformatter()
        self.graph: av.filter.Graph | None = None
        self.source: tuple[int, int, str] | None = None

    def _build(self, frame: av.VideoFrame) -> av.filter.Graph:
        x, y, w, h = self.crop
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > frame.width or y + h > frame.height:
            raise VideoError(f"{self.path}: crop (x={x}, y={y}, w={w}, h={h}) does not fit "
                             f"the {frame.width}x{frame.height} frame")
        graph = av.filter.Graph()
        graph.threads = 1  # decoding keeps the cores busy; on small frames slice threads cost 20%
        nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                  time_base=frame.time_base),
                 # exact=1: keep odd offsets in 4:2:0 video instead of rounding them to even
                 graph.add("crop", f"w={w}:h={h}:x={x}:y={y}:exact=1")]
        if self.size is not None:
            nodes.append(graph.add("scale", f"w={self.size[1]}:h={self.size[0]}:flags=area"))
        nodes += [graph.add("format", "rgb24"), graph.add("buffersink")]
        graph.link_nodes(*nodes).configure()
        return graph

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self.crop is None:
            height, width = self.size or (None, None)
            # area: averages the pixels it shrinks (no aliasing); threads=1: as for the graph
            rgb = self.scaler.reformat(frame, width, height, "rgb24", interpolation="AREA",
                                       threads=1)
        else:
            source = (frame.width, frame.height, frame.format.name)
            if source != self.source:
                self.graph, self.source = self._build(frame), source
            self.graph.push(frame)
            rgb = self.graph.pull()
        out = rgb.to_ndarray()  # (H, W, 3) uint8, a view of the converted frame's buffer
        # An rgb24 source may pass through unconverted, still in the decoder's buffer, which a
        # repeated frame would share: copy, so every returned array is the caller's own.
        return out.copy() if frame.format.name == "rgb24" else out


def iter_frames(path: str | os.PathLike, fps: float | None = None,
                size: tuple[int, int] | None = None,
                crop: tuple[int, int, int, int] | None = None,
                start: float = 0.0, end: float | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Stream a video's frames as (time_s, (H, W, 3) uint8 RGB), from ``start`` to before ``end``.

    fps=None gives every source frame at its own time; fps=f resamples by timestamps (see the
    module docstring). ``crop=(x, y, w, h)`` is in source pixels and applies before ``size=(H, W)``.
    ``start > 0`` seeks to the keyframe before it and decodes forward from there. Being a
    generator, it opens the file, and raises VideoError for it, at the first ``next()``.
    """
    path = Path(path)
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    stop = float("inf") if end is None else end
    container, stream = _open(path)
    with container:
        stream.thread_type = "AUTO"  # frame threads: decode the next frames while we convert
        # Containers round timestamps to their tick (mkv and webm: 1 ms), so a frame within half a
        # tick of an output time counts as at it.
        tol = min(float(stream.time_base) / 2, 1e-3)
        if start > 0:
            offset = (stream.start_time or 0) + int(start / stream.time_base)
            try:
                container.seek(offset, stream=stream, backward=True)
            except av.FFmpegError as e:
                raise VideoError(f"{path}: cannot seek to {start:.3f}s ({e})") from None
        to_rgb = _ToRGB(path, size, crop)
        frames = _decoded(path, container, stream)
        if fps is None:
            for t, frame in frames:
                if frame is None or t >= stop - tol:
                    return
                if t >= start - tol:
                    yield t, to_rgb(frame)
            return
        k, held = 0, None  # held: the latest frame at or before output k's time
        for t, frame in frames:
            # Each new frame (or the end) closes the outputs before it: they show the held frame.
            # A repeated frame is converted again, so every returned array is the caller's own.
            while held is not None and (target := start + k / fps) < t - tol:
                if target >= stop - tol:
                    return
                yield target, to_rgb(held)
                k += 1
            held = frame


def read_frames(path: str | os.PathLike, start: float, num: int, fps: float,
                size: tuple[int, int] | None = None,
                crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """``num`` frames at ``start + k / fps`` (same resampling rule as iter_frames), seeking to the
    keyframe before ``start``: a training window. (num, H, W, 3) uint8."""
    with contextlib.closing(iter_frames(path, fps, size, crop, start)) as frames:
        window = [frame for _, frame in itertools.islice(frames, num)]
    if len(window) < num:
        raise VideoError(f"{path}: only {len(window)} of {num} frames at {fps:g} fps are available "
                         f"from {start:.3f}s (the video ends first)")
    return np.stack(window)


# --- writing ------------------------------------------------------------------------------------


def _exact_rate(fps: float | Fraction) -> Fraction:
    """29.97 -> 30000/1001 (NTSC rates are an integer x 1000/1001), 30 -> 30, 12.5 -> 25/2."""
    if isinstance(fps, Fraction):
        return fps
    ntsc = round(fps * 1.001)
    if not float(fps).is_integer() and abs(fps - ntsc * 1000 / 1001) < 1e-3:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class VideoWriter:
    """Encode (H, W, 3) uint8 RGB frames at a constant ``fps``; frame k is at k / fps exactly.

    The file appears at ``path`` only on a successful close: frames go to a hidden temp file next
    to it, renamed at the end, so a killed run never leaves half a video at ``path`` (at most a
    ``.NAME.*.partial.EXT`` file). An exception inside ``with`` removes the temp file. A keyframe
    every ``gop`` frames keeps seeks cheap. ``crf`` sets constant quality for x264, x265, VP9 and
    AV1; other encoders use their default rate control.

    Odd sizes with a chroma-subsampled ``pix_fmt`` (yuv420p needs even width and height) are padded
    by repeating the last column / row, so such a file decodes one pixel wider / taller.
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, codec: str = "libx264",
                 gop: int = 30, crf: int = 18, pix_fmt: str = "yuv420p"):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.rate = _exact_rate(fps)
        self.codec, self.gop, self.crf, self.pix_fmt = codec, gop, crf, pix_fmt
        # Same extension as the target, so FFmpeg picks the same container format.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.",
                                   suffix=f".partial{self.path.suffix}", dir=self.path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a video is an ordinary file
        self._tmp = Path(tmp)
        try:
            self._container = av.open(str(self._tmp), "w")
        except (av.FFmpegError, ValueError) as e:
            self._tmp.unlink()
            raise VideoError(f"{self.path}: cannot write this format ({e})") from None
        self._time_base = 1 / self.rate  # frame k at pts k; the muxer may change the stream's own
        self._stream: av.VideoStream | None = None  # added at the first frame, which fixes the size
        self._shape: tuple[int, ...] = ()
        self._pad = (0, 0)
        self._count = 0
        self._done = False

    def _add_stream(self, height: int, width: int) -> None:
        fmt = av.VideoFormat(self.pix_fmt)
        # chroma_width(2) == 1: chroma is half as wide, so the width must be even (same for height)
        self._pad = (height % 2 if fmt.chroma_height(2) == 1 else 0,
                     width % 2 if fmt.chroma_width(2) == 1 else 0)
        stream = self._container.add_stream(self.codec, rate=self.rate)
        stream.height, stream.width = height + self._pad[0], width + self._pad[1]
        stream.pix_fmt = self.pix_fmt
        stream.time_base = self._time_base
        stream.codec_context.gop_size = self.gop
        if self.codec in _CRF_CODECS:
            stream.options = {"crf": str(self.crf), "b": "0"}
        self._stream = stream

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame; the first frame fixes the size."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoError(f"{self.path}: frames must be (H, W, 3) uint8 RGB, "
                             f"got {frame.shape} {frame.dtype}")
        if self._stream is not None and frame.shape != self._shape:
            raise VideoError(f"{self.path}: frame {self._count} is {frame.shape}, "
                             f"the video is {self._shape}")
        try:
            if self._stream is None:
                self._add_stream(frame.shape[0], frame.shape[1])
                self._shape = frame.shape
            if any(self._pad):
                frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = self._count, self._time_base
            self._container.mux(self._stream.encode(picture))  # the encoder converts to pix_fmt
        except (av.FFmpegError, ValueError) as e:  # ValueError: codec not allowed in this format
            raise VideoError(f"{self.path}: encoding frame {self._count} failed ({e})") from None
        self._count += 1

    def close(self) -> None:
        """Flush the encoder and move the finished file to ``path``."""
        if self._done:
            return
        if self._stream is None:
            self.discard()
            raise VideoError(f"{self.path}: no frames written, no video saved")
        try:
            self._container.mux(self._stream.encode(None))  # drain the encoder's delayed frames
            self._container.close()
        except av.FFmpegError as e:
            self.discard()
            raise VideoError(f"{self.path}: finishing the video failed ({e})") from None
        os.replace(self._tmp, self.path)
        self._done = True

    def discard(self) -> None:
        """Abandon the video: nothing is written at ``path`` and the temp file is removed."""
        if self._done:
            return
        with contextlib.suppress(av.FFmpegError):
            self._container.close()
        self._tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
