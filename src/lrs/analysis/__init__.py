"""Post-hoc analyses of evaluation results (issue 11): what steering changed, where, and how.

Each analysis reads the JSONL files ``lrs eval`` writes and is reachable as ``lrs analyze <name>``.
"""
