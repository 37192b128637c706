"""relayquant's pure library: configs, adapters, storage, calibration, formats, methods,
evaluation. Never imports ray."""

__version__ = "0.1.0"
