"""Progress output: a live bar only on a terminal; elsewhere a few whole lines, never ``\\r``."""

from __future__ import annotations

import io

import yaml

from peftkit.cli import main
from peftkit.progress import LineProgress, progress_bar
from tiny_runs import base_config, make_model, method_block, write_reviews


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_progress_prints_about_ten_whole_lines():
    out = io.StringIO()
    bar = progress_bar(250, desc="epoch 1/2", unit="step", stream=out)
    assert isinstance(bar, LineProgress)
    for _ in range(250):
        bar.set_postfix(loss="0.5000")
        bar.update(1)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 10  # every 25 steps; the last one is not repeated by close()
    assert lines[0].startswith("epoch 1/2: 25/250 steps (")
    assert lines[-1].startswith("epoch 1/2: 250/250 steps (")
    assert lines[-1].endswith(" loss=0.5000")


def test_line_progress_close_reports_a_short_tail_and_resumed_start():
    out = io.StringIO()
    bar = LineProgress(10, desc="eval", unit="row", initial=4, every=4, stream=out)
    for _ in range(6):  # 4 -> 10: one line at 8, the tail at 10 on close
        bar.update(1)
    bar.close()
    bar.close()  # closing twice prints nothing more
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "eval: 8/10 rows",
        "eval: 10/10 rows",
    ]


def test_terminal_gets_a_tqdm_bar_and_disabled_prints_nothing():
    from tqdm.auto import tqdm

    term = _Terminal()
    bar = progress_bar(3, desc="x", stream=term)
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    bar = progress_bar(3, enabled=False, stream=quiet)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""


def test_training_into_a_log_file_writes_no_carriage_returns(tmp_path, capfd):
    """A run whose stderr is not a terminal (CI, ``> run.log``): lines, not a redrawn bar."""
    model = make_model("llama", tmp_path / "llama")
    data = write_reviews(tmp_path / "reviews.csv", n=40)
    config = base_config(
        model,
        tmp_path / "run",
        {"type": "causal_lm_cls", "text": "review : {review} label :", "target": "{label}"},
        {"train": str(data), "eval_size": 8},
        method_block("lora"),
        epochs=1,
        batch_size=2,  # 16 steps: a bar would redraw at least 16 times
        progress=True,
        tensorboard=False,
        plots=False,
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    capfd.readouterr()  # building the tiny model is not part of the run
    assert main(["train", str(path)]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err
    step_lines = [line for line in err.splitlines() if line.startswith("epoch 1/1: ")]
    assert 1 <= len(step_lines) <= 11
    assert step_lines[-1].startswith("epoch 1/1: 16/16 steps")
