"""Bridges to the tools users already run (issue 12); each needs its optional extra, imported on use.

- :mod:`lrs.integrations.lm_eval`: lm-eval model ``lrs`` (``HFLM`` with steering in ``generate_until``);
  ``python -m lrs.integrations.lm_eval`` runs lm-eval's CLI with it registered (extra ``lmeval``)
- :mod:`lrs.integrations.saes`: ``lrs import-encoder`` for SAELens and sparsify SAEs (extras ``saelens``,
  ``sparsify``), with the hook layer checked against the SAE's metadata
- :mod:`lrs.integrations.control_vectors`: ``lrs export-vectors`` / ``import-vectors``, steering vectors as
  GGUF control vectors (llama.cpp ``--control-vector``, repeng), and steering-vectors objects
- :mod:`lrs.integrations.cli`: adds those ``lrs`` sub-commands

See ``docs/integrations.md``.
"""
