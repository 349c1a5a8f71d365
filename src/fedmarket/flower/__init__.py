"""Running fedmarket methods on Flower 1.41 (Message API), unchanged.

- `records`: payload ↔ ``ArrayRecord`` (1:1) and the small JSON envelope every message carries.
- `client`: the ClientApp side. One SuperNode = one market, chosen by node config (``market=de``) or, in
  simulation, by ``partition-id`` into the experiment's market list. It loads only its own market's data and
  runs the method's own `ClientTrainer`.
- `server`: the ServerApp side. It drives the method's own `Strategy` with the same round bookkeeping as the
  in-process `Simulator` (shared functions in `fedmarket.federation.runtime`) and writes the same run folder.
- `app`: the ``ClientApp`` / ``ServerApp`` objects named in ``[tool.flwr.app.components]``.
- `launch`: start a SuperLink and one SuperNode per market on 127.0.0.1 (optionally with TLS), submit the
  run with ``flwr run``, stop exactly the processes it started.
"""
