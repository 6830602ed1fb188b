"""Chat templates, segment tokenization and label masks (mmjax.data.templates)."""

import numpy as np
import pytest

from mmjax.data import templates as tpl
from mmjax.data.tokenizer import build_qwen_test_tokenizer, ensure_internvl_tokens

SYS_LM2 = tpl.INTERNLM2_SYSTEM
SYS_25 = tpl.INTERNVL2_5_SYSTEM
CONV = [("user", "<image>\nWhat is it?"), ("assistant", "A cat."), ("user", "Colour?"), ("assistant", "Grey.")]


@pytest.fixture(scope="module")
def tok():
    return build_qwen_test_tokenizer()


@pytest.fixture(scope="module")
def ctx(tok):
    return tpl.TokenizeContext(tok, num_image_token=4)


def test_render_internlm2_chat_exact():
    text = tpl.render_text("internlm2-chat", [("user", " Hi "), ("assistant", "Hello\n")])
    assert text == (f"<|im_start|>system\n{SYS_LM2}<|im_end|><|im_start|>user\nHi<|im_end|>"
                    f"<|im_start|>assistant\nHello<|im_end|>")


def test_render_phi3_exact():
    text = tpl.render_text("phi3-chat", [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")])
    assert text == (f"<|system|>\n{SYS_LM2}<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|>"
                    f"<|user|>\nQ2<|end|><|assistant|>\nA2<|end|>")


def test_render_internvl2_5_exact_and_system_turn():
    text = tpl.render_text("internvl2_5", [("user", "Q"), ("assistant", "A")])
    assert text == (f"<|im_start|>system\n{SYS_25}<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                    f"<|im_start|>assistant\nA<|im_end|>\n")
    own = tpl.render_text("internvl2_5", [("system", "Be brief."), ("user", "Q"), ("assistant", "A")])
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ")
    assert SYS_25 not in own
    override = tpl.render_text("internvl2_5", [("user", "Q"), ("assistant", "A")], system_message="S")
    assert override.startswith("<|im_start|>system\nS<|im_end|>\n")


def test_render_xtuner_intern_s1_and_internvl_3_5():
    """XTuner v1's chatml: default system prompt when the record has none, answer + <|im_end|>
    supervised, the newline after it not, and no think block (unlike qwen3)."""
    conv = [("user", "<image>\nQ"), ("assistant", "A"), ("user", "Q2"), ("assistant", "B")]
    sys_s1 = "你是书生大模型，英文名是Intern-S1，是由上海人工智能实验室开发的多模态大语言模型。"
    body = "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n" \
           "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
    assert tpl.render_text("intern-s1", conv) == f"<|im_start|>system\n{sys_s1}<|im_end|>\n" + body
    assert tpl.render_text("internvl-3.5", conv) == f"<|im_start|>system\n{SYS_25}<|im_end|>\n" + body
    segs = tpl.render_segments("intern-s1", conv)
    assert [s.text for s in segs if s.supervised] == ["A<|im_end|>", "B<|im_end|>"]
    assert "<think>" not in tpl.render_text("intern-s1", conv)


def test_render_qwen3_think_block():
    text = tpl.render_text("qwen3", CONV)
    # no default system; history turn plain; last assistant turn gets the empty think block
    assert text == ("<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
                    "<|im_start|>user\nColour?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\nGrey.<|im_end|>\n")
    hist = tpl.render_text("qwen3", [("user", "Q"), ("assistant", "<think>\nr\n</think>\n\nA"), ("user", "Q2"),
                                     ("assistant", "<think>\nr2\n</think>\n\nB")])
    assert "r\n</think>" not in hist and "assistant\nA<|im_end|>" in hist       # history reasoning stripped
    assert hist.endswith("assistant\n<think>\nr2\n</think>\n\nB<|im_end|>\n")   # own reasoning kept


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template"):
        tpl.get_template("vicuna-x")


def _supervised_texts(tok, ids, labels):
    return [tok.decode(ids[s:e]) for s, e in tpl.supervised_spans(ids, labels)]


@pytest.mark.parametrize("name,end", [("internlm2-chat", "<|im_end|>"), ("phi3-chat", "<|end|>"),
                                      ("internvl2_5", "<|im_end|>"), ("qwen3", "<|im_end|>")])
def test_labels_supervise_exactly_answers_and_end(tok, ctx, name, end):
    segs = tpl.render_segments(name, CONV)
    ids, labels = tpl.tokenize_segments(ctx, segs, [2])
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
    assert _supervised_texts(tok, ids, labels) == ["A cat." + end, "Grey." + end]
    # unsupervised positions carry -100, supervised ones carry their own id
    sup = labels != tpl.IGNORE_INDEX
    assert (labels[sup] == ids[sup]).all() and (labels[~sup] == -100).all()
    # the image block: <img> + 4*2 context tokens + </img>, all unsupervised
    assert int((ids == ctx.img_context).sum()) == 8
    s = int(np.flatnonzero(ids == ctx.img_start)[0])
    assert ids[s + 9] == ctx.img_end and (labels[s:s + 10] == -100).all()
    # segment-wise tokenization equals tokenizing the whole rendered string where every segment boundary
    # touches a special token (ChatML markers are special in the Qwen vocabulary; phi3's are plain text here)
    assert tpl.matches_whole_tokenization(ctx, segs, [2], ids) == (name != "phi3-chat")


def test_qwen3_token_ids_and_prompt_prefix(tok, ctx):
    segs = tpl.render_segments("qwen3", [("user", "Hi"), ("assistant", "Hello")])
    ids, labels = tpl.tokenize_segments(ctx, segs, [])
    assert ids.tolist() == tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>"
                                      "\n\nHello<|im_end|>\n", add_special_tokens=False)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start == 151644          # real Qwen ids
    assert tok.decode(ids[labels != -100]) == "Hello<|im_end|>"
    # the think block is prompt, not target
    think = tok.convert_tokens_to_ids("<think>")
    assert labels[ids == think].tolist() == [-100]


def test_placeholder_mismatch_raises(ctx):
    segs = tpl.render_segments("internvl2_5", [("user", "<image><image> x"), ("assistant", "y")])
    with pytest.raises(ValueError, match="placeholders"):
        tpl.tokenize_segments(ctx, segs, [1])
    with pytest.raises(ValueError, match="placeholders"):
        tpl.tokenize_segments(ctx, segs, [1, 1, 1])


def test_answer_with_leading_newline_keeps_exact_labels(tok, ctx):
    segs = tpl.render_segments("internvl2_5", [("user", "Q"), ("assistant", "\n\nA")])
    ids, labels = tpl.tokenize_segments(ctx, segs, [])
    assert _supervised_texts(tok, ids, labels) == ["\n\nA<|im_end|>"]


def test_chat_template_comparison(tok):
    # A ChatML jinja template of our own: plain ChatML must agree with internvl2_5 given the same system turn.
    tok2 = build_qwen_test_tokenizer()
    tok2.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}")
    msgs = [("system", "S"), ("user", "Q"), ("assistant", "A")]
    assert tpl.chat_template_text(tok2, msgs) == tpl.render_text("internvl2_5", msgs)
    assert tpl.chat_template_text(tok2, msgs) != tpl.render_text("qwen3", msgs)  # qwen3 adds the think block
    assert tpl.chat_template_text(tok, msgs) is None


def test_ensure_internvl_tokens_adds_missing(tmp_path):
    from transformers import PreTrainedTokenizerFast
    base = build_qwen_test_tokenizer()
    base.save_pretrained(tmp_path)
    t = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert ensure_internvl_tokens(t) == 0       # already present in the test tokenizer
    assert len(t.encode("<IMG_CONTEXT>", add_special_tokens=False)) == 1
