"""One module per model dataflow (llama.py, bert.py, ...); shared pieces in base.py."""
