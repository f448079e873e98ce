"""ProactiveLLM: `train` (random monotone masks + SPSD), `heads` (entropy / attention / probe decision heads and
adaptive decoding), `subword` (any tokenizer: training on your corpus, probe rows,
decisions at word starts), `bench`, `demo`.

The zoo recipes stay in brisklm.streaming.proactive_zoo: a recipe's train function's module is part of its zoo
fingerprint, so moving it would retrain every cached proactive model.
"""
