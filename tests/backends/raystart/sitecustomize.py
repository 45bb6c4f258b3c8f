"""Run first by every Python process of the tests' Ray clusters (`tests/backends/
rayhead.py` puts this directory first on their ``PYTHONPATH``).

Ray imports jsonschema in each of its processes (its runtime_env plugin schemas),
and jsonschema imports its optional IRI format checker ``rfc3987_syntax``, which
builds some 35 Earley parsers as it is imported: 1.1 of the 1.8 s of CPU that
starting a dashboard agent takes here (python-jsonschema/jsonschema#1428). Ray
checks no IRI. On a loaded machine that CPU was the difference between a dashboard
agent writing its ports within the raylet's fixed 15 s and the raylet aborting
("Timed out waiting for file ... metrics_agent_port"), the node lost. Marked
missing, it is not imported: jsonschema goes without that checker, as where the
package is not installed.
"""

import sys

sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[assignment]
