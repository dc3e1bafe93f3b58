"""The Ray ingress's retry rules without a Ray instance: RayService over a fake streaming handle
whose replicas answer as scripted."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError  # noqa: E402

from caraserve.ray_serve.config import RoutingConfig  # noqa: E402
from caraserve.ray_serve.ingress import RayService  # noqa: E402
from caraserve.ray_serve.messages import Head  # noqa: E402
from caraserve.serve import protocol as proto  # noqa: E402
from caraserve.serve.http import ApiError  # noqa: E402


class FakeGen:
    """One call's answer: items (a Head, SSE lines) or exceptions raised in their place."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """Each generate call takes the next scripted answer; records the hints."""

    def __init__(self, answers):
        self.answers, self.hints, self.gens = list(answers), [], []
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, hint, *_):
        self.hints.append(hint)
        gen = FakeGen(self.answers.pop(0))
        self.gens.append(gen)
        return gen


def error_head(status: int, type_: str, fault: bool = False) -> Head:
    headers = {proto.FAULT_HEADER: "request"} if fault else None
    return Head(status, proto.error_body("boom", type_, status), headers, "r1")


def run(answers, stream: bool = False):
    handle = FakeHandle(answers)
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    body = proto.CompletionRequest(model="demo-r8", prompt="x", max_tokens=4, stream=stream)

    async def go():
        try:
            answer = await service.completion(body, "req-1", False)
        except ApiError as e:
            return e
        if isinstance(answer, dict):
            return answer
        return [line async for line in answer]

    return asyncio.run(go()), handle, service


@pytest.mark.parametrize("head", [error_head(404, "not_found_error"), error_head(400, "invalid_request_error"),
                                  error_head(500, "request_failed", fault=True)])
def test_client_errors_and_request_faults_go_back_once(head):
    result, handle, service = run([[head], [Head(200, {"ok": 1})]])
    assert isinstance(result, ApiError) and result.status == head.status and len(handle.hints) == 1
    assert result.headers == head.headers
    assert service.retries.labels("replica_fault")._value.get() == 0


@pytest.mark.parametrize("first", [[error_head(503, "server_overloaded")], [error_head(500, "internal_error")],
                                   [ActorDiedError()]])
def test_replica_failures_are_retried_elsewhere_with_a_fresh_id(first):
    result, handle, _ = run([first, [Head(200, {"ok": 1})]])
    assert result == {"ok": 1} and [h.attempt for h in handle.hints] == [0, 1]
    assert [h.request_id for h in handle.hints] == ["req-1", "req-1.1"] and handle.gens[0].cancelled


def test_every_attempt_failing_is_a_502_naming_them():
    result, handle, _ = run([[ActorDiedError()]] * 3)
    assert isinstance(result, ApiError) and result.status == 502 and len(handle.hints) == 3
    assert result.message.count("transport") == 3


def test_every_replica_overloaded_is_a_503_to_come_back_later_and_a_mix_a_502():
    result, _, _ = run([[error_head(503, "server_overloaded")]] * 3)
    assert isinstance(result, ApiError) and (result.status, result.type) == (503, "server_overloaded")
    assert result.headers == {"Retry-After": "1"}
    result, _, _ = run([[error_head(503, "server_overloaded")]] * 2 + [[ActorDiedError()]])
    assert isinstance(result, ApiError) and (result.status, result.type) == (502, "bad_gateway")


def test_stream_retried_before_its_first_token_and_ended_with_an_error_event_after():
    lines = ["data: {\"a\": 1}\n\n", "data: [DONE]\n\n"]
    result, handle, _ = run([[Head(200, None), ActorDiedError()], [Head(200, None), *lines]], stream=True)
    assert result == lines and len(handle.hints) == 2
    result, handle, _ = run([[Head(200, None), lines[0], ActorDiedError()]], stream=True)
    assert result[0] == lines[0] and "replica failed mid-stream" in result[1] and result[1].endswith("[DONE]\n\n")
    assert len(handle.hints) == 1


