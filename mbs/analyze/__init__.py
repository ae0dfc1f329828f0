"""Analyses that reuse the engine's per-language statistics and a sweep's results: language similarity
(``similarity``) and what predicts how much of each language a compressed model retains (``retention``)."""
