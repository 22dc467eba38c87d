"""The ack baseline: a bare Starlette app that reads the body, computes the same Standard
Webhooks HMAC as the worker (`app.signing.Verifier`) and answers 202, under the same uvicorn
settings as `app.main.serve`.

    python -m bench.bare_app --port P
"""

from __future__ import annotations

import argparse
import os
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.errors import SignatureError
from app.signing import Verifier

verifier = Verifier.from_secrets(os.environ["WEBHOOK_SECRETS"].split(","), 300)


async def webhooks(request: Request) -> Response:
    body = await request.body()
    try:
        verifier.verify(request.headers, body, now_s=time.time())
    except SignatureError as exc:
        return JSONResponse({"detail": exc.reason}, status_code=401)
    return JSONResponse({"status": "accepted"}, status_code=202)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/v1/webhooks", webhooks, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    config = uvicorn.Config(  # the same settings as app.main.serve
        app,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