def test_a_replica_started_after_a_runtime_load_gets_the_adapter_and_the_request_once():
    class FanOut:
        calls: list = []

        async def remote(self, hint, op, body):
            self.calls.append((hint.target, op, body.lora_name))
            return Head(200, {"status": "ok"}, None, hint.target)

    missing = Head(404, proto.error_body("The model `late` does not exist.", "not_found_error", 404), None, "new")
    handle = FakeHandle([[missing], [Head(200, {"ok": 1}, None, "new")], [missing], [missing]])
    handle.fan_out = FanOut()
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    service.runtime_adapters["late"] = proto.LoadLoraRequest(lora_name="late", lora_path="/adapters/late")
    body = proto.CompletionRequest(model="late", prompt="x", max_tokens=4)
    assert asyncio.run(service.completion(body, "req-1", False)) == {"ok": 1}
    assert handle.fan_out.calls == [("new", "load_adapter", "late")]
    assert [(h.attempt, h.target) for h in handle.hints] == [(0, ""), (1, "new")]
    with pytest.raises(ApiError) as e:  # still missing after the re-load: the 404 goes back
        asyncio.run(service.completion(body, "req-2", False))
    assert e.value.status == 404 and len(handle.hints) == 4


def test_tokenize_asks_one_replica_and_returns_its_answer_or_error():
    class FanOut:
        def __init__(self, head):
            self.head, self.calls = head, []

        async def remote(self, hint, op, body):
            self.calls.append((op, body))
            return self.head

    handle = FakeHandle([])
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    body = proto.TokenizeRequest(model="tiny", prompt="x")
    handle.fan_out = FanOut(Head(200, {"count": 2, "tokens": [1, 87]}, None, "r1"))
    assert asyncio.run(service.tokenize(body)) == {"count": 2, "tokens": [1, 87]}
    assert handle.fan_out.calls == [("tokenize", body)]
    handle.fan_out = FanOut(Head(404, proto.error_body("The model `x` does not exist.", "not_found_error", 404),
                                 None, "r1"))
    with pytest.raises(ApiError) as e:
        asyncio.run(service.detokenize(proto.DetokenizeRequest(model="x", tokens=[1])))
    assert e.value.status == 404 and "`x` does not exist" in e.value.message and len(handle.fan_out.calls) == 1


def test_the_route_hint_counts_every_prompt_of_a_batched_completion():
    from caraserve.ray_serve.ingress import estimate_prompt_tokens

    one = proto.CompletionRequest(model="m", prompt="x" * 400)
    ids = proto.CompletionRequest(model="m", prompt=[1, 2, 3])
    assert estimate_prompt_tokens(one) == 100 and estimate_prompt_tokens(ids) == 3
    assert estimate_prompt_tokens(proto.CompletionRequest(model="m", prompt=["x" * 400, "y" * 40])) == 110
    assert estimate_prompt_tokens(proto.CompletionRequest(model="m", prompt=[[1, 2], [3, 4, 5]])) == 5


