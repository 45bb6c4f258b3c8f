"""``dispynb.logger``: the package's logger, with dispy's level attributes.

dispy programs pass ``loglevel=dispy.logger.DEBUG`` and call ``dispy.logger.info``;
this is the standard ``logging`` logger named ``dispynb`` with those attributes added.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("dispynb")
for _level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    setattr(logger, _level, getattr(logging, _level))
