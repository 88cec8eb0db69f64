"""The click CLI shell: version, doctor, chat, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

import spd_ext
from spd import __version__
from spd.cli import cli


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_lists_only_working_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].strip().splitlines()}
    assert listed == {"bench", "calibrate", "chat", "doctor", "eval", "export", "generate", "inspect",
                      "random-subspace", "report", "rescore", "run", "train"}


def test_doctor_json_matches_the_environment():
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["spd"] == __version__
    assert report["extension"]["loaded"] == spd_ext.has_extension()
    assert report["packages"]["torch"].split("+")[0] in __import__("torch").__version__
    assert set(report["models"]) == {"smollm2-135m", "qwen2.5-coder-0.5b"}


def test_doctor_reports_what_the_cache_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_CACHE_DIR", str(tmp_path))
    (tmp_path / "converted" / "m-0123").mkdir(parents=True)
    (tmp_path / "converted" / "m-0123" / "model.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / "converted" / ".m-4567.tmp").mkdir()  # a conversion in progress is not a model yet
    (tmp_path / "gguf-digests.json").write_text("{}")
    report = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)
    assert report["cache"] == {"bytes": 3002, "converted_models": 1}
    text = CliRunner().invoke(cli, ["doctor"]).output
    assert f"cache:           {tmp_path} (2.9 KB, 1 converted model(s)" in text


def test_doctor_says_when_a_gpu_has_no_compiled_kernels():
    from spd.doctor import collect, format_report

    report = collect()
    report["cuda"] = {"available": True, "torch_cuda": "13.0", "devices": ["NVIDIA H200"]}
    report["extension"] = dict(report["extension"], cuda=False)
    assert "no compiled CUDA kernels: ops on GPU tensors use the PyTorch reference" in format_report(report)
    report["extension"] = dict(report["extension"], loaded=True, cuda=True, cuda_archs=["9.0"],
                               build_system="setuptools", torch_version="2.11.0")
    assert "no compiled CUDA kernels" not in format_report(report)


def test_ctrl_c_exits_130_with_one_line(monkeypatch):
    """Ctrl-C is not a failure to report with a traceback, and callers (the study) can tell it from one."""
    import spd.doctor

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(spd.doctor, "collect", interrupted)
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted: finished work is kept; the same command resumes it"


def test_doctor_text_names_the_extension_state():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0
    expected = "compiled (CPU" if spd_ext.has_extension() else "NOT loaded"
    assert expected in result.output


def test_bad_model_is_a_one_line_error_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "spd.cli", "chat", "-m", "no-such-model", "-p", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown model 'no-such-model'" in proc.stderr


def test_bad_flag_value_is_a_usage_error():
    result = CliRunner().invoke(cli, ["chat", "-p", "hi", "--max-new-tokens", "0"])
    assert result.exit_code == 2 and "--max-new-tokens" in result.output


def test_chat_answers_with_the_default_model(default_model):
    result = CliRunner().invoke(cli, ["chat", "-p", "Say hello.", "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