def test_an_adapter_unloaded_through_the_ingress_stays_gone_until_loaded_again():
    """A replica started after the unload holds it again (from adapters.dir): the ingress answers
    404 for it itself and leaves it out of /v1/models, until it is loaded through the ingress."""
    class FanOut:
        def __init__(self):
            self.covered = 0

        async def remote(self, hint, op, body=None):
            if len(hint.covered) >= 1:  # one replica
                return Head(200, None, None, "r1", skipped=True)
            if op == "models":
                return Head(200, {"data": [{"id": "tiny"}, {"id": "gone"}, {"id": "kept"}]}, None, "r1")
            return Head(200, {"status": "ok"}, None, "r1")

    handle = FakeHandle([[Head(200, {"ok": 1})]])
    handle.fan_out = FanOut()
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    body = proto.CompletionRequest(model="gone", prompt="x", max_tokens=4)

    async def go():
        await service.unload_adapter(proto.UnloadLoraRequest(lora_name="gone"))
        with pytest.raises(ApiError) as e:
            await service.completion(body, "req-1", False)
        assert e.value.status == 404 and not handle.hints  # answered without a replica
        assert [m["id"] for m in await service.models()] == ["tiny", "kept"]
        # unloaded again: what replicas started since hold of it goes too (here the one replica)
        assert (await service.unload_adapter(proto.UnloadLoraRequest(lora_name="gone")))["replicas"] == 1
        await service.load_adapter(proto.LoadLoraRequest(lora_name="gone", lora_path="/adapters/gone"))
        assert await service.completion(body, "req-2", False) == {"ok": 1}

    asyncio.run(go())


def test_models_advertise_the_smallest_context_length_of_the_replicas():
    """Replicas whose KV caches hold different context lengths: /v1/models gives the smallest,
    so a request sized by it fits whichever replica takes it."""
    class FanOut:
        async def remote(self, hint, op, body=None):
            lens = [2048, 512, 1024]
            k = len(hint.covered)
            if k >= len(lens):
                return Head(200, None, None, "none", skipped=True)
            return Head(200, {"data": [{"id": "tiny", "max_model_len": lens[k]}, {"id": "a"}]}, None, f"r{k}")

    handle = FakeHandle([])
    handle.fan_out = FanOut()
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    cards = asyncio.run(service.models())
    assert cards[0] == {"id": "tiny", "max_model_len": 512} and [c["id"] for c in cards] == ["tiny", "a"]


def test_drain_refuses_new_calls_and_waits_for_running_streams():
    lines = ["data: {\"a\": 1}\n\n", "data: [DONE]\n\n"]
    handle = FakeHandle([[Head(200, None), *lines]])
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    body = proto.CompletionRequest(model="demo-r8", prompt="x", max_tokens=4, stream=True)

    async def go():
        stream = await service.completion(body, "req-1", False)
        assert service.inflight == 1
        draining = asyncio.ensure_future(service.drain(5))
        await asyncio.sleep(0.2)
        assert not draining.done()  # the stream is still being answered
        with pytest.raises(ApiError) as e:
            await service.completion(body, "req-2", False)
        assert e.value.status == 503
        assert [line async for line in stream] == lines
        assert await asyncio.wait_for(draining, 2) == 0 and service.inflight == 0
        assert await service.drain(0) == 0

    asyncio.run(go())


def test_a_stream_is_counted_by_how_it_ended():
    def outcomes(service):
        return {k: service.calls.labels(k)._value.get() for k in ("ok", "broken", "disconnected")}

    lines = ["data: {\"a\": 1}\n\n", "data: [DONE]\n\n"]
    _, _, service = run([[Head(200, None), *lines]], stream=True)
    assert outcomes(service) == {"ok": 1, "broken": 0, "disconnected": 0}
    _, _, service = run([[Head(200, None), lines[0], ActorDiedError()]], stream=True)
    assert outcomes(service) == {"ok": 0, "broken": 1, "disconnected": 0}
    handle = FakeHandle([[Head(200, None), *lines]])
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))

    async def client_leaves_after_the_first_line():
        stream = await service.completion(proto.CompletionRequest(model="m", prompt="x", stream=True), "r", False)
        await anext(stream)
        await stream.aclose()
        assert handle.gens[0].cancelled and service.inflight == 0  # at once, not when collected

    asyncio.run(client_leaves_after_the_first_line())
    assert outcomes(service) == {"ok": 0, "broken": 0, "disconnected": 1} and handle.gens[0].cancelled


