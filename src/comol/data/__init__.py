"""Data: prompt templates, dataset loading and tokenisation, and the offline arithmetic generator."""
