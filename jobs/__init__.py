"""Entry points: the `relayquant` CLI, `python -m jobs.quantize`, and the YAML recipes."""
