"""The target runtime: copied to a device as it is, importable in the package as ``edgedistill.target``."""
