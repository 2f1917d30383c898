"""user_cache: the cross-request user K/V cache in front of target_fusion (ensemble ranker_cached).

A returning user's history is usually unchanged (a feed refresh, "load more", a retry) or has
grown by a few events at the end. This python-backend model keeps, per user_id, the events it
encoded, their user_kv, the newest timestamp and which weights produced them, and answers each
request with the same two tensors as user_encoder, by one of three paths:

* hit:    the request's kept history equals the cached events -> the cached user_kv, no encoder;
* append: the cached events are a strict prefix of the history, the mask is causal, the whole
          history fits max_history and at most `max_append_events` (256) events are new ->
          user_encoder_append on the new events only (O(ΔL));
* miss:   anything else (first visit, a rewritten history, another device's history, a total
          past max_history where every position shifts, other weights) -> user_encoder.

Exactness never rests on the cache key: events are compared by content (item, action,
timestamp), never by user_id or a hash alone, so two users with the same id or the same hash
still get their own history's K/V. What is stored is the history the models actually use, the
newest max_history events (user_encoder drops older ones, and the first kept event has no time
gap), so an over-long history costs max_history events of memory and still hits on a repeat.

The encoders run through BLS (`pb_utils.InferenceRequest(...).exec()`), pinned to the version
whose weights the entries are tagged with; the tag is re-read on every request (the newest
version folder and its model card) and again when an encoder call fails, so after a model is
reloaded with new weights under poll/explicit model control every entry of the old weights is a
miss. The LRU is bounded in bytes (`cache_bytes`). Counters go to Triton's metrics
endpoint as python-backend custom metrics (`user_cache_*`).

Requests are handled one at a time in this instance's process (Triton calls `execute` with a
list; each request reads and updates the cache before the next starts), so concurrent requests
of one user with different histories each get their own history's K/V. Every failure becomes an
error response for that request only: the stub must never die, or the model stays broken while
the server still reports it ready.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

USER_ID = "user_id"
HISTORY = ("history_item_ids", "history_action_ids", "history_timestamps")
USER_KV = "user_kv"
LAST_EVENT_TIMESTAMP = "last_event_timestamp"
CACHED_USER_KV = "cached_user_kv"
CACHED_LAST_EVENT_TIMESTAMP = "cached_last_event_timestamp"
PATHS = ("hit", "append", "miss")


@dataclass
class Entry:
    """One user's cached state: the kept events [P, 3] (item, action, timestamp), their user_kv
    [layers, 2, H, P, dh], the newest timestamp [1], and the weights tag that produced them."""

    events: np.ndarray
    user_kv: np.ndarray
    last_ts: np.ndarray
    weights: str

    @property
    def nbytes(self) -> int:
        return self.events.nbytes + self.user_kv.nbytes + self.last_ts.nbytes


class LruStore:
    """user_id -> Entry, least recently used first out, bounded by the bytes of its entries.
    An entry larger than the whole bound is not stored (it would evict everyone for nothing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def get(self, user_id: int) -> Entry | None:
        entry = self.entries.get(user_id)
        if entry is not None:
            self.entries.move_to_end(user_id)
        return entry

    def put(self, user_id: int, entry: Entry) -> None:
        old = self.entries.pop(user_id, None)
        if old is not None:
            self.bytes -= old.nbytes
        if entry.nbytes > self.capacity:
            return
        while self.entries and self.bytes + entry.nbytes > self.capacity:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.evictions += 1
        self.entries[user_id] = entry
        self.bytes += entry.nbytes


class RequestRefusedError(Exception):
    """A request this model answers with an error (the message and Triton error code)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _newest_version(model_dir: Path) -> str:
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    if not versions:
        raise RuntimeError(f"no version folder in {model_dir}")
    return str(max(versions))


def _weights_of(model_dir: Path, version: str) -> str:
    """The weights a model version carries: its model card's weight sha256 when the export
    wrote one, else the model file's size and modification time. Read on every request, so the
    card is parsed only when its file changes (one stat otherwise)."""
    folder = model_dir / version
    card = folder / "model_card.json"
    if card.exists():
        stat = card.stat()
        sha = _card_sha(str(card), stat.st_size, stat.st_mtime_ns)
        if sha:
            return sha
    model = folder / "model.onnx"
    stat = model.stat() if model.exists() else folder.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@functools.lru_cache(maxsize=64)
def _card_sha(path: str, size: int, mtime_ns: int) -> str | None:
    """weight_sha256 of a model card; keyed on its size and mtime so a new card is re-read."""
    return json.loads(Path(path).read_text()).get("weight_sha256")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.max_history = int(params["max_history"])
        self.encoder = params["encoder"]
        self.append_model = params.get("append_model") or None
        # more new events than this re-encode: the append's attention is [ΔL, P + ΔL]
        self.max_append = int(params.get("max_append_events") or 256)
        self.store = LruStore(int(params.get("cache_bytes") or 1 << 30))
        # the sibling model folders of this one: <repository>/<model>/<version>/
        self.repository = Path(args["model_repository"]).parent
        self.kv_dtype = pb_utils.triton_string_to_numpy(
            next(o["data_type"] for o in config["output"] if o["name"] == USER_KV))
        self.counts = dict.fromkeys(PATHS, 0)
        self._resolve_weights()
        self._metrics = self._make_metrics(args.get("model_version", "1"))

    # ------------------------------------------------------------------ weights
    def _resolve_weights(self) -> bool:
        """Pin each encoder to its newest version folder and tag entries with their weights.
        Returns whether the tag changed."""
        models = [m for m in (self.encoder, self.append_model) if m]
        versions = {m: _newest_version(self.repository / m) for m in models}
        tag = ";".join(f"{m}@{v}:{_weights_of(self.repository / m, v)}"
                       for m, v in versions.items())
        changed = tag != getattr(self, "weights", None)
        self.versions, self.weights = versions, tag
        return changed

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
                ("bytes", "user_cache_bytes", "bytes held: events + user_kv of every user", gauge),
                ("users", "user_cache_users", "users held", gauge),
                ("capacity", "user_cache_capacity_bytes", "the LRU bound (cache_bytes)", gauge),
            ):
                metrics[key] = family(name, doc, kind).Metric(labels=labels)
            metrics["capacity"].set(self.store.capacity)
            return metrics
        except Exception as e:  # metrics off on this server: serve without them
            pb_utils.Logger.log_warn(f"{self.name}: custom metrics unavailable ({e})")
            return None

    def _record(self, path: str, evictions_before: int) -> None:
        self.counts[path] += 1
        if self._metrics is None:
            return
        self._metrics[path].increment(1)
        if self.store.evictions > evictions_before:
            self._metrics["evictions"].increment(self.store.evictions - evictions_before)
        self._metrics["bytes"].set(self.store.bytes)
        self._metrics["users"].set(len(self.store.entries))

    # ------------------------------------------------------------------ encoders (BLS)
    def _bls(self, model: str, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run an encoder on `inputs`; (user_kv, last_event_timestamp) as owned numpy arrays.
        On failure the weights are re-read once: a model reloaded with new weights is retried
        at its new version (the old tag then misses); any other error is that request's."""
        for attempt in (0, 1):
            response = pb_utils.InferenceRequest(
                model_name=model, model_version=int(self.versions[model]),
                inputs=[pb_utils.Tensor(n, v) for n, v in inputs.items()],
                requested_output_names=[USER_KV, LAST_EVENT_TIMESTAMP],
                preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
            ).exec()
            if not response.has_error():
                out = {t.name(): t for t in response.output_tensors()}
                # copies: the response's shared memory is released after this call
                return (np.array(out[USER_KV].as_numpy(), dtype=self.kv_dtype),
                        np.array(out[LAST_EVENT_TIMESTAMP].as_numpy(), dtype=np.int64))
            error = response.error()
            if attempt == 0 and self._resolve_weights():
                continue
            code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL
            raise RequestRefusedError(f"{model}: {error.message()}", code)
        raise AssertionError("unreachable")

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

    def _answer(self, request: object) -> tuple[np.ndarray, np.ndarray]:
        # Which weights are served now (a few stat calls and one small file read): a model
        # reloaded with new weights under poll/explicit model control must turn every entry of
        # the old weights into a miss, hits included (a hit runs no encoder that could fail).
        self._resolve_weights()
        user_id, history = self._inputs(request)
        lengths = {v.shape for v in history.values()}
        if len(lengths) != 1:
            # Lengths that disagree: user_encoder's guard answers (the same INTERNAL error as
            # `ranker` gives), and nothing is cached.
            return self._bls(self.encoder, history)
        events = np.stack([history[n] for n in HISTORY], axis=1)  # [L, 3]
        kept = events[-self.max_history:]
        evictions = self.store.evictions
        entry = self.store.get(user_id)
        if entry is not None and entry.weights != self.weights:
            entry = None
        if entry is not None and np.array_equal(entry.events, kept):
            self._record("hit", evictions)
            return entry.user_kv, entry.last_ts
        prefix = 0 if entry is None else len(entry.events)
        if (entry is not None and self.append_model and prefix < len(events) <= self.max_history
                and len(events) - prefix <= self.max_append
                and np.array_equal(entry.events, events[:prefix])):
            new = {n: np.ascontiguousarray(history[n][prefix:]) for n in HISTORY}
            user_kv, last_ts = self._bls(self.append_model, {
                CACHED_USER_KV: entry.user_kv, CACHED_LAST_EVENT_TIMESTAMP: entry.last_ts, **new})
            path = "append"
        else:
            user_kv, last_ts = self._bls(self.encoder, history)
            path = "miss"
        self.store.put(user_id, Entry(np.array(kept), user_kv, last_ts, self.weights))
        self._record(path, evictions)
        return user_kv, last_ts

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                user_kv, last_ts = self._answer(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(USER_KV, user_kv),
                    pb_utils.Tensor(LAST_EVENT_TIMESTAMP, last_ts)]))
            except RequestRefusedError as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), e.code)))
            except Exception as e:  # never let the stub die on one request
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{self.name}: internal error: {type(e).__name__}: {e}",
                    pb_utils.TritonError.INTERNAL)))
        return responses

    def finalize(self) -> None:
        pb_utils.Logger.log_info(
            f"{self.name}: served {self.counts} at exit, {len(self.store.entries)} users, "
            f"{self.store.bytes} bytes, {self.store.evictions} evictions "
            f"(pid {os.getpid()}, {time.strftime('%H:%M:%S')})")
        self._metrics = None  # metrics before their families
        self._families = []
