"""EngineState: the typed engine snapshot and its JSON wire form, as the policies read it."""

import json

from caraserve.cluster.policies import ReplicaState
from caraserve.perf.model import PerfModel
from caraserve.state import EngineState, RequestView


def _state(perf=None) -> EngineState:
    return EngineState(8, (RequestView("a", 16, 12, 5, "r1"),), (RequestView("", 0, 3, 9, "r2"),),
                       frozenset({"a"}), {"a": 16, "b": 64}, 40.0, perf, "tiny")


def test_wire_form_round_trips_with_and_without_a_latency_model():
    plain = _state()
    assert EngineState.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    perf = PerfModel.linear()
    back = EngineState.from_dict(json.loads(json.dumps(_state(perf).to_dict())))
    assert back.perf_model.to_dict() == perf.to_dict() and back.running == plain.running
    assert plain.to_dict()["queued"][0]["adapter"] is None  # the base model, as /v1/state always said


def test_replica_state_uses_the_engines_model_else_the_fallback_and_adds_requests_sent_since():
    fallback, own = PerfModel.linear(), PerfModel.linear(decode_base_ms=5.0)
    sent = (RequestView("b", 64, 4, 16, "r3"),)
    rs = ReplicaState.of(_state(), fallback, sent)
    assert rs.perf is fallback and rs.queued[-1] == sent[0] and rs.num_requests == 3 and rs.has_room
    assert ReplicaState.of(_state(own), fallback).perf is own
