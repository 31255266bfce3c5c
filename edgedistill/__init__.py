"""edgedistill: distil large pretrained vision models into small, fast, domain-specific students for edge devices."""
__version__ = "0.1.0"
