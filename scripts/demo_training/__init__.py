"""The pieces of ``scripts/train_demo.py``, the command that reproduces kvprune's demo model.

``common``       constants shared by every phase (special token ids, task weights, held-out seed) and ``log``
``tokenizer``    the SentencePiece BPE tokenizer of the task language, converted to a fast tokenizer
``data``         training rows (task documents, copy, phrase and fact rows) and batches
``supervision``  the attention-supervision targets and loss used during training only
``evaluation``   held-out documents and exact-match measurement (teacher-forced and with ``generate``)
``model``        the Llama configuration, checkpoints, growing a model from an exported one
``training``     the curriculum, learning-rate schedule and the resumable training loop
``card``         the model card template
``export``       ``save_pretrained``, the final evaluation and the model card

Run it through ``python scripts/train_demo.py``; that script holds the command line.
"""
