"""dmoe.lm: the application: a byte-level MoE language model trained and run through the swarm.

- ``config.py``     LMConfig, TrainConfig, InferConfig (torch-free: the CLI reads them without torch)
- ``model.py``      MoELM: a transformer whose feed-forward sublayers are MoE layers
- ``data.py``       ByteCorpus: byte-level text (a file, a folder, or Python's standard library)
- ``train.py``      Trainer: ``dmoe train`` (checkpoints, evaluation, metrics)
- ``averaging.py``  ParameterAverager: trainers of one run average their client-side parameters
- ``infer.py``      load_model, generate: ``dmoe infer``
"""
