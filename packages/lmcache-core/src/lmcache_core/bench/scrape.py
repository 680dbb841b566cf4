"""A Prometheus ``/metrics`` page read back: lmcache's own exporter, or vLLM's (which
carries lmcache's metrics through the connector stats API).

Load tools read hit rates from it; tests read the counters they check.
"""

from __future__ import annotations


def scrape_samples(
    url: str, prefixes: tuple[str, ...] = ("lmcache:",)
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each sample of the metrics named with ``prefixes`` on a ``/metrics`` page, by name and
    labels (sorted; a ``rank`` label left out, so ranks add up).

    Counters read under their family name (``lmcache:num_hit_tokens``, not
    ``..._total``); a histogram gives ``<name>_count`` and ``<name>_sum``.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefixes):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            name = family.name if sample.name == f"{family.name}_total" else sample.name
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "rank"))
            out[(name, labels)] = out.get((name, labels), 0.0) + float(sample.value)
    return out


def scrape_metrics(url: str, prefix: str = "lmcache:") -> dict[str, float]:
    """Sum each ``lmcache:*`` metric over its labels (ranks, tiers) from a ``/metrics`` page.

    Works on lmcache's exporter and on vLLM's ``/metrics`` alike (see
    :func:`scrape_samples`).
    """
    out: dict[str, float] = {}
    for (name, _), v in scrape_samples(url, (prefix,)).items():
        out[name] = out.get(name, 0.0) + v
    return out
