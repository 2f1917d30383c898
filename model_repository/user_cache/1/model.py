"""user_cache: the cross-request user K/V cache in front of target_fusion (ensemble ranker_cached).

A thin Triton adapter around kv_cache.UserKvCache (beside this file, importable without Triton
and unit-tested on its own): it reads the request, asks Triton which encoder version is served,
calls user_encoder / user_encoder_append through BLS, and answers with the same two tensors as
user_encoder plus `cache_path` (hit / append / miss), the path this request took.

* Weights come from Triton, never from the repository's folders (which may be on S3/GCS): BLS
  calls are pinned to the encoder version `pb_utils.is_model_ready` reports ready, asked on every
  request (a hit runs no encoder, yet must miss once new weights are loaded). Entries are tagged
  with that version; an entry of another version is a miss. A call whose version was unloaded
  meanwhile is re-planned on the new version as a full miss: K/V of two weights never meet.
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

import numpy as np
import triton_python_backend_utils as pb_utils
from kv_cache import (
    PATHS,
    Encoders,
    UserKvCache,
    Weights,
    WeightsChangedError,
    in_buffer,
    resolve_version,
    stack_events,
)

USER_ID = "user_id"
HISTORY = ("history_item_ids", "history_action_ids", "history_timestamps")
USER_KV = "user_kv"
LAST_EVENT_TIMESTAMP = "last_event_timestamp"
CACHE_PATH = "cache_path"
CACHED_USER_KV = "cached_user_kv"
CACHED_LAST_EVENT_TIMESTAMP = "cached_last_event_timestamp"
NEW_USER_KV = "new_user_kv"
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
        self.cache = UserKvCache(
            capacity_bytes=int(params.get("cache_bytes") or 1 << 30),
            max_history=int(params["max_history"]),
            # more new events than this re-encode: the append's attention is [ΔL, P + ΔL]
            max_append=int(params.get("max_append_events") or 256))
        self.kv_dtype = pb_utils.triton_string_to_numpy(
            next(o["data_type"] for o in config["output"] if o["name"] == USER_KV))
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
    async def _bls(self, model: str, version: int, inputs: dict[str, np.ndarray],
                   kv_name: str = USER_KV,
                   capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run `model` at `version` on `inputs`: (its K/V output `kv_name`, copied into a buffer
        of `capacity` along the history axis when given, last_event_timestamp), owned copies
        (the response's shared memory is released after this call). A failure because the
        version is no longer served is WeightsChangedError; any other is the request's."""
        response = await pb_utils.InferenceRequest(
            model_name=model, model_version=version,
            inputs=[pb_utils.Tensor(n, v) for n, v in inputs.items()],
            requested_output_names=[kv_name, LAST_EVENT_TIMESTAMP],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        ).async_exec()
        if response.has_error():
            error = response.error()
            if not self._ready(model, version):
                raise WeightsChangedError(f"{model} version {version}: {error.message()}")
            code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL
            raise RequestRefusedError(f"{model}: {error.message()}", code)
        out = {t.name(): t for t in response.output_tensors()}
        kv = out[kv_name].as_numpy()
        kv = (in_buffer(kv, max(capacity, kv.shape[3])) if capacity is not None
              else np.array(kv, dtype=self.kv_dtype))
        return kv, np.array(out[LAST_EVENT_TIMESTAMP].as_numpy(), dtype=np.int64)

    @staticmethod
    def _columns(events: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(events[:, i]) for i, name in enumerate(HISTORY)}

    async def _encode(self, weights: Weights, events: np.ndarray,
                      capacity: int) -> tuple[np.ndarray, np.ndarray]:
        return await self._bls(self.encoder, weights.encoder_version, self._columns(events),
                               capacity=capacity)

    async def _append(self, weights: Weights, cached_kv: np.ndarray, cached_last_ts: np.ndarray,
                      new_events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """user_encoder_append reads the cached K/V of every layer but the last and returns the
        new events' K/V only: O(ΔL) bytes back, and the last layer's O(P) never sent."""
        return await self._bls(self.append_model, weights.append_version, {
            CACHED_USER_KV: cached_kv[:-1], CACHED_LAST_EVENT_TIMESTAMP: cached_last_ts,
            **self._columns(new_events)}, NEW_USER_KV)

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
                ("bytes", "user_cache_bytes", "bytes held: the events and user_kv buffers of "
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
    def _inputs(self, request: object) -> tuple[int, dict[str, np.ndarray]]:
        tensor = pb_utils.get_input_tensor_by_name(request, USER_ID)
        if tensor is None:  # Triton's own check refuses this first; kept for direct BLS callers
            raise RequestRefusedError(f"{self.name}: missing input '{USER_ID}'",
                                      pb_utils.TritonError.INVALID_ARG)
        user_id = tensor.as_numpy()
        if user_id.dtype != np.int64 or user_id.size != 1:
            raise RequestRefusedError(f"{self.name}: input '{USER_ID}' must be INT64 [1]",
                                      pb_utils.TritonError.INVALID_ARG)
        history = {}
        for name in HISTORY:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestRefusedError(f"{self.name}: missing input '{name}'",
                                          pb_utils.TritonError.INVALID_ARG)
            history[name] = tensor.as_numpy()
        return int(user_id.reshape(-1)[0]), history

    async def _answer(self, request: object) -> pb_utils.InferenceResponse:
        user_id, history = self._inputs(request)
        if len({v.shape for v in history.values()}) != 1:
            # Lengths that disagree: user_encoder's guard answers (the same INTERNAL error as
            # `ranker` gives), and nothing is cached.
            weights = await self._resolve()
            user_kv, last_ts = await self._bls(self.encoder, weights.encoder_version, history)
            path = "miss"
        else:
            evictions = self.cache.store.evictions
            answer = await self.cache.serve(user_id, stack_events(*history.values()),
                                            self.encoders)
            user_kv, last_ts, path = answer.user_kv, answer.last_ts, answer.path
            self._record(path, evictions)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(USER_KV, user_kv),
            pb_utils.Tensor(LAST_EVENT_TIMESTAMP, last_ts),
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
