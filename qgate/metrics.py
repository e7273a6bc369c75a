"""How corpus-level metrics are kept per sample: the weight each document carries in the aggregate.

Perplexity-like metrics are re-aggregated from per-document (loglikelihood, weight) pairs rather than
averaged; evaluation stores the weight under this name and the decision engine reads it back.
"""

from __future__ import annotations

CORPUS_WEIGHTS = {"word_perplexity": "words", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}
