"""user_cache: the cross-request user-state cache in front of target_fusion (ensemble
ranker_cached), for any split family.

A thin Triton adapter around kv_cache.UserStateCache (beside this file, importable without
Triton and unit-tested on its own). It reads the family's declaration from its own config
(parameter `split_contract`, written by the export): the history features it takes, the event
features it compares, the state tensors it holds and returns (the same tensors as user_encoder,
plus `cache_path`: hit / append / miss, the path this request took). It asks Triton which
encoder version is served and calls user_encoder / user_encoder_append through BLS with the
declared names. Nothing here names a family's tensors.

* Weights come from Triton, never from the repository's folders (which may be on S3/GCS): BLS
  calls are pinned to the encoder version `pb_utils.is_model_ready` reports ready, asked on every
  request (a hit runs no encoder, yet must miss once new weights are loaded). Entries are tagged
  with that version; an entry of another version is a miss. A call whose version was unloaded
  meanwhile is re-planned on the new version as a full miss: state of two weights never meets.
* No head-of-line blocking: `execute` hands each request to this instance's own event loop
  (a thread) and returns at once, without responses; each request is answered later through its
  response sender (allowed in the default, non-decoupled mode: one final response per request).
  So Triton hands the instance new requests while earlier ones await their encoder
  (`async_exec`): one user's miss never holds another user's hit. A decoupled model would do the
  same, but Triton refuses it as a step of this ensemble, and a decoupled ensemble is one that
  unary gRPC clients cannot call (README "ranker_cached"). Requests of one user are serialised.
* Every failure becomes an error response for that request only: the stub must never die, or
  the model stays broken while the server still reports it ready.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils
from kv_cache import (
    PATHS,
    Arrays,
    Encoders,
    Layout,
    StateLayout,
    UserStateCache,
    Weights,
    WeightsChangedError,
    resolve_version,
)

# The cache's own tensors (client/contract.py's USER_ID and CACHE_PATH); the rest is declared.
USER_ID = "user_id"
CACHE_PATH = "cache_path"
CONTRACT_PARAMETER = "split_contract"  # client/split_contract.py's
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class RequestRefusedError(Exception):
    """A request this model answers with an error (the message and Triton error code)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.encoder = params["encoder"]
        self.append_model = params.get("append_model") or None
        # versions are looked for within this distance of the pinned one (kv_cache.resolve_version)
        self.version_window = int(params.get("version_window") or 16)
        self.layout = Layout.from_declaration(params[CONTRACT_PARAMETER])
        self.cache = UserStateCache(
            layout=self.layout, capacity_bytes=int(params.get("cache_bytes") or 1 << 30),
            # more new events than this re-encode: the append's attention is [ΔL, P + ΔL]
            max_append=int(params.get("max_append_events") or 256))
        # the state's dtypes as served (an fp16 export's K/V), from this model's own outputs
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                       for o in config["output"]}
        self.pinned: dict[str, int | None] = {self.encoder: None, self.append_model: None}
        self.encoders = Encoders(resolve=self._resolve, encode=self._encode,
                                 append=self._append)
        self._metrics = self._make_metrics(args.get("model_version", "1"))
        # one event loop in one thread owns the cache: no locks beyond kv_cache's per-user ones
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="user_cache",
                                       daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ weights (from Triton)
    def _ready(self, model: str, version: int) -> bool:
        return bool(pb_utils.is_model_ready(model, str(version)))

    async def _resolve(self) -> Weights:
        for model in (self.encoder, self.append_model):
            if model:
                self.pinned[model] = resolve_version(
                    lambda v, m=model: self._ready(m, v), self.pinned[model], self.version_window)
        encoder = self.pinned[self.encoder]
        if encoder is None:
            raise RequestRefusedError(f"{self.name}: no version of {self.encoder} is ready",
                                      pb_utils.TritonError.UNAVAILABLE)
        return Weights(encoder, self.pinned[self.append_model] if self.append_model else None)

    # ------------------------------------------------------------------ encoders (BLS)
    async def _bls(self, model: str, version: int, inputs: Arrays,
                   keep: dict[str, Callable[[np.ndarray], np.ndarray]]) -> Arrays:
        """Run `model` at `version` on `inputs`: each output named in `keep`, turned by its
        function into an owned copy while the response's shared memory is still held. A failure
        because the version is no longer served is WeightsChangedError; any other is the
        request's."""
        response = await pb_utils.InferenceRequest(
            model_name=model, model_version=version,
            inputs=[pb_utils.Tensor(n, v) for n, v in inputs.items()],
            requested_output_names=list(keep),
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        ).async_exec()
        if response.has_error():
            error = response.error()
            if not self._ready(model, version):
                raise WeightsChangedError(f"{model} version {version}: {error.message()}")
            code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL
            raise RequestRefusedError(f"{model}: {error.message()}", code)
        out = {t.name(): t for t in response.output_tensors()}
        return {name: own(out[name].as_numpy()) for name, own in keep.items()}

    def _copy(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda value: np.array(value, dtype=self.dtypes[name])

    async def _encode(self, weights: Weights, history: Arrays, capacity: int) -> Arrays:
        """user_encoder on the whole history: each growing state tensor copied once, straight
        into a buffer with room for `capacity` events (the entry adopts it)."""
        def into_buffer(s: StateLayout) -> Callable[[np.ndarray], np.ndarray]:
            return lambda value: s.in_buffer(value.astype(self.dtypes[s.name], copy=False),
                                             max(capacity, value.shape[s.axis]))

        return await self._bls(self.encoder, weights.encoder_version, history, {
            s.name: self._copy(s.name) if s.axis is None else into_buffer(s)
            for s in self.layout.state})

    async def _append(self, weights: Weights, cached: Arrays, new_history: Arrays) -> Arrays:
        """user_encoder_append reads what the declaration says of the cached state (e.g. every
        layer's K/V but the last) and returns the new events' part of each growing tensor:
        O(ΔL) bytes back."""
        out = await self._bls(self.append_model, weights.append_version,
                              {**cached, **new_history},
                              {s.new_name: self._copy(s.name) for s in self.layout.state})
        return {s.name: out[s.new_name] for s in self.layout.state}

    # ------------------------------------------------------------------ metrics
    def _make_metrics(self, version: str) -> dict | None:
        """Prometheus counters and gauges on Triton's metrics endpoint. A server started without
        metrics refuses custom metrics: the cache then works without them."""
        try:
            labels = {"model": self.name, "version": str(version)}
            self._families = []  # each family must outlive its metrics

            def family(name: str, doc: str, kind: object) -> object:
                self._families.append(pb_utils.MetricFamily(name=name, description=doc,
                                                            kind=kind))
                return self._families[-1]

            counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
            requests = family("user_cache_requests_total",
                              "user_cache requests by path: hit (no encoder), append "
                              "(user_encoder_append on the new events), miss (user_encoder)",
                              counter)
            metrics = {path: requests.Metric(labels={**labels, "path": path}) for path in PATHS}
            for key, name, doc, kind in (
                ("evictions", "user_cache_evictions_total", "users evicted by the LRU bound",
                 counter),
                ("bytes", "user_cache_bytes", "bytes held: the events and state buffers of "
                 "every user", gauge),
                ("users", "user_cache_users", "users held", gauge),
                ("capacity", "user_cache_capacity_bytes", "the LRU bound (cache_bytes)", gauge),
            ):
                metrics[key] = family(name, doc, kind).Metric(labels=labels)
            metrics["capacity"].set(self.cache.store.capacity)
            return metrics
        except Exception as e:  # metrics off on this server: serve without them
            pb_utils.Logger.log_warn(f"{self.name}: custom metrics unavailable ({e})")
            return None

    def _record(self, path: str, evictions_before: int) -> None:
        if self._metrics is None:
            return
        store = self.cache.store
        self._metrics[path].increment(1)
        if store.evictions > evictions_before:
            self._metrics["evictions"].increment(store.evictions - evictions_before)
        self._metrics["bytes"].set(store.bytes)
        self._metrics["users"].set(len(store.entries))

    # ------------------------------------------------------------------ one request
    def _inputs(self, request: object) -> tuple[int, Arrays]:
        tensor = pb_utils.get_input_tensor_by_name(request, USER_ID)
        if tensor is None:  # Triton's own check refuses this first; kept for direct BLS callers
            raise RequestRefusedError(f"{self.name}: missing input '{USER_ID}'",
                                      pb_utils.TritonError.INVALID_ARG)
        user_id = tensor.as_numpy()
        if user_id.dtype != np.int64 or user_id.size != 1:
            raise RequestRefusedError(f"{self.name}: input '{USER_ID}' must be INT64 [1]",
                                      pb_utils.TritonError.INVALID_ARG)
        history = {}
        for name in self.layout.history:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestRefusedError(f"{self.name}: missing input '{name}'",
                                          pb_utils.TritonError.INVALID_ARG)
            history[name] = tensor.as_numpy()
        return int(user_id.reshape(-1)[0]), history

    async def _answer(self, request: object) -> pb_utils.InferenceResponse:
        user_id, history = self._inputs(request)
        if len({v.shape[:1] for v in history.values()}) != 1:
            # Lengths that disagree: user_encoder's guard answers (the same INTERNAL error as
            # `ranker` gives), and nothing is cached.
            weights = await self._resolve()
            state = await self._bls(self.encoder, weights.encoder_version, history,
                                    {s.name: self._copy(s.name) for s in self.layout.state})
            path = "miss"
        else:
            evictions = self.cache.store.evictions
            answer = await self.cache.serve(user_id, history, self.encoders)
            state, path = answer.state, answer.path
            self._record(path, evictions)
        return pb_utils.InferenceResponse(output_tensors=[
            *(pb_utils.Tensor(s.name, state[s.name]) for s in self.layout.state),
            pb_utils.Tensor(CACHE_PATH, np.array([path], dtype=np.object_))])

    async def _serve(self, request: object) -> None:
        sender = request.get_response_sender()
        try:
            response = await self._answer(request)
        except RequestRefusedError as e:
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), e.code))
        except WeightsChangedError as e:  # versions changed twice under one request: retryable
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"{self.name}: {e}", pb_utils.TritonError.UNAVAILABLE))
        except Exception as e:  # never let the stub die on one request
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"{self.name}: internal error: {type(e).__name__}: {e}",
                pb_utils.TritonError.INTERNAL))
        try:
            sender.send(response, flags=FINAL)
        except Exception as e:  # e.g. the request was cancelled: nothing left to answer
            pb_utils.Logger.log_warn(f"{self.name}: could not send a response: {e}")

    def execute(self, requests: list) -> None:
        """Start each request on the event loop and return: the python backend then hands this
        instance the next requests while these await their encoders."""
        for request in requests:
            asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)

    def finalize(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        store = self.cache.store
        pb_utils.Logger.log_info(
            f"{self.name}: served {self.cache.counts} at exit, {len(store.entries)} users, "
            f"{store.bytes} bytes, {store.evictions} evictions "
            f"(pid {os.getpid()}, {time.strftime('%H:%M:%S')})")
        self._metrics = None  # metrics before their families
        self._families = []
