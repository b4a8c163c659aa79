"""A run's generated data, out of distill: exports in the formats other trainers read
(``distill data export``) and a self-contained page to inspect every row (``distill data inspect``)."""
