"""The engines that run a `JobCluster`'s jobs, behind one seam (`backends.base`).

``nodes``: dispynb's own node servers (the default); ``dask`` and ``ray``: an existing
Dask or Ray cluster. `dispynb.backends.base` defines what an engine provides.
"""
