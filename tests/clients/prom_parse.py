"""Parses Prometheus text exposition format (0.0.4) from stdin with the Prometheus project's own
Python client (`prometheus_client.parser`), which raises on malformed input.

Prints one JSON object: {"families": [{"name", "type"}], "samples": [[name, labels, value]]}.
Exits non-zero, with the parser's message on stderr, when the text does not parse.
"""
import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    families, samples = [], []
    try:
        for fam in text_string_to_metric_families(text):
            families.append({"name": fam.name, "type": fam.type})
            for s in fam.samples:
                v = s.value
                samples.append([s.name, s.labels, v if math.isfinite(v) else str(v)])
    except Exception as e:  # the parser raises ValueError and friends on bad lines
        print(f"does not parse: {e!r}", file=sys.stderr)
        return 1
    json.dump({"families": families, "samples": samples}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
