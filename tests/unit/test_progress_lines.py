"""Progress in a log file: plain lines, not a bar that a file never redraws."""

from distill.core import progress
from distill.core.progress import console, progress_bar, progress_line


def test_a_log_gets_a_line_per_interval_and_one_at_the_end(monkeypatch):
    assert not console.is_terminal  # pytest captures the stream
    monkeypatch.setattr(progress, "LOG_EVERY_S", 3600.0)
    with console.capture() as cap:
        with progress_bar("train", 10) as advance:
            for _ in range(10):
                advance(1, status="loss 0.5")
    lines = cap.get().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train 10/10 (100%) 0m00s") and lines[0].endswith("loss 0.5")

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with console.capture() as cap:
        with progress_bar("score", 4) as advance:
            advance(1)
            advance(2)
    lines = cap.get().splitlines()
    # every advance printed; the unfinished bar's last state is its last line, not repeated
    assert [ln.split(" (")[0] for ln in lines] == ["score 1/4", "score 3/4"] and "left" in lines[-1]

    # a line longer than the console is one line still: log readers grep it
    with console.capture() as cap:
        with progress_bar("train: kd scores by embedded:qwen2.5-coder-0.5b-instruct", 4) as advance:
            advance(4, status="loss 0.128, 58 tok/s, dev 22% / loss 0.209")
    assert len(cap.get().splitlines()) == 1 and len(cap.get()) > console.width


def test_progress_line_reads_like_a_person_wrote_it():
    assert progress_line("train", 40, 160, 192.0, "loss 0.41") == "train 40/160 (25%) 3m12s, ~9m36s left, loss 0.41"
    assert progress_line("generate", 7, None, 4000.0) == "generate 7 1h06m"
