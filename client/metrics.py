"""The user K/V cache's counters, read from Triton's Prometheus metrics endpoint.

user_cache (model_repository/user_cache/1/model.py) publishes them as python-backend custom
metrics: `user_cache_requests_total{path="hit"|"append"|"miss"}`, `user_cache_evictions_total`,
`user_cache_bytes`, `user_cache_users`, `user_cache_capacity_bytes`. This is where an operator's
Prometheus scrapes them too, so the CLI reads the same numbers instead of a side channel. The page
is fetched with urllib and parsed with prometheus_client's text-format parser.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


class MetricsError(RuntimeError):
    """The metrics endpoint could not be read, or holds no user_cache metrics."""


@dataclass(frozen=True)
class CacheStats:
    hits: int
    appends: int
    misses: int
    evictions: int
    bytes_held: int
    users: int
    capacity_bytes: int

    @property
    def requests(self) -> int:
        return self.hits + self.appends + self.misses

    @property
    def reuse_rate(self) -> float:
        """Share of requests that ran no full encode (hits and appends)."""
        return (self.hits + self.appends) / self.requests if self.requests else 0.0


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus text format."""
    try:
        return [(sample.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(text) for sample in family.samples]
    except ValueError as e:
        raise MetricsError(f"not a Prometheus text page: {e}") from None


def cache_stats(text: str, model: str = "user_cache") -> CacheStats:
    """The counters of `model` in a metrics page (summed over versions)."""
    values: dict[str, float] = {}
    for name, labels, value in parse_samples(text):
        if not name.startswith("user_cache_") or labels.get("model") != model:
            continue
        key = f"{name}:{labels['path']}" if "path" in labels else name
        values[key] = values.get(key, 0.0) + value
    if not values:
        raise MetricsError(f"no user_cache metrics for model {model!r} (is ranker_cached served, "
                           f"and the server started with metrics on?)")
    def get(key: str) -> int:
        return int(values.get(key, 0.0))

    return CacheStats(
        hits=get("user_cache_requests_total:hit"), appends=get("user_cache_requests_total:append"),
        misses=get("user_cache_requests_total:miss"), evictions=get("user_cache_evictions_total"),
        bytes_held=get("user_cache_bytes"), users=get("user_cache_users"),
        capacity_bytes=get("user_cache_capacity_bytes"),
    )


def fetch_cache_stats(metrics_url: str, model: str = "user_cache",
                      timeout_s: float = 10.0) -> CacheStats:
    """Read `metrics_url` (e.g. http://127.0.0.1:8002/metrics) and return the cache counters."""
    url = metrics_url if "://" in metrics_url else f"http://{metrics_url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError as e:
        raise MetricsError(f"cannot read {url}: {e} (start the server with --metrics-port)") \
            from None
    return cache_stats(text, model)
