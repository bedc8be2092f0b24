"""Bridges to the tools users already run (issue 12): lm-eval, pretrained SAE libraries, launchers."""
