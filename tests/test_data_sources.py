"""Sources (InternVL meta JSONL, XComposer JSON + data.txt, XTuner lists), validation, truncation, build_dataset."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmjax.data import build_dataset, default_data_config, run_check, validate_data_config
from mmjax.data import sources as src_lib
from mmjax.data.samples import SampleSource, SkipBudgetExceeded
from mmjax.data.tokenizer import build_qwen_test_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_qwen_test_tokenizer()


def small_cfg(**kw):
    c = default_data_config()
    c.image_size = 28
    c.num_image_token = 2
    c.max_length = 512
    c.pack_max_length = 512
    c.max_dynamic_patch = 6
    c.update(kw)
    return c


def conv(q="<image>\nWhat?", a="A thing."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def make_images(root, names, size=(60, 40)):
    os.makedirs(root, exist_ok=True)
    for k, n in enumerate(names):
        Image.new("RGB", size, (k * 40 % 256, 100, 200)).save(os.path.join(root, n))


def write_meta(tmp_path, datasets):
    meta = {}
    for name, (records, extra) in datasets.items():
        ann = tmp_path / f"{name}.jsonl"
        write_jsonl(ann, records)
        meta[name] = {**dict(root=str(tmp_path / "img"), annotation=str(ann), data_augment=False, repeat_time=1,
                             length=len(records)), **extra}
    p = tmp_path / "meta.json"
    p.write_text(json.dumps(meta))
    return str(p)


def test_meta_jsonl_all_kinds(tmp_path, tok):
    make_images(tmp_path / "img", ["a.png", "b.png", "c.png"] + [f"v/{i:03d}.png" for i in []])
    make_images(tmp_path / "img" / "vid", [f"f{i}.png" for i in range(1, 11)], size=(30, 30))
    recs = [
        {"id": 0, "conversations": conv("Hi", "Hello")},                                  # text
        {"id": 1, "image": "a.png", "conversations": conv("What?", "A.")},                # placeholder prepended
        {"id": 2, "image": ["a.png", "b.png", "c.png"],
         "conversations": conv("Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nSame?", "No.")},
        {"id": 3, "video": "vid/", "conversations": conv("<video>\nWhat happens?", "Nothing.")},
        {"id": 4, "video": [f"vid/f{i}.png" for i in (1, 2, 3)], "conversations": conv("Describe.", "Frames.")},
    ]
    meta = write_meta(tmp_path, {"mix": (recs, {"max_dynamic_patch": 6})})
    cfg = small_cfg(meta_path=meta, num_video_frames=4)
    ds = build_dataset(cfg, tok)
    assert len(ds) == 5
    text, single, multi, video, video_list = (ds[i] for i in range(5))
    for s in (text, single, multi, video, video_list):
        assert s["input_ids"].dtype == np.int32 and s["labels"].dtype == np.int32
        assert s["pixel_values"].dtype == np.float32 and s["image_flags"].dtype == np.int32
        assert s["source"] == "mix" and s["num_tiles"] == len(s["pixel_values"]) == len(s["image_flags"])
    assert text["pixel_values"].shape == (0, 28, 28, 3) and text["image_flags"].shape == (0,)
    # single 60x40 image at max 6 -> (3,2) grid + thumbnail
    assert single["num_tiles"] == 7 and (single["image_flags"] == 1).all()
    assert int((single["input_ids"] == tok.convert_tokens_to_ids("<IMG_CONTEXT>")).sum()) == 2 * 7
    # multi-image: budget max(1, 6 // 3) = 2 per image -> (2,1) + thumb = 3 tiles each
    assert multi["num_images"] == 3 and multi["num_tiles"] == 9
    # video folder: 10 frames sampled to 4, one tile each, Frame-k prefixes
    assert video["num_tiles"] == 4
    decoded = tok.decode(video["input_ids"])
    assert "Frame-1: <img>" in decoded and "Frame-4: <img>" in decoded and "Frame-5" not in decoded
    assert video_list["num_tiles"] == 3 and "Frame-3: <img>" in tok.decode(video_list["input_ids"])
    assert "<video>" not in tok.decode(video_list["input_ids"])
    # dummy tile for text
    s = build_dataset(small_cfg(meta_path=meta, dummy_image_for_text=True), tok)[0]
    assert s["pixel_values"].shape == (1, 28, 28, 3) and s["image_flags"].tolist() == [0]


def test_video_frame_indices():
    from mmjax.data.video import segment_frames
    assert segment_frames(10, 4) == [1, 3, 6, 8]
    assert segment_frames(3, 8) == [0, 1, 2]


def test_repeat_time(tmp_path, tok):
    recs = [{"id": i, "conversations": conv("Q%d" % i, "A%d" % i)} for i in range(10)]
    meta = write_meta(tmp_path, {"head": (recs, {"repeat_time": 0.35}), "twice": (recs, {"repeat_time": 2})})
    sources = src_lib.load_meta_json(meta)
    assert sources[0].order.tolist() == [0, 1, 2]              # first floor(10*0.35) lines
    assert sources[1].order.tolist() == list(range(10)) * 2
    assert len(build_dataset(small_cfg(meta_path=meta), tok)) == 23
    with pytest.raises(ValueError, match="whole number"):
        src_lib.repeat_time_indices(10, 1.5)


def test_xcomposer_json_and_data_txt(tmp_path, tok):
    make_images(tmp_path, ["x.png", "y.png"])
    a = [{"id": str(i), "image": [str(tmp_path / "x.png")],
          "conversations": [{"from": "user", "value": "<ImageHere>Describe %d" % i},
                            {"from": "assistant", "value": "Blue %d" % i}]} for i in range(30)]
    b = [{"id": "t%d" % i, "conversations": [{"from": "human", "value": "Hi %d" % i},
                                             {"from": "bot", "value": "Yo %d" % i}]} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(a, indent=2))
    (tmp_path / "b.json").write_text(json.dumps(b))
    (tmp_path / "data.txt").write_text(f"{tmp_path / 'a.json'} 0.01\n{tmp_path / 'b.json'} 0.005\n")
    cfg = small_cfg(data_txt=str(tmp_path / "data.txt"), seed=7)
    s1 = src_lib.load_xcomposer(cfg.data_txt, seed=7)
    assert [len(s.order) for s in s1] == [10, 5]               # floor(k*1000)
    assert len(set(s1[0].order.tolist())) == 10                # down-sampled without replacement
    assert s1[1].order[:3].tolist() == [0, 1, 2]               # up-sampled: all + draws with replacement
    s2 = src_lib.load_xcomposer(cfg.data_txt, seed=7)
    s3 = src_lib.load_xcomposer(cfg.data_txt, seed=8)
    assert [s.order.tolist() for s in s1] == [s.order.tolist() for s in s2]
    assert s1[0].order.tolist() != s3[0].order.tolist()
    # element line numbers point at where each element starts
    lines = (tmp_path / "a.json").read_text().splitlines()
    assert [r.line for r in s1[0].records[:3]] == [k + 1 for k, l in enumerate(lines) if l == "  {"][:3]
    ds = build_dataset(cfg, tok)
    assert len(ds) == 15
    sample = ds[0]
    assert sample["num_images"] == 1 and "Describe" in tok.decode(sample["input_ids"])
    assert tok.decode(sample["input_ids"][sample["labels"] != -100]).startswith("Blue")


def test_xtuner_folder_and_sample_ratio(tmp_path, tok):
    make_images(tmp_path / "media", ["p.png"])
    (tmp_path / "anns" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "anns" / "one.jsonl", [{"image": "p.png", "conversations": conv()} for _ in range(4)])
    write_jsonl(tmp_path / "anns" / "sub" / "two.jsonl",
                [{"messages": [{"role": "user", "content": "Q%d" % i}, {"role": "assistant", "content": "A"}]}
                 for i in range(10)])
    cfg = small_cfg(datasets=[dict(anno_path=str(tmp_path / "anns"), media_root=str(tmp_path / "media"),
                                   sample_ratio=2.5, name="mine")])
    sources = src_lib.load_xtuner(cfg.datasets, seed=1)
    assert [s.name for s in sources] == ["mine/one.jsonl", "mine/sub/two.jsonl"]
    o = sources[1].order.tolist()
    assert len(o) == 25 and o[:20] == list(range(10)) * 2 and len(set(o[20:])) == 5   # 2 repeats + random half
    assert sources[0].order.tolist()[:8] == [0, 1, 2, 3] * 2 and len(sources[0].order) == 10
    again = src_lib.load_xtuner(cfg.datasets, seed=1)
    assert again[1].order.tolist() == o
    assert src_lib.sample_ratio_indices(10, 0.3, np.random.default_rng(0)).size == 3
    assert len(build_dataset(cfg, tok)) == 35


BAD_LINES = [
    ('{"conversations": [{"from": "human", "value": "x"}, ', "malformed JSON"),
    ({"image": "missing.png", "conversations": conv()}, "missing image"),
    ({"image": ["a.png", "a.png"], "conversations": conv("<image> one")}, "1 <image> placeholders for 2 images"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "no assistant turn"),
    ({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}, "unknown role"),
    ({"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "y"}]}, "empty turn"),
    ({"image": "broken.png", "conversations": conv()}, "unreadable image"),
    ({"image": "a.png", "conversations": conv("<image>\n" + "word " * 400, "short")}, "too long after truncation"),
    ({"conversations": conv("Hi", "Hello")}, None),
]


def test_every_bad_reason_with_file_and_line(tmp_path, tok):
    make_images(tmp_path / "img", ["a.png"])
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG garbage")
    ann = tmp_path / "bad.jsonl"
    write_jsonl(ann, [r for r, _ in BAD_LINES])
    meta = {"bad": dict(root=str(tmp_path / "img"), annotation=str(ann), data_augment=False, repeat_time=1)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = small_cfg(meta_path=str(tmp_path / "meta.json"), max_length=300)
    stats, bad, _ = run_check(cfg, tok)
    got = dict(bad)
    for line, (_, reason) in enumerate(BAD_LINES, 1):
        where = f"{ann}:{line}"
        if reason is None:
            assert where not in got
        else:
            assert reason in got.get(where, ""), (where, got)
    assert stats[0].bad == len(BAD_LINES) - 1 and stats[0].samples == len(BAD_LINES)
    # training mode: skipping 8 of 9 is over the cap -> a clear error naming the reasons
    with pytest.raises(SkipBudgetExceeded, match="max_skip_fraction"):
        SampleSource(cfg, tok, mode="train")
    # with a generous cap, up-front failures leave the index and lazy ones become None, all counted
    cfg.max_skip_fraction = 1.0
    ds = build_dataset(cfg, tok)
    src = ds.mmjax_source
    assert len(ds) == 3                  # unreadable image, too long, and the good one survive the text pass
    items = [ds[i] for i in range(len(ds))]
    assert sum(x is None for x in items) == 2
    assert src.skipped() == 8 and "8 of 9 samples skipped" in src.skip_summary()


def test_truncation_never_cuts_an_image_block(tmp_path, tok):
    make_images(tmp_path / "img", ["a.png", "b.png"], size=(28, 28))   # 1 tile each -> 2 context tokens
    q = "first <image> then " + "filler " * 30 + "<image> end"
    recs = [{"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Look."}, {"from": "gpt", "value": "OK then."},
        {"from": "human", "value": q}, {"from": "gpt", "value": "Done."}]}]
    recs[0]["conversations"][0]["value"] = "Look."
    recs[0]["conversations"][2]["value"] = q
    meta = write_meta(tmp_path, {"t": (recs, {})})
    full = build_dataset(small_cfg(meta_path=meta, max_length=4096, pack_max_length=4096), tok)[0]
    img_start, img_end = (tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>"))
    starts = np.flatnonzero(full["input_ids"] == img_start)
    assert len(starts) == 2
    for cut in range(int(starts[1]) + 1, int(starts[1]) + 4):        # lengths landing inside the 2nd block
        s = build_dataset(small_cfg(meta_path=meta, max_length=cut), tok)[0]
        ids = s["input_ids"]
        assert len(ids) == starts[1]                                  # cut right before the 2nd <img>
        assert (ids == img_start).sum() == (ids == img_end).sum() == 1
        assert s["num_tiles"] == 1 and s["num_images"] == 1
        assert s["num_supervised"] > 0                                # the first answer survives


def test_zero_supervised_dropped_and_counted(tmp_path, tok):
    make_images(tmp_path / "img", ["a.png"], size=(200, 100))
    recs = [{"image": "a.png", "conversations": conv("<image>\nQ", "A")}, {"conversations": conv("Hi", "Yo")}]
    meta = write_meta(tmp_path, {"z": (recs, {})})
    ds = build_dataset(small_cfg(meta_path=meta, max_length=40, max_skip_fraction=0.5, system_message="S", num_image_token=16), tok)
    assert ds[0] is None and ds[1] is not None
    assert ds.mmjax_source.skipped() == 1
    ds.mmjax_source.lazy_skips.clear()
    with pytest.raises(SkipBudgetExceeded):
        build_dataset(small_cfg(meta_path=meta, max_length=40, max_skip_fraction=0.0, system_message="S", num_image_token=16), tok)[0]


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="data.template"):
        validate_data_config(small_cfg(template="nope", meta_path="x"))
    with pytest.raises(ValueError, match="min_dynamic_patch"):
        validate_data_config(small_cfg(min_dynamic_patch=8, max_dynamic_patch=4))
    with pytest.raises(ValueError, match="data.meta_path: file not found"):
        validate_data_config(small_cfg(meta_path=str(tmp_path / "none.json")))
    with pytest.raises(ValueError, match=r"datasets\[0\].anno_path"):
        validate_data_config(small_cfg(datasets=[dict(anno_path=str(tmp_path / "nope"))]))
    with pytest.raises(ValueError, match="no source configured"):
        validate_data_config(small_cfg())
    ann = tmp_path / "a.jsonl"
    write_jsonl(ann, [{"conversations": conv("q", "a")}])
    assert validate_data_config(small_cfg(datasets=[dict(anno_path=str(ann))]))


def test_augmentation_seeded_per_index(tmp_path, tok):
    make_images(tmp_path / "img", ["a.png"], size=(90, 50))
    Image.fromarray((np.random.default_rng(0).random((50, 90, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "img" / "a.png")
    recs = [{"image": "a.png", "conversations": conv()}]
    meta = write_meta(tmp_path, {"aug": (recs, {"data_augment": True})})
    a = build_dataset(small_cfg(meta_path=meta), tok)[0]["pixel_values"]
    b = build_dataset(small_cfg(meta_path=meta), tok)[0]["pixel_values"]
    c = build_dataset(small_cfg(meta_path=meta, seed=5), tok)[0]["pixel_values"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _xtuner_image(url, wh=(60, 40)):
    return {"type": "image_url", "image_url": {"url": url, "image_wh": list(wh)}}


def test_xtuner_openai_messages_read_as_their_internvl_equivalents(tmp_path, tok):
    """XTuner v1 records (content lists with image_url items and <IMG_CONTEXT> placeholders,
    system turns, string content, several images, images without placeholders) give the same
    samples as the same conversations written in InternVL's format."""
    make_images(tmp_path / "media", ["a.png", "b.png"])
    text = lambda t: {"type": "text", "text": t}
    xtuner = [
        {"messages": [{"role": "user", "content": [_xtuner_image("a.png"), text("<IMG_CONTEXT>\nWhat is it?")]},
                      {"role": "assistant", "content": "A square."}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [_xtuner_image("a.png"), _xtuner_image("b.png", [[60, 40]]),
                                                   text("First <IMG_CONTEXT>, then "), text("<IMG_CONTEXT>. Same?")]},
                      {"role": "assistant", "content": [text("No.")]},
                      {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Colours."}]},
        {"messages": [{"role": "user", "content": [_xtuner_image("b.png"), text("Describe.")]},   # no placeholder
                      {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "loss": True}]},
    ]
    internvl = [
        {"image": "a.png", "conversations": conv("<image>\nWhat is it?", "A square.")},
        {"image": ["a.png", "b.png"], "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "First <image>, then <image>. Same?"},
            {"from": "gpt", "value": "No."}, {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Colours."}]},
        {"image": "b.png", "conversations": conv("<image>\nDescribe.", "Blue.")},
        {"conversations": conv("Hi", "Hello")},
    ]
    write_jsonl(tmp_path / "x.jsonl", xtuner)
    write_jsonl(tmp_path / "i.jsonl", internvl)
    media = str(tmp_path / "media")
    a = build_dataset(small_cfg(datasets=[dict(anno_path=str(tmp_path / "x.jsonl"), media_root=media)]), tok)
    b = build_dataset(small_cfg(datasets=[dict(anno_path=str(tmp_path / "i.jsonl"), media_root=media)]), tok)
    assert len(a) == len(b) == 4
    for i in range(4):
        x, y = a[i], b[i]
        assert x is not None and y is not None
        assert sorted(x) == sorted(y)
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert np.array_equal(x[key], y[key]), (i, key)
    assert a.mmjax_source.skipped() == 0


XTUNER_BAD = [
    ({"messages": [{"role": "user", "content": [_xtuner_image("a.png"), {"type": "text", "text": "<IMG_CONTEXT> and "
                                                                          "<IMG_CONTEXT>"}]},
                   {"role": "assistant", "content": "x"}]}, "2 <image> placeholders for 1 images"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "hm"}]},
     "has 'thinking'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": False}]},
     "sets loss=False"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [_xtuner_image("a.png"), {"type": "text", "text": "a"}]}]},
     "media belong in user messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png", "image_wh": [60]}},
                                                {"type": "text", "text": "<IMG_CONTEXT>"}]},
                   {"role": "assistant", "content": "a"}]}, "image_wh must be [width, height]"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": {}}]}, {"role": "assistant", "content": "a"}]},
     "unknown content item"),
    ({"messages": [{"role": "user", "content": [_xtuner_image("gone.png"), {"type": "text", "text": "<IMG_CONTEXT>"}]},
                   {"role": "assistant", "content": "a"}]}, "missing image"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "has no content"),
]


