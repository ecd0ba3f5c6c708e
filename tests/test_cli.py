"""The `adaspec` command line."""

from __future__ import annotations

from adaspec.cli import main


def test_generate(tiny_pair, capsys):
    target, draft, _ = tiny_pair
    rc = main(["generate", "--model", str(target), "--draft-model", str(draft), "--policy", "static:2",
               "--max-tokens", "6", "--ignore-eos", "def add(a, b):", "class"])
    out = capsys.readouterr()
    assert rc == 0
    assert out.err.count("[length; 6 tokens;") == 2


def test_generate_bad_input_is_a_clear_error(tiny_pair, capsys):
    target, draft, _ = tiny_pair
    rc = main(["generate", "--model", str(target), "--draft-model", str(draft), "--top-p", "2", "x"])
    assert rc == 2 and "top_p" in capsys.readouterr().err
    rc = main(["generate", "--model", str(target), "--policy", "static:2", "x"])
    assert rc == 2 and "draft_model" in capsys.readouterr().err
