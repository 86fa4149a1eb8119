"""Evaluation: retrieval metrics over an index (``retrieval``) and zero-shot classification (``zeroshot``)."""