def test_bad_xtuner_records_name_their_reason(tmp_path):
    make_images(tmp_path / "media", ["a.png"])
    write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in XTUNER_BAD])
    records = src_lib.load_xtuner([dict(anno_path=str(tmp_path / "bad.jsonl"), media_root=str(tmp_path / "media"))])[0].records
    for rec, (_, reason) in zip(records, XTUNER_BAD):
        assert rec.error is not None and reason in rec.error, (rec.line, rec.error, reason)


def test_xtuner_datasets_from_json_text_or_file(tmp_path):
    """A list cannot be a command-line flag: ``data.datasets_json`` takes the same list as JSON
    text or a file, after any ``data.datasets`` entries."""
    from mmjax.data.config import xtuner_datasets
    write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]}])
    entry = {"anno_path": str(tmp_path / "t.jsonl"), "sample_ratio": 5.0, "name": "text"}
    (tmp_path / "mix.json").write_text(json.dumps([entry]))
    assert xtuner_datasets(small_cfg(datasets_json=json.dumps([entry]))) == [entry]
    both = xtuner_datasets(small_cfg(datasets=[dict(entry, name="a")], datasets_json=str(tmp_path / "mix.json")))
    assert [d["name"] for d in both] == ["a", "text"]
    validate_data_config(small_cfg(datasets_json=str(tmp_path / "mix.json")))
    with pytest.raises(ValueError, match=r"data.datasets_json: not valid JSON"):
        xtuner_datasets(small_cfg(datasets_json="[{"))
    with pytest.raises(ValueError, match=r"mix2.json: must be a JSON list of dataset objects"):
        (tmp_path / "mix2.json").write_text('{"anno_path": "x"}')
        xtuner_datasets(small_cfg(datasets_json=str(tmp_path / "mix2.json")))
    with pytest.raises(ValueError, match=r"data.datasets\[0\].anno_path: not found"):
        validate_data_config(small_cfg(datasets_json='[{"anno_path": "nowhere.jsonl"}]'))


