"""Remote tracebacks that point at the notebook cell the code came from: the core's
`dispynb.tracebacks`, which names a cell ``Cell In[3]`` when IPython runs."""

from __future__ import annotations

from dispynb.tracebacks import DYNAMIC_CODE, SourceMap, rerender_traceback

__all__ = ["DYNAMIC_CODE", "SourceMap", "rerender_traceback"]
