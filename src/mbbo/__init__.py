"""mbbo: stochastic multi-block bilevel optimisation on PyTorch."""

__version__ = "0.1.0"
