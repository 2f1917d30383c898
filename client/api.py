"""gRPC client for a ranker on Triton: validated scoring, ranking, readiness and statistics.

Wraps `tritonclient.grpc.InferenceServerClient` so that callers get numpy scores [N, T] or one
exception type (RankerError, or RequestError for a request refused before sending), with retries
only where a retry can help (server not up yet, connection dropped). Any model family: what a
request holds and what comes back is the family's declaration, read from the served model's
config (parameter `split_contract`, client/split_contract.py), so the client names no feature.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.contract import CACHE_PATH, USER_ID, USER_ID_HEADER
from client.request import INT64_MAX, INT64_MIN, NUMPY_DTYPES, RankingRequest, RequestError
from client.split_contract import (
    CONTRACT_PARAMETER,
    ContractError,
    Output,
    SplitContract,
    contract_from_json,
)
from client.validation import build_request, validate_request

T = TypeVar("T")
# A request as a RankingRequest, or a feature dict (name -> array or lists) built against the
# served model's declaration.
RequestLike = RankingRequest | Mapping[str, Any]
# gRPC codes worth retrying: the server is starting, restarting or the connection broke. Never
# INVALID_ARGUMENT (the same request fails the same way) nor DEADLINE_EXCEEDED (it would double
# the load on a server that is already too slow).
_RETRYABLE = frozenset({"StatusCode.UNAVAILABLE"})
_UNREACHABLE = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"})
TASK_NAMES_PARAMETER = "task_names"
MAX_CANDIDATES_PARAMETER = "max_candidates"
NAIVE_MAX_WORK_PARAMETER = "naive_max_work"
MAX_HISTORY_PARAMETER = "max_history"
CACHED_MODEL = "ranker_cached"


class RankerError(RuntimeError):
    """A call to Triton failed. `server_message` is the server's (or gRPC's) own text and
    `status` the gRPC status string (e.g. "StatusCode.INVALID_ARGUMENT"), None when the failure
    is the client's finding (bad metadata, unexpected output)."""

    def __init__(
        self,
        message: str,
        *,
        server_message: str | None = None,
        status: str | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(message)
        self.server_message = server_message
        self.status = status
        self.model = model

    @property
    def code(self) -> str | None:
        """The bare gRPC code name, e.g. "UNAVAILABLE"."""
        return self.status.removeprefix("StatusCode.") if self.status else None


@dataclass(frozen=True)
class ModelInfo:
    """What the client needs to know about a served model, read from the server: its family's
    declaration (features, outputs, max_history) and the serving limits of its config."""

    name: str
    contract: SplitContract
    num_tasks: int  # columns of the scores: the first declared output, [N, T]
    task_names: tuple[str, ...]
    max_candidates: int | None = None
    # ranker_naive's memory bound, which its graph enforces: N x (min(L, max_history) + 1)^2
    # attention cells per request. The client splits a larger request into candidate slices.
    naive_max_work: int | None = None
    max_history: int | None = None
    inputs: tuple[str, ...] = ()  # every input the model takes (ranker_cached adds user_id)

    @property
    def needs_user_id(self) -> bool:
        return USER_ID in self.inputs

    @property
    def scores(self) -> Output:
        """The declared output that ranks the candidates: the first one."""
        return self.contract.outputs[0]

    def serves_history(self, history_length: int) -> bool:
        """Whether even one candidate fits naive_max_work at this history length (ranker_naive
        refuses it otherwise: a long history is beyond the oracle, not beyond the ranker)."""
        if not self.naive_max_work or not self.max_history:
            return True
        return (min(history_length, self.max_history) + 1) ** 2 <= self.naive_max_work

    def candidates_per_call(self, history_length: int) -> int | None:
        """Most candidates one call may carry under naive_max_work (None: no such bound)."""
        if not self.naive_max_work or not self.max_history:
            return None
        tokens = min(history_length, self.max_history) + 1
        return max(1, self.naive_max_work // (tokens * tokens))

    def task_index(self, task: str | int) -> int:
        """Column of `task` (a name or an index) in the scores; RankerError if unknown."""
        if isinstance(task, int) and not isinstance(task, bool):
            if 0 <= task < self.num_tasks:
                return task
        elif isinstance(task, str) and task in self.task_names:
            return self.task_names.index(task)
        raise RankerError(
            f"unknown task {task!r} for model {self.name!r}: tasks are "
            + ", ".join(f"{i}={n}" for i, n in enumerate(self.task_names)),
            model=self.name,
        )


class RankerClient:
    """Scores RankingRequests on a Triton server over gRPC.

    `timeout_s` bounds each RPC attempt; UNAVAILABLE answers (server starting, connection
    refused or dropped) are retried up to `retries` times with exponential backoff from
    `backoff_s`, each sleep capped at `max_backoff_s`: with the defaults a call rides through
    about 12 s of server outage (a local restart takes 5-10 s) and then gives up. With
    `validate`, requests are checked against the contract and the model's
    profile_dim before they are sent, so a bad request fails with a RequestError naming the
    tensor instead of an opaque server error.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        model: str = "ranker",
        timeout_s: float = 30.0,
        retries: int = 6,
        backoff_s: float = 0.25,
        validate: bool = True,
        max_backoff_s: float = 4.0,
    ) -> None:
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("timeout_s must be > 0; retries, backoff_s, max_backoff_s >= 0")
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.validate = validate
        self._client = grpcclient.InferenceServerClient(url=url)
        self._info: dict[str, ModelInfo] = {}
        self._closed = False

    # ------------------------------------------------------------------ plumbing
    def _call(
        self, what: str, fn: Callable[[], T], model: str | None = None, retry: bool = True
    ) -> T:
        """Run one RPC, retrying UNAVAILABLE with backoff, mapping failures to RankerError.

        gRPC reports connection failures (refused, reset, DNS) as UNAVAILABLE, so they are
        retried too."""
        if self._closed:
            raise RankerError(f"{what}: the client is closed", model=model)
        attempt = 0
        while True:
            try:
                return fn()
            except InferenceServerException as e:
                status = e.status()
                if retry and status in _RETRYABLE and attempt < self.retries \
                        and not _restricted(e):
                    time.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
                    attempt += 1
                    continue
                raise self._error(what, e, model, attempt) from None

    def _error(
        self, what: str, e: InferenceServerException, model: str | None, retried: int
    ) -> RankerError:
        status = e.status()
        text = " ".join(str(e.message() or "").split())  # one line, whatever the server sent
        target = f" for model {model!r}" if model else ""
        code = status.removeprefix("StatusCode.") if status else "ERROR"
        hint = ""
        if status in _UNREACHABLE and "connect" in text.lower():
            hint = " (is the server running and is the gRPC port right?)"
        tries = f" after {retried + 1} attempts" if retried else ""
        return RankerError(
            f"{what}{target} at {self.url} failed{tries}: [{code}] {text}{hint}",
            server_message=e.message(),
            status=status,
            model=model,
        )

    # ------------------------------------------------------------------ health
    def is_live(self) -> bool:
        """Server liveness. RankerError if the server cannot be reached (no retries, so that
        health checks answer quickly)."""
        return self._is_live(self.timeout_s)

    def is_ready(self, model: str | None = None) -> bool:
        """Server readiness (model None) or one model's readiness. RankerError if unreachable."""
        return self._is_ready(model, self.timeout_s)

    def _is_live(self, timeout_s: float) -> bool:
        return bool(self._call(
            "is_server_live", lambda: self._client.is_server_live(client_timeout=timeout_s),
            retry=False,
        ))

    def _is_ready(self, model: str | None, timeout_s: float) -> bool:
        if model is None:
            return bool(self._call(
                "is_server_ready",
                lambda: self._client.is_server_ready(client_timeout=timeout_s),
                retry=False,
            ))
        return bool(self._call(
            "is_model_ready",
            lambda: self._client.is_model_ready(model, client_timeout=timeout_s),
            model=model, retry=False,
        ))

    def wait_ready(self, models: list[str], timeout_s: float) -> None:
        """Poll until the server is live and every model in `models` is ready (the server
        itself when `models` is empty). RankerError saying what was still missing on timeout."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            # No single poll may outlive the deadline, whatever self.timeout_s is.
            call_timeout = max(0.05, min(self.timeout_s, deadline - time.monotonic()))
            try:
                if not self._is_live(call_timeout):
                    last = "server is not live"
                elif not models:
                    if self._is_ready(None, call_timeout):
                        return
                    last = "server is not ready"
                else:
                    pending = [m for m in models if not self._is_ready(m, call_timeout)]
                    if not pending:
                        return
                    last = "not ready: " + ", ".join(pending)
            except RankerError as e:
                last = str(e)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankerError(
                    f"Triton at {self.url} not ready after {timeout_s:g} s "
                    f"(waiting for {', '.join(models) or 'the server'}); last state: {last}"
                )
            time.sleep(min(0.5, remaining))

    def repository_index(self) -> list[dict[str, str]]:
        """Every model the server knows: name, version, state (READY, UNAVAILABLE, ...), reason
        (why it failed to load). For health reports."""
        index = self._call(
            "get_model_repository_index",
            lambda: self._client.get_model_repository_index(client_timeout=self.timeout_s),
        )
        return [
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in index.models
        ]

    # ------------------------------------------------------------------ model facts
    def model_info(self, model: str | None = None) -> ModelInfo:
        """The declaration and serving limits of `model`, read once from the server.

        The declaration is the config parameter `split_contract` (JSON, checked); every
        declared feature must be an input and every declared output an output of the model
        (metadata). The first declared output is the scores: [N, T], T its fixed dims (1 for
        [N]); task names come from the config parameter `task_names` (comma-separated), else
        task0, task1, ...
        """
        model = model or self.model
        if model in self._info:
            return self._info[model]
        meta = self._call(
            "get_model_metadata",
            lambda: self._client.get_model_metadata(model, client_timeout=self.timeout_s),
            model=model,
        )
        config = self._call(
            "get_model_config",
            lambda: self._client.get_model_config(model, client_timeout=self.timeout_s),
            model=model,
        ).config
        contract = _declaration(model, config, meta)
        num_tasks = math.prod(d for d in contract.outputs[0].dims[1:] if isinstance(d, int))
        names: tuple[str, ...] = tuple(f"task{i}" for i in range(num_tasks))
        if TASK_NAMES_PARAMETER in config.parameters:
            raw = config.parameters[TASK_NAMES_PARAMETER].string_value
            parsed = tuple(n.strip() for n in raw.split(",") if n.strip())
            if len(parsed) != num_tasks:
                raise RankerError(
                    f"model {model!r}: parameter {TASK_NAMES_PARAMETER}={raw!r} names "
                    f"{len(parsed)} tasks but the scores output has {num_tasks}", model=model,
                )
            names = parsed
        def int_parameter(key: str) -> int | None:
            value = config.parameters.get(key)
            return int(value.string_value) if value and value.string_value else None

        info = ModelInfo(model, contract, num_tasks, names,
                         int_parameter(MAX_CANDIDATES_PARAMETER),
                         int_parameter(NAIVE_MAX_WORK_PARAMETER),
                         int_parameter(MAX_HISTORY_PARAMETER) or contract.max_history,
                         tuple(t.name for t in meta.inputs))
        self._info[model] = info
        return info

    def inference_count(self, model: str | None = None) -> tuple[int, int]:
        """(inference_count, execution_count) of `model`, summed over its versions. Requests
        served vs model executions: equal without batching; an ensemble step that ran once
        per request proves the user history was encoded once."""
        model = model or self.model
        stats = self._call(
            "get_inference_statistics",
            lambda: self._client.get_inference_statistics(
                model_name=model, client_timeout=self.timeout_s
            ),
            model=model,
        )
        rows = [s for s in stats.model_stats if s.name == model]
        return sum(s.inference_count for s in rows), sum(s.execution_count for s in rows)

    # ------------------------------------------------------------------ scoring
    def request(self, values: Mapping[str, Any], model: str | None = None) -> RankingRequest:
        """A checked request for `model` from a feature dict (name -> numpy array or nested
        lists): each feature converted to the served declaration's dtype where no value
        changes, then validated (client.validation.build_request). RequestError naming the
        feature otherwise; nothing is sent."""
        info = self.model_info(model)
        return build_request(info.contract, values, now=int(time.time()),
                             max_candidates=info.max_candidates)

    def score(self, req: RequestLike, model: str | None = None,
              user_id: int | None = None) -> np.ndarray:
        """Scores float32 [N, T] of the request's candidates (rows in candidate order): the
        first declared output. `user_id` is for models that take one (ranker_cached: the key
        of the user K/V cache)."""
        return self.score_with_latency(req, model, user_id)[0]

    def infer(self, req: RequestLike, model: str | None = None,
              user_id: int | None = None) -> dict[str, np.ndarray]:
        """Every declared output of the model by name, each [N, ...] and checked against its
        declared dtype and dims."""
        return self._scored(req, model, user_id)[0]

    def score_cached(self, req: RequestLike, user_id: int, model: str = CACHED_MODEL
                     ) -> tuple[np.ndarray, str, float]:
        """(scores [N, T], the path user_cache took: "hit" / "append" / "miss", seconds) of one
        ranker_cached request: the path is the model's own per-request output `cache_path`."""
        outputs, latency, path = self._scored(req, model, user_id, with_path=True)
        return self._scores(outputs, model), str(path), latency

    def score_with_latency(
        self, req: RequestLike, model: str | None = None, user_id: int | None = None
    ) -> tuple[np.ndarray, float]:
        """(scores [N, T], seconds). The latency is that of the successful RPC alone: not the
        validation, not failed attempts or backoff sleeps.

        A model that declares a memory bound (`naive_max_work`, ranker_naive) gets the request
        in candidate slices that fit it, one call each (candidates never see each other, so the
        scores are the same); the latency is then the sum of the calls."""
        outputs, latency, _ = self._scored(req, model, user_id)
        return self._scores(outputs, model), latency

    def _scores(self, outputs: dict[str, np.ndarray], model: str | None) -> np.ndarray:
        info = self.model_info(model)
        scores = outputs[info.scores.name]
        return scores.reshape(scores.shape[0], info.num_tasks)

    def _scored(self, req: RequestLike, model: str | None, user_id: int | None,
                with_path: bool = False) -> tuple[dict[str, np.ndarray], float, str | None]:
        model = model or self.model
        info = self.model_info(model)
        if not isinstance(req, RankingRequest):
            req = self.request(req, model) if self.validate else RankingRequest(info.contract,
                                                                                req)
        elif self.validate:
            validate_request(req, info.contract, now=int(time.time()),
                             max_candidates=info.max_candidates)
        if self.validate:
            _check_user_id(user_id, info)
        per_call = info.candidates_per_call(req.history_length)
        n = req.num_candidates
        if per_call is None or n <= per_call:
            return self._infer(req, info, user_id, with_path)
        parts = [self._infer(req.candidates(s, s + per_call), info, user_id, with_path)
                 for s in range(0, n, per_call)]
        outputs = {name: np.concatenate([p[0][name] for p in parts]) for name in parts[0][0]}
        return outputs, sum(p[1] for p in parts), parts[-1][2]

    def _infer(
        self, req: RankingRequest, info: ModelInfo, user_id: int | None = None,
        with_path: bool = False,
    ) -> tuple[dict[str, np.ndarray], float, str | None]:
        """One RPC: (the declared outputs, seconds, cache_path when `with_path`), each output
        checked against the request. A user id travels twice: as the `user_id` tensor (the
        cache's key) and as the USER_ID_HEADER metadata that a balancer in front of several
        replicas routes on."""
        model = info.name
        inputs = []
        tensors = req.as_inputs()
        dtypes = {f.name: f.dtype for f in req.layout}
        headers = None
        if user_id is not None:
            tensors[USER_ID] = np.array([user_id], dtype=np.int64)
            dtypes[USER_ID] = "INT64"
            headers = {USER_ID_HEADER: str(int(user_id))}
        for name, array in tensors.items():
            infer_input = grpcclient.InferInput(name, list(array.shape), dtypes[name])
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        declared = info.contract.outputs
        outputs = [grpcclient.InferRequestedOutput(name) for name in
                   (*(o.name for o in declared), *((CACHE_PATH,) if with_path else ()))]

        def infer() -> tuple[grpcclient.InferResult, float]:
            start = time.perf_counter()
            result = self._client.infer(
                model, inputs, outputs=outputs, client_timeout=self.timeout_s, headers=headers
            )
            return result, time.perf_counter() - start

        result, latency = self._call("infer", infer, model=model)
        values = {o.name: _output(result, o, req.num_candidates, model) for o in declared}
        if not with_path:
            return values, latency, None
        path = result.as_numpy(CACHE_PATH)
        if path is None or path.size != 1:
            raise RankerError(f"model {model!r} returned no {CACHE_PATH!r} output", model=model)
        return values, latency, path.reshape(-1)[0].decode()

    def rank(
        self, req: RequestLike, task: str | int = 0, model: str | None = None
    ) -> list[tuple[int, float]]:
        """(candidate id, score of `task`) best first; ties keep candidate order. The id is
        the candidate feature with role "item" (else the first candidate feature)."""
        model = model or self.model
        info = self.model_info(model)
        column = info.task_index(task)
        if not isinstance(req, RankingRequest):
            req = self.request(req, model)
        scores = self.score(req, model)[:, column]
        order = np.argsort(-scores, kind="stable")
        ids = req.candidate_ids
        return [(int(ids[i]), float(scores[i])) for i in order]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the gRPC channel; later calls raise RankerError. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._client.close()

    def __enter__(self) -> RankerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _restricted(e: InferenceServerException) -> bool:
    """Triton 2.51 answers a protocol restricted by the production command (deploy.production)
    with UNAVAILABLE; asking again cannot help."""
    return "protocol is restricted" in str(e.message() or "")


def _check_user_id(user_id: int | None, info: ModelInfo) -> None:
    """A user_id where the model takes one, an int64, and none where it does not."""
    if user_id is None:
        if info.needs_user_id:
            raise RequestError(f"{USER_ID}: model {info.name!r} needs a user id (the key of its "
                               f"user K/V cache)")
        return
    if not info.needs_user_id:
        raise RequestError(f"{USER_ID}: model {info.name!r} takes no user id")
    if isinstance(user_id, bool) or not isinstance(user_id, int | np.integer):
        raise RequestError(f"{USER_ID}: expected an integer, got {user_id!r}")
    if not INT64_MIN <= int(user_id) <= INT64_MAX:
        raise RequestError(f"{USER_ID}: {user_id} is outside the int64 range")


def _declaration(model: str, config: Any, meta: Any) -> SplitContract:
    """The family's declaration from the model's config, checked against its metadata."""
    parameter = config.parameters.get(CONTRACT_PARAMETER)
    if parameter is None or not parameter.string_value:
        raise RankerError(
            f"model {model!r} carries no {CONTRACT_PARAMETER!r} parameter (the family's "
            "declaration): is it a ranker (ranker, ranker_cached, ranker_naive, ranker_base), "
            "exported by this project's export?", model=model)
    try:
        contract = contract_from_json(parameter.string_value)
    except ContractError as e:
        raise RankerError(f"model {model!r}: its {CONTRACT_PARAMETER!r} parameter is not a "
                          f"valid declaration: {e}", model=model) from None
    for kind, declared, served in (
            ("input", [f.name for f in contract.features], [t.name for t in meta.inputs]),
            ("output", [o.name for o in contract.outputs], [t.name for t in meta.outputs])):
        missing = [n for n in declared if n not in served]
        if missing:
            raise RankerError(
                f"model {model!r}: declared {kind}(s) {', '.join(missing)} are not among its "
                f"{kind}s ({', '.join(served) or 'none'}): the declaration does not describe "
                "the served model", model=model)
    return contract


def _output(result: grpcclient.InferResult, output: Output, n: int, model: str) -> np.ndarray:
    """One declared output of a response, checked: its dtype, N rows, its fixed dims."""
    try:
        value = result.as_numpy(output.name)
    except ValueError as e:  # payload size does not match the declared shape
        raise RankerError(
            f"model {model!r} returned a malformed {output.name!r} output: {e}", model=model
        ) from None
    if value is None:
        raise RankerError(f"model {model!r} returned no {output.name!r} output", model=model)
    want = (n, *output.dims[1:])
    if value.dtype != NUMPY_DTYPES[output.dtype] or value.shape != want:
        raise RankerError(
            f"model {model!r} returned {output.name} {value.dtype} {list(value.shape)}, "
            f"expected {NUMPY_DTYPES[output.dtype]} {list(want)}", model=model,
        )
    return value
