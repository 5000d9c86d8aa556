"""Tools over converted models: ``explain`` (what ran in which precision, and why), ``check``
(measured precision advice against float64), ``memory`` (bytes kept for backward) and
``debug`` (documented accessors of internal state, for tests and investigations)."""
