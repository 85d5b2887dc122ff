"""What sela writes and says (issue 30, cases 3, 7, 8, 9, 18, 23 and the messages): never a file it did
not write, every write atomic (no half file, no ``.tmp`` left, the file named when it fails), read and write
failures told apart, notes on the console, ``~`` expanded, small folders trained by the default recipe."""

import errno
import json
import pathlib

import pytest
from cli_harness import call_sela, error_line, leftover_tmp
from test_labels_follow_files import TR, digit_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _fail_writes_to(monkeypatch, part, err=errno.ENOSPC):
    """Writes (``Path.write_text``) to a file whose name holds ``part`` write half, then fail."""
    real = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if part in self.name:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(err, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


# ------------------------------------------------------------------------------ case 7: the user's files


def test_train_into_a_directory_of_the_users_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    (out / "labels.csv").write_text("my labels\n")
    line = error_line(call_sela(["train", "--out", out, *TR]))
    assert "--force" in line and str(out) in line, line
    assert (out / "config.json").read_text() == '{"mine": 1}' and (
        out / "labels.csv"
    ).read_text() == "my labels\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "labels.csv"]
    result = call_sela(["train", "--out", out, *TR, "--force"])
    assert result.code == 0 and json.loads((out / "config.json").read_text())["_version"], str(result)


# ------------------------------------------------------------------------- cases 8, 9: atomic outputs


def test_a_failed_eval_json_write_keeps_the_old_file_and_names_it(run_copy, monkeypatch):
    (run_copy / "eval.json").write_text('{"old": true}')
    _fail_writes_to(monkeypatch, "json")
    line = error_line(call_sela(["eval", run_copy, "--no-linear", "--device", "cpu"]))
    assert "eval.json" in line and "full" in line, line
    assert json.loads((run_copy / "eval.json").read_text()) == {"old": True}
    assert not leftover_tmp(run_copy)


def test_embed_writes_the_array_and_its_paths_together(run_copy, tmp_path, monkeypatch):
    images = digit_folder(tmp_path / "new", n=6)
    out = tmp_path / "e.npy"
    assert call_sela(["embed", run_copy, images, "-o", out, "--device", "cpu"]).code == 0
    before = out.read_bytes(), (tmp_path / "e.paths.txt").read_text()
    (images / "d0000.png").unlink()  # the next embedding has 5 rows: a mismatch if only one file changed
    _fail_writes_to(monkeypatch, ".txt")
    line = error_line(call_sela(["embed", run_copy, images, "-o", out, "--device", "cpu"]))
    assert "e.paths.txt" in line, line
    assert (out.read_bytes(), (tmp_path / "e.paths.txt").read_text()) == before
    assert not leftover_tmp(tmp_path)


def test_a_path_with_a_newline_cannot_break_the_paths_file(run_copy, tmp_path):
    images = digit_folder(tmp_path / "new", n=3)
    (images / "d0000.png").rename(images / "two\nlines.png")
    line = error_line(call_sela(["embed", run_copy, images, "-o", tmp_path / "e.npy", "--device", "cpu"]))
    assert "line break" in line and ".pt" in line, line
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "e.paths.txt").exists()
    assert call_sela(["embed", run_copy, images, "-o", tmp_path / "e.csv", "--device", "cpu"]).code == 0


def test_a_failed_report_write_keeps_the_old_report(run_copy, tmp_path, monkeypatch):
    report = tmp_path / "report"
    assert call_sela(["show", run_copy, "-o", report, "--device", "cpu"]).code == 0
    before = (report / "index.html").read_text()
    _fail_writes_to(monkeypatch, "index")
    line = error_line(call_sela(["show", run_copy, "-o", report, "--device", "cpu"]))
    assert "index.html" in line, line
    assert (report / "index.html").read_text() == before and not leftover_tmp(tmp_path)


# --------------------------------------------------------------------------------------- the messages


def test_a_read_failure_says_read_and_names_the_file(run_copy, tmp_path, monkeypatch):
    import sela.export

    def loop(source):
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", str(tmp_path / "loop" / "loop"))

    monkeypatch.setattr(sela.export, "list_images", loop)
    line = error_line(call_sela(["embed", run_copy, tmp_path, "-o", tmp_path / "e.npy", "--device", "cpu"]))
    assert "could not read" in line and "loop" in line and "write" not in line, line


def test_the_summary_notes_reach_the_console(tmp_path):
    images = digit_folder(tmp_path / "flat", n=80)  # a flat folder: no ground truth
    result = call_sela(["train", "--dataset", "folder", "--data-dir", images, "--out", tmp_path / "run", *TR])
    assert result.code == 0, str(result)
    notes = json.loads((tmp_path / "run" / "summary.json").read_text())["notes"]
    assert notes and all(f"note: {n}" in result.out for n in notes), result.out


# ---------------------------------------------------------------------------- case 18: a small folder


def test_the_default_recipe_trains_a_200_image_folder(tmp_path):
    images = digit_folder(tmp_path / "small", n=200)
    argv = ["train", "--dataset", "folder", "--data-dir", images, "--out", tmp_path / "run", "--epochs", "1"]
    result = call_sela([*argv, "--no-progress", "--image-size", "16"])
    assert result.code == 0, str(result)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["batch_size"] <= 100


# ------------------------------------------------------------------------------------ case 23: paths


def test_tilde_in_path_flags_is_the_home_directory(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    result = call_sela(["train", "--out=~/x", *TR])
    assert result.code == 0 and (tmp_path / "home" / "x" / "checkpoint.pt").is_file(), str(result)
    assert not (tmp_path / "~").exists()
    result = call_sela(["labels", "~/x", "-o", "~/l.csv", "--device", "cpu"])
    assert result.code == 0 and (tmp_path / "home" / "l.csv").is_file(), str(result)


def test_show_per_page_leaves_no_stale_pages(run_copy, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "page_099.html").write_text("<html>my own page</html>")  # not sela's: stays
    assert call_sela(["show", run_copy, "-o", report, "--per-page", "1", "--device", "cpu"]).code == 0
    many = sorted(p.name for p in report.glob("page_*.html"))
    assert call_sela(["show", run_copy, "-o", report, "--per-page", "5", "--device", "cpu"]).code == 0
    few = sorted(p.name for p in report.glob("page_*.html"))
    assert len(few) < len(many) and few == [
        *[f"page_{i:03d}.html" for i in range(1, len(few))],
        "page_099.html",
    ]
