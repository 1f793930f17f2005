"""The floor of a call's server CPU: a grpc.aio translator.v1 server that answers every Translate with a fixed
text (no model, no checks, no metrics), on 127.0.0.1:18101 (docs/decisions/serving-cpu.md):

    docs/experiments/server_tree_cpu.sh floor -- .venv/bin/python docs/experiments/grpc_floor.py

With `refuse` it refuses every call at once (RESOURCE_EXHAUSTED), the floor of a refusal's latency
(docs/decisions/refusals.md):

    .venv/bin/python docs/experiments/grpc_floor.py refuse &
    .venv/bin/python docs/experiments/refusal_latency.py 127.0.0.1:18101 500 10 8
"""

import asyncio
import json
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.api.translator.v1 import translator_pb2 as pb  # noqa: E402
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc  # noqa: E402

REFUSE = sys.argv[1:] == ["refuse"]


class FixedAnswer(pb_grpc.TranslatorServicer):
    async def Translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranslateResponse:
        if REFUSE:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls")
        translation = pb.Translation(text="el perro", target_tokens=["el", "perro"])
        return pb.TranslateResponse(translations=[translation for _ in request.texts])


async def main() -> None:
    server = grpc.aio.server()
    pb_grpc.add_TranslatorServicer_to_server(FixedAnswer(), server)
    server.add_insecure_port("127.0.0.1:18101")
    await server.start()
    print(json.dumps({"message": "ready"}), flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
