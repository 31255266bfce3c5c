"""The target runtime: copied to a device as it is. The library reaches this folder as ``edgedistill.runtime``
(see edgedistill/runtime/__init__.py)."""
