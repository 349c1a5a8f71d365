"""The production path of a trained run: export → recommend → serve.

- `fedmarket.serving.models`: the selected round's model of each market, written by the in-process runtime
  to ``models/seed<N>/<market>.safetensors`` (weights + the feature tables the model reads, no optimizer),
  and rebuilt from such a file without the trainer.
- `fedmarket.serving.export`: a self-contained folder per market (weights, spec, ID maps, feature tables,
  train history, config, model card) that loads without the run folder, the data or pickle.
- `fedmarket.serving.recommender`: top-K over the market's catalog and pair scoring from an export.
- `fedmarket.serving.app`: the same over HTTP (FastAPI).
"""