def test_a_runtime_adapters_rank_goes_with_its_requests():
    class FanOut:
        async def remote(self, hint, op, body=None):
            if hint.covered:
                return Head(200, None, None, "r1", skipped=True)
            return Head(200, {"status": "ok", "rank": 16}, None, "r1")

    handle = FakeHandle([[Head(200, {"ok": 1})]])
    handle.fan_out = FanOut()
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))

    async def go():
        await service.load_adapter(proto.LoadLoraRequest(lora_name="my16", lora_path="/adapters/x"))
        await service.completion(proto.CompletionRequest(model="my16", prompt="x", max_tokens=2), "q", False)

    asyncio.run(go())
    assert handle.hints[0].rank == 16


def test_an_error_after_the_streams_last_line_is_not_the_clients():
    lines = ["data: {\"a\": 1}\n\n", "data: [DONE]\n\n"]
    result, _, service = run([[Head(200, None), *lines, ActorDiedError()]], stream=True)
    assert result == lines and service.calls.labels("ok")._value.get() == 1


def test_an_id_in_flight_is_refused_again_as_a_single_server_does():
    """Two calls with one X-Request-Id at once would each reach a replica of their own, which
    could not tell; the ingress refuses the second (400) while the first runs, and takes the id
    again once it has ended."""
    lines = ["data: {\"a\": 1}\n\n", "data: [DONE]\n\n"]
    handle = FakeHandle([[Head(200, None), *lines], [Head(200, None), *lines]])
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    body = proto.CompletionRequest(model="demo-r8", prompt="x", max_tokens=4, stream=True)

    async def go():
        stream = await service.completion(body, "same", False)
        with pytest.raises(ApiError) as e:
            await service.completion(body, "same", False)
        assert e.value.status == 400 and "request id 'same' is already in flight" in e.value.message
        assert [line async for line in stream] == lines
        again = await service.completion(body, "same", False)
        assert [line async for line in again] == lines and not service.live_ids

    asyncio.run(go())


def _replicas_answering(unload_status: list[int]):
    """A fan-out over len(unload_status) replicas: unload answers each its status (409: still in
    use), load 200; the calls are recorded."""
    class FanOut:
        calls: list[tuple[str, str]] = []

        async def remote(self, hint, op, body=None):
            k = len(hint.covered)
            if k >= len(unload_status):
                return Head(200, None, None, "none", skipped=True)
            self.calls.append((op, f"r{k}"))
            status = unload_status[k] if op == "unload_adapter" else 200
            body = {"status": "ok"} if status == 200 else {"error": {"message": "still in use", "type": "conflict"}}
            return Head(status, body, None, f"r{k}")

    return FanOut()


def test_an_unload_one_replica_refuses_leaves_the_deployment_whole():
    """r0 unloads, r1 refuses (409): a runtime adapter is loaded again on r0, as a single server
    keeps an adapter whose unload it refused; one of adapters.dir is unloaded at the ingress
    (404 from now) and a later unload clears the replicas that still hold it."""
    handle = FakeHandle([])
    handle.fan_out = _replicas_answering([200, 409])
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    load = proto.LoadLoraRequest(lora_name="rt", lora_path="/adapters/rt")

    async def go():
        await service.load_adapter(load)
        handle.fan_out.calls.clear()
        with pytest.raises(ApiError) as e:
            await service.unload_adapter(proto.UnloadLoraRequest(lora_name="rt"))
        assert e.value.status == 409 and "loaded it again" in e.value.message
        assert ("load_adapter", "r0") in handle.fan_out.calls and "rt" in service.runtime_adapters
        assert "rt" not in service.unloaded
        with pytest.raises(ApiError) as e:
            await service.unload_adapter(proto.UnloadLoraRequest(lora_name="dir-one"))
        assert e.value.status == 409 and "dir-one" in service.unloaded
        handle.fan_out = _replicas_answering([404, 200])  # r1's requests ended
        assert (await service.unload_adapter(proto.UnloadLoraRequest(lora_name="dir-one")))["status"] == "ok"

    asyncio.run(go())
