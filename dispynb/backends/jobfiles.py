"""Files that jobs send their client (``dispy_send_file``) through an engine that
hands them over whole (Dask, Ray): saved under the cluster's ``files_dir``."""

from __future__ import annotations

import logging
import os

from dispynb.errors import DispynbError
from dispynb.protocol.files import write_inside


def save_job_file(
    files_dir: str | None,
    key: int,
    path: str,
    data: bytes,
    *,
    logger: logging.Logger,
) -> None:
    """Save the file job ``key`` sent as ``path`` under ``files_dir`` (the working
    directory if None). A file that cannot be saved (a path leaving the folder, a full
    disk) is logged on the engine's ``logger``, never raised: the job goes on."""
    base_dir = files_dir or os.getcwd()
    try:
        saved = write_inside(base_dir, path, memoryview(data))
    except (DispynbError, OSError) as exc:
        logger.warning("file %r from job %d not saved: %s", path, key, exc)
        return
    logger.info("saved %s from job %d", saved, key)
