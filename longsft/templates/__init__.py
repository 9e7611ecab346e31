"""Stage 2, templates: how a conversation becomes tokens and supervised labels, one module per template family
(glm.py, llama.py, longalign.py, auto.py), on the shared base (base.py), looked up by name (registry.py) through
the one registry of families and templates, patch/families.py. No torch is imported."""
