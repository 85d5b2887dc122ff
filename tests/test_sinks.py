"""The metrics sinks: a custom sink sees what metrics.jsonl stores, the console line's text, rank 0 only."""

import json

import pytest
from test_train import make_trainer

from sela.plan import Plan
from sela.sinks import ConsoleSink, JsonlSink, Sink, default_sinks


class Recorder(Sink):
    def __init__(self):
        self.steps, self.epochs, self.closed = [], [], 0

    def on_step(self, step, values):
        self.steps.append((step, values))

    def on_epoch(self, stats):
        self.epochs.append(stats)

    def close(self):
        self.closed += 1


def test_a_custom_sink_gets_the_metrics_lines_and_every_step(tiny_set, tmp_path):
    sink = Recorder()
    t = make_trainer(tiny_set, tmp_path, epochs=3, sinks=[JsonlSink(tmp_path), sink])
    history = t.fit(max_epochs=2)
    assert sink.closed == 0  # the run goes on
    history += t.fit()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert sink.epochs == lines == history and [m["epoch"] for m in lines] == [1, 2, 3]
    assert [s for s, _ in sink.steps] == list(range(3 * 6))  # 240 images, batches of 40
    assert all(set(v) == {"loss", "lr"} and isinstance(v["loss"], float) for _, v in sink.steps)
    assert [v["lr"] for _, v in sink.steps] == [t.plan.lr_at(s) for s in range(18)]
    per_epoch = [sum(v["loss"] for _, v in sink.steps[e * 6 : (e + 1) * 6]) / 6 for e in range(3)]
    assert [m["loss"] for m in lines] == pytest.approx(per_epoch)  # the same losses the line averages
    assert lines[-1]["lr"] == sink.steps[-1][1]["lr"]
    assert sink.closed == 1  # once, when the run ended


def test_sinks_replace_the_defaults(tiny_set, tmp_path):
    sink, lines = Recorder(), []
    make_trainer(tiny_set, tmp_path, epochs=1, sinks=[sink], log=lines.append).fit()
    assert len(sink.epochs) == 1 and not (tmp_path / "metrics.jsonl").exists() and lines == []


def test_the_default_sinks_write_the_jsonl_file_and_the_console_line(tiny_set, tmp_path):
    lines = []
    t = make_trainer(tiny_set, tmp_path, epochs=2, log=lines.append)
    assert [type(s) for s in t.sinks] == [JsonlSink, ConsoleSink]
    t.fit()
    assert len(lines) == 2 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert [type(s) for s in default_sinks(tmp_path, None, t.plan)] == [JsonlSink]  # silent: no console


def test_console_line_text():
    plan = Plan(epochs=10, steps_per_epoch=5, base_lr=0.1)
    plan.epoch_times = [30.0, 36.0, 33.0]
    lines = []
    stats = {"epoch": 3, "loss": 1.23456, "time_s": 33.04, "label_time_s": 4.96, "label_share": 0.1501}
    stats["heads"] = [{"min": 12, "n_empty": 0}, {"min": 7, "n_empty": 2}]
    ConsoleSink(lines.append, plan).on_epoch(stats)
    ConsoleSink(lines.append, plan).on_epoch({**stats, "knn_top1": 61.25})
    expected = (
        "epoch 3/10: loss 1.235, 33.0 s (label steps 5.0 s, 15%), clusters: smallest 7, 2 empty; "
        "about 3.9 min left"  # 7 epochs at the median 33 s
    )
    assert lines == [expected, expected + "; kNN top-1 61.2 %"]


def test_only_rank_0_has_sinks(tiny_set, tmp_path, monkeypatch):
    import sela.distributed as dist

    monkeypatch.setattr(dist, "is_main", lambda: False)
    t = make_trainer(tiny_set, tmp_path, epochs=1, sinks=[Recorder()])
    assert t.sinks == []
