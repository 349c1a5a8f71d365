"""``fedmarket serve``: one market's export over HTTP (FastAPI + uvicorn).

- ``GET /health``: market, family, catalog size;
- ``GET /card``: the model card (``card.json``);
- ``GET /recommend?user=U&k=10&exclude_history=false``: top-K over the catalog (popularity for an unknown user);
- ``POST /score`` ``{"pairs": [{"user": U, "item": I}, ...]}`` (or ``[[U, I], ...]``): one score per pair.

Multi-task exports take ``task=ctr|ctcvr`` (query parameter; in the ``/score`` body) and default to ``ctr``.

Bad input is a 4xx JSON body ``{"error": "<one line>"}``: 422 for a malformed request or k out of range,
404 for an unknown item. Scoring holds a lock: torch modules are not meant to be called from several
threads at once, and one request is a few milliseconds.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

from fedmarket.serving.recommender import MAX_K, Recommender, ServingInputError

MAX_PAIRS = 10_000


def create_app(recommender: Recommender):
    from fastapi import Body, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title=f"fedmarket: {recommender.spec.get('method')} on {recommender.market}")
    lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(status_code=422, content={"error": "; ".join(parts)})

    @app.exception_handler(ServingInputError)
    async def _bad_input(request: Request, exc: ServingInputError) -> JSONResponse:
        status = 404 if str(exc).startswith("unknown item") else 422
        return JSONResponse(status_code=status, content={"error": str(exc)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "market": recommender.market,
            "family": recommender.family,
            "method": recommender.spec.get("method"),
            "users": len(recommender.user_ids),
            "catalog_items": recommender.num_catalog,
        }

    @app.get("/card")
    def card() -> dict[str, Any]:
        return recommender.card

    @app.get("/recommend")
    def recommend(
        user: str = Query(..., min_length=1),
        k: int = Query(10, ge=1, le=MAX_K),
        exclude_history: bool = False,
        task: str | None = None,
    ) -> dict[str, Any]:
        with lock, _task(recommender, task):
            frame = recommender.recommend([user], k, exclude_history)
        source = frame["source"].iloc[0] if len(frame) else "model"
        items = [
            {"rank": int(r), "item": i, "score": float(s)}
            for r, i, s in zip(frame["rank"], frame["item"], frame["score"], strict=True)
        ]
        return {"user": user, "k": k, "source": source, "items": items}

    @app.post("/score")
    def score(body: Any = Body(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI reads the default)
        pairs = _pairs(body)
        task = body.get("task") if isinstance(body, dict) else None
        with lock, _task(recommender, task):
            frame = recommender.score(pairs)
        return {"scores": frame.to_dict(orient="records")}

    return app


@contextmanager
def _task(recommender: Recommender, task: str | None):
    """``task`` for one request (multi-task exports), the default restored afterwards."""
    before = recommender.task
    try:
        if task is not None:
            recommender.check_task(task)
        yield
    finally:
        recommender.task = before


def _pairs(body: Any) -> list[tuple[str, str]]:
    """``{"pairs": [...]}`` of ``{"user", "item"}`` objects or ``[user, item]`` lists (or the list alone)."""
    if isinstance(body, str | bytes):
        raise ServingInputError("the body must be JSON (Content-Type: application/json)")
    raw = body.get("pairs") if isinstance(body, dict) else body
    if not isinstance(raw, list) or not raw:
        raise ServingInputError(
            'the body must be {"pairs": [{"user": U, "item": I}, ...]} with at least one pair'
        )
    if len(raw) > MAX_PAIRS:
        raise ServingInputError(f"at most {MAX_PAIRS} pairs per request, got {len(raw)}")
    pairs = []
    for n, p in enumerate(raw):
        if isinstance(p, dict) and "user" in p and "item" in p:
            pairs.append((str(p["user"]), str(p["item"])))
        elif isinstance(p, list | tuple) and len(p) == 2:
            pairs.append((str(p[0]), str(p[1])))
        else:
            raise ServingInputError(f'pairs[{n}] must be {{"user": U, "item": I}} or [U, I], got {p!r}'[:200])
    return pairs


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, threads: int = 1) -> None:
    import torch
    import uvicorn

    torch.set_num_threads(threads)
    recommender = Recommender(folder)
    print(
        f"serving {recommender.spec.get('method')} ({recommender.family}) for market {recommender.market} "
        f"on http://{host}:{port} (catalog: {recommender.num_catalog} items)",
        flush=True,
    )
    uvicorn.run(create_app(recommender), host=host, port=port, log_level="warning", ws="none")
