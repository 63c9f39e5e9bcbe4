"""The streamer, and `mamba-generate` end to end with the embedded model (CPU, a few tokens)."""

import io
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mamba_pkg.generation.cli import ASSETS_DIR, main
from mamba_pkg.generation.streamer import TextStreamer


def byte_level_tokenizer():
    """A byte-level tokenizer with no merges: one token per UTF-8 byte."""
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_text_streamer_prints_exactly_the_text_and_holds_partial_characters():
    tok = byte_level_tokenizer()
    text = "Hé, naïve → ok\nnext line"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    buf = io.StringIO()
    streamer = TextStreamer(tok, file=buf)
    streamer.put(torch.tensor([ids[:2]]))
    seen = []
    for i in ids[2:]:
        streamer.put(torch.tensor([i]))
        seen.append(buf.getvalue())
        assert "\ufffd" not in buf.getvalue()
    streamer.end()
    assert buf.getvalue() == text + "\n"
    assert len(set(seen)) > 5  # it streamed along the way, not all at the end


def test_text_streamer_skip_prompt():
    tok = byte_level_tokenizer()
    buf = io.StringIO()
    streamer = TextStreamer(tok, skip_prompt=True, file=buf)
    streamer.put(torch.tensor([tok.encode("prompt ").ids]))
    for i in tok.encode("answer").ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert buf.getvalue() == "answer\n"
    with pytest.raises(ValueError, match="batch size 1"):
        streamer.put(torch.zeros(2, 3, dtype=torch.long))


def test_embedded_model_is_shipped_and_small():
    names = {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert names <= set(os.listdir(ASSETS_DIR))
    assert sum(os.path.getsize(os.path.join(ASSETS_DIR, n)) for n in names) <= 20 * 2**20


def test_cli_generates_with_the_embedded_model(capsys):
    assert main(["ROMEO:", "--max-new-tokens", "12", "--seed", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:")
    assert len(out.strip()) > len("ROMEO:")
    assert "tokens/s" in err
    # same seed, same text
    main(["ROMEO:", "--max-new-tokens", "12", "--seed", "0", "--device", "cpu"])
    assert capsys.readouterr()[0] == out


def test_cli_greedy_matches_generate():
    from mamba_pkg.generation.decode import generate
    from mamba_pkg.models.checkpoint import load_pretrained, load_tokenizer
    from mamba_pkg.models.lm import MambaLMHeadModel

    model = load_pretrained(MambaLMHeadModel, ASSETS_DIR)
    tok = load_tokenizer(ASSETS_DIR)
    ids = torch.tensor([tok.encode("KING:\n").ids])
    expected = tok.decode(generate(model, ids, max_new_tokens=8)[0].tolist())
    buf = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, buf
    try:
        main(["KING:\n", "--max-new-tokens", "8", "--top-k", "1", "--device", "cpu", "--no-eos"])
    finally:
        sys.stdout = sys_stdout
    assert buf.getvalue() == expected + "\n"


def test_cli_as_module_subprocess():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "mamba_pkg.generation.cli", "The king", "--max-new-tokens", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The king")
    assert "tokens/s" in proc.stderr


def test_cli_graphs_by_default_on_cuda_only():
    """Without --cg / --no-cg the script decodes with CUDA graphs on a GPU and eagerly on a CPU."""
    from mamba_pkg.generation.cli import build_parser, use_graphs

    parser = build_parser()
    assert parser.parse_args(["hi"]).cg is None
    assert parser.parse_args(["hi", "--cg"]).cg is True
    assert parser.parse_args(["hi", "--no-cg"]).cg is False
    assert use_graphs(None, torch.device("cuda")) and not use_graphs(None, torch.device("cpu"))
    assert not use_graphs(False, torch.device("cuda")) and use_graphs(True, torch.device("cuda"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["   "], "empty"),
        (["hi", "--device", "tpu9"], "--device"),
        (["hi", "--device", "cuda:7"] if not torch.cuda.is_available() else ["hi", "--device", "cuda:99"], "--device"),
        (["hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["The king of France is here", "--max-length", "2", "--device", "cpu"], "below the prompt length"),
        (["hi", "--model", "/nonexistent/dir", "--device", "cpu"], "--model"),
        (["hi", "--cg", "--device", "cpu"], "--cg"),
    ],
)
def test_cli_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
