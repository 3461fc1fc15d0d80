"""Untrusted input: PNG metadata and prompt text never crash the reader or escape the output folder."""

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from ldm_cli.errors import LdmError
from ldm_cli.io.images import slug
from ldm_cli.io.metadata import read_png_job
from ldm_cli.io.prompts import parse_prompts


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "/abs/path", "..", "CON", "nul", "a\\b\\..\\c", "", "   ",
                                    "x" * 500, "日本語だけ", "a/b:c*d?e\"f<g>h|i"])
def test_slug_cannot_escape(prompt):
    s = slug(prompt)
    assert s and len(s) <= 48 and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in s)
    assert s not in ("con", "nul", "..")


def png_with(text_chunks: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in text_chunks.items():
        info.add_itxt(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                           max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps),
                 st.fixed_dictionaries({"prompt": json_values, "seed": json_values, "model": json_values},
                                       optional={"steps": json_values, "cfg": json_values}).map(json.dumps)))
def test_png_metadata_reader_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("png") / "x.png"
    path.write_bytes(png_with({"ldm": text}))
    try:
        job, model = read_png_job(path)
        assert isinstance(job.prompt, str) and isinstance(model, str)
    except LdmError as e:
        assert str(path) in str(e)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_png_reader_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("png") / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    with pytest.raises(LdmError):
        read_png_job(path)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_prompt_parser_only_raises_ldm_errors(text):
    try:
        for prompt, _overrides, where in parse_prompts(text, "f"):
            assert prompt.strip() and where.startswith("f:")
    except LdmError as e:
        assert str(e).startswith("f:")


@pytest.mark.parametrize("bad", [{"steps": -5}, {"steps": "1e9x"}, {"cfg": "nan"}, {"width": 7}, {"seed": -1},
                                 {"steps": [1]}, {"prompt": {"a": 1}}, {"strength": 5}])
def test_hostile_metadata_is_refused(tmp_path, bad):
    good = {"prompt": "a cat", "seed": 1, "model": "m", "steps": 10, "cfg": 7.5, "eta": 0.0, "width": 64,
            "height": 64, "negative": "", "strength": None, "init_image": None}
    path = tmp_path / "x.png"
    path.write_bytes(png_with({"ldm": json.dumps(good)}))
    assert read_png_job(path)[0].settings.steps == 10
    path.write_bytes(png_with({"ldm": json.dumps({**good, **bad})}))
    with pytest.raises(LdmError, match="ldm metadata is damaged"):
        read_png_job(path)


def test_no_unsafe_loading_in_source():
    """No torch.load without weights_only=True, no trust_remote_code, no pickle module in ldm_cli."""
    import re
    from pathlib import Path

    import ldm_cli

    for path in Path(ldm_cli.__file__).parent.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "trust_remote_code" not in text and "import pickle" not in text, path.name
