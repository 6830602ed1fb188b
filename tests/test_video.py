"""Video files (PyAV) and frame lists: which frames a sample takes, their pixels, the prompt, and a
video that cannot be read. The videos are written by the test (solid colours, one per frame)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmjax.data import run_check
from mmjax.data import video as video_lib
from mmjax.data.images import process_image
from mmjax.data.samples import SampleSource
from tests.test_data_sources import conv, make_images, small_cfg, tok, write_meta  # noqa: F401 (fixture)

FPS, N_FRAMES = 10, 30


BITS = 5   # a frame shows its index in binary: 5 vertical bars, white for a 1 (robust to the codec)


def frame_image(i: int, size=(80, 48)) -> np.ndarray:
    img = np.zeros((size[1], size[0], 3), np.uint8)
    bar = size[0] // BITS
    for b in range(BITS):
        if i >> b & 1:
            img[:, b * bar:(b + 1) * bar] = 255
    return img


def write_video(path, n=N_FRAMES, fps=FPS, size=(80, 48)):
    import av
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_image(i, size), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def frame_number(image) -> int:
    """Which frame a decoded image is: its bars read as bits (each bar's middle half)."""
    a = np.asarray(image, np.float32).mean(-1)
    bar = a.shape[1] // BITS
    return sum(1 << b for b in range(BITS) if a[:, b * bar + bar // 4:(b + 1) * bar - bar // 4].mean() > 128)


def test_frames_are_picked_as_upstream_and_decoded(tmp_path):
    path = write_video(tmp_path / "v.mp4")
    assert video_lib.frame_count(path) == N_FRAMES
    picks = video_lib.segment_frames(N_FRAMES, 4)
    assert picks == [3, 11, 18, 26]                      # the middle of 4 equal segments
    assert [frame_number(im) for im in video_lib.decode_frames(path, picks)] == picks
    rng = np.random.default_rng(0)
    drawn = video_lib.segment_frames(N_FRAMES, 6, rng)  # one frame drawn in each of 6 segments of 5
    assert all(5 * k <= f < 5 * (k + 1) for k, f in enumerate(drawn))
    assert [frame_number(im) for im in video_lib.decode_frames(path, drawn)] == drawn
    # a clip keeps the frames shown in [1.0 s, 2.0 s]: frames 10-20
    assert video_lib.frame_count(path, (1.0, 2.0)) == 11
    assert [frame_number(im) for im in video_lib.decode_frames(path, [0, 10], (1.0, 2.0))] == [10, 20]


def _video_meta(tmp_path, records, **extra):
    return write_meta(tmp_path, {"vid": (records, extra)})


def test_a_video_record_becomes_frames_with_upstream_prompt(tmp_path, tok):
    (tmp_path / "img").mkdir()
    write_video(tmp_path / "img" / "v.mp4")
    recs = [{"video": "v.mp4", "conversations": conv("<video>\nWhat changes?", "The colour.")},
            {"video": "v.mp4", "clip": [1.0, 2.0], "conversations": conv("Describe.", "Green.")}]
    meta = _video_meta(tmp_path, recs)
    src = SampleSource(small_cfg(meta_path=meta, num_video_frames=4), tok, mode="check")
    sample, info = src.builder.build(src.record(0)[1], with_info=True)
    assert sample["num_tiles"] == 4 and sample["num_images"] == 4
    text = tok.decode(sample["input_ids"])
    assert "Frame-1: <img>" in text and "Frame-4: <img>" in text and "Frame-5" not in text
    expected = [process_image(im, min_num=1, max_num=1, image_size=28, use_thumbnail=True, dynamic=False,
                              normalize_type="imagenet")[0]
                for im in video_lib.decode_frames(str(tmp_path / "img" / "v.mp4"), [3, 11, 18, 26])]
    np.testing.assert_array_equal(sample["pixel_values"], np.concatenate(expected))
    clipped, info = src.builder.build(src.record(1)[1], with_info=True)   # the <video> placeholder prepended
    assert clipped["num_tiles"] == 4 and info.image_paths[0].endswith("v.mp4 frame 1")


def test_training_draws_the_frame_count_and_frames_per_sample(tmp_path, tok):
    (tmp_path / "img").mkdir()
    write_video(tmp_path / "img" / "v.mp4")
    recs = [{"video": "v.mp4", "conversations": conv("<video>\nWhat changes?", "The colour.")}] * 12
    meta = _video_meta(tmp_path, recs, min_num_frame=2, max_num_frame=6)   # the dataset's own range
    cfg = small_cfg(meta_path=meta, num_video_frames=4, min_num_frame=8, max_num_frame=32, max_skip_fraction=0.0)
    train = SampleSource(cfg, tok)
    counts = [train[i]["num_tiles"] for i in range(12)]
    assert all(2 <= c <= 6 for c in counts) and len(set(counts)) > 1
    assert counts == [SampleSource(cfg, tok)[i]["num_tiles"] for i in range(12)]   # seeded: a resume sees the same
    assert SampleSource(cfg, tok, mode="check").builder.build(train.record(0)[1])["num_tiles"] == 4


def test_a_video_that_cannot_be_read_is_named(tmp_path, tok):
    (tmp_path / "img").mkdir()
    write_video(tmp_path / "img" / "v.mp4")
    (tmp_path / "img" / "bad.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    recs = [{"video": "v.mp4", "conversations": conv("<video>\nWhat?", "Colours.")},
            {"video": "bad.mp4", "conversations": conv("<video>\nWhat?", "Nothing.")},
            {"video": "gone.mp4", "conversations": conv("<video>\nWhat?", "Nothing.")}]
    meta = _video_meta(tmp_path, recs)
    ann = tmp_path / "vid.jsonl"
    _, bad, _ = run_check(small_cfg(meta_path=meta, num_video_frames=4), tok)
    assert [w for w, _ in bad] == [f"{ann}:2", f"{ann}:3"]
    assert bad[0][1].startswith(f"cannot open video {tmp_path / 'img' / 'bad.mp4'}")
    assert bad[1][1] == f"missing video: {tmp_path / 'img' / 'gone.mp4'}"
    skipping = SampleSource(small_cfg(meta_path=meta, num_video_frames=4, max_skip_fraction=1.0), tok)
    assert skipping[0] is not None and skipping[1] is None and "cannot open video" in skipping.skip_summary()


def test_xtuner_video_url_reads_the_file(tmp_path, tok):
    (tmp_path / "media").mkdir()
    write_video(tmp_path / "media" / "v.mp4")
    rec = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}},
                                                      {"type": "text", "text": "<VIDEO_CONTEXT>\nWhat changes?"}]},
                        {"role": "assistant", "content": "The colour."}]}
    (tmp_path / "x.jsonl").write_text(json.dumps(rec) + "\n")
    cfg = small_cfg(datasets_json=json.dumps([{"anno_path": str(tmp_path / "x.jsonl"),
                                               "media_root": str(tmp_path / "media")}]), num_video_frames=3)
    src = SampleSource(cfg, tok, mode="check")
    sample = src.builder.build(src.record(0)[1])
    assert sample["num_tiles"] == 3 and "Frame-3: <img>" in tok.decode(sample["input_ids"])


def test_bad_clip_and_frame_ranges_are_refused(tmp_path, tok):
    make_images(tmp_path / "img", ["f1.png", "f2.png"])
    recs = [{"video": ["f1.png", "f2.png"], "clip": [0, 1], "conversations": conv("<video>\nWhat?", "Two.")},
            {"video": "v.mp4", "clip": [2, 1], "conversations": conv("<video>\nWhat?", "Two.")}]
    meta = _video_meta(tmp_path, recs)
    _, bad, _ = run_check(small_cfg(meta_path=meta), tok)
    assert [r for _, r in bad] == ["'clip' applies to a video file, not to frames",
                                   "'clip' must be [start, end] seconds with 0 <= start < end, got [2, 1]"]
    with pytest.raises(ValueError, match="need 1 <= min_num_frame <= max_num_frame"):
        SampleSource(small_cfg(meta_path=meta, min_num_frame=9, max_num_frame=4), tok)
