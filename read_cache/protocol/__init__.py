"""The paper's protocol on top of stage one and two: `search` (the Bayesian learning-rate search over
architectures and seeds) and `glue` (every task's cache, search and selection, laid out as Table 1)."""
