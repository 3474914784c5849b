"""Progress bars: drawn on a terminal only, never under `--quiet`; `ember quantize --method gptq` shows one bar
step per decoder layer on a pseudo-terminal and nothing when stderr is a pipe."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios

from ember.progress import is_shown, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_is_drawn_on_a_terminal_only():
    term, pipe = _Terminal(), io.StringIO()
    assert list(progress(range(3), desc="layers", unit="layer", file=term)) == [0, 1, 2]
    assert list(progress(range(3), desc="layers", unit="layer", file=pipe)) == [0, 1, 2]
    assert "3/3" in term.getvalue() and "layers" in term.getvalue()
    assert pipe.getvalue() == ""


def test_quiet_disables_the_bar_on_a_terminal():
    term = _Terminal()
    bar = progress(total=4, desc="x", enabled=False, file=term)
    bar.update(4)
    bar.close()
    assert term.getvalue() == "" and bar.disable
    assert is_shown(True, term) and not is_shown(False, term) and not is_shown(True, io.StringIO())


def test_default_stream_is_stderr_as_it_is_when_called(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(progress(range(2), desc="calibration")) == [0, 1]
    assert "calibration" in term.getvalue() and "2/2" in term.getvalue()


def test_delay_hides_a_quick_job():
    term = _Terminal()
    assert list(progress(range(5), desc="loading", file=term, delay=60.0)) == list(range(5))
    assert "loading" not in term.getvalue()


def _quantize_cmd(model_dir: str, tmp_path, name: str) -> list[str]:
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return [sys.executable, "-m", "ember.cli.main", "quantize", "--model", model_dir, "--method", "gptq",
            "--bits", "4", "--group-size", "32", "--calib-file", str(calib), "--num-samples", "2",
            "--calib-seq-len", "32", "--num-threads", "1", "--output", str(tmp_path / name)]


def _run_on_pty(cmd: list[str], timeout_s: float = 120.0) -> tuple[int, str]:
    """Run `cmd` with stderr on a pseudo-terminal (stdout piped); return its exit code and what stderr showed."""
    primary, secondary = pty.openpty()
    # a fresh pty is 0x0 and tqdm draws nothing at width 0: give it a real terminal's size
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([primary], [], [], timeout_s)
            if not ready:
                proc.kill()
                break
            try:
                data = os.read(primary, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(primary)
    proc.stdout.read()
    return proc.wait(timeout=timeout_s), b"".join(chunks).decode("utf-8", "replace")


def test_quantize_gptq_shows_a_layer_bar_on_a_terminal(tiny_llama_dir, tmp_path):
    code, shown = _run_on_pty(_quantize_cmd(tiny_llama_dir, tmp_path, "tty"))
    assert code == 0, shown[-2000:]
    assert "quantize gptq" in shown and "2/2" in shown and "layer" in shown  # the tiny Llama has 2 layers


def test_quantize_gptq_draws_nothing_into_a_pipe(tiny_llama_dir, tmp_path):
    piped = subprocess.run(_quantize_cmd(tiny_llama_dir, tmp_path, "pipe"), capture_output=True, text=True,
                           timeout=120)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "quantize gptq" not in piped.stderr and "it/s" not in piped.stderr and "layer/s" not in piped.stderr
    assert "\u2588" not in piped.stderr and "2/2" not in piped.stderr  # no bar blocks, no counts


def test_quantize_quiet_draws_nothing_on_a_terminal(tiny_llama_dir, tmp_path, monkeypatch):
    from ember.cli.main import main

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    main(_quantize_cmd(tiny_llama_dir, tmp_path, "quiet")[3:] + ["--quiet"])
    assert (tmp_path / "quiet" / "quantization_config.json").is_file()
    assert "quantize gptq" not in term.getvalue()
