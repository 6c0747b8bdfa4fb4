"""Evaluation of base models and adapters: arithmetic accuracy and HumanEval pass@k.

* :mod:`comol.evaluation.math`: arithmetic accuracy (package: answers, data, scoring, tables).
* :mod:`comol.evaluation.code`: HumanEval problems, the unbiased pass@k estimator, scoring.
* :mod:`comol.evaluation.sandbox`: isolated, resource-limited execution of model-written programs.
* :mod:`comol.evaluation.generation`: model (+ adapter) loading and batched left-padded generation.
* result files are written atomically with :mod:`comol.files`.
* :mod:`comol.evaluation.runner`: whole runs (load, generate or read, score, write) behind `comol eval`.
* :mod:`comol.evaluation.harness`: lm-evaluation-harness on a base model + comol adapter (`comol eval harness`).

Submodules are imported on demand so that importing this package stays light.
"""
