"""The trainer's data: tokens in, global batches out.

- :mod:`train.data.inputs`: what the trainer calls (``load_tokenizer``, ``make_datasets``: this
  process's train and eval datasets, ``global_batch``);
- :mod:`train.data.pipeline`: ``make_dataset`` for a ``--data`` spec, ``seek``; the batch layout;
- the sources: :mod:`train.data.text` (``embedded`` and ``text:``), :mod:`train.data.jsonl`,
  :mod:`train.data.tfds`;
- :mod:`train.data.corpus` (the offline corpus and its held-out split) and
  :mod:`train.data.tokenizer` (SentencePiece).

Importing this package imports nothing else: grain is imported by the pipeline modules only
(it is not installed on every Python, see pyproject.toml).
"""
