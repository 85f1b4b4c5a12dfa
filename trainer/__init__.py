"""The parts of training, one module per concern, over ``model/`` and ``data/``:

    config.py       the run's configuration dataclasses, their checks, the model they build
    distributed.py  device, precision, process group, DDP/FSDP2 wrapping, collectives
    prepare.py      everything before the first step: folder, data, tokenizer, model, loader
    loop.py         ``train(cfg)``: the training loop and its side jobs
    optim.py        optimizer and learning-rate schedule
    schedule.py     how long a run trains: the plan fitted to --time-budget
    keep.py         which weights the run folder keeps: the last, unless clearly beaten
    patience.py     --patience: stop early, after a short learning-rate decay
    lock.py         one writer per run folder (flock on RUN/.lock)
    checkpoint.py   atomic run-folder checkpoints (plain and sharded), safe loading
    metrics.py      metrics.jsonl, TensorBoard, progress, curves, summary.json
    evaluate.py     the one held-out evaluator, rank-aware
    samples.py      the fill-masks and summaries a command run ends with (samples.json)
    init_from.py    --init-from: a new run from another run's weights and tokenizer
    plot.py         training_curves.png from metrics.jsonl
    cli.py          the ``minituring`` command for trained runs
    errors.py       ``TrainingError``

``train.py`` beside this package is the user's command: flags -> ``TrainConfig`` -> ``train``.
"""
