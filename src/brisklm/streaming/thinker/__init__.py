"""StreamingThinker (reason while reading): `data` (traces, layouts, batches), `train` (sentence-level streaming
mask), `session` (ThinkerSession: input and reasoning caches), `text` (any checkpoint, your JSONL data, a
batched TextThinkerSession), `cli` (`brisk think`, `brisk think train`), `bench`, `demo`.

The zoo recipes stay in brisklm.streaming.thinker_zoo: a recipe's train function's module is part of its zoo
fingerprint, so moving it would retrain every cached thinker model.
"""
