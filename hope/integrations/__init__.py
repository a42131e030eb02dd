"""Integrations with other libraries; each is optional and imports its library only when used.

- :mod:`hope.integrations.hf`: HOPE memory layers inside a frozen Hugging Face causal LM (``pip install 'hope[hf]'``).
"""
