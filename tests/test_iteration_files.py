"""pipeline.flows.IterationFiles, the pipeline's persisted step store, under the library's loop in this
process (no DVC, no calibration files: the teacher's side is the library's stream). Its steps are Prefect
tasks, run against the session's Prefect server."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import model_inputs, tiny_model, tiny_sample

from kprune.config import KPruneConfig
from kprune.iterate import iterate
from kprune.knowledge import measure_knowledge
from kprune.sample import make_batches
from kprune.sublayer import sublayers


class Stopped(Exception):
    """Raised after an iteration's files are written: the run stops there, as a killed one would."""


@pytest.fixture
def prefect(prefect_server):
    """Prefect's settings pointed at the session's server, whenever Prefect was first imported."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield


def without_seconds(steps):
    return [dataclasses.replace(step, seconds=0.0) for step in steps]


@pytest.mark.parametrize("stopped_after", [0, 2])  # attention steps: the resumed run starts at their FFN
def test_layer_rescore_resumed_at_an_ffn_step_gives_the_straight_run_s_model(
    prefect, tmp_path, monkeypatch, stopped_after
):
    from pipeline.flows import IterationFiles, read_knowledge

    teacher = tiny_model("bert")
    batches = make_batches(model_inputs(teacher, tiny_sample()), 8)
    config = KPruneConfig(0.4, rescore="layer")
    total = len(sublayers(teacher))
    straight = iterate(teacher, batches, config, progress=False)  # the library's store: nothing persisted

    def stop(record):
        if record.sublayer == stopped_after:
            raise Stopped

    with pytest.raises(Stopped):
        store = IterationFiles("run", total, tmp_path)
        iterate(teacher, batches, config, store=store, progress=False, on_step=stop)
    assert sorted(path.parent.name for path in tmp_path.glob("*/step.json")) == [
        f"{t:02d}" for t in range(stopped_after + 1)
    ]

    measured_at = []

    def counted(student, subs, *args, **options):  # the real measurement, counted
        measured_at.append(subs[0].index)
        return measure_knowledge(student, subs, *args, **options)

    monkeypatch.setattr("kprune.iterate.measure_knowledge", counted)
    resumed = iterate(teacher, batches, config, store=IterationFiles("run", total, tmp_path), progress=False)
    assert measured_at == list(range(stopped_after + 2, total, 2))  # the later attention steps only
    assert without_seconds(resumed.record.steps) == without_seconds(straight.record.steps)
    assert [step.knowledge_measured for step in resumed.record.steps] == [True, False] * (total // 2)
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected), "not the straight run's model"

    # The FFN step's file holds the attention step's knowledge without the attention sublayer's entry.
    attention, ffn = (
        read_knowledge(tmp_path / f"{t:02d}" / "knowledge.safetensors", t)
        for t in (stopped_after, stopped_after + 1)
    )
    assert len(ffn) == len(attention) - 1
    for reused, measured in zip(ffn, attention[1:], strict=True):
        assert torch.equal(reused.predictive, measured.predictive)
        assert torch.equal(reused.representational, measured.representational)
