"""`--model FOLDER` where the folder holds no (complete) model: one line naming the flag, what the
folder lacks, what a model folder has and the way out; never a transformers traceback (issue 23:
`--model common` ended in a ValueError asking to install sentencepiece)."""

import os
import subprocess
import sys

import pytest
import torch

from common.models import load_model_and_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = "expected config.json, model.safetensors or pytorch_model.bin, and tokenizer.json"


def load_error(path, hint="") -> str:
    with pytest.raises(SystemExit) as info:
        load_model_and_tokenizer(str(path), torch.device("cpu"), torch.float32, hint=hint)
    message = str(info.value.code)
    assert message.startswith("error: --model: ") and "\n" not in message, message
    return message


def test_empty_folder_holds_no_model(tmp_path):
    message = load_error(tmp_path)
    assert f"{tmp_path} holds no model;" in message and EXPECTED in message
    assert "python sft.py" in message and "qwen2-tiny:random" in message  # the way out


def test_folder_with_only_a_config(tmp_path, tiny_model):
    tiny_model.config.save_pretrained(tmp_path)
    message = load_error(tmp_path)
    assert "no model.safetensors or pytorch_model.bin, no tokenizer files" in message and EXPECTED in message


def test_folder_with_config_and_weights_but_no_tokenizer(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    message = load_error(tmp_path)
    assert "(no tokenizer files)" in message and "config.json" not in message.split(";")[0]


def test_the_callers_hint_is_the_way_out(tmp_path):
    assert load_error(tmp_path, hint="Run `python sft.py` first.").endswith("Run `python sft.py` first.")


def test_a_run_folder_points_at_its_checkpoint(tmp_path, tokenizer, tiny_model):
    """A run stopped before its final save has its model in checkpoint/: say so."""
    tiny_model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    assert load_error(tmp_path).endswith(f"pass --model {tmp_path / 'checkpoint'}.")
    model, _ = load_model_and_tokenizer(str(tmp_path / "checkpoint"), torch.device("cpu"), torch.float32)
    assert model.config.hidden_size == tiny_model.config.hidden_size


def test_script_with_an_empty_model_folder_prints_one_line(tmp_path):
    """The issue's input through a real script: `--model <a folder with no model>`."""
    (tmp_path / "common").mkdir()
    out = subprocess.run([sys.executable, os.path.join(REPO, "sft.py"), "--model", "common"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: --model: "), out.stderr[-2000:]
