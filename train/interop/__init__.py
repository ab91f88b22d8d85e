"""Other formats than this trainer's own: :mod:`train.interop.hf` maps the params to and from a
Hugging Face transformers ``LlamaForCausalLM`` directory (``python -m train.export`` and
``--init-from``)."""