def test_relative_paths_resolve_from_the_launch_folder(tmp_path, monkeypatch):
    """The tools' own layouts read from any working directory: an XComposer data.txt in
    ``finetune/`` naming ``data/x.json`` whose images are ``data/images/...`` (relative to
    ``finetune/``, where upstream launches), and an InternVL meta in ``internvl_chat/shell/data/``
    naming ``playground/...`` (relative to ``internvl_chat/``)."""
    ft = tmp_path / "finetune"
    make_images(ft / "data" / "images", ["panda.png"])
    (ft / "data" / "x.json").write_text(json.dumps([{"id": "0", "image": ["data/images/panda.png"], "conversations": [
        {"from": "user", "value": "<ImageHere>What is it?"}, {"from": "assistant", "value": "A panda."}]}]))
    (ft / "data.txt").write_text("data/x.json 1\n")
    ic = tmp_path / "internvl_chat"
    make_images(ic / "playground" / "img", ["a.png"])
    write_jsonl(ic / "playground" / "a.jsonl", [{"image": "a.png", "conversations": conv()}])
    (ic / "shell" / "data").mkdir(parents=True)
    (ic / "shell" / "data" / "meta.json").write_text(json.dumps(
        {"a": {"root": "playground/img/", "annotation": "playground/a.jsonl", "repeat_time": 1}}))
    monkeypatch.chdir(tmp_path)            # neither launch folder
    [xc] = src_lib.load_xcomposer(str(ft / "data.txt"))
    assert xc.records[0].error is None and xc.records[0].images == [str(ft / "data" / "images" / "panda.png")]
    [meta] = src_lib.load_meta_json(str(ic / "shell" / "data" / "meta.json"))
    assert meta.records[0].error is None and meta.records[0].images == [str(ic / "playground" / "img" / "a.png")]
    monkeypatch.chdir(ft)                  # upstream's launch folder: the paths as written
    [xc] = src_lib.load_xcomposer("data.txt")
    assert xc.records[0].images == ["data/images/panda.png"]
