"""Fetches a /metrics page and parses it with PyPI's prometheus-client
(an independent parser of the Prometheus text format).

    metrics_check.py --check   prints VERSIONS prometheus-client=X and exits
    metrics_check.py URL       prints one line per sample:
                               SAMPLE NAME LABEL=VALUE,... VALUE
"""

import sys
import urllib.request
from importlib.metadata import version

from prometheus_client.parser import text_string_to_metric_families


def main():
    if sys.argv[1:] == ["--check"]:
        print(f"VERSIONS prometheus-client={version('prometheus-client')}")
        return
    with urllib.request.urlopen(sys.argv[1], timeout=10) as page:
        kind = page.headers.get("Content-Type", "")
        assert kind.startswith("text/plain; version=0.0.4"), kind
        text = page.read().decode("utf-8")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            value = int(s.value) if float(s.value).is_integer() else s.value
            print(f"SAMPLE {s.name} {labels} {value}")


if __name__ == "__main__":
    main()
